"""Bounded response schemas: what a judge reply may look like, and the check that it does.

* `bounded_schema`: every string gets ``maxLength = max_chars``, every array ``maxItems = max_items``; the
  ``statements``/``claims`` arrays get ``minItems 1`` (ragas 0.4.3's Faithfulness is NaN on an empty list and
  its AnswerCorrectness scores empty lists as a perfect match) and ``verdict`` is restricted to {0, 1}; objects
  get ``additionalProperties: false`` (an extra key is out of schema, and OpenAI's ``strict`` json_schema mode
  requires it). Without the bounds a random model writes ``"verdict": 6666...`` forever.
* `schema_violation`: every reply, fresh or cached, is checked against the bounded schema itself (jsonschema:
  minItems, maxItems, maxLength, verdict in {0, 1}), not only parsed into ragas's pydantic model, which accepts
  an empty statement list, a verdict of 7 or a 5,000-character string; a server that ignores
  ``response_format`` is caught here.

jsonschema is imported on first use.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

BOUNDED_ARRAYS_MIN1 = ("statements", "claims")


def bounded_schema(schema: dict, max_chars: int, max_items: int) -> dict:
    """A copy of JSON schema `schema` whose strings, arrays and verdicts are bounded (see the module docstring).

    `max_chars` bounds every string (characters), `max_items` every array (items); the input is not modified.
    """
    out = copy.deepcopy(schema)

    def walk(node: Any, name: Optional[str] = None) -> None:
        if isinstance(node, list):
            for n in node:
                walk(n, name)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind == "string" and "enum" not in node:
            node["maxLength"] = min(node.get("maxLength", max_chars), max_chars)
        elif kind == "array":
            node["maxItems"] = min(node.get("maxItems", max_items), max_items)
            if name in BOUNDED_ARRAYS_MIN1:
                node["minItems"] = max(node.get("minItems", 0), 1)
        elif kind == "integer" and name == "verdict":
            node["enum"] = [0, 1]
        elif kind == "object" and "properties" in node:
            node["additionalProperties"] = False  # a key the model does not define is out of schema
        for key, sub in node.get("properties", {}).items():
            walk(sub, key)
        if "items" in node:
            walk(node["items"], name)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                walk(node[key], name)
        for sub in node.get("$defs", {}).values():
            walk(sub)

    walk(out)
    return out


def schema_json(schema: dict) -> str:
    """`schema` as canonical JSON text (sorted keys, no spaces): the key of a compiled grammar."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def schema_violation(obj: Any, schema: dict) -> Optional[str]:
    """None when `obj` satisfies the (bounded) JSON schema, else the first violation in one line (jsonschema)."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(obj))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{where}: {error.message[:160]}"


"""The one way models are loaded: a local checkpoint or a hub id at a pinned revision.

Safetensors only (no pickle), and `trust_remote_code` only when params say so. A checkpoint folder
may hold the weights, or a `hub.json` pointer {"hub": id, "revision": sha, "chat_template": name}
that the paper profile's base_models stage writes instead of copying 7B weights.
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelLoadError(ValueError):
    pass


def _resolve(source: str, revision: str | None) -> tuple[str, str | None, str | None]:
    """(what to pass to from_pretrained, revision, chat template name or None)."""
    p = Path(source)
    if p.is_dir():
        pointer = p / "hub.json"
        if pointer.exists():
            ref = json.loads(pointer.read_text())
            return ref["hub"], ref["revision"], ref.get("chat_template")
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: no config.json: not a checkpoint folder (run its producing stage: dvc repro)")
        if not list(p.glob("*.safetensors")):
            raise ModelLoadError(f"{p}: no *.safetensors weights (telekd loads safetensors only): re-save the model with safe_serialization=True")
        return str(p), None, None
    if p.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelLoadError(f"{source}: neither a checkpoint folder nor a hub id like org/name")
    if not revision:
        raise ModelLoadError(f"hub model {source} needs a pinned revision (a commit hash)")
    return source, revision, None


def load_tokenizer(source: str, revision: str | None = None, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from .prompts import set_chat_template

    where, rev, template = _resolve(source, revision)
    tok = AutoTokenizer.from_pretrained(where, revision=rev, trust_remote_code=trust_remote_code)
    if template:
        set_chat_template(tok, template)
    if tok.pad_token is None:  # Llama-2 and Mistral ship without one; padding is masked anyway
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def load_model(source: str, revision: str | None = None, *, dtype: str = "float32", trust_remote_code: bool = False,
               device: str = "cpu"):
    """Return (model, tokenizer) from a checkpoint folder or a hub id + revision."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tok = load_tokenizer(source, revision, trust_remote_code=trust_remote_code)
    where, rev, _ = _resolve(source, revision)
    model = AutoModelForCausalLM.from_pretrained(
        where, revision=rev, dtype=getattr(torch, DTYPES[dtype]), use_safetensors=True,
        trust_remote_code=trust_remote_code,
    ).to(device)
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise ModelLoadError(
            f"{source}: tokenizer has {len(tok)} tokens but the model embeds {model.get_input_embeddings().num_embeddings}: "
            "they do not belong together; load both from the same checkpoint"
        )
    return model, tok


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())

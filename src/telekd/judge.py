"""Oracle-LLM metrics through ragas: answer correctness, factual correctness, faithfulness, per sample.

Design
------
* ragas 0.4.3's collections API (`ragas.metrics.collections`) does the metric logic; it asks the judge
  for structured output through `generate(prompt, response_model)`, which `JudgeLLM` (an
  `InstructorBaseRagasLLM`) answers from one of two backends:

  - ``local``: a transformers causal LM (loaded through `telekd.models.load_model`) whose decoding is
    constrained by xgrammar to the *bounded* JSON schema of the response model, so even the tiny
    profile's 4M-parameter judge always returns schema-valid JSON (numbers, never NaN);
  - ``openai``: any OpenAI-compatible server (`base_url`, `model`), asked for
    ``response_format: json_schema`` with the same bounded schema (`telekd.judge_server` is one).

* Bounded schema (`bounded_schema`): every string gets ``maxLength = max_chars``, every array
  ``maxItems = max_items``; the ``statements``/``claims`` arrays get ``minItems 1`` (Faithfulness is NaN
  on an empty list and AnswerCorrectness scores empty lists as a perfect match) and ``verdict`` is
  restricted to {0, 1}; objects get ``additionalProperties: false`` (an extra key is out of schema, and
  OpenAI's ``strict`` json_schema mode requires it). Without the bounds a random model writes ``"verdict": 6666...`` forever.
* Every reply, fresh or cached, is checked against the bounded schema itself (jsonschema: minItems,
  maxItems, maxLength, verdict in {0, 1}), not only parsed into ragas's pydantic model, which accepts
  an empty statement list, a verdict of 7 or a 5,000-character string; a server that ignores
  ``response_format`` is caught here. Replies that fit the schema but that ragas's formulas would
  silently turn into a number are failed judgments too (`check_classification`, `check_verdicts`): an
  empty TP/FP/FN classification (ragas scores it F1 = 1, so "the UDM" against "the SMF" scored 0.83),
  fewer/more NLI verdicts than statements (the denominator of faithfulness and factual correctness),
  and, with ``eval_llm.strict_classification`` (off by default, as in ragas), a classification whose
  TP + FP is not the answer's statement count; and a blank (empty or whitespace) statement or claim, which
  ragas would count like a real one (`blank_statement`). A failed judgment is None with its reason in ``judge_error``; it is retried only when the
  backend is not deterministic (the local judge decodes greedily: the same prompt fails the same way).
* Metrics: answer correctness = ragas AnswerCorrectness (weights 0.75 factuality / 0.25 semantic
  similarity, embeddings = the offline all-MiniLM-L6-v2); factual correctness = ragas FactualCorrectness
  (F1); faithfulness = ragas Faithfulness against the record's own context. A record with several
  references is scored against each distinct non-empty reference and the **maximum** is kept (as the
  n-gram and embedding metrics do); if any reference's score fails, the metric is None. (Answer
  correctness keeps ragas's formula as is: it dips below 0 only if the MiniLM cosine is negative.)
  An empty prediction states nothing correct: answer and factual correctness are 0.0 without a judge
  call, and faithfulness is undefined (None, reason recorded, counted as ``undefined``, not as a failure);
  so is faithfulness of a record without a context (a question table without one).
* Judge calls are cached on disk, keyed by sha256(judge identity + prompt + bounded schema), in
  ``cache/judge/`` (one JSON file per call, written to a temporary name and renamed, so processes that
  share the cache never read a partial entry); only outputs that parsed into the response model are
  written, so a failed call is retried on the next run.
* Failures that can pass (timeouts, connection errors, HTTP 408/409/429/5xx, ragas exceptions, NaN) are
  retried up to ``max_retries`` times with exponential backoff; deterministic ones are not (the local
  judge decodes greedily and the OpenAI-compatible one runs at temperature 0, so a reply cut at the token
  limit, refused, unparseable, out of schema or degenerate comes back the same; other HTTP 4xx). Then the
  metric is None and the sample's ``judge_error`` says why. A missing score is never turned into a number.
* ``eval_llm.concurrency`` samples are judged at once (threads; the OpenAI-compatible backend only: a
  server such as vLLM batches concurrent requests). Scores do not depend on it: each sample's calls are
  its own, and results are kept in sample order.
* Only the first ``max_samples`` samples in sorted question-id order are judged (the same subset in
  every cell); the rest get None with the reason ``not judged: beyond profiles.<profile>.eval.max_samples``. Under
  ``accelerate launch`` the processes share the judged samples (telekd.shard) and all get every score.
* The API key is read only from the environment variable named by ``api_key_env``; it is never written
  anywhere, and every message that leaves this module is scrubbed of it.

Imports are lazy: ragas (~2.3 s), torch/transformers and xgrammar load only when a judge is built.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from .metric_names import LLM_METRICS

NOT_JUDGED = "not judged: beyond profiles.<profile>.eval.max_samples"
EMPTY_PREDICTION = "empty prediction: no statements, faithfulness undefined"
NO_CONTEXT = "record has no context: faithfulness undefined"
UNDEFINED = (EMPTY_PREDICTION, NO_CONTEXT)  # reasons that are not judge failures
CACHE_DIR = "cache/judge"
XGRAMMAR_FIX = "pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 (see requirements.txt / Makefile)"
MAX_BACKOFF_S = 30.0
RETRYABLE_HTTP = (408, 409, 429)  # and every 5xx: the server may answer next time
SMALL_MODEL_PARAMS = 100_000_000  # below this, CPU decoding runs on one torch thread
_DECODING = "greedy+xgrammar-json-schema"


class JudgeError(RuntimeError):
    """A judge call that gave no usable answer. `retryable` is False for deterministic failures."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class JudgeSetupError(RuntimeError):
    """The judge cannot be built at all (missing package, missing key, bad endpoint)."""


# -----------------------------------------------------------------------------
# bounded response schemas

BOUNDED_ARRAYS_MIN1 = ("statements", "claims")


def bounded_schema(schema: dict, max_chars: int, max_items: int) -> dict:
    """A copy of a JSON schema whose strings, arrays and verdicts are bounded (see the module docstring)."""
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
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def schema_violation(obj: Any, schema: dict) -> Optional[str]:
    """None when `obj` satisfies the (bounded) JSON schema, else the first violation in one line (jsonschema)."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(obj))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{where}: {error.message[:160]}"


# -----------------------------------------------------------------------------
# what a judgment must hold beyond its schema (ragas's metrics take degenerate replies as answers)


def check_classification(tp: int, fp: int, fn: int, n_answer: int, n_reference: int,
                         strict: bool = False) -> Optional[str]:
    """None when a TP/FP/FN classification (ragas AnswerCorrectness) can be a judgment, else why not.

    An empty classification always fails: ragas scores it F1 = 1 (precision and recall both default to 1),
    a perfect match for any answer. `strict` (eval_llm.strict_classification; off by default, as in ragas)
    also holds the classification to its definition: every answer statement is either a TP or an FP, and
    FN are reference statements, so TP + FP = n_answer and FN <= n_reference.
    """
    if tp + fp + fn == 0:
        return "empty classification (no TP, FP or FN): a failed judgment, not a perfect match"
    if not strict:
        return None
    if tp + fp != n_answer:
        return f"classification puts {tp + fp} statements in TP/FP, but the answer has {n_answer}"
    if fn > n_reference:
        return f"classification has {fn} FN statements, but the reference has only {n_reference}"
    return None


STATEMENT_KEYS = ("statements", "claims", "TP", "FP", "FN")


def blank_statement(obj: Any, where: str = "") -> Optional[str]:
    """None when every statement or claim in a reply has text, else where the first blank one is.

    A blank statement ("" or whitespace) fits the bounded schema but states nothing: ragas would count it
    (a TP of "" scores "the UDM" against "the SMF" 0.83, statements [""] get verdicts), so it is a failed
    judgment like an empty list. Looks at string items of the statements/claims/TP/FP/FN arrays and at
    every ``statement`` field.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            path = f"{where}/{key}" if where else key
            if key == "statement" and isinstance(value, str) and not value.strip():
                return path
            if key in STATEMENT_KEYS and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, str) and not item.strip():
                        return f"{path}/{i}"
            found = blank_statement(value, path)
            if found:
                return found
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            found = blank_statement(item, f"{where}/{i}")
            if found:
                return found
    return None


def check_verdicts(n_verdicts: int, n_statements: int) -> Optional[str]:
    """None when an NLI reply gives one verdict per statement (Faithfulness, FactualCorrectness), else why not."""
    if n_verdicts != n_statements:
        return f"{n_verdicts} verdicts for {n_statements} statements: one verdict per statement is needed"
    return None


# -----------------------------------------------------------------------------
# disk cache


class JudgeCache:
    """sha256(judge identity + prompt + schema) -> the judge's raw output that parsed; one file per call."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._mem: dict[str, str] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    @staticmethod
    def key(identity: str, prompt: str, schema: dict) -> str:
        blob = json.dumps({"judge": identity, "prompt": prompt, "schema": schema}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def key_lock(self, key: str) -> threading.Lock:
        """One lock per key: concurrent threads asking the same prompt wait for the first one's answer."""
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            if key in self._mem:
                return self._mem[key]
        if self.root is None:
            return None
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["output"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, output: str, meta: dict) -> None:
        with self._lock:
            self._mem[key] = output
        if self.root is not None:
            from .io import write_json

            write_json(self._path(key), {**meta, "output": output})


# -----------------------------------------------------------------------------
# local generation with schema-constrained decoding (shared with telekd.judge_server)


def _import_xgrammar():
    try:
        import xgrammar
        import xgrammar.contrib.hf  # noqa: F401
    except ImportError as e:
        raise JudgeSetupError(f"the local judge needs xgrammar ({e}): {XGRAMMAR_FIX}") from None
    return xgrammar


def model_identity(source: str, dtype: str) -> str:
    """What the judge's answers depend on: the checkpoint's content (or hub id@revision) and dtype."""
    p = Path(source)
    pointer = p / "hub.json"
    if pointer.exists():
        ref = json.loads(pointer.read_text())
        return f"local:hub:{ref['hub']}@{ref['revision']}:{ref.get('chat_template')}:{dtype}:{_DECODING}"
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in (".json", ".jinja", ".safetensors", ".model", ".txt"):
                h.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
        return f"local:sha256:{h.hexdigest()}:{dtype}:{_DECODING}"
    return f"local:{source}:{dtype}:{_DECODING}"


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop | length | timeout
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class LocalGenerator:
    """A transformers causal LM that decodes greedily, optionally constrained to a JSON schema by xgrammar."""

    def __init__(self, source: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                 device: Optional[str] = None):
        xgr = _import_xgrammar()
        import torch

        from .models import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        self.model.eval()
        self.source = source
        self.identity = model_identity(source, dtype)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self._info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=vocab)
        self._compiler = xgr.GrammarCompiler(self._info)
        self._grammars: dict[str, Any] = {}
        eos = self.tok.eos_token_id
        self._eos = {eos} if isinstance(eos, int) else set(eos or [])
        # Special tokens other than end-of-sequence never belong inside JSON text.
        self._banned = sorted(set(self.tok.all_special_ids) - self._eos)
        # A small model on CPU decodes faster on one thread: per token, the thread pool's synchronisation
        # costs more than it saves (measured 2-10x slower with 2 threads on a busy 2-core machine).
        n_params = sum(p.numel() for p in self.model.parameters())
        self._one_thread = self.model.device.type == "cpu" and n_params < SMALL_MODEL_PARAMS
        self._lock = threading.Lock()

    def _grammar(self, schema):
        key = "json" if schema == "json" else schema_json(schema)
        if key not in self._grammars:
            if schema == "json":
                self._grammars[key] = self._compiler.compile_builtin_json_grammar()
            else:
                self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        return self._grammars[key]

    def render(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        text = "\n\n".join(m["content"] for m in messages)
        return self.tok(text)["input_ids"]

    def complete(self, messages: list[dict], schema: dict | str | None, max_new_tokens: int,
                 timeout_s: Optional[float] = None) -> Generation:
        """Greedy completion of a chat; `schema` a JSON schema dict, "json" (any JSON) or None (free text)."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from xgrammar.contrib.hf import LogitsProcessor as GrammarProcessor

        banned = self._banned

        class Ban(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if banned:
                    scores[:, banned] = float("-inf")
                return scores

        with self._lock:
            t0 = time.perf_counter()
            procs = [GrammarProcessor(self._grammar(schema))] if schema is not None else []
            procs.append(Ban())
            ids = torch.tensor([self.render(messages)], device=self.model.device)
            kwargs = {"max_time": float(timeout_s)} if timeout_s else {}
            threads = torch.get_num_threads()
            if self._one_thread:
                torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    out = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                        do_sample=False, logits_processor=LogitsProcessorList(procs),
                        pad_token_id=self.tok.pad_token_id, eos_token_id=sorted(self._eos) or None, **kwargs,
                    )
            finally:
                torch.set_num_threads(threads)
            new = out[0, ids.shape[1]:].tolist()
            seconds = time.perf_counter() - t0
        if new and new[-1] in self._eos:
            finish = "stop"
        elif len(new) >= max_new_tokens:
            finish = "length"
        elif timeout_s and seconds >= timeout_s:
            finish = "timeout"
        else:
            finish = "stop"
        text = self.tok.decode(new, skip_special_tokens=True)
        return Generation(text, finish, ids.shape[1], len(new), seconds)


# -----------------------------------------------------------------------------
# backends: (prompt, schema) -> raw text, or JudgeError


class LocalBackend:
    name = "local"
    deterministic = True  # greedy decoding: the same prompt gives the same reply

    def __init__(self, source: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                 max_new_tokens: int = 1024, timeout_s: Optional[float] = None, generator: LocalGenerator | None = None):
        self.gen = generator or LocalGenerator(source, dtype=dtype, trust_remote_code=trust_remote_code)
        self.identity = self.gen.identity
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s

    def complete(self, prompt: str, schema: dict, schema_name: str) -> str:
        g = self.gen.complete([{"role": "user", "content": prompt}], schema, self.max_new_tokens, self.timeout_s)
        if g.finish_reason == "timeout":
            raise JudgeError(f"judge timed out after {g.seconds:.1f}s ({g.completion_tokens} tokens)")
        if g.finish_reason == "length":  # greedy: the same prompt is cut at the same place again
            raise JudgeError(f"judge output cut at max_new_tokens={self.max_new_tokens} before the JSON closed "
                             "(raise eval_llm.max_new_tokens or lower max_chars/max_items)", retryable=False)
        return g.text


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIBackend:
    """POST {base_url}/chat/completions with response_format json_schema (stdlib HTTP, no retries of its own).

    Thread-safe: `Judge` sends up to eval_llm.concurrency requests at once. At temperature 0 a reply is
    deterministic, so a reply that fails (cut at max_tokens, refused, empty, out of schema) is not retried;
    timeouts, connection errors, HTTP 408/409/429 and 5xx are (the server may recover), other HTTP 4xx are not.
    """

    name = "openai"
    deterministic = True  # temperature 0

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "TELEKD_JUDGE_API_KEY",
                 max_new_tokens: int = 1024, timeout_s: float = 120.0):
        if not base_url or not model:
            raise JudgeSetupError("backend openai needs eval_llm.base_url and eval_llm.model")
        if urlparse(base_url).scheme not in ("http", "https"):
            raise JudgeSetupError(f"eval_llm.base_url {base_url!r} is not an http(s) URL")
        key = os.environ.get(api_key_env) or None
        if key is None and not is_loopback(base_url):
            raise JudgeSetupError(f"eval_llm.base_url {base_url} is not a loopback address: put the API key in the "
                                  f"environment variable {api_key_env} (eval_llm.api_key_env)")
        self.__key = key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.identity = f"openai:{self.base_url}:{model}"

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, {self.model!r})"

    def scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def complete(self, prompt: str, schema: dict, schema_name: str) -> str:
        import socket
        import urllib.error
        import urllib.request

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": schema_name, "schema": schema, "strict": True}},
        }
        headers = {"Content-Type": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        error: Optional[str] = None
        retryable = True
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = self.scrub(e.read(4096).decode("utf-8", "replace"))[:300]
            error = f"HTTP {e.code} from {self.base_url}: {detail}"
            retryable = e.code in RETRYABLE_HTTP or e.code >= 500
        except (TimeoutError, socket.timeout):
            error = f"judge timed out after {self.timeout_s:g}s ({self.base_url})"
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                error = f"judge timed out after {self.timeout_s:g}s ({self.base_url})"
            else:
                error = f"cannot reach {self.base_url}: {reason}"
        except OSError as e:
            error = f"connection error with {self.base_url}: {type(e).__name__}: {e}"
        if error is not None:
            raise JudgeError(self.scrub(error), retryable=retryable) from None
        try:
            msg = json.loads(raw)["choices"][0]
            content = msg["message"].get("content")
            refusal = msg["message"].get("refusal")
            finish = msg.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raw_text = self.scrub(raw.decode("utf-8", "replace"))[:200]
            raise JudgeError(f"not an OpenAI chat completion from {self.base_url}: {raw_text!r}") from None
        if refusal:
            raise JudgeError(f"judge refused: {self.scrub(str(refusal))[:200]}", retryable=False)
        if not isinstance(content, str) or not content.strip():
            raise JudgeError(f"empty judge answer (finish_reason {finish})", retryable=False)
        if finish == "length":  # temperature 0: the same prompt is cut at the same place again
            raise JudgeError(f"judge output cut at max_tokens={self.max_new_tokens} (finish_reason length; raise "
                             "eval_llm.max_new_tokens or lower max_chars/max_items)", retryable=False)
        return content


def _strip_fences(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip()


# -----------------------------------------------------------------------------
# the ragas LLM and embeddings


@dataclass
class CallStats:
    calls: int = 0      # backend calls (model generations / HTTP requests)
    cache_hits: int = 0
    seconds: float = 0.0


class _Counters:
    """Totals (`total`) and the current thread's own counts (`mine()`): with concurrent rows, each row is
    scored in one thread, so a row's calls and cache hits are its thread's counts while it runs."""

    def __init__(self):
        self.total = CallStats()
        self._lock = threading.Lock()
        self._local = threading.local()

    def mine(self) -> CallStats:
        if not hasattr(self._local, "stats"):
            self._local.stats = CallStats()
        return self._local.stats

    def add(self, calls: int = 0, hits: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.total.calls += calls
            self.total.cache_hits += hits
            self.total.seconds += seconds
        m = self.mine()
        m.calls += calls
        m.cache_hits += hits
        m.seconds += seconds


_CLASSES: dict[str, type] = {}


def _ragas_classes() -> tuple[type, type]:
    """JudgeLLM (InstructorBaseRagasLLM) and MiniLMEmbeddings (BaseRagasEmbedding), built on first use."""
    if not _CLASSES:
        from ragas.embeddings.base import BaseRagasEmbedding
        from ragas.llms.base import InstructorBaseRagasLLM

        class JudgeLLM(InstructorBaseRagasLLM):
            """generate(prompt, response_model) -> a response_model instance, through cache and backend."""

            is_async = False  # legacy ragas.evaluate looks for it

            def __init__(self, backend, cache: JudgeCache, max_chars: int, max_items: int,
                         scrub: Callable[[str], str] = lambda s: s):
                self.backend = backend
                self.cache = cache
                self.max_chars = max_chars
                self.max_items = max_items
                self.scrub = scrub
                self.counters = _Counters()
                self.strict_classification = False

            @property
            def stats(self) -> CallStats:
                return self.counters.total

            @property
            def deterministic(self) -> bool:
                """A failed reply comes back unchanged on a retry (greedy local decoding)."""
                return bool(getattr(self.backend, "deterministic", False))

            def _parse(self, text: str, response_model, schema: dict):
                """The reply as `response_model`, after checking it against the bounded schema; JudgeError if not."""
                name = response_model.__name__
                try:
                    obj = json.loads(_strip_fences(text))
                except ValueError as e:
                    raise JudgeError(f"unparseable judge output for {name} ({self.scrub(str(e))[:120]}): "
                                     f"{self.scrub(text)[:120]!r}", retryable=not self.deterministic) from None
                violation = schema_violation(obj, schema)
                if violation is not None:
                    raise JudgeError(f"judge output for {name} breaks its bounded schema ({self.scrub(violation)}): "
                                     f"{self.scrub(text)[:120]!r}", retryable=not self.deterministic)
                blank = blank_statement(obj)
                if blank is not None:
                    raise JudgeError(f"degenerate judgment: blank statement at {blank} in the {name} reply",
                                     retryable=not self.deterministic)
                try:
                    return response_model.model_validate(obj)
                except Exception as e:  # pydantic ValidationError
                    first = self.scrub(e.errors()[0]["msg"] if hasattr(e, "errors") else str(e))[:120]
                    raise JudgeError(f"unparseable judge output for {name} ({first}): {self.scrub(text)[:120]!r}",
                                     retryable=not self.deterministic) from None

            def _checked(self, text: str, response_model, schema: dict, check):
                out = self._parse(text, response_model, schema)
                why = check(out) if check is not None else None
                if why is not None:
                    raise JudgeError(f"degenerate judgment: {why}", retryable=not self.deterministic)
                return out

            def generate(self, prompt, response_model, check: Optional[Callable[[Any], Optional[str]]] = None):
                """The judge's reply as `response_model`: from the cache or the backend, checked against the bounded
                schema and by `check` (reply -> None or why it is no judgment); only checked replies are cached."""
                schema = bounded_schema(response_model.model_json_schema(), self.max_chars, self.max_items)
                key = JudgeCache.key(self.backend.identity, prompt, schema)
                with self.cache.key_lock(key):  # the same prompt in flight twice: asked once
                    return self._generate(prompt, response_model, check, schema, key)

            def _generate(self, prompt, response_model, check, schema, key):
                cached = self.cache.get(key)
                if cached is not None:
                    try:
                        out = self._checked(cached, response_model, schema, check)
                        self.counters.add(hits=1)
                        return out
                    except JudgeError:
                        pass  # a stale or corrupt entry: ask again
                t0 = time.perf_counter()
                try:
                    text = self.scrub(self.backend.complete(prompt, schema, response_model.__name__))
                finally:
                    self.counters.add(calls=1, seconds=time.perf_counter() - t0)
                out = self._checked(text, response_model, schema, check)
                self.cache.put(key, text, {"schema": response_model.__name__, "judge": self.backend.identity})
                return out

            async def agenerate(self, prompt, response_model, check=None):
                return self.generate(prompt, response_model, check)

        class MiniLMEmbeddings(BaseRagasEmbedding):
            """A sentence-transformers model from a local folder, loaded on first use, normalised vectors."""

            def __init__(self, path: str, device: str = "cpu"):
                super().__init__(cache=None)
                self.path, self.device = path, device
                self._lock = threading.Lock()  # concurrent judge threads share one model

            def embed_text(self, text, **kwargs):
                from .metrics import _sentence_model

                with self._lock:
                    model = _sentence_model(self.path, self.device)
                    return model.encode(text, normalize_embeddings=True, show_progress_bar=False).tolist()

            async def aembed_text(self, text, **kwargs):
                return self.embed_text(text)

        _CLASSES["llm"], _CLASSES["emb"] = JudgeLLM, MiniLMEmbeddings
    return _CLASSES["llm"], _CLASSES["emb"]


def _strict_metrics() -> tuple[type, type, type]:
    """ragas's AnswerCorrectness, FactualCorrectness and Faithfulness, refusing degenerate judgments.

    The formulas are ragas 0.4.3's, unchanged; the three methods that ask for a classification or for NLI
    verdicts are ragas's own (the same prompt and response model) plus a `check` on the reply, so that a reply
    those formulas would silently turn into a number (an empty classification scores a perfect F1; fewer
    verdicts than statements shrink the denominator) raises JudgeError instead and is never cached
    (see `check_classification`, `check_verdicts`). Empty statement and claim lists fail the bounded schema.
    """
    if "metrics" not in _CLASSES:
        from ragas.metrics.collections import AnswerCorrectness, FactualCorrectness, Faithfulness
        from ragas.metrics.collections.answer_correctness.util import (ClassificationWithReason,
                                                                       CorrectnessClassifierInput)
        from ragas.metrics.collections.factual_correctness import util as fc_util
        from ragas.metrics.collections.faithfulness.util import NLIStatementInput, NLIStatementOutput

        def verdicts_for(statements):
            return lambda out: check_verdicts(len(out.statements), len(statements))

        class StrictAnswerCorrectness(AnswerCorrectness):
            async def _classify_statements(self, question, answer_statements, ground_truth_statements):
                prompt = self.correctness_classifier_prompt.to_string(CorrectnessClassifierInput(
                    question=question, answer=answer_statements, ground_truth=ground_truth_statements))
                strict = self.llm.strict_classification
                return await self.llm.agenerate(prompt, ClassificationWithReason, check=lambda c: check_classification(
                    len(c.TP), len(c.FP), len(c.FN), len(answer_statements), len(ground_truth_statements), strict))

        class StrictFactualCorrectness(FactualCorrectness):
            async def _verify_claims(self, claims, reference):
                prompt = self.nli_prompt.to_string(fc_util.NLIStatementInput(context=reference, statements=claims))
                return await self.llm.agenerate(prompt, fc_util.NLIStatementOutput, check=verdicts_for(claims))

        class StrictFaithfulness(Faithfulness):
            async def _create_verdicts(self, statements, context):
                prompt = self.nli_statement_prompt.to_string(NLIStatementInput(context=context, statements=statements))
                return await self.llm.agenerate(prompt, NLIStatementOutput, check=verdicts_for(statements))

        _CLASSES["metrics"] = (StrictAnswerCorrectness, StrictFactualCorrectness, StrictFaithfulness)
    return _CLASSES["metrics"]


# -----------------------------------------------------------------------------
# the judge


@dataclass
class JudgeConfig:
    """What `judge_rows` needs; `from_params` builds it from params.yaml's eval_llm section."""

    backend: str = "local"
    judge_model: Optional[str] = None   # local: checkpoint folder or hub pointer folder
    max_samples: Optional[int] = None
    max_retries: int = 2
    timeout_s: float = 120.0
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: str = "TELEKD_JUDGE_API_KEY"
    max_new_tokens: int = 1024
    max_chars: int = 100
    max_items: int = 3
    dtype: str = "float32"
    trust_remote_code: bool = False
    cache_dir: Optional[str] = CACHE_DIR
    backoff_s: float = 1.0
    embedding_model: Optional[str] = None  # None: the offline all-MiniLM-L6-v2
    strict_classification: bool = False    # TP + FP must equal the answer's statements (see check_classification)
    concurrency: int = 1                   # samples judged at once (openai backend; the local judge is one model)

    @classmethod
    def from_params(cls, p, **overrides) -> "JudgeConfig":
        e, pe = p.eval_llm, p.active.eval   # the scale-dependent caps come from the profile
        return cls(backend=e.backend, judge_model=pe.judge_model, max_samples=pe.max_samples,
                   max_retries=e.max_retries, timeout_s=e.timeout_s, base_url=e.base_url, model=e.model,
                   api_key_env=e.api_key_env, max_new_tokens=e.max_new_tokens, max_chars=pe.max_chars,
                   max_items=pe.max_items, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                   strict_classification=e.strict_classification, concurrency=e.concurrency, **overrides)


@dataclass
class JudgeReport:
    judged: int = 0
    failures: int = 0          # judged samples with at least one metric failed
    not_judged: int = 0        # beyond max_samples
    undefined: int = 0         # e.g. faithfulness of an empty prediction
    failed_metrics: dict = field(default_factory=lambda: {m: 0 for m in LLM_METRICS})
    calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    judge: str = ""

    def extra(self) -> dict:
        """The deterministic part, for the summary and DVC metrics (call counts and times vary with the cache)."""
        return {"judged": self.judged, "judge_failures": self.failures, "not_judged": self.not_judged,
                "undefined": self.undefined, "failed_metrics": dict(self.failed_metrics), "judge": self.judge}


def judged_ids(ids: list[str], max_samples: Optional[int]) -> set[str]:
    """The first `max_samples` ids in sorted order (all when None): the same subset in every cell."""
    order = sorted(ids)
    return set(order if max_samples is None else order[:max_samples])


class Judge:
    """Scores rows ({id, question, context, prediction, references}) with the three ragas metrics."""

    def __init__(self, cfg: JudgeConfig, backend=None):
        self.cfg = cfg
        if cfg.concurrency < 1:
            raise JudgeSetupError(f"eval_llm.concurrency {cfg.concurrency} must be >= 1")
        if cfg.concurrency > 1 and (backend is None and cfg.backend == "local" or isinstance(backend, LocalBackend)):
            raise JudgeSetupError(f"eval_llm.concurrency {cfg.concurrency} needs backend openai: the local judge is one "
                                  "model that decodes one request at a time (set eval_llm.concurrency: 1)")
        if backend is None:
            if cfg.backend == "local":
                if not cfg.judge_model:
                    raise JudgeSetupError("backend local needs profiles.<profile>.eval.judge_model")
                backend = LocalBackend(cfg.judge_model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                       max_new_tokens=cfg.max_new_tokens, timeout_s=cfg.timeout_s)
            elif cfg.backend == "openai":
                backend = OpenAIBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                                        max_new_tokens=cfg.max_new_tokens, timeout_s=cfg.timeout_s)
            else:
                raise JudgeSetupError(f"eval_llm.backend {cfg.backend!r} is not local or openai")
        self.backend = backend
        self.scrub = getattr(backend, "scrub", lambda s: s)
        JudgeLLM, Emb = _ragas_classes()
        AnswerCorrectness, FactualCorrectness, Faithfulness = _strict_metrics()

        from .metrics import minilm_path

        self.llm = JudgeLLM(backend, JudgeCache(cfg.cache_dir), cfg.max_chars, cfg.max_items, self.scrub)
        self.llm.strict_classification = cfg.strict_classification
        emb = Emb(cfg.embedding_model or minilm_path())
        self.answer_correctness = AnswerCorrectness(llm=self.llm, embeddings=emb)
        self.factual_correctness = FactualCorrectness(llm=self.llm, mode="f1")
        self.faithfulness = Faithfulness(llm=self.llm)

    # one metric value, with retries -------------------------------------------------------------
    def _retry(self, run) -> tuple[Optional[float], Optional[str]]:
        import asyncio

        attempts = self.cfg.max_retries + 1
        last = "no attempt"
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                value = float(asyncio.run(run()).value)
            except JudgeError as e:
                last = str(e)
                if not e.retryable:
                    return None, f"{last} (not retried: deterministic)"
                continue
            except Exception as e:  # ragas or pydantic errors, anything the judge threw
                last = f"{type(e).__name__}: {self.scrub(str(e))[:300]}"
                continue
            if math.isfinite(value):
                return value, None
            last = "ragas returned NaN"
        return None, f"{last} (after {attempts} attempts)"

    def _over_references(self, make_run, references: list[str]) -> tuple[Optional[float], Optional[str]]:
        refs = list(dict.fromkeys(r for r in references if r and r.strip()))
        if not refs:
            return None, "no non-empty reference"
        values = []
        for i, ref in enumerate(refs):
            v, err = self._retry(make_run(ref))
            if v is None:
                return None, (f"reference {i + 1}/{len(refs)}: {err}" if len(refs) > 1 else err)
            values.append(v)
        return max(values), None

    def score_row(self, row: dict) -> tuple[dict, dict]:
        """({metric: value or None}, {metric: reason}) for one record."""
        q, pred, ctx = row.get("question") or "", row.get("prediction") or "", row.get("context") or ""
        refs = row.get("references") or []
        values: dict[str, Optional[float]] = {}
        reasons: dict[str, str] = {}
        if not pred.strip():
            values = {"answer_correctness": 0.0, "factual_correctness": 0.0, "faithfulness": None}
            return values, {"faithfulness": EMPTY_PREDICTION}
        ac, fc, ff = self.answer_correctness, self.factual_correctness, self.faithfulness
        values["answer_correctness"], reasons["answer_correctness"] = self._over_references(
            lambda ref: (lambda: ac.ascore(user_input=q, response=pred, reference=ref)), refs)
        values["factual_correctness"], reasons["factual_correctness"] = self._over_references(
            lambda ref: (lambda: fc.ascore(response=pred, reference=ref)), refs)
        if ctx.strip():
            values["faithfulness"], reasons["faithfulness"] = self._retry(
                lambda: ff.ascore(user_input=q or " ", response=pred, retrieved_contexts=[ctx]))
        else:
            values["faithfulness"], reasons["faithfulness"] = None, NO_CONTEXT
        return values, {m: self.scrub(r) for m, r in reasons.items() if r}

    def score_rows(self, rows: list[dict], progress: bool = True) -> tuple[list[dict], JudgeReport]:
        from tqdm.auto import tqdm

        from . import shard

        chosen = judged_ids([r["id"] for r in rows], self.cfg.max_samples)
        report = JudgeReport(judge=self.backend.identity)
        scores: list[Optional[dict]] = [None] * len(rows)
        todo = sorted((i for i, r in enumerate(rows) if r["id"] in chosen), key=lambda i: rows[i]["id"])
        stats = self.llm.stats

        counters = self.llm.counters

        def one(i):  # one row, entirely in the calling thread: its counts are the thread's
            mine = counters.mine()
            calls, hits, t0 = mine.calls, mine.cache_hits, time.perf_counter()
            values, reasons = self.score_row(rows[i])
            return values, reasons, mine.calls - calls, mine.cache_hits - hits, time.perf_counter() - t0

        def run(share):  # under a launcher each process judges its share of `todo`
            from concurrent.futures import ThreadPoolExecutor

            failures = 0
            bar = tqdm(total=len(share), unit="sample", desc="judge", disable=not progress or not shard.is_main(),
                       dynamic_ncols=True)

            def done(result):
                nonlocal failures
                failures += any(result[1][m] not in UNDEFINED for m in result[1])
                bar.update(1)
                bar.set_postfix(failures=failures, calls=stats.calls, cached=stats.cache_hits)
                return result

            if self.cfg.concurrency == 1:
                out = [done(one(i)) for i in share]
            else:  # results in `share` order whatever order they finish in
                with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="judge") as pool:
                    out = [done(r) for r in pool.map(one, share)]
            bar.close()
            return out

        for i, (values, reasons, calls, hits, seconds) in zip(todo, shard.map_sharded(run, todo)):
            failed = [m for m in LLM_METRICS if m in reasons and reasons[m] not in UNDEFINED]
            if any(r in UNDEFINED for r in reasons.values()):
                report.undefined += 1
            for m in failed:
                report.failed_metrics[m] += 1
            report.failures += bool(failed)
            report.judged += 1
            error = "; ".join(f"{m}: {reasons[m]}" for m in LLM_METRICS if m in reasons) or None
            scores[i] = {**{m: values.get(m) for m in LLM_METRICS}, "judge_error": error}
            report.calls += calls
            report.cache_hits += hits
            report.seconds += seconds
        for i, s in enumerate(scores):
            if s is None:
                scores[i] = {**{m: None for m in LLM_METRICS}, "judge_error": NOT_JUDGED}
                report.not_judged += 1
        return scores, report


def judge_rows(rows: list[dict], cfg: JudgeConfig, progress: bool = True, backend=None) -> tuple[list[dict], JudgeReport]:
    """Per-sample scores aligned with `rows` (None where the judge gave none, `judge_error` says why) and a report."""
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("predictions have duplicate question ids")
    if not judged_ids(ids, cfg.max_samples):
        return ([{**{m: None for m in LLM_METRICS}, "judge_error": NOT_JUDGED} for _ in rows],
                JudgeReport(not_judged=len(rows)))
    return Judge(cfg, backend=backend).score_rows(rows, progress=progress)

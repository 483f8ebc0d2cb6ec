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
  restricted to {0, 1}. Without the bounds a random model writes ``"verdict": 6666...`` forever.
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
* Failures (timeouts, HTTP errors, refusals, unparseable output, ragas exceptions, NaN) are retried up to
  ``max_retries`` times with exponential backoff; after that the metric is None and the sample's
  ``judge_error`` says why. A missing score is never turned into a number.
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

LLM_METRICS = ("answer_correctness", "factual_correctness", "faithfulness")
NOT_JUDGED = "not judged: beyond profiles.<profile>.eval.max_samples"
EMPTY_PREDICTION = "empty prediction: no statements, faithfulness undefined"
NO_CONTEXT = "record has no context: faithfulness undefined"
UNDEFINED = (EMPTY_PREDICTION, NO_CONTEXT)  # reasons that are not judge failures
CACHE_DIR = "cache/judge"
XGRAMMAR_FIX = "pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 (see requirements.txt / Makefile)"
MAX_BACKOFF_S = 30.0
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


# -----------------------------------------------------------------------------
# disk cache


class JudgeCache:
    """sha256(judge identity + prompt + schema) -> the judge's raw output that parsed; one file per call."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._mem: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(identity: str, prompt: str, schema: dict) -> str:
        blob = json.dumps({"judge": identity, "prompt": prompt, "schema": schema}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

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
    """POST {base_url}/chat/completions with response_format json_schema (stdlib HTTP, no retries of its own)."""

    name = "openai"

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
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = self.scrub(e.read(4096).decode("utf-8", "replace"))[:300]
            error = f"HTTP {e.code} from {self.base_url}: {detail}"
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
            raise JudgeError(self.scrub(error)) from None
        try:
            msg = json.loads(raw)["choices"][0]
            content = msg["message"].get("content")
            refusal = msg["message"].get("refusal")
            finish = msg.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raw_text = self.scrub(raw.decode("utf-8", "replace"))[:200]
            raise JudgeError(f"not an OpenAI chat completion from {self.base_url}: {raw_text!r}") from None
        if refusal:
            raise JudgeError(f"judge refused: {self.scrub(str(refusal))[:200]}")
        if not isinstance(content, str) or not content.strip():
            raise JudgeError(f"empty judge answer (finish_reason {finish})")
        if finish == "length":
            raise JudgeError(f"judge output cut at max_tokens={self.max_new_tokens} (finish_reason length)")
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
                self.stats = CallStats()

            def generate(self, prompt, response_model):
                schema = bounded_schema(response_model.model_json_schema(), self.max_chars, self.max_items)
                key = JudgeCache.key(self.backend.identity, prompt, schema)
                cached = self.cache.get(key)
                if cached is not None:
                    try:
                        out = response_model.model_validate_json(_strip_fences(cached))
                        self.stats.cache_hits += 1
                        return out
                    except Exception:
                        pass  # a stale or corrupt entry: ask again
                self.stats.calls += 1
                t0 = time.perf_counter()
                try:
                    text = self.scrub(self.backend.complete(prompt, schema, response_model.__name__))
                finally:
                    self.stats.seconds += time.perf_counter() - t0
                try:
                    out = response_model.model_validate_json(_strip_fences(text))
                except Exception as e:
                    first = self.scrub(e.errors()[0]["msg"] if hasattr(e, "errors") else str(e))[:120]
                    shown = self.scrub(text)[:120]
                    raise JudgeError(f"unparseable judge output for {response_model.__name__} ({first}): "
                                     f"{shown!r}") from None
                self.cache.put(key, text, {"schema": response_model.__name__, "judge": self.backend.identity})
                return out

            async def agenerate(self, prompt, response_model):
                return self.generate(prompt, response_model)

        class MiniLMEmbeddings(BaseRagasEmbedding):
            """A sentence-transformers model from a local folder, loaded on first use, normalised vectors."""

            def __init__(self, path: str, device: str = "cpu"):
                super().__init__(cache=None)
                self.path, self.device = path, device

            def embed_text(self, text, **kwargs):
                from .metrics import _sentence_model

                model = _sentence_model(self.path, self.device)
                return model.encode(text, normalize_embeddings=True, show_progress_bar=False).tolist()

            async def aembed_text(self, text, **kwargs):
                return self.embed_text(text)

        _CLASSES["llm"], _CLASSES["emb"] = JudgeLLM, MiniLMEmbeddings
    return _CLASSES["llm"], _CLASSES["emb"]


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

    @classmethod
    def from_params(cls, p, **overrides) -> "JudgeConfig":
        e, pe = p.eval_llm, p.active.eval   # the scale-dependent caps come from the profile
        return cls(backend=e.backend, judge_model=pe.judge_model, max_samples=pe.max_samples,
                   max_retries=e.max_retries, timeout_s=e.timeout_s, base_url=e.base_url, model=e.model,
                   api_key_env=e.api_key_env, max_new_tokens=e.max_new_tokens, max_chars=pe.max_chars,
                   max_items=pe.max_items, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                   **overrides)


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
        from ragas.metrics.collections import AnswerCorrectness, FactualCorrectness, Faithfulness

        from .metrics import minilm_path

        self.llm = JudgeLLM(backend, JudgeCache(cfg.cache_dir), cfg.max_chars, cfg.max_items, self.scrub)
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

        def run(share):  # under a launcher each process judges its share of `todo`
            out, failures = [], 0
            bar = tqdm(total=len(share), unit="sample", desc="judge", disable=not progress or not shard.is_main(),
                       dynamic_ncols=True)
            for i in share:
                calls, hits, t0 = stats.calls, stats.cache_hits, time.perf_counter()
                values, reasons = self.score_row(rows[i])
                out.append((values, reasons, stats.calls - calls, stats.cache_hits - hits, time.perf_counter() - t0))
                failures += any(reasons[m] not in UNDEFINED for m in reasons)
                bar.update(1)
                bar.set_postfix(failures=failures, calls=stats.calls, cached=stats.cache_hits)
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

"""The local judge: a transformers causal LM whose greedy decoding is constrained to a JSON schema.

`LocalGenerator` loads a checkpoint through `telekd.models.load_model` and constrains decoding with xgrammar to
the *bounded* JSON schema of the response model (telekd.judge.schema), so even the tiny profile's 4M-parameter
judge always returns schema-valid JSON (numbers, never NaN); telekd.judge_server serves the same generator over
HTTP. `LocalBackend` turns it into a judge backend: (prompt, schema) -> raw text, or JudgeError.

torch, transformers and xgrammar are imported only when a generator is built.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import JudgeError, JudgeSetupError
from .schema import schema_json

XGRAMMAR_FIX = "pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 (see requirements.txt / Makefile)"
SMALL_MODEL_PARAMS = 100_000_000  # below this, CPU decoding runs on one torch thread
_DECODING = "greedy+xgrammar-json-schema"


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
    """One completion: its text, why it ended, token counts and wall-clock seconds."""

    text: str
    finish_reason: str  # stop | length | timeout
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class LocalGenerator:
    """A transformers causal LM that decodes greedily, optionally constrained to a JSON schema by xgrammar.

    `source` is a checkpoint folder or a hub pointer folder (telekd.models.load_model), `dtype` a torch dtype name;
    `device` defaults to cuda when available. Raises JudgeSetupError when xgrammar is missing (the message names
    the install command) and telekd.models.ModelLoadError for a checkpoint that cannot be loaded.
    """

    def __init__(self, source: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                 device: Optional[str] = None):
        xgr = _import_xgrammar()
        import torch

        from ..models import load_model

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
        """The prompt's token ids: the chat template when the tokenizer has one, else the contents joined."""
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        text = "\n\n".join(m["content"] for m in messages)
        return self.tok(text)["input_ids"]

    def complete(self, messages: list[dict], schema: dict | str | None, max_new_tokens: int,
                 timeout_s: Optional[float] = None) -> Generation:
        """Greedy completion of a chat; `schema` a JSON schema dict, "json" (any JSON) or None (free text).

        At most `max_new_tokens` tokens and `timeout_s` seconds (transformers' max_time); the Generation's
        finish_reason says which limit ended it ("length", "timeout") or "stop". Thread-safe (one at a time).
        """
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



class LocalBackend:
    """The judge backend over a `LocalGenerator` (built from `source` unless `generator` is given).

    Raises JudgeSetupError when xgrammar is missing, telekd.models.ModelLoadError when the checkpoint is.
    """

    name = "local"
    deterministic = True  # greedy decoding: the same prompt gives the same reply

    def __init__(self, source: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                 max_new_tokens: int = 1024, timeout_s: Optional[float] = None, generator: LocalGenerator | None = None):
        self.gen = generator or LocalGenerator(source, dtype=dtype, trust_remote_code=trust_remote_code)
        self.identity = self.gen.identity
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s

    def complete(self, prompt: str, schema: dict, schema_name: str) -> str:
        """The raw reply to `prompt` constrained to `schema`; JudgeError on a timeout (retryable) or when cut at
        max_new_tokens (not retryable: greedy decoding cuts the same prompt at the same place again)."""
        g = self.gen.complete([{"role": "user", "content": prompt}], schema, self.max_new_tokens, self.timeout_s)
        if g.finish_reason == "timeout":
            raise JudgeError(f"judge timed out after {g.seconds:.1f}s ({g.completion_tokens} tokens)")
        if g.finish_reason == "length":  # greedy: the same prompt is cut at the same place again
            raise JudgeError(f"judge output cut at max_new_tokens={self.max_new_tokens} before the JSON closed "
                             "(raise eval_llm.max_new_tokens or lower max_chars/max_items)", retryable=False)
        return g.text


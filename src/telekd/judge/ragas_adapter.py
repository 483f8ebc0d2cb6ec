"""The ragas adapter: the judge as a ragas LLM, MiniLM as ragas embeddings, and ragas's three metrics made strict.

ragas 0.4.3's collections API (`ragas.metrics.collections`) does the metric logic; it asks the judge for
structured output through `generate(prompt, response_model)`, which `JudgeLLM` (an `InstructorBaseRagasLLM`)
answers from a backend (telekd.judge.local or telekd.judge.openai) through the cache (telekd.judge.cache). Every
reply, fresh or cached, must fit the bounded schema (telekd.judge.schema) and hold as a judgment
(telekd.judge.checks) before it is parsed into ragas's pydantic model; only such replies are cached.

The formulas are ragas 0.4.3's metric definitions, unchanged (scores in [0, 1]):
* answer correctness (`AnswerCorrectness`, weights 0.75 / 0.25) = 0.75 * F1(TP, FP, FN) + 0.25 * cosine of
  the MiniLM embeddings of answer and reference, where the judge splits both into statements and classifies
  them (TP: answer statements the reference supports, FP: answer statements it does not, FN: reference
  statements missing from the answer); F1 = 2PR / (P + R), P = TP / (TP + FP), R = TP / (TP + FN);
* factual correctness (`FactualCorrectness`, mode f1, beta 1) = F1 over claims (TP: answer claims the reference
  supports, FP: those it does not, FN: reference claims the answer does not support), rounded to 2 decimals;
* faithfulness (`Faithfulness`) = answer statements the context supports / answer statements.

This module imports ragas (~2.3 s) at the top: telekd.judge.scoring imports it only when a judge is built.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ragas.embeddings.base import BaseRagasEmbedding
from ragas.llms.base import InstructorBaseRagasLLM
from ragas.metrics.collections import AnswerCorrectness, FactualCorrectness, Faithfulness
from ragas.metrics.collections.answer_correctness.util import ClassificationWithReason, CorrectnessClassifierInput
from ragas.metrics.collections.factual_correctness import util as fc_util
from ragas.metrics.collections.faithfulness.util import NLIStatementInput, NLIStatementOutput

from .cache import JudgeCache
from .checks import blank_statement, check_classification, check_verdicts
from .errors import JudgeError
from .schema import bounded_schema, schema_violation


def _strip_fences(text: str) -> str:
    """`text` without a surrounding Markdown code fence (```json ... ```), stripped of outer whitespace."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip()


@dataclass
class CallStats:
    """Counts of judge calls: backend calls made, replies served from the cache, seconds spent in the backend."""

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


class JudgeLLM(InstructorBaseRagasLLM):
    """generate(prompt, response_model) -> a response_model instance, through cache and backend.

    `backend` answers (prompt, schema, schema_name) with raw text or JudgeError; `max_chars` / `max_items` bound
    every string (characters) / array (items) of the reply's schema; `scrub` removes secrets from messages. A reply
    that is no judgment raises JudgeError, retryable only when the backend is not deterministic.
    """

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
        """The totals over all threads."""
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
        """`generate`, for ragas's async API (runs synchronously)."""
        return self.generate(prompt, response_model, check)


class MiniLMEmbeddings(BaseRagasEmbedding):
    """A sentence-transformers model from a local folder, loaded on first use, normalised vectors."""

    def __init__(self, path: str, device: str = "cpu"):
        super().__init__(cache=None)
        self.path, self.device = path, device
        self._lock = threading.Lock()  # concurrent judge threads share one model

    def embed_text(self, text, **kwargs):
        """The unit-length MiniLM embedding of `text` (a list of floats; the model loads on first use)."""
        from ..metrics import _sentence_model

        with self._lock:
            model = _sentence_model(self.path, self.device)
            return model.encode(text, normalize_embeddings=True, show_progress_bar=False).tolist()

    async def aembed_text(self, text, **kwargs):
        """`embed_text`, for ragas's async API."""
        return self.embed_text(text)


def _verdicts_for(statements):
    """A check of an NLI reply: one verdict per statement of `statements`."""
    return lambda out: check_verdicts(len(out.statements), len(statements))


class StrictAnswerCorrectness(AnswerCorrectness):
    """ragas's AnswerCorrectness whose TP/FP/FN classification must pass `check_classification`.

    The formulas are ragas 0.4.3's, unchanged; the methods that ask for a classification or for NLI verdicts
    (here and in the two classes below) are ragas's own (the same prompt and response model) plus a `check` on
    the reply, so that a reply those formulas would silently turn into a number (an empty classification
    scores a perfect F1; fewer verdicts than statements shrink the denominator) raises JudgeError instead and is
    never cached. Empty statement and claim lists fail the bounded schema.
    """

    async def _classify_statements(self, question, answer_statements, ground_truth_statements):
        prompt = self.correctness_classifier_prompt.to_string(CorrectnessClassifierInput(
            question=question, answer=answer_statements, ground_truth=ground_truth_statements))
        strict = self.llm.strict_classification
        return await self.llm.agenerate(prompt, ClassificationWithReason, check=lambda c: check_classification(
            len(c.TP), len(c.FP), len(c.FN), len(answer_statements), len(ground_truth_statements), strict))


class StrictFactualCorrectness(FactualCorrectness):
    """ragas's FactualCorrectness whose NLI verdicts must be one per claim (`check_verdicts`)."""

    async def _verify_claims(self, claims, reference):
        prompt = self.nli_prompt.to_string(fc_util.NLIStatementInput(context=reference, statements=claims))
        return await self.llm.agenerate(prompt, fc_util.NLIStatementOutput, check=_verdicts_for(claims))


class StrictFaithfulness(Faithfulness):
    """ragas's Faithfulness whose NLI verdicts must be one per statement (`check_verdicts`)."""

    async def _create_verdicts(self, statements, context):
        prompt = self.nli_statement_prompt.to_string(NLIStatementInput(context=context, statements=statements))
        return await self.llm.agenerate(prompt, NLIStatementOutput, check=_verdicts_for(statements))

"""Scoring with retries: the judge's settings, the per-sample scores of the three ragas metrics, and the report.

* Metrics (formulas: telekd.judge.ragas_adapter, ragas 0.4.3): answer correctness, factual correctness (F1) and
  faithfulness against the record's own context. A record with several references is scored against each
  distinct non-empty reference and the **maximum** is kept (as the n-gram and embedding metrics do); if any
  reference's score fails, the metric is None. (Answer correctness keeps ragas's formula as is: it dips below 0
  only if the MiniLM cosine is negative.) An empty prediction states nothing correct: answer and factual
  correctness are 0.0 without a judge call, and faithfulness is undefined (None, reason recorded, counted as
  ``undefined``, not as a failure); so is faithfulness of a record without a context.
* Failures that can pass (timeouts, connection errors, HTTP 408/409/429/5xx, ragas exceptions, NaN) are retried
  up to ``max_retries`` times with exponential backoff (``backoff_s * 2**k`` seconds, at most `MAX_BACKOFF_S`);
  deterministic ones are not (the local judge decodes greedily and the OpenAI-compatible one runs at
  temperature 0, so a reply cut at the token limit, refused, unparseable, out of schema or degenerate comes back
  the same; other HTTP 4xx). Then the metric is None and the sample's ``judge_error`` says why. A missing score
  is never turned into a number.
* ``eval_llm.concurrency`` samples are judged at once (threads; the OpenAI-compatible backend only: a server
  such as vLLM batches concurrent requests). Scores do not depend on it: each sample's calls are its own, and
  results are kept in sample order.
* Only the first ``max_samples`` samples in sorted question-id order are judged (the same subset in every
  cell); the rest get None with the reason `NOT_JUDGED`. Under ``accelerate launch`` the processes share the
  judged samples (telekd.shard) and all get every score.

ragas, torch and transformers are imported only when a `Judge` is built.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from ..metric_names import LLM_METRICS
from .cache import CACHE_DIR, JudgeCache
from .errors import JudgeError, JudgeSetupError
from .local import LocalBackend
from .openai import OpenAIBackend

NOT_JUDGED = "not judged: beyond profiles.<profile>.eval.max_samples"
EMPTY_PREDICTION = "empty prediction: no statements, faithfulness undefined"
NO_CONTEXT = "record has no context: faithfulness undefined"
UNDEFINED = (EMPTY_PREDICTION, NO_CONTEXT)  # reasons that are not judge failures
MAX_BACKOFF_S = 30.0


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
        """The settings from validated params (telekd.params): eval_llm, the active profile's eval caps and dtype."""
        e, pe = p.eval_llm, p.active.eval   # the scale-dependent caps come from the profile
        return cls(backend=e.backend, judge_model=pe.judge_model, max_samples=pe.max_samples,
                   max_retries=e.max_retries, timeout_s=e.timeout_s, base_url=e.base_url, model=e.model,
                   api_key_env=e.api_key_env, max_new_tokens=e.max_new_tokens, max_chars=pe.max_chars,
                   max_items=pe.max_items, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                   strict_classification=e.strict_classification, concurrency=e.concurrency, **overrides)


@dataclass
class JudgeReport:
    """Counts of one judging run: samples judged, failed, not judged, undefined; calls, cache hits, seconds."""

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
    """Scores rows ({id, question, context, prediction, references}) with the three ragas metrics.

    `backend` (tests, fault injection) replaces the one `cfg` names. Raises JudgeSetupError for settings that
    cannot work (concurrency < 1, concurrency > 1 with the local judge, no judge model, an unknown backend,
    the OpenAI-compatible backend's key rules) and when xgrammar is missing; ImportError without ragas.
    """

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

        from ..metrics import minilm_path
        from .ragas_adapter import (JudgeLLM, MiniLMEmbeddings, StrictAnswerCorrectness, StrictFactualCorrectness,
                                    StrictFaithfulness)

        self.llm = JudgeLLM(backend, JudgeCache(cfg.cache_dir), cfg.max_chars, cfg.max_items, self.scrub)
        self.llm.strict_classification = cfg.strict_classification
        emb = MiniLMEmbeddings(cfg.embedding_model or minilm_path())
        self.answer_correctness = StrictAnswerCorrectness(llm=self.llm, embeddings=emb)
        self.factual_correctness = StrictFactualCorrectness(llm=self.llm, mode="f1")
        self.faithfulness = StrictFaithfulness(llm=self.llm)

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
        """Per-row {metric: value or None, judge_error} aligned with `rows`, and the run's report (see `judge_rows`)."""
        from tqdm.auto import tqdm

        from .. import shard

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

"""LLM-as-a-judge metrics through ragas: answer correctness, factual correctness, faithfulness, per sample.

One module per job:

=================  =======================================================================================
module             job
=================  =======================================================================================
`schema`           bounded response schemas (max lengths, item counts, verdict in {0, 1}) and the check
                   that a reply fits one
`checks`           what a judgment must hold beyond its schema (degenerate replies ragas would score)
`cache`            the judge-call cache on disk (`JudgeCache`, ``cache/judge/``)
`local`            the local judge: transformers + xgrammar constrained greedy decoding (`LocalGenerator`,
                   `LocalBackend`); telekd.judge_server serves it over HTTP
`openai`           the OpenAI-compatible HTTP backend (`OpenAIBackend`; loopback and API-key rules)
`ragas_adapter`    the judge as a ragas LLM, MiniLM as ragas embeddings, ragas 0.4.3's three metrics made
                   strict (the formulas are documented there); imports ragas, so it loads only with a judge
`scoring`          `JudgeConfig`, `judge_rows` / `Judge` (retries, references, max_samples), `JudgeReport`
`errors`           `JudgeError` (a call without a usable answer), `JudgeSetupError` (no judge at all)
=================  =======================================================================================

Importing this package is cheap (standard library only): ragas (~2.3 s), torch/transformers and xgrammar load
only when a judge is built. The metric names come from telekd.metric_names.
"""

from ..metric_names import LLM_METRICS
from .cache import CACHE_DIR, JudgeCache
from .checks import blank_statement, check_classification, check_verdicts
from .errors import JudgeError, JudgeSetupError
from .local import Generation, LocalBackend, LocalGenerator, model_identity
from .openai import OpenAIBackend, is_loopback
from .schema import bounded_schema, schema_json, schema_violation
from .scoring import (EMPTY_PREDICTION, MAX_BACKOFF_S, NO_CONTEXT, NOT_JUDGED, UNDEFINED, Judge, JudgeConfig,
                      JudgeReport, judge_rows, judged_ids)

__all__ = [
    "CACHE_DIR", "EMPTY_PREDICTION", "LLM_METRICS", "MAX_BACKOFF_S", "NO_CONTEXT", "NOT_JUDGED", "UNDEFINED",
    "Generation", "Judge", "JudgeCache", "JudgeConfig", "JudgeError", "JudgeReport", "JudgeSetupError",
    "LocalBackend", "LocalGenerator", "OpenAIBackend", "blank_statement", "bounded_schema", "check_classification",
    "check_verdicts", "is_loopback", "judge_rows", "judged_ids", "model_identity", "schema_json",
    "schema_violation",
]

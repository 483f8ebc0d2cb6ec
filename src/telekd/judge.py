"""Oracle-LLM metrics through ragas (answer correctness, factual correctness, faithfulness).

Not implemented yet (issue 5): every sample gets null scores with the reason recorded, counted as
judge failures; a missing score is never turned into a number.
"""

from __future__ import annotations

LLM_METRICS = ("answer_correctness", "factual_correctness", "faithfulness")
NOT_IMPLEMENTED = "oracle-LLM judge not implemented yet (issue 5)"


def judge_rows(rows: list[dict], max_samples: int | None) -> list[dict]:
    """Per-sample scores (None when the judge gave none) with a `judge_error` reason."""
    return [{**{m: None for m in LLM_METRICS}, "judge_error": NOT_IMPLEMENTED} for _ in rows]

"""What a judgment must hold beyond its schema: ragas's metrics take degenerate replies as answers.

Replies that fit the bounded schema but that ragas 0.4.3's formulas would silently turn into a number are
failed judgments: an empty TP/FP/FN classification (ragas scores it F1 = 1, so "the UDM" against "the SMF"
scored 0.83), fewer/more NLI verdicts than statements (the denominator of faithfulness and factual
correctness), and, with ``eval_llm.strict_classification`` (off by default, as in ragas), a classification
whose TP + FP is not the answer's statement count; and a blank (empty or whitespace) statement or claim, which
ragas would count like a real one. Each check returns None (a judgment) or why not, in one line.
"""

from __future__ import annotations

from typing import Any, Optional


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


"""TeleQuAD loading and validation (no torch here: stage start-up stays fast; splitting: telekd.split).

Besides TeleQuAD JSON, `load_records` reads a table of questions (`.csv`, or `.jsonl` with one object per
line) with `question` and `answer` (or, in JSONL, `answers`: a list) columns and optional `id`, `context`,
`source`, `doc_id`, `title`, `is_impossible`. A record without a context is valid: its prompt has none.
Questions flagged impossible are dropped, or kept with `no_answer_text` as their one answer (the
training target and the evaluation reference).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

ON_INVALID = ("error", "skip")
IMPOSSIBLE = ("drop", "keep")
FIX_RECORDS = "fix the records, or set data.on_invalid: skip to drop them (they are listed in the skipped file)"
FIX_FILE = "fix or replace the file (data.on_invalid: skip cannot drop a whole file)"
EXPECTED = 'expected TeleQuAD JSON: {"version": ..., "data": [{"docid", "title", "source", "paragraphs": [...]}]}'
EXPECTED_TABLE = "expected a table with question and answer columns (optional: id, context, source, doc_id, title, is_impossible)"
TABLE_SUFFIXES = (".csv", ".jsonl")
NO_ANSWER_TEXT = "unanswerable"

_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns non-UTF-8 bytes into
_INT = re.compile(r"\s*-?\d+\s*")


@dataclass(frozen=True)
class QARecord:
    """One validated question with its context and reference answers (answer_starts: character offsets)."""

    id: str
    doc_id: str
    source: str  # spec the paragraph came from; "" if absent
    title: str  # "" if absent
    context: str
    question: str
    answers: tuple[str, ...]  # stripped, non-empty, de-duplicated in order (kept impossible: (no_answer_text,))
    answer_starts: tuple[int, ...]  # char offset of each answer in context; -1 if the text is not in it
    is_impossible: bool

    def to_dict(self) -> dict:
        """The record as JSON-ready fields (tuples as lists), as data/prepared/*.jsonl holds it."""
        d = asdict(self)
        d["answers"], d["answer_starts"] = list(self.answers), list(self.answer_starts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QARecord:
        """The record from `to_dict`'s fields (a data/prepared/*.jsonl line)."""
        return cls(**{**d, "answers": tuple(d["answers"]), "answer_starts": tuple(d["answer_starts"])})


@dataclass(frozen=True)
class Problem:
    """One validation problem: which record, which field, and why."""

    record_id: str  # question id, or "doc[3].paragraphs[0].qas[5]" when the id itself is missing/bad
    field: str
    reason: str


class DataValidationError(ValueError):
    """Every problem found in a data file, one per line, then how to proceed."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [f"record {p.record_id}: {p.field}: {p.reason}" for p in self.problems]
        file_only = all(p.field == "file" for p in self.problems)
        lines.append(FIX_FILE if file_only else FIX_RECORDS)
        super().__init__("\n".join(lines))


@dataclass
class LoadResult:
    """What load_records returns: the valid records, those skipped (data.on_invalid: skip) and repaired spans."""

    records: list[QARecord]
    skipped: list[dict]  # {"id", "field", "reason"} per dropped record
    warnings: list[dict]  # {"id", "field", "reason"} per repaired answer span


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; use one of {', '.join(allowed)}")


def _file_error(path: Path, reason: str, expected: str = EXPECTED) -> DataValidationError:
    return DataValidationError([Problem("<file>", "file", f"{path}: {reason}; {expected}")])


def _read_text(path: Path, expected: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found or not a regular file: {path} (fix data.source)")
    raw = path.read_bytes()
    if not raw.strip():
        raise _file_error(path, "file is empty", expected)
    return raw.decode("utf-8-sig", errors="surrogateescape")  # bad bytes inside strings are caught per record


def _read_data(path: Path) -> list:
    """The top-level "data" list; file-level problems raise DataValidationError."""
    text = _read_text(path, EXPECTED)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _file_error(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise _file_error(path, 'top level has no "data" list')
    return obj["data"]


def _bad_bytes(s: str) -> bool:
    return _SURROGATE.search(s) is not None


def _doc_fields(doc: dict) -> tuple[dict, list[tuple[str, str]]]:
    """(doc_id/title/source values, problems shared by every question of the document)."""
    probs = []
    docid = doc.get("docid")
    if isinstance(docid, int) and not isinstance(docid, bool):
        docid = str(docid)
    if not isinstance(docid, str) or not docid.strip():
        probs.append(("docid", "missing or not a non-empty string/integer"))
        docid = ""
    elif _bad_bytes(docid):
        probs.append(("docid", "non-UTF-8 bytes"))
    fields = {"doc_id": docid}
    for key in ("title", "source"):
        value = doc.get(key, "")
        if not isinstance(value, str):
            probs.append((key, f"not a string: {type(value).__name__}"))
            value = ""
        elif _bad_bytes(value):
            probs.append((key, "non-UTF-8 bytes"))
        fields[key] = value
    return fields, probs


def _context_problem(context) -> tuple[str, str] | None:
    if not isinstance(context, str) or not context.strip():
        return ("context", "missing or empty")
    if _bad_bytes(context):
        return ("context", "non-UTF-8 bytes")
    return None


def _parse_impossible(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _parse_start(value) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    return None


def _parse_qa(qa, loc: str, context, doc: dict, doc_probs: list) -> tuple[str, dict | None, list[tuple[str, str]]]:
    """(record id, QARecord fields with raw spans instead of answer_starts, [(field, reason)]) for one question."""
    if not isinstance(qa, dict):
        return loc, None, [("qa", f"expected an object, got {type(qa).__name__}")]
    probs = list(doc_probs)
    qid = qa.get("id")
    rid = loc
    if not isinstance(qid, str) or not qid.strip():
        probs.append(("id", "missing or not a non-empty string"))
    elif _bad_bytes(qid):
        probs.append(("id", "non-UTF-8 bytes"))
    else:
        rid = qid
    ctx_problem = _context_problem(context)
    if ctx_problem:
        probs.append(ctx_problem)
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        probs.append(("question", "missing or empty"))
    elif _bad_bytes(question):
        probs.append(("question", "non-UTF-8 bytes"))
    impossible = _parse_impossible(qa.get("is_impossible", False))
    if impossible is None:
        probs.append(("is_impossible", f"not a bool or 'True'/'False': {qa.get('is_impossible')!r:.40}"))
    answers, spans = [], []  # spans: (index in the file, raw text, given start) per kept answer
    raw_answers = qa.get("answers")
    if not isinstance(raw_answers, list):
        probs.append(("answers", "missing or not a list"))
        raw_answers = []
    n_before = len(probs)
    for i, a in enumerate(raw_answers):
        if not isinstance(a, dict):
            probs.append((f"answers[{i}]", f"expected an object with text and answer_start, got {type(a).__name__}"))
            continue
        text, start = a.get("text"), _parse_start(a.get("answer_start"))
        if not isinstance(text, str):
            probs.append((f"answers[{i}].text", f"not a string: {type(text).__name__}"))
        elif _bad_bytes(text):
            probs.append((f"answers[{i}].text", "non-UTF-8 bytes"))
        if start is None:
            probs.append((f"answers[{i}].answer_start", f"not an integer: {a.get('answer_start')!r:.40}"))
        if len(probs) > n_before or not text.strip() or text.strip() in answers:
            continue
        answers.append(text.strip())
        spans.append((i, text, start))
    if len(probs) == n_before and isinstance(qa.get("answers"), list) and not answers and impossible is False:
        probs.append(("answers", "no non-empty answer"))
    if probs:
        return rid, None, probs
    fields = dict(doc, id=qid, context=context, question=question.strip(), is_impossible=impossible)
    return rid, dict(fields, answers=answers, spans=spans), []


def _locate(context: str, raw: str, start: int) -> tuple[int, str | None]:
    """(start of raw.strip(), warning or None): the given span if it matches, else the nearest occurrence, else -1."""
    text, shifted = raw.strip(), start + len(raw) - len(raw.lstrip())
    if start >= 0 and context[start : start + len(raw)] == raw:
        return shifted, None
    if shifted >= 0 and context[shifted : shifted + len(text)] == text:
        return shifted, f"answer text has surrounding whitespace the context lacks at {start}; stripped, start kept"
    hits, i = [], context.find(text)
    while i != -1:
        hits.append(i)
        i = context.find(text, i + 1)
    if not hits:
        return -1, f"answer_start {start} does not match the context and the text is not in it; set to -1"
    best = min(hits, key=lambda h: (abs(h - start), h))
    return best, f"answer_start {start} does not match the context; relocated to {best}"


def _qa_items(data: list):
    """Yield (record id, fields or None, [(field, reason)], location) for every raw question, in file order."""
    for di, doc in enumerate(data):
        dloc = f"doc[{di}]"
        if not isinstance(doc, dict):
            yield dloc, None, [("doc", f"expected an object, got {type(doc).__name__}")], dloc
            continue
        fields, doc_probs = _doc_fields(doc)
        paragraphs = doc.get("paragraphs")
        if not isinstance(paragraphs, list):
            yield dloc, None, [("paragraphs", "missing or not a list")], dloc
            continue
        for pi, para in enumerate(paragraphs):
            ploc = f"{dloc}.paragraphs[{pi}]"
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                yield ploc, None, [("qas", "paragraph is not an object with a qas list")], ploc
                continue
            for qi, qa in enumerate(para["qas"]):
                loc = f"{ploc}.qas[{qi}]"
                yield (*_parse_qa(qa, loc, para.get("context"), fields, doc_probs), loc)


def load_telequad(path, on_invalid: str = "error", impossible: str = "drop",
                  no_answer_text: str = NO_ANSWER_TEXT) -> LoadResult:
    """Load and validate a TeleQuAD v4 file; on_invalid: error|skip, impossible: drop|keep."""
    _check_choice("on_invalid", on_invalid, ON_INVALID)
    _check_choice("impossible", impossible, IMPOSSIBLE)
    return _collect(_qa_items(_read_data(Path(path))), on_invalid, impossible, no_answer_text)


def _table_rows(path: Path):
    """Yield (location, row dict or None, problem or None) for every row of a .csv or .jsonl file."""
    text = _read_text(path, EXPECTED_TABLE)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"question"} - set(reader.fieldnames or ()) or {"answer"} - set(reader.fieldnames or ())
        if missing:
            raise _file_error(path, f"no {' or '.join(sorted(missing))} column in {reader.fieldnames}", EXPECTED_TABLE)
        for n, row in enumerate(reader, start=1):
            if None in row:
                yield f"row {n}", None, ("row", f"{len(row[None])} more cells than columns")
            else:
                yield f"row {n}", row, None
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {n}", None, ("line", f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            yield f"line {n}", None, ("line", f"expected an object, got {type(row).__name__}")
        else:
            yield f"line {n}", row, None


def _table_items(path: Path):
    """Yield (record id, fields or None, [(field, reason)], location) for every row of a question table."""
    for loc, row, problem in _table_rows(path):
        if row is None:
            yield loc, None, [problem], loc
            continue
        probs = []
        qid = row.get("id")
        if isinstance(qid, int) and not isinstance(qid, bool):
            qid = str(qid)
        if qid is None or qid == "":
            qid = loc.replace(" ", "")  # no id column: the row's place ("row3", "line3")
        elif not isinstance(qid, str) or not qid.strip():
            probs.append(("id", "not a non-empty string/integer"))
        rid = qid if isinstance(qid, str) and qid.strip() else loc
        text = {}
        for key in ("question", "context", "source", "doc_id", "title"):
            value = row.get(key) or ""
            if not isinstance(value, str):
                probs.append((key, f"not a string: {type(value).__name__}"))
            elif _bad_bytes(value):
                probs.append((key, "non-UTF-8 bytes"))
            text[key] = value if isinstance(value, str) else ""
        if not text["question"].strip():
            probs.append(("question", "missing or empty"))
        impossible = _parse_impossible(row.get("is_impossible") or False)
        if impossible is None:
            probs.append(("is_impossible", f"not a bool or 'True'/'False': {row.get('is_impossible')!r:.40}"))
        raw = row["answers"] if "answers" in row else row.get("answer")
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
            probs.append(("answer", "missing, or not a string or a list of strings"))
            raw = []
        answers = list(dict.fromkeys(a.strip() for a in raw if a.strip()))
        if any(_bad_bytes(a) for a in answers):
            probs.append(("answer", "non-UTF-8 bytes"))
        if not answers and impossible is False and not any(f == "answer" for f, _ in probs):
            probs.append(("answer", "no non-empty answer"))
        if probs:
            yield rid, None, probs, loc
            continue
        fields = {"id": qid, "doc_id": text["doc_id"] or qid, "source": text["source"], "title": text["title"],
                  "context": text["context"], "question": text["question"].strip(), "is_impossible": impossible,
                  "answers": answers, "spans": [(i, a, None) for i, a in enumerate(answers)]}
        yield rid, fields, [], loc


def load_records(path, on_invalid: str = "error", impossible: str = "drop",
                 no_answer_text: str = NO_ANSWER_TEXT) -> LoadResult:
    """Load and validate TeleQuAD JSON, or a .csv / .jsonl question table (see the module docstring)."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        return load_telequad(path, on_invalid, impossible, no_answer_text)
    _check_choice("on_invalid", on_invalid, ON_INVALID)
    _check_choice("impossible", impossible, IMPOSSIBLE)
    return _collect(_table_items(path), on_invalid, impossible, no_answer_text)


def _collect(items, on_invalid: str, impossible: str, no_answer_text: str) -> LoadResult:
    """Records, skipped and warnings from (record id, fields, problems, location) items; raise on problems if error."""
    if not no_answer_text.strip():
        raise ValueError("no_answer_text is empty: set data.no_answer_text to the reply for impossible questions")
    records, skipped, warnings, problems, first_seen = [], [], [], [], {}
    for rid, fields, probs, loc in items:
        if rid != loc:  # a usable id: later occurrences are duplicates
            if rid in first_seen:
                probs = probs + [("id", f"duplicate id; first seen at {first_seen[rid]}")]
            else:
                first_seen[rid] = loc
        if probs:
            problems += [Problem(rid, f, r) for f, r in probs]
            reason = probs[0][1] if len(probs) == 1 else "; ".join(f"{f}: {r}" for f, r in probs)
            skipped.append({"id": rid, "field": probs[0][0], "reason": reason})
            continue
        spans = fields.pop("spans")
        if fields["is_impossible"]:
            if impossible == "drop":
                skipped.append({"id": rid, "field": "is_impossible", "reason": "is_impossible (data.impossible: drop)"})
                continue
            # kept: the abstention reply is the one answer (training target and evaluation reference)
            records.append(QARecord(**dict(fields, answers=(no_answer_text.strip(),), answer_starts=(-1,))))
            continue
        starts = []
        for i, raw, start in spans:
            if start is None:  # a table gives no span: the first occurrence in the context, if any
                starts.append(fields["context"].find(raw))
                continue
            start, warning = _locate(fields["context"], raw, start)
            starts.append(start)
            if warning:
                warnings.append({"id": rid, "field": f"answers[{i}].answer_start", "reason": warning})
        records.append(QARecord(**dict(fields, answers=tuple(fields["answers"]), answer_starts=tuple(starts))))
    if problems and on_invalid == "error":
        raise DataValidationError(problems)
    return LoadResult(records, skipped, warnings)

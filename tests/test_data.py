"""Tests for telekd.data: TeleQuAD loading/validation and group-aware splits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from telekd.data import DataValidationError, LoadResult, Problem, QARecord, load_telequad
from telekd.split import cap_by_group, split_by_group

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared/data/telequad/TeleQuAD-v4-full.json"
SAMPLE = REPO / "data/sample/telequad-sample.json"
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
CTX = "The AMF selects the SMF. The SMF allocates the IP address. The UPF forwards user plane traffic."


def qa(qid, question="Who selects the SMF?", answers=(("The AMF", 0),), **extra):
    row = {"id": qid, "type": "SHORT", "question": question, "is_impossible": False, "contributor": "1"}
    row["answers"] = [{"text": t, "answer_start": s, "answer_end": 0, "contributor": "1"} for t, s in answers]
    row.update(extra)
    return row


def doc(docid, paragraphs, source="spec-a", title="Spec A#1"):
    return {"docid": docid, "title": title, "source": source, "paragraphs": paragraphs}


def para(qas, context=CTX):
    return {"context": context, "qas": qas}


def write(tmp_path, docs, name="tq.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": "test", "data": docs}), encoding="utf-8")
    return path


def drop_keys(row, *keys):
    return {k: v for k, v in row.items() if k not in keys}


# ---------------------------------------------------------------- loading good data


def test_good_file_loads(tmp_path):
    docs = [
        doc("1", [para([
            qa("q1"),  # int start
            qa("q2", "What does the SMF allocate?", [("the IP address", "43")]),  # string start
            qa("q3", "Which nodes?", [("The AMF", 0), (" The AMF ", 0), ("", "0"), ("The UPF", "59")]),
        ])]),
        {"docid": 7, "paragraphs": [para([qa("q4")])]},  # no title/source, int docid
    ]
    res = load_telequad(write(tmp_path, docs))
    assert isinstance(res, LoadResult)
    assert [r.id for r in res.records] == ["q1", "q2", "q3", "q4"]
    assert res.skipped == [] and res.warnings == []
    q1, q2, q3, q4 = res.records
    assert (q1.doc_id, q1.source, q1.title, q1.context) == ("1", "spec-a", "Spec A#1", CTX)
    assert q1.answers == ("The AMF",) and q1.answer_starts == (0,) and q1.is_impossible is False
    assert q2.answer_starts == (43,) and CTX[43:57] == "the IP address"
    assert q3.answers == ("The AMF", "The UPF") and q3.answer_starts == (0, 59)  # stripped, de-duplicated, empty dropped
    assert (q4.doc_id, q4.source, q4.title) == ("7", "", "")
    for r in res.records:
        for text, start in zip(r.answers, r.answer_starts):
            assert r.context[start : start + len(text)] == text


def test_record_json_round_trip(tmp_path):
    rec = load_telequad(write(tmp_path, [doc("1", [para([qa("q1", answers=[("The AMF", 0), ("SMF", 20)])])])])).records[0]
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["answers"] == ["The AMF", "SMF"] and d["answer_starts"] == [0, 20]
    assert QARecord.from_dict(d) == rec


def test_is_impossible_strings_and_missing(tmp_path):
    docs = [doc("1", [para([
        qa("a", is_impossible="False"),
        qa("b", is_impossible="true"),
        qa("c", is_impossible="TRUE"),
        drop_keys(qa("d"), "is_impossible"),
        qa("e", is_impossible=True, answers=[]),  # impossible questions may have no answer
    ])])]
    keep = load_telequad(write(tmp_path, docs), impossible="keep")
    assert [(r.id, r.is_impossible) for r in keep.records] == [("a", False), ("b", True), ("c", True), ("d", False), ("e", True)]
    # kept impossible questions have one answer, the no-answer reply (data.no_answer_text), at no span
    assert [(r.answers, r.answer_starts) for r in keep.records if r.is_impossible] == [(("unanswerable",), (-1,))] * 3
    assert keep.records[0].answers == ("The AMF",) and keep.skipped == []
    drop = load_telequad(write(tmp_path, docs), impossible="drop")
    assert [r.id for r in drop.records] == ["a", "d"]
    assert drop.skipped == [{"id": i, "field": "is_impossible", "reason": "is_impossible (data.impossible: drop)"} for i in "bce"]


def test_bad_option_values(tmp_path):
    path = write(tmp_path, [doc("1", [para([qa("q1")])])])
    with pytest.raises(ValueError, match="on_invalid='ignore'.*error, skip"):
        load_telequad(path, on_invalid="ignore")
    with pytest.raises(ValueError, match="impossible='remove'.*drop, keep"):
        load_telequad(path, impossible="remove")


# ---------------------------------------------------------------- answer spans


def test_span_relocated_to_nearest_occurrence_with_warning(tmp_path):
    docs = [doc("1", [para([qa("q1", "Which SMF?", [("The SMF", 70)])])])]  # "The SMF" is at 25 only; "the" differs
    res = load_telequad(write(tmp_path, docs))
    assert res.records[0].answer_starts == (25,)
    assert res.warnings == [{"id": "q1", "field": "answers[0].answer_start", "reason": res.warnings[0]["reason"]}]
    assert "relocated to 25" in res.warnings[0]["reason"]
    ctx = "x SMF y SMF z SMF"
    docs = [doc("1", [para([qa("q2", "Which?", [("SMF", 9)])], context=ctx)])]
    assert load_telequad(write(tmp_path, docs)).records[0].answer_starts == (8,)  # nearest of 2, 8, 14


def test_span_not_found_is_minus_one_with_warning(tmp_path):
    docs = [doc("1", [para([qa("q1", answers=[("The AMF", 0), ("the MME", "5")])])])]
    res = load_telequad(write(tmp_path, docs))
    assert res.records[0].answers == ("The AMF", "the MME") and res.records[0].answer_starts == (0, -1)
    assert len(res.warnings) == 1 and res.warnings[0]["field"] == "answers[1].answer_start"
    assert "set to -1" in res.warnings[0]["reason"]


def test_span_whitespace_not_in_context_warns_but_keeps_start(tmp_path):
    docs = [doc("1", [para([qa("q1", answers=[("The AMF\n", 0), (" SMF", 19)])])])]  # CTX[7] is " ", not "\n"
    res = load_telequad(write(tmp_path, docs))
    assert res.records[0].answers == ("The AMF", "SMF") and res.records[0].answer_starts == (0, 20)
    assert [w["field"] for w in res.warnings] == ["answers[0].answer_start"]  # " SMF" at 19 matches the context as is
    assert "whitespace" in res.warnings[0]["reason"]


# ---------------------------------------------------------------- invalid records

BAD_DOCS = [
    doc("1", [
        para([
            qa("ok1"),
            drop_keys(qa("x"), "id"),  # doc[0].paragraphs[0].qas[1]
            drop_keys(qa("no-question"), "question"),
            qa("blank-question", question="   "),
            drop_keys(qa("no-answers"), "answers"),
            qa("empty-answers", answers=[]),
            qa("blank-answers", answers=[("  ", 0), ("", 3)]),
            qa("text-not-str", answers=[("The AMF", 0), (5, 0)]),
            qa("bad-start", answers=[("The AMF", "zero")]),
            qa("bad-impossible", is_impossible="maybe"),
            qa("ok1"),  # duplicate of the first
        ]),
        para([qa("ctx-empty-1"), qa("ctx-empty-2")], context=""),
        {"qas": [qa("ctx-missing")]},
    ]),
    doc("2", [para([qa("ok2", "Who forwards traffic?", [("The UPF", "59")])])], source="spec-b"),
]
BAD_EXPECTED = [
    ("doc[0].paragraphs[0].qas[1]", "id"),
    ("no-question", "question"),
    ("blank-question", "question"),
    ("no-answers", "answers"),
    ("empty-answers", "answers"),
    ("blank-answers", "answers"),
    ("text-not-str", "answers[1].text"),
    ("bad-start", "answers[0].answer_start"),
    ("bad-impossible", "is_impossible"),
    ("ok1", "id"),
    ("ctx-empty-1", "context"),
    ("ctx-empty-2", "context"),
    ("ctx-missing", "context"),
]


def test_invalid_records_raise_one_error_listing_all(tmp_path):
    with pytest.raises(DataValidationError) as exc:
        load_telequad(write(tmp_path, BAD_DOCS), on_invalid="error")
    err = exc.value
    assert isinstance(err, ValueError)
    assert [(p.record_id, p.field) for p in err.problems] == BAD_EXPECTED
    assert all(isinstance(p, Problem) and p.reason for p in err.problems)
    lines = str(err).splitlines()
    assert len(lines) == len(BAD_EXPECTED) + 1
    for line, p in zip(lines, err.problems):
        assert line == f"record {p.record_id}: {p.field}: {p.reason}"
    assert lines[-1] == "fix the records, or set data.on_invalid: skip to drop them (they are listed in the skipped file)"
    dup = next(p for p in err.problems if p.record_id == "ok1")
    assert "duplicate" in dup.reason and "doc[0].paragraphs[0].qas[0]" in dup.reason
    assert next(p for p in err.problems if p.record_id == "empty-answers").reason == "no non-empty answer"
    assert "'zero'" in next(p for p in err.problems if p.record_id == "bad-start").reason


def test_invalid_records_skipped_and_listed(tmp_path):
    res = load_telequad(write(tmp_path, BAD_DOCS), on_invalid="skip")
    assert [r.id for r in res.records] == ["ok1", "ok2"]
    assert res.records[0].context == CTX  # the first "ok1" is kept, the duplicate is dropped
    assert [(s["id"], s["field"]) for s in res.skipped] == BAD_EXPECTED
    assert all(set(s) == {"id", "field", "reason"} and s["reason"] for s in res.skipped)


def test_several_problems_in_one_record_are_joined(tmp_path):
    docs = [doc("1", [para([drop_keys(qa("q1", question=""), "answers")])])]
    res = load_telequad(write(tmp_path, docs), on_invalid="skip")
    assert res.skipped == [{"id": "q1", "field": "question", "reason": "question: missing or empty; answers: missing or not a list"}]
    with pytest.raises(DataValidationError) as exc:
        load_telequad(write(tmp_path, docs))
    assert [p.field for p in exc.value.problems] == ["question", "answers"]


def test_non_utf8_bytes_in_a_context(tmp_path):
    text = json.dumps({"data": [doc("1", [para([qa("bad1"), qa("bad2")], context="@@BAD@@ The AMF"),
                                          para([qa("good")])])]})
    path = tmp_path / "bytes.json"
    path.write_bytes(text.encode("utf-8").replace(b"@@BAD@@", b"\xff\xfe"))
    with pytest.raises(DataValidationError) as exc:
        load_telequad(path)
    assert [(p.record_id, p.field, p.reason) for p in exc.value.problems] == [
        ("bad1", "context", "non-UTF-8 bytes"), ("bad2", "context", "non-UTF-8 bytes")]
    res = load_telequad(path, on_invalid="skip")
    assert [r.id for r in res.records] == ["good"]
    assert [(s["id"], s["field"], s["reason"]) for s in res.skipped] == [
        ("bad1", "context", "non-UTF-8 bytes"), ("bad2", "context", "non-UTF-8 bytes")]
    json.dumps(res.skipped, ensure_ascii=False).encode("utf-8")  # rows are safe to write


def test_non_utf8_bytes_in_question_and_answer(tmp_path):
    text = json.dumps({"data": [doc("1", [para([qa("q1", question="Who @@BAD@@?"), qa("q2", answers=[("AMF@@BAD@@", 4)])])])]})
    path = tmp_path / "bytes.json"
    path.write_bytes(text.encode("utf-8").replace(b"@@BAD@@", b"\xc3\x28"))
    with pytest.raises(DataValidationError) as exc:
        load_telequad(path)
    assert [(p.record_id, p.field) for p in exc.value.problems] == [("q1", "question"), ("q2", "answers[0].text")]


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"data": [\xff]}', "not valid JSON"),  # bad bytes outside any string
        (b"[1, 2]", '"data" list'),
        (b'{"version": "x"}', '"data" list'),
        (b'{"data": {"a": 1}}', '"data" list'),
    ],
)
def test_bad_files_raise_a_file_problem(tmp_path, content, what):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    for on_invalid in ("error", "skip"):
        with pytest.raises(DataValidationError) as exc:
            load_telequad(path, on_invalid=on_invalid)
        [p] = exc.value.problems
        assert (p.record_id, p.field) == ("<file>", "file")
        assert str(path) in p.reason and what in p.reason and '"data"' in p.reason


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_telequad(tmp_path / "nope.json")


# ---------------------------------------------------------------- splits


def make_records(n_groups=30, seed_sizes=(1, 2, 3, 5, 8)):
    """Synthetic records: group g has seed_sizes[g % len] questions over a shared context; every 7th has no source."""
    records = []
    for g in range(n_groups):
        source = "" if g % 7 == 0 else f"spec-{g}"
        for k in range(seed_sizes[g % len(seed_sizes)]):
            records.append(QARecord(f"q{g}-{k}", f"d{g}", source, "", f"context of group {g}", f"question {k}?",
                                    ("a",), (-1,), False))
    return records


def group_of(r):
    return r.source or "doc:" + r.doc_id


def assert_valid_split(records, splits, key=group_of):
    ids = [r.id for part in splits.values() for r in part]
    assert sorted(ids) == sorted(r.id for r in records) and len(set(ids)) == len(ids)  # each record exactly once
    seen = {}
    for name, part in splits.items():
        assert part, f"split {name} is empty"
        for r in part:
            assert seen.setdefault(key(r), name) == name  # no group in two splits
        order = {r.id: i for i, r in enumerate(records)}
        assert [order[r.id] for r in part] == sorted(order[r.id] for r in part)  # file order kept
    assert not {r.context for r in splits["train"]} & {r.context for r in splits["test"]}


def test_split_groups_never_straddle_and_track_fractions():
    records = make_records(60)
    splits = split_by_group(records, FRACTIONS, seed=0)
    assert list(splits) == ["train", "validation", "test"]
    assert_valid_split(records, splits)
    for name, frac in FRACTIONS.items():
        assert abs(len(splits[name]) / len(records) - frac) < 0.05


def test_split_by_doc_id():
    records = [QARecord(f"q{i}", f"d{i // 3}", "same-spec", "", f"ctx {i // 3}", "q?", ("a",), (-1,), False) for i in range(30)]
    with pytest.raises(ValueError, match="1 groups by source; need at least 3: use group_by doc_id or more data"):
        split_by_group(records, FRACTIONS, seed=0)
    splits = split_by_group(records, FRACTIONS, seed=0, group_by="doc_id")
    assert_valid_split(records, splits, key=lambda r: r.doc_id)
    with pytest.raises(ValueError, match="group_by='title'"):
        split_by_group(records, FRACTIONS, seed=0, group_by="title")


def test_empty_source_falls_back_to_doc_id():
    records = make_records(21)
    splits = split_by_group(records, FRACTIONS, seed=3)
    sourceless = {r.doc_id: name for name, part in splits.items() for r in part if not r.source}
    assert len(sourceless) == 3  # groups 0, 7, 14 are split by doc_id, not lumped into one "" group
    assert_valid_split(records, splits)


def test_split_is_deterministic_and_seed_dependent():
    records = make_records(40)
    ids = lambda s: {k: [r.id for r in v] for k, v in s.items()}
    a = ids(split_by_group(records, FRACTIONS, seed=1))
    rev = ids(split_by_group(list(reversed(records)), FRACTIONS, seed=1))
    assert {k: sorted(v) for k, v in rev.items()} == {k: sorted(v) for k, v in a.items()}  # input order does not matter
    assert a == ids(split_by_group(records, FRACTIONS, seed=1))
    others = [ids(split_by_group(records, FRACTIONS, seed=s)) for s in range(2, 7)]
    assert any(o != a for o in others)


def test_split_does_not_depend_on_pythonhashseed(tmp_path):
    records = make_records(40)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), encoding="utf-8")
    code = (
        "import json, sys\n"
        "from telekd.data import QARecord\n"
        "from telekd.split import split_by_group\n"
        "recs = [QARecord.from_dict(json.loads(l)) for l in open(sys.argv[1])]\n"
        f"s = split_by_group(recs, {FRACTIONS!r}, seed=5)\n"
        "print(json.dumps({k: [r.id for r in v] for k, v in s.items()}))\n"
    )
    here = {k: [r.id for r in v] for k, v in split_by_group(records, FRACTIONS, seed=5).items()}
    for hashseed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(REPO / "src")}
        out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.7, "test": 0.2},
        {"train": 0.7, "validation": 0.4, "test": -0.1},
        {"train": 1.0, "test": 0.0},
        {"train": "0.5", "test": 0.5},
        {},
    ],
)
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_by_group(make_records(10), fractions, seed=0)


def test_too_few_groups():
    with pytest.raises(ValueError, match="2 groups by source; need at least 3: use group_by doc_id or more data"):
        split_by_group(make_records(3)[1:], FRACTIONS, seed=0)  # drop group 0 (sourceless) -> groups 1 and 2
    splits = split_by_group(make_records(3), FRACTIONS, seed=0)  # exactly 3 groups: one each
    assert sorted(len({group_of(r) for r in part}) for part in splits.values()) == [1, 1, 1]


def test_small_split_gets_a_group_even_when_large_groups_come_first():
    records = []
    for g, size in enumerate([60, 39, 1]):
        records += [QARecord(f"q{g}-{k}", f"d{g}", f"s{g}", "", f"c{g}", "q?", ("a",), (-1,), False) for k in range(size)]
    for seed in range(10):
        splits = split_by_group(records, {"train": 0.5, "validation": 0.01, "test": 0.49}, seed=seed)
        assert_valid_split(records, splits)


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} is absent")
def test_real_telequad():
    res = load_telequad(REAL, on_invalid="error", impossible="drop")
    assert len(res.records) == 4485 - 223 == 4262
    assert len(res.skipped) == 223
    assert {s["reason"] for s in res.skipped} == {"is_impossible (data.impossible: drop)"}
    assert len(res.warnings) == 2
    splits = split_by_group(res.records, FRACTIONS, seed=0, group_by="source")
    assert_valid_split(res.records, splits, key=lambda r: r.source)
    capped = cap_by_group(splits["train"], 32, seed=0)   # the small reference study's cap: 32 documents, not 2
    assert len(capped) == 32 and len({r.source for r in capped}) == 32


def test_a_cap_takes_one_question_per_group_in_turn():
    # groups of 1, 2, 3, 5, 8 questions (make_records(5)); the seeded group order by hand: random.Random(0)
    # shuffles the sorted keys ["doc_id:d0", "source:spec-1" ... "source:spec-4"]
    import random

    records = make_records(5)
    keys = ["doc_id:d0", "source:spec-1", "source:spec-2", "source:spec-3", "source:spec-4"]
    random.Random(0).shuffle(keys)
    size = {"doc_id:d0": 1, "source:spec-1": 2, "source:spec-2": 3, "source:spec-3": 5, "source:spec-4": 8}
    first = [f"q{k.split('-')[-1] if 'spec' in k else 0}-0" for k in keys]
    assert sorted(r.id for r in cap_by_group(records, 3, seed=0)) == sorted(first[:3])   # 3 groups, one each
    assert len({group_of(r) for r in cap_by_group(records, 5, seed=0)}) == 5
    seconds = [f"q{k.split('-')[-1]}-1" for k in keys if size[k] >= 2]
    assert sorted(r.id for r in cap_by_group(records, 7, seed=0)) == sorted(first + seconds[:2])
    eleven = cap_by_group(records, 11, seed=0)   # depths 0, 1, 2 cover 5 + 4 + 3 = 12: the last round is cut
    assert len(eleven) == 11 and [r.id for r in eleven] == [r.id for r in records if r in eleven]   # file order
    assert cap_by_group(records, 100, seed=0) == records
    assert cap_by_group(records, 3, seed=0) == cap_by_group(list(records), 3, seed=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"cap {bad!r}: must be an integer of at least 1"):
            cap_by_group(records, bad, seed=0)


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"{SAMPLE} is absent")
def test_sample_telequad():
    res = load_telequad(SAMPLE, on_invalid="error")
    assert len({r.context for r in res.records}) >= 40
    assert len(res.records) >= 200
    splits = split_by_group(res.records, FRACTIONS, seed=0)
    assert_valid_split(res.records, splits)

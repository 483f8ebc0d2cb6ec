"""Data that is empty, not JSON, a question table without contexts, or with unanswerable questions: each either
loads and flows through the pipeline's library calls, or fails naming the file or the record."""

from __future__ import annotations

import json
import math

import pytest

from telekd.data import DataValidationError, load_records

QUESTIONS = [  # (question, answer): no context anywhere
    ("What does RRC stand for?", "Radio Resource Control"),
    ("Which node selects the SMF?", "the AMF"),
    ("What is the subcarrier spacing of numerology 0?", "15 kHz"),
]


def csv_file(tmp_path, rows=QUESTIONS, header="question,answer"):
    import csv

    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)
    return path


def jsonl_file(tmp_path, lines):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name, content, what", [
    ("empty.json", b"", "file is empty"),
    ("empty.csv", b"\n", "file is empty"),
    ("empty.jsonl", b"  \n", "file is empty"),
    ("notjson.json", b"question,answer\nWhat?,That\n", "not valid JSON (Expecting value at line 1 column 1)"),
    ("nocolumns.csv", b"q,a\nWhat?,That\n", "no question column in ['q', 'a']"),
])
def test_empty_or_unreadable_files_fail_naming_the_file(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataValidationError) as e:
        load_records(path, on_invalid="skip")
    [problem] = e.value.problems
    assert problem.record_id == "<file>" and str(path) in problem.reason and what in problem.reason


def test_a_bad_table_row_is_named(tmp_path):
    path = jsonl_file(tmp_path, [{"id": "a", "question": "Q?", "answer": "A"}, "{oops", {"id": "c", "question": "",
                                 "answer": "A"}, {"id": "a", "question": "Q2?", "answers": ["B"]}])
    with pytest.raises(DataValidationError) as e:
        load_records(path)
    lines = str(e.value).splitlines()
    assert lines[:3] == ["record line 2: line: not valid JSON (Expecting property name enclosed in double quotes at "
                         "column 2)", "record c: question: missing or empty",
                         "record a: id: duplicate id; first seen at line 1"]
    assert [r.id for r in load_records(path, on_invalid="skip").records] == ["a"]


def test_question_table_without_context_flows_through_the_pipeline(tmp_path, tokenizers, saved_models):
    from telekd.generation import generate_answers
    from telekd.metrics import cosine_scores, ngram_batch
    from telekd.models import load_model
    from telekd.prompts import build_example

    for path in (csv_file(tmp_path), jsonl_file(tmp_path, [{"question": q, "answers": [a]} for q, a in QUESTIONS])):
        loaded = load_records(path)
        recs = loaded.records
        assert [(r.question, r.answers, r.context, r.answer_starts) for r in recs] == \
            [(q, (a,), "", (-1,)) for q, a in QUESTIONS]
        assert [r.id for r in recs] == ([f"row{i}" for i in (1, 2, 3)] if path.suffix == ".csv" else
                                        [f"line{i}" for i in (1, 2, 3)])
        assert not loaded.skipped and not loaded.warnings
    ex = build_example(tokenizers["llama"], recs[0], "Answer.", max_length=128, max_prompt_length=96)
    assert "Context:" not in ex.prompt and recs[0].question in ex.prompt
    assert ex.completion == " Radio Resource Control</s>" and not ex.truncated and not ex.answer_in_context
    model, tok = load_model(str(saved_models["student"]))
    rows = generate_answers(model, tok, recs, "Answer.", 96, 4, batch_size=2)
    assert [r["context"] for r in rows] == ["", "", ""] and [r["references"] for r in rows] == [[a] for _, a in QUESTIONS]
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    assert all(math.isfinite(v) for s in ngram_batch(preds, refs) for v in s.values())
    assert all(math.isfinite(v) for v in cosine_scores(preds, refs))


def test_judge_faithfulness_without_a_context_is_undefined_not_a_failure(tmp_path, saved_models):
    pytest.importorskip("ragas")
    from telekd.judge import NO_CONTEXT, JudgeConfig, judge_rows

    rows = [{"id": "row1", "question": "What does RRC stand for?", "context": "", "prediction": "Radio Resource",
             "references": ["Radio Resource Control"]}]
    cfg = JudgeConfig(judge_model=str(saved_models["llama"]), max_chars=12, max_items=2, max_new_tokens=512,
                      max_retries=0, cache_dir=str(tmp_path / "judge"))
    [s], report = judge_rows(rows, cfg, progress=False)
    assert s["faithfulness"] is None and s["judge_error"] == f"faithfulness: {NO_CONTEXT}"
    assert isinstance(s["answer_correctness"], float) and isinstance(s["factual_correctness"], float)
    assert (report.judged, report.failures, report.undefined) == (1, 0, 1)


def telequad_with_impossible(tmp_path):
    ctx = "The AMF selects the SMF. The UPF forwards user plane traffic."
    qas = [{"id": f"q{i}", "question": f"Who selects the SMF ({i})?", "is_impossible": False,
            "answers": [{"text": "The AMF", "answer_start": 0}]} for i in range(4)]
    qas.append({"id": "q-imp", "question": "Which node charges roaming users?", "is_impossible": True, "answers": []})
    docs = [{"docid": f"d{i}", "title": "t", "source": f"s{i}", "paragraphs": [{"context": ctx, "qas": [qa]}]}
            for i, qa in enumerate(qas)]
    path = tmp_path / "tq.json"
    path.write_text(json.dumps({"version": "t", "data": docs}))
    return path


def test_unanswerable_question_end_to_end(tmp_path, tokenizers, saved_models):
    """data.impossible: keep -> the no-answer reply is the training target and the evaluation reference."""
    from telekd.split import split_by_group
    from telekd.examples import tokenized
    from telekd.generation import generate_answers
    from telekd.metrics import ngram_batch
    from telekd.models import load_model

    path = telequad_with_impossible(tmp_path)
    dropped = load_records(path)
    assert "q-imp" not in [r.id for r in dropped.records]
    assert dropped.skipped == [{"id": "q-imp", "field": "is_impossible", "reason": "is_impossible (data.impossible: drop)"}]
    kept = load_records(path, impossible="keep", no_answer_text="not in the context")
    [imp] = [r for r in kept.records if r.id == "q-imp"]
    assert (imp.answers, imp.answer_starts, imp.is_impossible) == (("not in the context",), (-1,), True)
    assert load_records(path, impossible="keep").records[-1].answers == ("unanswerable",)  # the default
    splits = split_by_group(kept.records, {"train": 0.6, "test": 0.4}, seed=0, group_by="doc_id")
    test = [r for r in kept.records if r.id == "q-imp"] + splits["test"][:1]  # a test split with the question
    [ex] = tokenized([imp], tokenizers["llama"], "Answer.", 128, 96)
    assert ex.completion == " not in the context</s>" and ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
    model, tok = load_model(str(saved_models["student"]))
    rows = generate_answers(model, tok, test, "Answer.", 96, 4, batch_size=2)
    assert rows[0]["references"] == ["not in the context"]
    assert all(math.isfinite(v) for s in ngram_batch([r["prediction"] for r in rows], [r["references"] for r in rows])
               for v in s.values())


def test_prepare_stage_passes_no_answer_text(tmp_path, monkeypatch):
    """The prepare stage itself: kept impossible questions reach data/prepared with the configured reply."""
    import runpy

    import yaml

    from conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = telequad_with_impossible(tmp_path)
    params["data"].update(source=str(path), impossible="keep", no_answer_text="no answer")
    params["split"].update(group_by="doc_id", fractions={"train": 0.4, "validation": 0.2, "test": 0.4})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "stages/prepare.py"), run_name="__main__")
    rows = [json.loads(line) for f in (tmp_path / "data/prepared").glob("*.jsonl") if f.stem != "skipped"
            and f.stem != "warnings" for line in f.read_text().splitlines()]
    assert len(rows) == 5 and [r["answers"] for r in rows if r["id"] == "q-imp"] == [["no answer"]]

"""telekd.score_diff: exact per-sample comparison of two studies' scores (hand-made score files)."""

import json

import pytest

from telekd import score_diff


def _study(root, values: dict):
    for (run, family), rows in values.items():
        d = root / "scores" / run
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{family}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_identical_and_differing_values_are_counted(tmp_path, capsys):
    same = [{"id": "q1", "bleu1": 0.5, "rouge1": 0.25}, {"id": "q2", "bleu1": 0.0, "rouge1": 1.0}]
    before = _study(tmp_path / "b", {("c1", "ngram"): same, ("c1", "embed"): [{"id": "q1", "cosine": 0.3}],
                                     ("c1", "llm"): [{"id": "q1", "faithfulness": 1.0}]})
    after = _study(tmp_path / "a", {("c1", "ngram"): same, ("c1", "embed"): [{"id": "q1", "cosine": 0.3 + 1e-7}],
                                    ("c1", "llm"): [{"id": "q1", "faithfulness": 0.5}]})
    rows = {r["family"]: r for r in score_diff.compare(before, after)}
    assert (rows["ngram"]["values"], rows["ngram"]["identical"], rows["ngram"]["differ"]) == (4, 4, 0)
    assert rows["embed"]["differ"] == 1 and rows["embed"]["max_abs_diff"] == pytest.approx(1e-7)
    assert rows["llm"]["differ"] == 1 and rows["llm"]["max_abs_diff"] == 0.5
    assert score_diff.main([str(before), str(after)]) == 1          # an embedding value differs
    assert "| embed | 1 | 1 | 1 | 0 | 1 | 1e-07 | 0 |" in capsys.readouterr().out


def test_only_judge_changes_pass_and_a_missing_run_fails(tmp_path):
    n = [{"id": "q1", "bleu1": 0.5}]
    before = _study(tmp_path / "b", {("c1", "ngram"): n, ("c1", "embed"): [{"id": "q1", "cosine": 0.1}],
                                     ("c1", "llm"): [{"id": "q1", "faithfulness": 1.0}]})
    after = _study(tmp_path / "a", {("c1", "ngram"): n, ("c1", "embed"): [{"id": "q1", "cosine": 0.1}],
                                    ("c1", "llm"): [{"id": "q1", "faithfulness": None}]})
    assert score_diff.main([str(before), str(after)]) == 0
    _study(tmp_path / "a", {("c2", "ngram"): n})
    assert score_diff.main([str(before), str(after)]) == 1


def test_different_samples_and_missing_folders_are_refused(tmp_path):
    before = _study(tmp_path / "b", {("c1", "ngram"): [{"id": "q1", "bleu1": 0.5}]})
    after = _study(tmp_path / "a", {("c1", "ngram"): [{"id": "q9", "bleu1": 0.5}]})
    with pytest.raises(ValueError, match="different samples"):
        score_diff.compare(before, after)
    with pytest.raises(FileNotFoundError, match="holds scores|hold scores"):
        score_diff.compare(tmp_path / "nowhere", after)

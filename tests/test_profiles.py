"""`-S profile=paper` carries every setting that differs with scale: its data, the judge's sample count and bounds;
the report states what it ran with."""

import pytest
import yaml

from telekd.params import ParamsError, load_params


def _write(tmp_path, **changes):
    raw = yaml.safe_load(open("params.yaml", encoding="utf-8"))
    for key, value in changes.items():
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_paper_profile_refuses_the_toy_sample_as_data(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, profile="paper"))
    msg = str(e.value)
    assert "data.source data/sample/telequad-sample.json" in msg
    assert "-S profile=paper -S data.source=data/telequad/TeleQuAD-v4-full.json" in msg and "\n" not in msg


def test_paper_profile_judges_every_question_with_real_bounds(tmp_path):
    from telekd.judge import JudgeConfig

    p = load_params(_write(tmp_path, profile="paper", **{"data.source": "data/telequad/TeleQuAD-v4-full.json"}))
    cfg = JudgeConfig.from_params(p)
    assert (cfg.max_samples, cfg.max_chars, cfg.max_items) == (None, 400, 32)
    tiny = JudgeConfig.from_params(load_params("params.yaml"))
    assert (tiny.max_samples, tiny.max_chars, tiny.max_items) == (2, 16, 1)  # a smoke-test judge: cheap bounds


def test_judge_caps_are_no_longer_global_keys(tmp_path):
    with pytest.raises(ParamsError, match="eval_llm.max_samples"):
        load_params(_write(tmp_path, **{"eval_llm.max_samples": 5}))


def test_report_header_states_data_judge_and_counts():
    from telekd.report.sections import _judge_caps, _split_counts

    assert _split_counts({"questions": {"train": 2988, "validation": 424, "test": 850}}) == \
        "2988 train, 424 validation, 850 test questions"
    assert _judge_caps({"judge_max_samples": None, "judge_max_chars": 400, "judge_max_items": 32}) == (
        "every test question judged per run, answers bounded to 400 characters per string and 32 items per list")
    assert _judge_caps({"judge_max_samples": 2, "judge_max_chars": 48, "judge_max_items": 2}).startswith(
        "the first 2 test questions judged")

"""Training metrics through DVCLive: a tiny KD run and a tiny SFT run write DVCLive directories whose histories hold the
losses the runs return, step for step, identically across two runs, with no wall-clock values."""

import json
import os
import signal

import pytest
import torch

from telekd.prompts import build_example
from telekd.tracking import TrainLive, parse_history, read_rows, split_timing

SYSTEM = "Answer from the context."


def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_trainlive_writes_histories_summary_and_params(tmp_path):
    live = TrainLive(tmp_path / "run", {"lr": 0.1, "targets": ("q", "v")})
    live.log(1, {"loss": 3.5, "ce": 2.0})
    live.log(2, {"loss": 3.0, "ce": 1.5})
    live.finish({"val_ce_after": 1.25, "unset": None})
    d = tmp_path / "run"
    assert (d / "plots/metrics/train/loss.tsv").read_text().split() == ["step", "loss", "1", "3.5", "2", "3.0"]
    assert json.loads((d / "metrics.json").read_text()) == {"train": {"loss": 3.0, "ce": 1.5}, "step": 2,
                                                            "val_ce_after": 1.25}
    assert (d / "params.yaml").read_text().split() == ["lr:", "0.1", "targets:", "-", "q", "-", "v"]
    assert read_rows(d) == [{"step": 1, "ce": 2.0, "loss": 3.5}, {"step": 2, "ce": 1.5, "loss": 3.0}]
    assert not (d / "dvc.yaml").exists() and not (d / "report.html").exists()  # no side effects of DVCLive's own


def test_hf_logs_split_train_eval_and_drop_timings(tmp_path):
    live = TrainLive(tmp_path / "run")
    live.log_hf(0, {"eval_loss": 5.0, "eval_runtime": 0.3, "eval_samples_per_second": 9.0, "epoch": 0,
                    "eval_model_preparation_time": 0.002})
    live.log_hf(1, {"loss": 4.0, "grad_norm": 1.5, "learning_rate": 0.001, "epoch": 0.5})
    live.log_hf(1, {"train_runtime": 2.0, "train_loss": 4.4, "total_flos": 1e9, "train_samples_per_second": 3.0})
    assert read_rows(tmp_path / "run", "eval") == [{"step": 0, "epoch": 0.0, "loss": 5.0}]
    assert read_rows(tmp_path / "run") == [{"step": 1, "epoch": 0.5, "grad_norm": 1.5, "learning_rate": 0.001,
                                           "loss": 4.0}]
    text = json.dumps(json.loads((tmp_path / "run/metrics.json").read_text()))
    assert "runtime" not in text and "per_second" not in text and "flos" not in text and "_time" not in text


def test_split_timing_and_history_parser():
    assert split_timing({"steps": 2, "wall_s": 1.5, "tokens_per_s": 10.0}) == ({"steps": 2},
                                                                               {"wall_s": 1.5, "tokens_per_s": 10.0})
    assert parse_history("step\tloss\n0\t1.5\n3\t0.25\n") == [(0, 1.5), (3, 0.25)]
    with pytest.raises(ValueError, match="not a DVCLive metric history"):
        parse_history("step\ta\tb\n0\t1\t2\n")


def _kd_run(tokenizers, records, out, checkpoint=None, sigterm_at=None):
    from conftest import tiny_model

    from telekd.align import vocab_map
    from telekd.cache import compute_targets
    from telekd.kd.loop import KDConfig, train_kd
    from telekd.losses import Divergence
    from telekd.teacher_inputs import build_pairs
    from telekd.kd.vanilla import vanilla_term

    s_tok = t_tok = tokenizers["llama"]
    teacher = tiny_model("llama", len(t_tok), hidden=48)
    student = tiny_model("llama", len(s_tok), hidden=32, seed=1)
    exs = [build_example(s_tok, r, SYSTEM, 600, 500) for r in records]
    pairs = build_pairs(exs, records, s_tok, t_tok, SYSTEM, 600, 500)
    s_map, t_map = vocab_map(s_tok, t_tok)
    targets = compute_targets(teacher, pairs, s_map, t_map, top_k=16, batch_size=2, pad_id=t_tok.pad_token_id,
                              temperature=2.0)
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 2.0, 0.1, 0.5), epochs=1,
                   lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0, seed=0)
    live = TrainLive(out, {"cell": "t"})
    inner = vanilla_term(targets, pairs, s.divergence)

    def term(*args):  # SIGTERM to ourselves during batch `sigterm_at`: the run saves a checkpoint and stops
        term.calls += 1
        if term.calls == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(*args)
    term.calls = 0
    return train_kd(student, exs, s, s_tok.pad_token_id, term, val_examples=exs[:2], live=live, checkpoint=checkpoint)


def test_train_kd_writes_its_losses_to_dvclive_deterministically(tokenizers, sample_records, tmp_path):
    runs = [_kd_run(tokenizers, sample_records[:6], tmp_path / f"r{i}") for i in (0, 1)]
    out = runs[0]
    rows = read_rows(tmp_path / "r0")
    assert [r["step"] for r in rows] == [1, 2, 3] == [r["step"] for r in out["log"]]
    for got, want in zip(rows, out["log"]):
        assert {k: got[k] for k in ("loss", "ce", "kd")} == {k: want[k] for k in ("loss", "ce", "kd")}
    summary = json.loads((tmp_path / "r0/metrics.json").read_text())
    assert summary["step"] == 3 and summary["train"]["loss"] == out["log"][-1]["loss"]
    assert summary["val_ce_after"] == out["metrics"]["val_ce_after"]
    assert _files(tmp_path / "r0") == _files(tmp_path / "r1")  # deterministic: no timestamps, no wall clock


def test_resumed_train_kd_writes_the_uninterrupted_runs_dvclive_files(tokenizers, sample_records, tmp_path):
    from telekd.checkpoint import Checkpoint, Interrupted

    records = sample_records[:8]
    _kd_run(tokenizers, records, tmp_path / "whole")
    ckpt = Checkpoint(tmp_path / "ckpt", "fp", save_steps=0)
    with pytest.raises(Interrupted):
        _kd_run(tokenizers, records, tmp_path / "cut", ckpt, sigterm_at=2)
    assert [r["step"] for r in read_rows(tmp_path / "cut")] == [1, 2]
    # rerun (DVC removes a stage's outputs first; TrainLive empties its directory): the checkpoint's rows come back
    out = _kd_run(tokenizers, records, tmp_path / "cut", ckpt)
    assert [r["step"] for r in out["log"]] == [1, 2, 3, 4]
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_run_sft_writes_train_and_eval_losses_to_dvclive(saved_models, sample_records, tmp_path):
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft

    model, tok = load_model(str(saved_models["student"]))
    train = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[:8]]
    val = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[8:10]]
    s = SFTSettings(max_length=400, max_prompt_length=300, batch_size=4, grad_accum=1, epochs=2, lr=5e-3, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj"), weight_decay=0.0,
                    lr_scheduler="cosine", max_grad_norm=1.0, save_steps=2, dtype="float32", seed=0)
    out = run_sft(model, tok, train, val, s, None, live=TrainLive(tmp_path / "sft", {"model": "student"}))
    d = tmp_path / "sft"
    train_rows, eval_rows = read_rows(d), read_rows(d, "eval")
    assert [(r["step"], r["loss"]) for r in train_rows] == [(r["step"], r["loss"]) for r in out["train_log"]]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # eval at step 0 (before training) and every eval_steps; the best checkpoint's evaluation is summary only
    assert [(r["step"], r["loss"]) for r in eval_rows] == [(0, out["metrics"]["eval_loss_initial"])] + [
        (r["step"], r["loss"]) for r in out["eval_log"] if r["step"] > 0][:2]
    summary = json.loads((d / "metrics.json").read_text())
    assert summary["eval_loss_best"] == out["metrics"]["eval_loss_best"] and summary["step"] == 4
    text = (d / "metrics.json").read_text() + "".join(p.name for p in d.rglob("*"))
    assert "runtime" not in text and "per_second" not in text and "_time" not in text

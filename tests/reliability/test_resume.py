"""Interrupted KD and SFT runs (SIGTERM, SIGKILL) resume from their checkpoints and end bit-identical to an
uninterrupted run; a checkpoint of a different run is ignored.

The killed runs are subprocesses running this file as a script (the library functions the stages call);
a per-step delay in the script's own KD term / Trainer callback gives the test time to kill mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SYSTEM = "Answer from the context."
FP = "run-a"


def _examples(tok, lo, hi):
    from telekd.data import load_telequad
    from telekd.prompts import build_example

    sys.path.insert(0, str(TESTS))
    from conftest import SAMPLE

    records = load_telequad(SAMPLE).records[lo:hi]
    return records, [build_example(tok, r, SYSTEM, 400, 300) for r in records]


def kd_run(models: Path, ckpt_dir: Path, out: Path, fp: str = FP, delay: float = 0.0) -> None:
    """DSKD into a LoRA student (dropout on: the RNG state matters), projectors trained, checkpoint every 2 steps."""
    import torch
    from safetensors.torch import save_file

    from telekd.align import vocab_map
    from telekd.cache import compute_targets
    from telekd.checkpoint import Checkpoint
    from telekd.kd.loop import KDConfig, train_kd
    from telekd.losses import Divergence
    from telekd.teacher_inputs import build_pairs
    from telekd.kd.dskd import make_projectors
    from telekd.models import load_model
    from telekd.kd.dskd import dskd_term

    torch.set_num_threads(1)
    teacher, tok = load_model(str(models / "llama"))
    student, _ = load_model(str(models / "student"))
    records, exs = _examples(tok, 0, 16)
    pairs = build_pairs(exs, records, tok, tok, SYSTEM, 400, 300)
    targets = compute_targets(teacher, pairs, *vocab_map(tok, tok), top_k=16, batch_size=8, pad_id=tok.pad_token_id,
                              temperature=2.0)
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 2.0, 0.1, 0.5), epochs=2,
                   lr=1e-2, batch_size=4, grad_accum=1, max_grad_norm=1.0, weight_decay=0.01, seed=0, student_lora=True,
                   lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_targets=("q_proj", "v_proj"))
    proj = make_projectors(student.config.hidden_size, teacher.config.hidden_size, cma=False)
    heads = (student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    inner = dskd_term(targets, pairs, proj, *heads, s.divergence)
    out.mkdir(parents=True, exist_ok=True)

    def term(*args):
        term.calls += 1
        (out / "progress").write_text(str(term.calls))
        time.sleep(delay)
        return inner(*args)
    term.calls = 0
    r = train_kd(student, exs, s, tok.pad_token_id, term, extra_modules=proj, projector_lr=1e-3, val_examples=exs[:4],
                 checkpoint=Checkpoint(ckpt_dir, fp, save_steps=2))
    weights = {f"student.{k}": v.contiguous() for k, v in r["model"].state_dict().items()}
    weights.update({f"proj.{k}": v.contiguous() for k, v in r["projectors"].state_dict().items()})
    save_file(weights, str(out / "weights.safetensors"))
    (out / "log.json").write_text(json.dumps({"log": r["log"], "val_ce_after": r["metrics"]["val_ce_after"],
                                              "val_ce_before": r["metrics"]["val_ce_before"]}))


def sft_run(models: Path, ckpt_dir: Path, out: Path, fp: str = FP, delay: float = 0.0) -> None:
    """LoRA SFT (dropout on), 8 steps, evaluation and checkpoint every 2 steps, best checkpoint loaded at the end."""
    import torch
    from transformers import TrainerCallback

    from telekd.checkpoint import Checkpoint
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft

    torch.set_num_threads(1)
    model, tok = load_model(str(models / "student"))
    _, train = _examples(tok, 0, 16)
    _, val = _examples(tok, 16, 20)
    s = SFTSettings(max_length=400, max_prompt_length=300, batch_size=4, grad_accum=1, epochs=2, lr=5e-3, lora_r=4,
                    lora_alpha=8, lora_dropout=0.1, lora_targets=("q_proj", "v_proj"), weight_decay=0.0,
                    lr_scheduler="cosine", max_grad_norm=1.0, save_steps=2, dtype="float32", seed=0)

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            (out / "progress").write_text(str(state.global_step))
            time.sleep(delay)

    out.mkdir(parents=True, exist_ok=True)
    r = run_sft(model, tok, train, val, s, out / "model", checkpoint=Checkpoint(ckpt_dir, fp), callbacks=[Slow()])
    m = {k: v for k, v in r["metrics"].items() if k not in ("wall_s", "tokens_per_s")}
    (out / "log.json").write_text(json.dumps({"train": r["train_log"], "eval": r["eval_log"], "metrics": m}))


def _launch(kind: str, models: Path, ckpt: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, kind, str(models), str(ckpt), str(out), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def _progress(out: Path) -> int:
    f = out / "progress"
    return int(f.read_text() or 0) if f.exists() else 0


def _same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _finish(kind, models, ckpt, out) -> str:
    p = _launch(kind, models, ckpt, out, 0.0)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-3000:]
    return stdout + stderr


def _kd_step(ckpt: Path) -> int:
    import torch

    return torch.load(ckpt / "state.pt", weights_only=True)["step"]


def _sft_steps(ckpt: Path) -> list[int]:
    return sorted(int(c.name.split("-")[1]) for c in ckpt.glob("checkpoint-*") if (c / "trainer_state.json").exists())


@pytest.fixture
def models(saved_models) -> Path:
    return saved_models["student"].parent


def test_kd_resumes_bit_identically_after_sigterm_and_sigkill(models, tmp_path, capsys):
    ref = tmp_path / "ref"
    kd_run(models, tmp_path / "ckpt-ref", ref)
    want = json.loads((ref / "log.json").read_text())

    # SIGTERM mid-run: the current step finishes, a checkpoint is saved, the exit status is non-zero
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    p = _launch("kd", models, ckpt, out, 0.3)
    _wait(lambda: _progress(out) >= 3, p, "batch 3")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "stopped by SIGTERM" in err and "resume" in err
    term_at = _kd_step(ckpt)
    assert 3 <= term_at < 8

    # the rerun resumes there; SIGKILL it after its next periodic checkpoint (every 2 steps)
    p = _launch("kd", models, ckpt, out, 0.3)
    _wait(lambda: _kd_step(ckpt) > term_at and term_at + _progress(out) > _kd_step(ckpt) + 1, p, "a checkpoint")
    p.kill()
    p.communicate()
    killed_in, saved = term_at + _progress(out), _kd_step(ckpt)
    assert term_at < saved < killed_in <= 8 and saved % 2 == 0

    log = _finish("kd", models, ckpt, out)
    assert f"resumed from {ckpt / 'state.pt'} at batch {saved}/8" in log
    assert _same_weights(ref / "weights.safetensors", out / "weights.safetensors")
    assert json.loads((out / "log.json").read_text()) == want
    with capsys.disabled():
        print(f"\nkd: SIGTERM -> saved after batch {term_at}; resumed, SIGKILL in batch {killed_in} -> resumed from "
              f"batch {saved}/8; weights and loss log equal the uninterrupted run's")

    # a checkpoint of another run is ignored (one line) and the run starts over, with the same result
    assert _kd_step(ckpt) >= saved  # the library leaves it; the stage removes it after writing its outputs
    kd_run(models, ckpt, tmp_path / "other", fp="run-b")
    assert "fingerprint differs): ignored, starting over" in capsys.readouterr().err
    assert _same_weights(ref / "weights.safetensors", tmp_path / "other" / "weights.safetensors")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_resumes_bit_identically_after_sigterm_and_sigkill(models, tmp_path, capsys):
    ref = tmp_path / "ref"
    sft_run(models, tmp_path / "ckpt-ref", ref)
    want = json.loads((ref / "log.json").read_text())
    assert want["metrics"]["steps"] == 8 and want["metrics"]["best_step"] in (2, 4, 6, 8)

    # SIGTERM mid-run: the Trainer saves at the end of the step and the run exits non-zero
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    p = _launch("sft", models, ckpt, out, 0.3)
    _wait(lambda: _progress(out) >= 3, p, "step 3")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "stopped by SIGTERM" in err
    term_at = _sft_steps(ckpt)[-1]
    assert 3 <= term_at < 8

    # the rerun resumes there; SIGKILL it after its next periodic checkpoint (every 2 steps)
    p = _launch("sft", models, ckpt, out, 0.3)
    _wait(lambda: _sft_steps(ckpt)[-1] > term_at and _progress(out) > _sft_steps(ckpt)[-1], p, "a checkpoint")
    p.kill()
    p.communicate()
    killed_after, saved = _progress(out), _sft_steps(ckpt)[-1]
    assert term_at < saved < killed_after < 8 and saved % 2 == 0

    log = _finish("sft", models, ckpt, out)
    assert f"resuming from {ckpt / f'checkpoint-{saved}'}" in log
    assert _same_weights(ref / "model" / "model.safetensors", out / "model" / "model.safetensors")
    assert _same_weights(ref / "model" / "adapter" / "adapter_model.safetensors",
                         out / "model" / "adapter" / "adapter_model.safetensors")
    assert json.loads((out / "log.json").read_text()) == want
    with capsys.disabled():
        print(f"\nsft: SIGTERM -> saved at step {term_at}; resumed, SIGKILL after step {killed_after} -> resumed from "
              f"step {saved}/8; merged weights, adapter, loss logs and metrics equal the uninterrupted run's")

    # checkpoints of another run are removed with one line and the run starts over, with the same result
    sft_run(models, ckpt, tmp_path / "other", fp="run-b")
    assert "fingerprint differs): ignored and removed, starting over" in capsys.readouterr().err
    assert _same_weights(ref / "model" / "model.safetensors", tmp_path / "other" / "model" / "model.safetensors")


if __name__ == "__main__":
    kind, root, ckpt_dir, out_dir, delay = sys.argv[1:]
    {"kd": kd_run, "sft": sft_run}[kind](Path(root), Path(ckpt_dir), Path(out_dir), delay=float(delay))

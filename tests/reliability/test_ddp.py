"""The kd and sft stages under `accelerate launch` with 2 CPU processes (gloo): both ranks end with identical
weights, only rank 0 writes, and the result matches the one-process run to float tolerance. A launch the loops
cannot serve (FSDP, DeepSpeed, a process count that does not divide grad_accum) is refused in one line.

The stage runs unchanged (stages/vanilla.py through runpy) in a temporary study folder; this file, run as a
script, wraps train_kd and the writers only to record what each rank holds and writes.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
CELL = "llama-base-base-vanilla"


def _study(tmp: Path, models: dict, records) -> Path:
    """A study folder with prepared splits, base models and the teacher cache: what the kd and sft stages read."""
    from telekd.io import write_jsonl

    d = tmp / "study"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # global batch 2 x 2: each of 2 processes computes one whole micro-batch of 2 per step (grad_accum / processes)
    params["profiles"]["tiny"]["train"].update(max_length=300, max_prompt_length=256, batch_size=2, grad_accum=2,
                                               epochs=1, save_steps=2)
    params["kd"].update(alg="vanilla")
    params["sft"].update(lora_dropout=0.0)  # dropout off: the ranks' RNG streams differ
    d.mkdir()
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_jsonl(d / "data/prepared/train.jsonl", [r.to_dict() for r in records[:16]])
    write_jsonl(d / "data/prepared/validation.jsonl", [r.to_dict() for r in records[16:20]])
    for role in ("student", "llama"):
        shutil.copytree(models[role], d / "models/base" / role)
    _stage(d, "teacher_cache", ["--teacher", "llama", "--teacher-sft", "base"])
    return d


def _stage(cwd: Path, name: str, args: list[str]) -> None:
    old_cwd, old_argv = os.getcwd(), sys.argv
    try:
        os.chdir(cwd)
        sys.argv = [f"stages/{name}.py", *args]
        runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv


def _observe_and_run(record: Path, stage: str = "vanilla", args: tuple = ("--cell", CELL)) -> None:
    """Run a stage here, recording this rank's KD weight digest and every file it writes."""
    import hashlib

    import telekd.checkpoint as ckpt
    import telekd.io as tio
    import telekd.kd.loop as distill
    import telekd.kd.run as kd_run
    import telekd.tracking as tracking
    from telekd.shard import state

    rank = state().process_index
    writes = []
    real_train, real_atomic, real_save = distill.train_kd, tio.atomic_path, ckpt.Checkpoint.save
    real_live = tracking.TrainLive.__init__

    def live_init(self, directory, *a, **k):  # DVCLive writes its directory itself
        writes.append(str(directory))
        return real_live(self, directory, *a, **k)

    def train_kd(*a, **k):
        out = real_train(*a, **k)
        h = hashlib.sha256()
        for name, t in sorted(out["model"].state_dict().items()):
            h.update(name.encode() + t.detach().contiguous().numpy().tobytes())
        (record / f"rank{rank}.digest").write_text(h.hexdigest())
        return out

    def atomic_path(path):
        writes.append(str(path))
        return real_atomic(path)

    def save(self, state):
        writes.append(str(self.file))
        return real_save(self, state)

    # kd.run binds atomic_path at its import, which an earlier test in this process may have done: patch it there too
    distill.train_kd, tio.atomic_path, kd_run.atomic_path, ckpt.Checkpoint.save = train_kd, atomic_path, atomic_path, save
    tracking.TrainLive.__init__ = live_init
    try:
        _stage(Path.cwd(), stage, list(args))
    finally:  # this also runs in the test process: put the real functions back for the tests after it
        distill.train_kd, tio.atomic_path, kd_run.atomic_path, ckpt.Checkpoint.save = (real_train, real_atomic,
                                                                                       real_atomic, real_save)
        tracking.TrainLive.__init__ = real_live
        (record / f"rank{rank}.writes.json").write_text(json.dumps(writes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_both(tmp_path, study, stage: str, args: tuple, torchrun: bool = False) -> tuple[Path, Path, Path, float]:
    """The stage under accelerate launch (or torchrun; 2 CPU processes) in `study`, and in this process in a copy."""
    single = tmp_path / f"single-{stage}"
    shutil.copytree(study, single)
    one, two = tmp_path / f"rec1-{stage}", tmp_path / f"rec2-{stage}"
    one.mkdir(), two.mkdir()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu-ddp.yaml"), "--main_process_port", str(_free_port())]
    if torchrun:  # the documented machine-sized launcher (there: --nproc-per-node gpu)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    p = subprocess.run([*launch, __file__, str(two), stage, *args], cwd=study, env=env, capture_output=True, text=True,
                       timeout=240)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    old = os.getcwd()
    os.chdir(single)
    try:
        _observe_and_run(one, stage, args)  # the same stage in this process: one rank
    finally:
        os.chdir(old)
    return single, one, two, wall


def test_kd_stage_under_accelerate_launch_with_two_cpu_processes(saved_models, sample_records, tmp_path, capsys):
    from safetensors.torch import load_file

    study = _study(tmp_path, saved_models, sample_records)
    single, one, two, wall = _run_both(tmp_path, study, "vanilla", ("--cell", CELL))

    # both ranks hold identical weights
    d0, d1 = (two / "rank0.digest").read_text(), (two / "rank1.digest").read_text()
    assert d0 == d1
    # only rank 0 wrote: the stage's outputs and the (periodic) checkpoint; the checkpoint is gone after success
    w0, w1 = json.loads((two / "rank0.writes.json").read_text()), json.loads((two / "rank1.writes.json").read_text())
    assert w1 == []
    assert {f"models/kd/{CELL}", f"logs/kd/{CELL}", f"metrics/kd/{CELL}.json"} <= set(w0)
    assert f"checkpoints/kd/{CELL}/state.pt" in w0 and not (study / "checkpoints/kd" / CELL).exists()
    assert w0 == json.loads((one / "rank0.writes.json").read_text())

    # the 2-process result equals the 1-process one to float tolerance
    a = load_file(str(study / "models/kd" / CELL / "model.safetensors"))
    b = load_file(str(single / "models/kd" / CELL / "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert a.keys() == b.keys() and worst < 1e-5
    from telekd.tracking import read_rows

    la, lb = (read_rows(s / "logs/kd" / CELL) for s in (study, single))
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) < 1e-5 for k in ra)
    ma, mb = (json.loads((s / "metrics/kd" / f"{CELL}.json").read_text()) for s in (study, single))
    assert (ma["processes"], mb["processes"]) == (2, 1) and ma["tokens"] == mb["tokens"]
    assert abs(ma["val_ce_after"] - mb["val_ce_after"]) < 1e-5
    with capsys.disabled():
        print(f"\n2-process KD: ranks identical; max |w_2proc - w_1proc| = {worst:.2e}; launch wall {wall:.1f}s")


def test_kd_stage_under_torchrun_equals_one_process(saved_models, sample_records, tmp_path):
    """`launcher: torchrun --standalone --nproc-per-node ...` (docs/gpu.md) runs the same data-parallel loop."""
    from safetensors.torch import load_file

    study = _study(tmp_path, saved_models, sample_records)
    single, one, two, _ = _run_both(tmp_path, study, "vanilla", ("--cell", CELL), torchrun=True)
    assert (two / "rank0.digest").read_text() == (two / "rank1.digest").read_text()
    a = load_file(str(study / "models/kd" / CELL / "model.safetensors"))
    b = load_file(str(single / "models/kd" / CELL / "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert json.loads((study / "metrics/kd" / f"{CELL}.json").read_text())["processes"] == 2


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_stage_under_accelerate_launch_with_two_cpu_processes(saved_models, sample_records, tmp_path, capsys):
    from safetensors.torch import load_file

    study = _study(tmp_path, saved_models, sample_records)
    single, one, two, wall = _run_both(tmp_path, study, "sft", ("--model", "student"))
    w0, w1 = json.loads((two / "rank0.writes.json").read_text()), json.loads((two / "rank1.writes.json").read_text())
    assert w1 == [] and w0 == json.loads((one / "rank0.writes.json").read_text())
    assert {"models/sft/student", "metrics/sft/student.json", "logs/sft/student"} <= set(w0)
    assert not (study / "checkpoints/sft/student").exists()
    a = load_file(str(study / "models/sft/student/model.safetensors"))
    b = load_file(str(single / "models/sft/student/model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    ma, mb = (json.loads((s / "metrics/sft/student.json").read_text()) for s in (study, single))
    with capsys.disabled():
        print(f"\n2-process SFT: max |w_2proc - w_1proc| = {worst:.2e}; steps {ma['steps']} vs {mb['steps']}; "
              f"best eval loss {ma['eval_loss_best']:.6f} vs {mb['eval_loss_best']:.6f}; launch wall {wall:.1f}s")
    assert ma["steps"] == mb["steps"] and ma["best_step"] == mb["best_step"]
    assert a.keys() == b.keys() and worst < 1e-5
    for k in ("eval_loss_initial", "eval_loss_best", "train_loss_first", "train_loss_last"):
        assert abs(ma[k] - mb[k]) < 1e-5, k


class _Proc:
    def __init__(self, kind: str, n: int):
        from accelerate.utils import DistributedType

        self.distributed_type, self.num_processes = DistributedType(kind), n


@pytest.mark.parametrize("n, grad_accum", [(1, 1), (2, 2), (8, 8), (4, 8), (2, 8), (1, 8)])
def test_any_process_count_that_divides_grad_accum_is_served(n, grad_accum):
    """The paper profile (batch 4 x accumulation 8) on 8, 4, 2 or 1 GPUs: the global batch stays 32."""
    from telekd.shard import check_processes

    check_processes(_Proc("MULTI_GPU" if n > 1 else "NO", n), grad_accum, 4, "kd")


@pytest.mark.parametrize("kind, n, grad_accum, line", [
    ("MULTI_GPU", 3, 8, "kd: 3 processes do not divide profiles.<profile>.train.grad_accum 8: the global batch 4 x 8"),
    ("MULTI_GPU", 16, 8, "kd: 16 processes do not divide profiles.<profile>.train.grad_accum 8"),
    ("FSDP", 8, 8, "kd: FSDP is not supported (the sft and kd loops run data parallel"),
    ("DEEPSPEED", 8, 8, "kd: DEEPSPEED is not supported"),
])
def test_launches_the_loops_cannot_serve_are_refused_in_one_line(kind, n, grad_accum, line):
    from telekd.shard import check_processes

    with pytest.raises(SystemExit) as e:
        check_processes(_Proc(kind, n), grad_accum, 4, "kd")
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_shipped_accelerate_configs_take_the_process_count_from_the_command_line():
    """No config fixes a GPU count (it was 8, which refused every smaller machine's batch): ddp.yaml needs
    --num_processes; the FSDP config is gone (refused above)."""
    cfgs = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "configs/accelerate").glob("*.yaml")}
    assert set(cfgs) == {"ddp.yaml", "cpu-ddp.yaml"}
    assert "num_processes" not in cfgs["ddp.yaml"] and cfgs["ddp.yaml"]["distributed_type"] == "MULTI_GPU"


if __name__ == "__main__":
    _observe_and_run(Path(sys.argv[1]), sys.argv[2], tuple(sys.argv[3:]))

"""Generation and evaluation under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes)
give the one-process outputs, written by the main process only (telekd.shard)."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from telekd import shard
from telekd.metrics import bertscore_units

ROOT = Path(__file__).resolve().parents[1]

NAME = "ref-student-base"
STAGES = (["generate.py", "--ref", "student-base"], ["eval_ngram.py", "--name", NAME], ["eval_embed.py", "--name", NAME])

# Runs on every process of the launch: the three stages one after the other (a barrier between them, as
# separate DVC stages would have), a sampled generation, and map_sharded on its own. Writes through
# telekd.io by a process other than the main one are logged to argv[2].
DRIVER = """
import json, runpy, sys
from telekd import io, shard

repo, log, extra = sys.argv[1], sys.argv[2], sys.argv[3]
stages = json.loads(sys.argv[4])
rank = shard.state().process_index
if not shard.is_main():
    real = io.atomic_path
    def logged(path):
        with open(log, "a") as f:
            f.write(f"{path}\\n")
        return real(path)
    io.atomic_path = logged
for argv in stages:
    sys.argv = argv
    runpy.run_path(f"{repo}/stages/{argv[0]}", run_name="__main__")
    shard.state().wait_for_everyone()
got = shard.map_sharded(lambda share: [(x, rank) for x in share], list(range(7)))
from tests.test_shard import sampled
rows = sampled()
if shard.is_main():
    with open(extra, "w") as f:
        json.dump({"map": got, "sampled": rows}, f)
"""


def make_study(root: Path, student: Path, records) -> Path:
    """A study folder with params.yaml (4 answers per batch: 10 batches), a test split of 40 questions with one
    reference each (32 bert-score pairs per batch: two units for eval_embed to share) and the student."""
    from telekd.io import write_jsonl

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profiles"]["tiny"]["generate"] = {"batch_size": 4, "max_new_tokens": 8}
    params["stats"]["bootstrap_resamples"] = 100
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(root / "data/prepared/test.jsonl", (r.to_dict() for r in [r for r in records if len(r.answers) == 1][:40]))
    (root / "models/base").mkdir(parents=True)
    (root / "models/base/student").symlink_to(student)
    return root


def sampled() -> list[str]:
    """Sampled answers of the study's student: the same on any number of processes (one seed per batch)."""
    from telekd.examples import load_split
    from telekd.generation import generate_answers
    from telekd.models import load_model

    model, tok = load_model("models/base/student", device=shard.device())
    rows = generate_answers(model, tok, load_split("test"), "sys", 128, 8, 3, do_sample=True, seed=5)
    return [r["prediction"] for r in rows]


def outputs(root: Path) -> dict[str, object]:
    """Every output file by path, parsed; timings (generation_s, answers_per_s) dropped."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(f.relative_to(root))
        if rel == "params.yaml" or rel.startswith(("data/", "models/")):
            continue
        if f.suffix == ".jsonl":
            out[rel] = [{k: v for k, v in json.loads(line).items() if k != "generation_s"}
                        for line in f.read_text().splitlines()]
        else:
            out[rel] = {k: v for k, v in json.loads(f.read_text()).items() if k != "answers_per_s"}
    return out


def close(a, b, tol: float = 1e-6) -> bool:
    """a == b, but floats (at any depth) within tol."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    return a == b


TEARDOWN_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(saved_models, sample_records, tmp_path_factory):
    """(one-process outputs, two-process outputs, writes by rank 1, the driver's extra results, one-process sampled)."""
    tmp = tmp_path_factory.mktemp("shard")
    one = make_study(tmp / "one", saved_models["student"], sample_records)
    two = make_study(tmp / "two", saved_models["student"], sample_records)
    cwd, argv = os.getcwd(), sys.argv
    try:
        os.chdir(one)
        for a in STAGES:
            sys.argv = list(a)
            runpy.run_path(str(ROOT / "stages" / a[0]), run_name="__main__")
        one_sampled = sampled()
    finally:
        os.chdir(cwd)
        sys.argv = argv
    (tmp / "driver.py").write_text(DRIVER)
    log, extra = tmp / "rank1_writes.txt", tmp / "extra.json"
    # --multi_gpu is accelerate's torchrun path: on a machine without CUDA, two CPU processes over gloo.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    for attempt in range(3):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               str(tmp / "driver.py"), str(ROOT), str(log), str(extra), json.dumps(STAGES)]
        res = subprocess.run(cmd, cwd=two, env=env, capture_output=True, text=True, timeout=300)
        if res.returncode == 0 or TEARDOWN_ABORT not in res.stderr:
            break
        # Known, not yet fixed: after its last collective a process can still abort in gloo's teardown at exit
        # (seen in 2 CI runs of this launch, with models loaded; the bare launch of
        # test_a_process_that_leaves_first_exits_cleanly no longer does). Only that failure is retried, afresh.
        for p in (log, extra):
            p.unlink(missing_ok=True)
        two = make_study(tmp / f"two-retry{attempt + 1}", saved_models["student"], sample_records)
    assert res.returncode == 0, res.stderr[-3000:]
    writes = log.read_text().splitlines() if log.exists() else []
    return outputs(one), outputs(two), writes, json.loads(extra.read_text()), one_sampled


def test_two_processes_write_the_one_process_outputs(runs):
    one, two, _, _, _ = runs
    assert sorted(one) == sorted(two) == [
        f"metrics/eval/{NAME}/embed.json", f"metrics/eval/{NAME}/ngram.json", f"metrics/generate/{NAME}.json",
        f"predictions/{NAME}.jsonl", f"scores/{NAME}/embed.jsonl", f"scores/{NAME}/embed.summary.json",
        f"scores/{NAME}/ngram.jsonl", f"scores/{NAME}/ngram.summary.json"]
    for path in one:
        if "embed" in path:  # the embedding models' batches (padding) differ: equal up to float32 rounding
            assert close(two[path], one[path]), path
        else:
            assert two[path] == one[path], path
    preds = one[f"predictions/{NAME}.jsonl"]
    assert len(preds) == 40
    # eval_embed shares whole bert-score units: two here, so each process scored some
    assert len(bertscore_units([r["prediction"] for r in preds], [r["references"] for r in preds])) == 2


def test_only_the_main_process_writes(runs):
    _, _, writes, _, _ = runs
    assert writes == []


def test_sampled_generation_does_not_depend_on_the_process_count(runs):
    _, _, _, extra, one_sampled = runs
    assert extra["sampled"] == one_sampled


def test_map_sharded_gives_contiguous_shares_back_in_order(runs):
    _, _, _, extra, _ = runs
    assert [x for x, _ in extra["map"]] == list(range(7))
    assert [r for _, r in extra["map"]] == [0, 0, 0, 0, 1, 1, 1]  # accelerate: the first process takes the extra one


def test_map_sharded_one_process():
    assert shard.world_size() == 1 and shard.is_main()
    assert shard.map_sharded(lambda share: [x * 2 for x in share], [3, 1, 2]) == [6, 2, 4]
    assert shard.map_sharded(lambda share: [1], []) == []
    with pytest.raises(ValueError, match="gave 1 results for 2 items"):
        shard.map_sharded(lambda share: [0], [1, 2])


# A non-main process leaves after the last collective while the main one still works (it writes the outputs).
LEAVER = """
import sys, time
from accelerate.utils import gather_object
from telekd import shard
s = shard.state()
gather_object([s.process_index])
if s.is_main_process:
    time.sleep(1)
"""


def test_a_process_that_leaves_first_exits_cleanly(tmp_path):
    """Without the exit hook in shard.state() such a launch died in gloo's teardown ("terminate called without
    an active exception", SIGABRT) in 2 of 10 runs (and once in CI); with it, 0 of 20. Six launches: a run
    of six clean exits without the hook has probability 0.8**6 = 0.26."""
    (tmp_path / "leaver.py").write_text(LEAVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for _ in range(6):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(tmp_path / "leaver.py")]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]


def test_the_exit_hook_destroys_the_process_group(monkeypatch):
    """The hook registered once per process destroys the default group if one is still up, and only then."""
    import atexit

    import torch.distributed as dist

    hooks, destroyed = [], []
    monkeypatch.setattr(atexit, "register", hooks.append)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))
    shard._leave_group_at_exit.cache_clear()
    shard._leave_group_at_exit()
    shard._leave_group_at_exit()
    assert len(hooks) == 1
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    hooks[0]()
    assert destroyed == []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    hooks[0]()
    assert destroyed == [True]
    shard._leave_group_at_exit.cache_clear()

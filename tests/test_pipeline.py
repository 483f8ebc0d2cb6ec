"""End to end: the real DAG (`dvc repro`) on a reduced grid and tiny sizes, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from telekd.metrics import NGRAM_METRICS

pytestmark = pytest.mark.slow

COPY = ["dvc.yaml", "params.yaml", "stages", "src", "data/sample", ".dvc/config", ".dvcignore"]


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def reduce(params: dict) -> dict:
    """4 cells (both teachers, base teachers, SFT student, vanilla vs dskd) with models of a few thousand weights."""
    params["grid"].update(teachers=["llama", "mistral"], teacher_sft=["base"], student_sft=["sft"])
    params["sft"]["models"] = ["student"]
    params["sft"]["eval_steps"] = 4
    params["base_models"].update(vocab_size=400, pretrain_steps={"llama": 4, "mistral": 4, "student": 4},
                                 pretrain_batch=2, pretrain_seq_len=64)
    tiny = params["profiles"]["tiny"]
    tiny["architectures"] = {r: {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1 if r == "mistral" else 2,
                                 "mlp": 64} for r in ("llama", "mistral", "student")}
    tiny["train"].update(max_length=300, max_prompt_length=256, epochs=0.25, batch_size=8)
    tiny["generate"].update(max_new_tokens=4)
    params["data"].update(max_train=48, max_test=12)
    params["stats"]["bootstrap_resamples"] = 200
    params["eval_llm"].update(max_samples=1, max_chars=16, max_items=1, max_new_tokens=256)
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("study")
    for item in COPY:
        src, dst = ROOT / item, d / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    (d / "params.yaml").write_text(yaml.safe_dump(reduce(yaml.safe_load((d / "params.yaml").read_text())), sort_keys=False))
    run(["git", "init", "-q"], d)
    run(["git", "add", "-A"], d)
    run(["git", "commit", "-qm", "study"], d)
    run(["dvc", "repro"], d)
    return d


CELLS = ["llama-base-sft-vanilla-s0", "llama-base-sft-dskd-s0", "mistral-base-sft-vanilla-s0", "mistral-base-sft-dskd-s0"]


def test_repro_writes_every_declared_output(repo):
    for cell in CELLS:
        assert (repo / "models/kd" / cell / "model.safetensors").exists()
        for fam in ("ngram", "embed", "llm"):
            assert (repo / "scores" / cell / f"{fam}.jsonl").exists()
            assert json.loads((repo / "metrics/eval" / cell / f"{fam}.json").read_text())
    kd = json.loads((repo / "metrics/kd/mistral-base-sft-vanilla-s0.json").read_text())
    assert kd["algorithm"] == "vanilla" and kd["vocab_match"] is False and 0 < kd["aligned_fraction"] <= 1
    assert json.loads((repo / "metrics/kd/mistral-base-sft-dskd-s0.json").read_text())["algorithm"] == "dskd_cma"
    assert json.loads((repo / "metrics/kd/llama-base-sft-vanilla-s0.json").read_text())["vocab_match"] is True
    assert (repo / "report/README.md").read_text().startswith("# telekd study report")
    assert json.loads((repo / "metrics/stats.json").read_text())["comparisons"] > 0


def test_second_repro_is_a_no_op(repo):
    out = run(["dvc", "repro"], repo)
    assert "Running stage" not in out
    assert "up to date" in run(["dvc", "status"], repo)


def test_metrics_read_as_cell_and_metric(repo):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo))
    files = next(iter(shown.values()))["data"]
    assert "metrics/eval/llama-base-sft-dskd-s0/ngram.json" in files
    assert set(files["metrics/eval/llama-base-sft-dskd-s0/ngram.json"]["data"]) == set(NGRAM_METRICS)
    assert "metrics/stats.json" in files and not any(f.startswith(("metrics/kd/", "metrics/generate/")) for f in files)


def test_exp_run_dskd_reuses_everything_already_built(repo):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    out = run(["dvc", "exp", "run", "-S", "kd.alg=dskd"], repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # the DSKD cells were already built: only the study-level stages see the changed algorithm set
    assert ran == {"stats", "report"}, ran
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["kd"]["alg"] == "dskd"
    names = run(["dvc", "stage", "list", "--name-only"], repo).split()
    assert "kd@llama-base-sft-dskd-0" in names and not any(n.endswith("-vanilla-0") for n in names)

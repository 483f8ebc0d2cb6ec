"""End to end: the real DAG (`dvc repro`) on a reduced grid and tiny sizes, in a temporary copy of the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cmd
from telekd.metrics import NGRAM_METRICS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(study) -> Path:
    """The session's reduced study run (tests/conftest.py: run_study), shared with tests/reliability."""
    return study["dir"]


def run(cmd: list[str], cwd: Path) -> str:
    return run_cmd(cmd, cwd)


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

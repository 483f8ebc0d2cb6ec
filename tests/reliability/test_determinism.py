"""Determinism: the same seed, machine and versions give identical results, whatever the load or thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE

BUILD = r"""
import hashlib, json, pathlib, sys
import yaml
from telekd.data import load_telequad
from telekd.params import Params
from telekd import zoo

p = yaml.safe_load(open(sys.argv[1]))
p["base_models"].update(vocab_size=400, pretrain_steps={"llama": 2, "mistral": 1, "student": 1}, pretrain_batch=8,
                        pretrain_seq_len=256)
p["profiles"]["tiny"]["architectures"]["mistral"].update(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64)
p["profiles"]["tiny"]["architectures"]["student"].update(hidden=32, layers=1, heads=2, kv_heads=2, mlp=64)
recs = load_telequad(sys.argv[2]).records
ctx = list(dict.fromkeys(r.context for r in recs))
summary = zoo.build_tiny(Params.model_validate(p), ctx, [r.question for r in recs], sys.argv[3],
                         processes=int(sys.argv[4]), min_parallel_flops=0)
root = pathlib.Path(sys.argv[3])
out = {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()}
print(json.dumps({"files": out, "summary": summary}))
"""


def build(tmp_path, name: str, threads: str, processes: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    p = subprocess.run([sys.executable, "-c", BUILD, str(ROOT / "params.yaml"), str(SAMPLE), str(tmp_path / name),
                        str(processes)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def sequential_build(tmp_path_factory) -> dict:
    """The base models built in this process order, one OpenMP thread: what the other builds must equal bitwise."""
    return build(tmp_path_factory.mktemp("base"), "one", "1", processes=1)


def test_base_models_do_not_depend_on_the_thread_count(sequential_build, tmp_path):
    """The llama teacher at its real width (256, 4 layers) for 2 steps: 1 vs 2 OpenMP threads in the environment.

    Without the fixed `base_models.threads`, the weights already differ bitwise after these 2 steps."""
    one, two = sequential_build, build(tmp_path, "two", "2")
    assert len(one["files"]) >= 9 and any(f.endswith("model.safetensors") for f in one["files"])
    assert one == two


def test_base_models_in_parallel_processes_are_bitwise_the_sequential_ones(sequential_build, tmp_path):
    """The three models pre-trained in 2 worker processes (the stage's count on 2 cores: one waits for a free
    worker) under 2 OpenMP threads: every file (weights, tokenizers, configs) has the sha256 of the sequential
    build's, and the summary (losses, sizes) is the same."""
    one = sequential_build
    assert sum(f.endswith("model.safetensors") for f in one["files"]) == 3
    assert build(tmp_path, "two", "2", processes=2) == one


@pytest.mark.slow
def test_two_runs_from_scratch_give_identical_results(study, second_study):
    """The study twice from scratch under the fork server, as `make repro` runs it (separate copies, no shared DVC
    cache or run-cache): every per-sample score, prediction, metric (without wall times / throughputs), log, model
    and cache file is identical."""
    a, b = study["snapshot"], second_study["snapshot"]
    assert sorted(a) == sorted(b)
    assert any(k.startswith("scores/") and k.endswith("ngram.jsonl") for k in a)
    assert any(k.startswith("models/kd/") and k.endswith("model.safetensors") for k in a)
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, differing


@pytest.mark.slow
def test_plain_dvc_repro_gives_the_fork_server_s_results(study, plain_study):
    """Plain `dvc repro` (a fresh interpreter per stage) of one cell's chain across vocabularies, from scratch in
    its own copy: every file it computed equals the fork-server run's (telekd.forkserver: same bytes)."""
    a, b = study["snapshot"], plain_study["snapshot"]
    assert set(b) <= set(a)
    cell = "mistral-base-sft-dskd-s0"
    for want in (f"scores/{cell}/ngram.jsonl", f"scores/{cell}/embed.jsonl", f"scores/{cell}/llm.jsonl",
                 f"predictions/{cell}.jsonl", f"models/kd/{cell}/model.safetensors", "models/sft/student/config.json"):
        assert want in b, want
    assert any(k.startswith("cache/teacher/mistral-base/") for k in b)
    differing = [k for k in b if a[k] != b[k]]
    assert not differing, differing


@pytest.mark.slow
def test_default_run_opens_no_network_connection(study):
    """The whole reduced study ran with every non-loopback connection and DNS lookup refused, and without the
    offline environment variables: the project's own defaults keep it offline, nothing even tried."""
    assert "Running stage 'report'" in study["output"]
    log = study["netlog"]
    assert not log.exists() or not log.read_text(), log.read_text()

"""Shared fixtures: tokenizers and models small enough to build in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

import telekd  # noqa: F401  (sets the offline environment first)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "telequad-sample.json"
REAL_TELEQUAD = ROOT.parent / "shared" / "data" / "telequad" / "TeleQuAD-v4-full.json"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: torch's 2-thread pool costs more than it saves (ms per op)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_records():
    from telekd.data import load_telequad

    return load_telequad(SAMPLE).records


@pytest.fixture(scope="session")
def tokenizers(sample_records):
    """Two byte-level BPE tokenizers of equal size and different merges (Llama-like, Mistral-like)."""
    from telekd.prompts import set_chat_template
    from telekd.zoo import train_tokenizer

    contexts = list(dict.fromkeys(r.context for r in sample_records))
    llama = train_tokenizer(contexts, 400)
    mistral = train_tokenizer(contexts + [r.question for r in sample_records], 400)
    set_chat_template(llama, "llama2")
    set_chat_template(mistral, "mistral")
    for t in (llama, mistral):
        t.pad_token = t.unk_token
    return {"llama": llama, "mistral": mistral}


def tiny_model(family: str, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    from telekd.params import Architecture
    from telekd.zoo import make_config

    torch.manual_seed(seed)
    arch = Architecture(hidden=hidden, layers=layers, heads=2, kv_heads=1 if family == "mistral" else 2, mlp=2 * hidden)
    return AutoModelForCausalLM.from_config(make_config(family, arch, vocab_size, max_positions=512)).eval()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tokenizers):
    """A llama teacher, a mistral teacher and a student saved as checkpoint folders."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for role, family, hidden in (("llama", "llama", 48), ("mistral", "mistral", 48), ("student", "llama", 32)):
        model = tiny_model(family, len(tokenizers[family]), hidden=hidden)
        model.save_pretrained(root / role, safe_serialization=True)
        tokenizers[family].save_pretrained(root / role)
        out[role] = root / role
    return out


# ---- the reduced study: `dvc repro` end to end in a temporary copy (tests/test_pipeline.py, tests/reliability) ----

STUDY_FILES = ["dvc.yaml", "params.yaml", "stages", "src", "data/sample", ".dvc/config", ".dvcignore"]
NETGUARD = ROOT / "tests" / "reliability" / "netguard"
STUDY_KEY = "sk-telekd-study-0c1d2e3f4a5b6978"  # the judge API key set during the reduced study
# Variables that would keep a run offline by themselves: removed, so that the project's own defaults must.
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                "RAGAS_DO_NOT_TRACK", "DVC_NO_ANALYTICS", "TOKENIZERS_PARALLELISM")


def study_env(netlog: Path | None = None) -> dict:
    """The environment of a study run: this Python first; with `netlog`, no network (attempts logged there)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    if netlog is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["TELEKD_NETGUARD_LOG"] = str(netlog)
    return env


def run_cmd(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    import subprocess

    p = subprocess.run(cmd, cwd=cwd, env=env or study_env(), capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def reduce_study(params: dict) -> dict:
    """4 cells (both teachers, base teachers, SFT student, vanilla vs dskd) with models of a few thousand weights."""
    params["grid"].update(teachers=["llama", "mistral"], teacher_sft=["base"], student_sft=["sft"])
    params["sft"]["models"] = ["student"]
    params["profiles"]["tiny"]["train"]["save_steps"] = 4   # sft evaluation + checkpoint, kd checkpoint interval
    params["base_models"].update(vocab_size=400, pretrain_steps={"llama": 4, "mistral": 4, "student": 4},
                                 pretrain_batch=2, pretrain_seq_len=64)
    tiny = params["profiles"]["tiny"]
    tiny["architectures"] = {r: {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1 if r == "mistral" else 2,
                                 "mlp": 64} for r in ("llama", "mistral", "student")}
    tiny["train"].update(max_length=300, max_prompt_length=256, epochs=0.25, batch_size=8)
    tiny["generate"].update(max_new_tokens=4)
    params["data"].update(max_train=48, max_test=12)
    params["stats"]["bootstrap_resamples"] = 200
    params["eval_llm"].update(max_new_tokens=256)
    params["profiles"]["tiny"]["eval"].update(max_samples=1, max_chars=16, max_items=1)
    return params


def run_study(root: Path, forkserver: bool = True, targets: tuple[str, ...] = ()) -> dict:
    """Copy the repository into `root`, reduce params.yaml, `dvc repro [targets]` with the network cut off: as `make
    repro` runs it (`python -m telekd.forkserver python -m telekd.lockfile repro`: every stage a fork of one server,
    dvc.lock kept parsed between stages), or with `forkserver=False` as plain `dvc repro`, every stage its own
    interpreter.

    Returns {"dir", "netlog", "seconds", "output", "snapshot", "lock"}: the snapshot (see `study_snapshot`) and
    dvc.lock's text are taken right after the run, before any test changes the copy.
    """
    import shutil
    import sys
    import time

    import yaml

    for item in STUDY_FILES:
        src, dst = ROOT / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    params = reduce_study(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cmd(["git", "init", "-q"], root)
    run_cmd(["git", "add", "-A"], root)
    run_cmd(["git", "commit", "-qm", "study"], root)
    netlog = root.parent / f"{root.name}-network.log"
    t0 = time.perf_counter()
    # a dummy judge key in the environment, as a user's real one would be: tests/reliability/test_security.py
    # greps every file of the run (outputs, logs, metrics, dvc.lock) for it
    fast_dvc = [sys.executable, "-m", "telekd.forkserver", sys.executable, "-m", "telekd.lockfile"]
    dvc = fast_dvc if forkserver else ["dvc"]
    out = run_cmd([*dvc, "repro", *targets], root, env={**study_env(netlog), "TELEKD_JUDGE_API_KEY": STUDY_KEY})
    seconds = time.perf_counter() - t0
    return {"dir": root, "netlog": netlog, "seconds": seconds, "output": out, "snapshot": study_snapshot(root),
            "lock": (root / "dvc.lock").read_text()}


VOLATILE = ("_s", "_per_s")  # wall times and throughputs: measured, not computed


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not k.endswith(VOLATILE)}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def study_snapshot(root: Path) -> dict:
    """{relative path: content} of every result a run computes: per-sample scores, predictions, metrics (without
    wall times and throughputs), logs, the stats table, and the sha256 of every file of every model and cache."""
    import hashlib
    import json

    snap = {}
    for d in ("scores", "predictions", "metrics", "logs", "data/prepared", "report/stats_table.json"):
        p = root / d
        for f in sorted(p.rglob("*")) if p.is_dir() else [p] if p.exists() else []:   # a partial run lacks some
            rel = str(f.relative_to(root))
            if f.suffix == ".json":
                snap[rel] = _stable(json.loads(f.read_text()))
            elif f.suffix == ".jsonl":
                snap[rel] = [_stable(json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
            elif f.suffix in (".tsv", ".yaml"):  # DVCLive histories and params (logs/{sft,kd}/<name>/)
                snap[rel] = f.read_text()
    for d in ("models", "cache/teacher"):
        for f in sorted((root / d).rglob("*")):
            if f.is_file() and f.name != ".gitignore":   # DVC's list of the outputs the run made, not a result
                snap[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return snap


# tests/reliability/test_determinism.py: the tests that need a run of their own besides `study`
SECOND_STUDY_TEST = "test_two_runs_from_scratch_give_identical_results"
PLAIN_RUN_TEST = "test_plain_dvc_repro_gives_the_fork_server_s_results"
# The plain run: one KD cell's whole chain, across vocabularies (Mistral teacher, DSKD with cross-model attention),
# which runs every stage script but stats.py and report.py (they read all the cells)
PLAIN_TARGETS = tuple(f"eval_{f}@mistral-base-sft-dskd-0" for f in ("ngram", "embed", "llm"))


@pytest.fixture(scope="session")
def _studies(request, tmp_path_factory) -> dict:
    """The session's reduced-study runs, started together, each in its own copy (no shared files, DVC cache or
    run-cache): the study under the fork server, as `make repro` runs it; when the session collected the tests that
    need them, a second such run from scratch, and plain `dvc repro` (every stage its own interpreter) of
    PLAIN_TARGETS. Each `dvc repro` runs one stage process at a time: the three share the 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    runs = {"study": {}}
    names = {item.originalname for item in request.session.items}
    if SECOND_STUDY_TEST in names:
        runs["second"] = {}
    if PLAIN_RUN_TEST in names:
        runs["plain"] = {"forkserver": False, "targets": PLAIN_TARGETS}
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:  # threads: each only waits on its `dvc repro`
        futures = {name: pool.submit(run_study, tmp_path_factory.mktemp(name) / "repo", **kw)
                   for name, kw in runs.items()}
        yield {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="session")
def study(_studies) -> dict:
    """The reduced study, run once per session and shared (tests/test_pipeline.py, tests/reliability)."""
    return _studies["study"]


@pytest.fixture(scope="session")
def second_study(_studies) -> dict:
    """A second reduced study from scratch (separate copy, no shared DVC cache or run-cache), run alongside `study`."""
    return _studies["second"]


@pytest.fixture(scope="session")
def plain_study(_studies) -> dict:
    """PLAIN_TARGETS of the reduced study by plain `dvc repro` from scratch, run alongside `study`."""
    return _studies["plain"]

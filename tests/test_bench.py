"""Benchmarks cannot rot: every bench/*.py runs in its --smoke mode (tiny sizes, a subprocess each, result in a
temporary folder), and the README's performance table is the one bench/results/*.json give."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))


def _env() -> dict:
    """As the README runs a benchmark, `.venv/bin/python bench/<name>.py`: this Python's bin/ is not on PATH (a
    bare `dvc` or `python` in a benchmark would find another one, or none)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d.rstrip("/") != venv_bin)
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1"}


def _results_digest() -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((BENCH / "results").glob("*.json"))}


def check_gkd(d):
    loss = d["same_batch_loss"]
    assert d["same_objective_asserted"] is True
    # the headline compares the same loss: ours at k = V equals GKD's on the same batch (forward KL, T = 1)
    assert loss["ours_full_live"] == pytest.approx(loss["gkd"], rel=1e-5)
    assert loss["ours_full_cache"] == pytest.approx(loss["gkd"], rel=1e-5)
    # top-64 + residual bin is a lower bound of the full KL (data-processing inequality)
    assert loss["ours_top64_cache"] <= loss["gkd"] + 1e-6
    assert d["headline"] == "ours_full_live_over_gkd"
    assert set(d["ratio"]) == {"ours_full_live_over_gkd", "ours_full_cache_incl_build_over_gkd",
                               "ours_top64_live_over_gkd", "ours_top64_cache_incl_build_over_gkd"}
    assert d["examples"] == 16 and d["epochs"] == 1
    assert d["tokens"]["gkd"] == d["tokens"]["ours_full_live"]  # the same batches on both sides


def check_mfu(d):
    r = d["sizes"]["smoke"]
    assert d["prompt_tokens"] == 32 and d["answer_tokens"] == 16
    assert r["flop_per_token"]["live"] == 6 * r["n_student"] + 2 * r["n_teacher"]
    assert 0 < r["mfu"]["live"]["median"] < 1 and 0 < r["mfu"]["cache"]["median"] < 1


def check_loss_memory(d):
    assert d["same_value"] is True and d["vocab"] == 1024 and d["tokens"] == 128 and d["chunk_size"] == 16


def check_imports(d):
    assert d["stages_measured"] == ["prepare"] and set(d["stages"]) == {"prepare"}
    assert d["stages"]["prepare"]["stages_in_study"] == 1


def check_kd_cache(d):
    assert d["examples"] == 8 and d["teacher_forward_examples"] == {"cache": 8, "live": 8}
    assert d["speedup_cache_over_live"] > 0 and d["speedup_cache_incl_build_over_live"] > 0


def check_generation(d):
    assert d["answers"] == 4 and d["identical_answers"] is True


def check_gpu_kd(d):
    assert d["tiny"] is True and d["machine"]["device"] == "cpu"
    assert set(d["runs"]) == {"vanilla-cache", "vanilla-live", "dskd-cache", "dskd-live"}


def check_study(d):
    assert d["make_repro"]["stage_s"].keys() == {"prepare", "base_models", "kd@llama-sft-base-vanilla-s0",
                                                 "kd@llama-sft-base-dskd-s0", "report"}
    assert d["noop_repro"]["stages_run"] == 0 and d["noop_repro"]["stages_skipped"] == 2
    assert d["families"]["kd"]["stages"] == 2
    fast_dvc = "python -m telekd.forkserver python -m telekd.lockfile"
    assert d["plan"]["make_repro"] == f"{fast_dvc} repro"   # as `make repro` runs it
    assert d["plan"]["exp_run_dskd"] == f"{fast_dvc} exp run -S kd.alg=dskd"


def check_dvc_rebuilds(d):
    assert d["wrong_set_caught"] is True and d["recorded_all_ok"] is True
    import dvc_rebuilds

    assert len(d["recorded_verdicts"]) == len(dvc_rebuilds.CHANGES)  # every change has a recorded verdict


def _check_data_fallback(d):
    """Real TeleQuAD when imported; the sample (said in the result) only when it is not."""
    import paper_dryrun

    real = Path(paper_dryrun.TELEQUAD).exists()
    assert (d["data_fallback"] is None) == real and ("telequad-sample" in d["data"]) == (not real)


def check_paper_dryrun(d):
    _check_data_fallback(d)
    s = d["steps"]
    assert d["layers"] == 1 and set(s) == {"sft_student", "cache_llama", "kd_vanilla_llama"}
    assert (d["dtype"], d["micro_batch"], d["grad_accum"]) == ("bfloat16", 4, 8)
    # one TinyLlama layer, LoRA r 256 on the seven sft.lora_targets: r x (d_in + d_out) each
    assert s["sft_student"]["trainable_params"] == 256 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 5632) * 3)
    # the Llama teacher shares the student's tokenizer: every answer token aligned
    assert s["cache_llama"]["aligned_positions"] == s["cache_llama"]["answer_tokens"] > 0
    assert s["cache_llama"]["forward_batches"] == 8 and s["kd_vanilla_llama"]["micro_batches"] == 8
    # the paper's kd student: LoRA r 256 on q_proj, v_proj (profiles.paper.student_kd), one layer
    assert s["kd_vanilla_llama"]["student_lora"] is True
    assert s["kd_vanilla_llama"]["trainable_params"] == 256 * ((2048 + 2048) + (2048 + 256))
    # one student layer at real widths, bf16: embeddings + head, q/o, k/v (4 kv heads x 64), MLP, three RMSNorms
    student_1l = 2 * (2 * 32000 * 2048 + 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 3 * 2048)
    assert student_1l < s["kd_vanilla_llama"]["resident_bytes"] < student_1l + 64 * 2**20
    assert all(v["peak_bytes"] > v["resident_bytes"] and v["flops"] > 0 for v in s.values())
    assert "projection" not in d  # the projection needs every step


def check_paper_tokenizers(d):
    _check_data_fallback(d)
    llama, mistral = d["teachers"]["llama2"], d["teachers"]["mistral"]
    assert d["questions"] == 8 and llama["examples"] == mistral["examples"] == 8
    assert llama["vocab_overlap"] == llama["same_id"] == llama["gold_mapped_fraction"] == 1.0
    # the two 32,000-token vocabularies (data-independent): 75.58% of the strings shared, 0.84% at the same id
    assert (mistral["vocab_overlap"], mistral["same_id"]) == (0.7558, 0.0084)
    assert 0.5 < mistral["aligned_fraction"] < 1 and llama["student_answer_tokens"] == mistral["student_answer_tokens"]


SMOKES = [  # (script and extra args, result file, checks)
    (["gkd.py"], "gkd", check_gkd),
    (["mfu.py"], "mfu", check_mfu),
    (["loss_memory.py"], "loss_memory", check_loss_memory),
    (["imports.py"], "imports", check_imports),
    (["kd_cache.py", "--teacher", "llama", "--alg", "vanilla"], "kd_cache-llama-vanilla", check_kd_cache),
    (["kd_cache.py", "--teacher", "mistral", "--alg", "dskd"], "kd_cache-mistral-dskd", check_kd_cache),
    (["generation.py"], "generation", check_generation),
    (["gpu_kd.py"], "gpu_kd-cpu-tiny", check_gpu_kd),
    (["gpu_kd.py", "--teacher", "mistral"], "gpu_kd-cpu-tiny-mistral", check_gpu_kd),
    (["study.py"], "study", check_study),
    (["dvc_rebuilds.py"], "dvc_rebuilds", check_dvc_rebuilds),
    (["paper_dryrun.py"], "paper_dryrun", check_paper_dryrun),
    (["paper_tokenizers.py"], "paper_tokenizers", check_paper_tokenizers),
]
NEEDS_VOCAB = {"paper_dryrun.py", "paper_tokenizers.py"}  # the real Llama-2 / Mistral tokenizers (make setup)


def test_every_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py")} - {"common.py", "readme_table.py"}
    assert scripts <= {args[0] for args, _, _ in SMOKES}


def _vocab_missing() -> str | None:
    from telekd import vocab

    try:
        vocab.llama_gguf_file(), vocab.mistral_model_file()
    except vocab.VocabMissing as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every smoke run, two at a time (each a single-threaded subprocess: 2 cores): {script args: (process, its
    output folder)}, and the digest of bench/results before them."""
    from concurrent.futures import ThreadPoolExecutor

    before = _results_digest()
    skip = _vocab_missing()

    def run(args):
        out = tmp_path_factory.mktemp("smoke")
        cmd = [sys.executable, str(BENCH / args[0]), *args[1:], "--smoke", "--out-dir", str(out)]
        return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300), out

    todo = [args for args, _, _ in SMOKES if not (skip and args[0] in NEEDS_VOCAB)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip((" ".join(a) for a in todo), pool.map(run, todo)))
    return runs, before, skip


@pytest.mark.parametrize("args,name,check", SMOKES, ids=[" ".join(s[0]) for s in SMOKES])
def test_smoke(smoke_runs, args, name, check):
    runs, before, skip = smoke_runs
    if skip and args[0] in NEEDS_VOCAB:
        pytest.skip(f"paper vocabularies not installed: {skip}")
    p, out = runs[" ".join(args)]
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads((out / f"{name}.json").read_text())
    assert d["smoke"] is True
    assert re.fullmatch(r"[0-9a-f]{40}", d["commit"]) and isinstance(d["dirty"], bool)
    assert d["command"].startswith(f"python bench/{args[0]}") and "--smoke" in d["command"]
    check(d)
    assert _results_digest() == before, "a --smoke run changed bench/results"


def test_provenance_and_smoke_guard(tmp_path):
    import argparse

    import common

    prov = common.provenance(["bench/gkd.py", "--reps", "2"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert prov["commit"] == head and prov["command"] == "python bench/gkd.py --reps 2"
    a = argparse.Namespace(smoke=True, out_dir=str(common.RESULTS))
    with pytest.raises(SystemExit, match="may not go to"):
        common.write_result(a, "x", {})
    a = argparse.Namespace(smoke=False, out_dir=str(tmp_path), reps=2)
    d = json.loads(common.write_result(a, "x", {"benchmark": "x"}, prov).read_text())
    assert d["commit"] == head and d["args"] == {"smoke": False, "reps": 2} and d["smoke"] is False


def test_provenance_ignores_the_pipelines_outputs():
    """`make bench` runs `dvc repro` first, which rewrites wall times in tracked outputs (logs/timing/...): that
    leaves the code clean, so a result is not marked dirty for it; a change to code still is."""
    import common

    out = ROOT / "logs" / "timing" / "sft" / "llama.json"
    code = ROOT / "bench" / "common.py"
    saved = {f: f.read_bytes() for f in (out, code)}
    try:
        out.write_bytes(saved[out] + b" ")
        assert "logs/timing/sft/llama.json" not in common.provenance(["bench/gkd.py"])["dirty_paths"]
        code.write_bytes(saved[code] + b"\n")
        prov = common.provenance(["bench/gkd.py"])
        assert prov["dirty"] is True and "bench/common.py" in prov["dirty_paths"]
    finally:
        for f, b in saved.items():
            f.write_bytes(b)


def test_readme_table_is_current():
    """README.md's performance table is exactly what bench/readme_table.py makes of bench/results/*.json."""
    p = subprocess.run([sys.executable, str(BENCH / "readme_table.py"), "--check"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout[-3000:]


def test_readme_table_check_catches_an_edit(tmp_path):
    import readme_table

    readme = (ROOT / "README.md").read_text()
    block = readme_table.table(BENCH / "results")
    assert readme_table.render(readme, block) == readme
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace("| benchmark | result |", "| benchmark | figure |", 1))
    p = subprocess.run([sys.executable, str(BENCH / "readme_table.py"), "--check", "--readme", str(edited)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "stale" in p.stdout


def test_readme_table_refuses_smoke_results(tmp_path):
    import readme_table

    (tmp_path / "gkd.json").write_text(json.dumps({"benchmark": "gkd", "smoke": True}))
    with pytest.raises(SystemExit, match="--smoke result"):
        readme_table.table(tmp_path)


def test_readme_table_marks_unrecorded_commits():
    import readme_table

    assert readme_table.recorded("a.json", {}) == "`a.json`, commit not recorded"
    assert readme_table.recorded("a.json", {"commit": "0123456789" * 4, "dirty": True}) == "`a.json`, 0123456+dirty"

"""What the benchmarks share: provenance (commit, command), result files, the machine line, versions, medians,
tiny models, synthetic KD data and the tiny stand-in study that smoke modes read."""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
_STARTED: dict | None = None  # provenance at start-up (add_output_args)
# Tracked files the pipeline's stages write (dvc.yaml outs with cache: false, the lock, the report): data, not code
PIPELINE_OUTPUTS = ("dvc.lock", "logs", "metrics", "report")


def provenance(argv: list[str] | None = None) -> dict:
    """The commit a benchmark ran on and the exact command line that ran it.

    Returns {"commit": `git rev-parse HEAD`, "dirty": uncommitted changes to tracked files outside
    bench/results/ (a result file written earlier in the same `make bench` is not code) and outside the
    study's own outputs (PIPELINE_OUTPUTS: `make bench` runs `dvc repro` first, which rewrites the wall times
    in logs/timing/, metrics/generate/, report/README.md and dvc.lock of a fresh clone), "dirty_paths":
    the first 20 of them, "command": `python <script> <args>` as invoked}. Outside a git checkout
    commit is None. Raises nothing.
    """
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "dirty_paths": [], "command": shlex.join(["python", str(script), *argv[1:]])}
    status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results",
                             *(f":!{p}" for p in PIPELINE_OUTPUTS)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return {"commit": head.stdout.strip(), "dirty": bool(status), "dirty_paths": [ln[3:] for ln in status[:20]],
            "command": shlex.join(["python", str(script), *argv[1:]])}


def add_output_args(ap: argparse.ArgumentParser, smoke_help: str) -> None:
    """--smoke (tiny sizes, seconds; what the test suite runs) and --out-dir (where the result JSON goes).
    Takes the provenance snapshot now, at start-up: the code that runs is the code as it was when it started."""
    global _STARTED
    _STARTED = provenance()
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--out-dir", default=None,
                    help="folder for the result JSON (default bench/results; with --smoke a new temporary folder: "
                         "a smoke result never overwrites bench/results)")


def write_result(a: argparse.Namespace, name: str, result: dict, prov: dict | None = None) -> Path:
    """Write `result` plus provenance (`prov`, default: the start-up snapshot), `smoke` and the parsed arguments
    to <out-dir>/<name>.json; return the path. A --smoke run refuses bench/results/ (its figures are not the
    benchmark's)."""
    out_dir = Path(a.out_dir) if a.out_dir else (Path(tempfile.mkdtemp(prefix="telekd-bench-")) if a.smoke else RESULTS)
    if a.smoke and out_dir.resolve() == RESULTS.resolve():
        raise SystemExit(f"{name}: a --smoke result may not go to {RESULTS}: pass another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**result, "smoke": bool(a.smoke), **(prov or _STARTED or provenance()),
           "args": {k: v for k, v in vars(a).items() if k not in ("out_dir", "child")}}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"-> {path}")
    return path


def cpu_model() -> dict:
    """{"model": the CPU's model name, "amx": whether it has AMX (bf16 matmul units)} from /proc/cpuinfo (Linux);
    model None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or None, "amx": None}
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
    return {"model": names[0] if names else None, "amx": " amx_bf16" in text}


def machine(threads: int, device: str = "cpu") -> dict:
    import torch

    info = {"platform": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
            "cpu": cpu_model(),
            "torch_threads": threads, "device": device,
            "shared": "yes: 2 cores shared with other agents' tests and a pipeline; ratios are measured "
                      "A B A B in one process and reported as medians with the spread"}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def spread(xs: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "runs": [round(x, 3) for x in xs]}


def make_model(family: str, arch: dict, vocab: int, max_positions: int, seed: int, dtype=None, device="cpu"):
    """A randomly initialised Llama/Mistral model with `arch` {hidden, layers, heads, kv_heads, mlp}."""
    import torch
    from transformers import AutoModelForCausalLM

    from telekd.params import Architecture
    from telekd.zoo import make_config

    torch.manual_seed(seed)
    cfg = make_config(family, Architecture(**arch), vocab, max_positions)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    return model


def synthetic_pairs(n: int, prompt_len: int, answer_len: int, vocab: int, seed: int = 0):
    """n examples of random ids (prompt masked, answer labelled) paired with themselves: one shared vocabulary,
    every answer position aligned. Returns (examples, pairs)."""
    import random

    from telekd.prompts import IGNORE, Example

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        ids = [1] + [rng.randrange(3, vocab) for _ in range(prompt_len + answer_len - 1)]
        examples.append(Example(id=str(i), input_ids=ids, labels=[IGNORE] * prompt_len + ids[prompt_len:],
                                prompt_len=prompt_len, prompt="", completion="", context="", truncated=False,
                                answer_in_context=True))
    pairs = [(e, e, [(p, p) for p in range(e.prompt_len - 1, len(e.input_ids) - 1)]) for e in examples]
    return examples, pairs


def n_params(model) -> int:
    """Parameters that do matmul work per token: all but the input embedding (a lookup)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def smoke_study(root: Path, n_train: int = 8, n_test: int = 4, vocab: int = 400) -> Path:
    """A stand-in for what `dvc repro` leaves behind, in the study's layout under `root`, for the smoke modes of
    the benchmarks that read the study (kd_cache.py, generation.py): params.yaml (the repository's), the first
    n_train / n_test sample records as data/prepared/{train,test}.jsonl, and tiny randomly initialised models
    saved as models/base/{llama,mistral,student} (Llama and Mistral tokenizers of `vocab` ids trained on the
    sample, as in tests/conftest.py; the student shares Llama's) plus models/kd/smoke-student (the student).
    Run the benchmark with its working directory at `root`. Returns root."""
    import shutil

    from telekd import layout
    from telekd.data import load_telequad
    from telekd.io import write_jsonl
    from telekd.params import load_params
    from telekd.prompts import set_chat_template
    from telekd.zoo import train_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    p = load_params(ROOT / "params.yaml")
    records = load_telequad(ROOT / p.data.source).records
    for split, rows in (("train", records[:n_train]), ("test", records[n_train:n_train + n_test])):
        (root / layout.split_file(split)).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(root / layout.split_file(split), (r.to_dict() for r in rows))
    contexts = list(dict.fromkeys(r.context for r in records))
    toks = {"llama": train_tokenizer(contexts, vocab), "mistral": train_tokenizer(contexts + [r.question for r in records], vocab)}
    for family, tok in toks.items():
        set_chat_template(tok, "llama2" if family == "llama" else "mistral")
        tok.pad_token = tok.unk_token
    arch = {"llama": dict(hidden=48, layers=2, heads=2, kv_heads=2, mlp=96),
            "mistral": dict(hidden=48, layers=2, heads=2, kv_heads=1, mlp=96),
            "student": dict(hidden=32, layers=2, heads=2, kv_heads=2, mlp=64)}
    for role, family, seed in (("llama", "llama", 0), ("mistral", "mistral", 0), ("student", "llama", 1)):
        model = make_model(family, arch[role], len(toks[family]), 1024, seed=seed)
        for folder in [layout.model_dir(role, "base")] + ([f"{layout.KD}/smoke-student"] if role == "student" else []):
            model.save_pretrained(root / folder, safe_serialization=True)
            toks[family].save_pretrained(root / folder)
    return root

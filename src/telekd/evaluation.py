"""The eval stages' shared steps: their command line, the predictions they read, and per-sample scores ->
files: JSONL keyed by question id (for the statistics), CIs and counts beside, and the headline means
alone as DVC metrics (what `dvc metrics show/diff` lists as <name>/<metric>)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from . import layout
from .io import read_jsonl, write_json, write_jsonl


def stage_args(doc: str):
    """(name, params) for an eval stage: `--name` picks predictions/<name>.jsonl."""
    import argparse

    from .params import load_params

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--name", required=True, help="predictions/<name>.jsonl (a cell or ref-<role>-<stage>)")
    return ap.parse_args().name, load_params()


def fixed_hash_seed(script: str) -> None:
    """Re-run this process with PYTHONHASHSEED=0 unless it already has it; a stage calls it first, with __file__.

    bert-score 0.3.13 embeds the *set* of a call's texts in batches (bert_cos_score_idf:
    sorted(set(texts), key=word count)), and a set's order follows Python's per-process string hashing, so
    batches, their padding and the last float32 bits of BERTScore changed from run to run on the same
    predictions (up to 1.3e-7 measured on the tiny study). With the seed fixed, a rerun is bit-identical.
    Only a process started as `python <script> ...` (sys.orig_argv, which runpy leaves alone) is re-run, with
    its original command line; a caller running the stage inside another program (a test, through runpy) is
    never replaced, and keeps its own seed. A fork of telekd.forkserver has the seed 0 already (the server's)."""
    if sys.flags.hash_randomization == 0:       # started with PYTHONHASHSEED=0
        return
    target = Path(script).resolve()
    if any(not a.startswith("-") and Path(a).resolve() == target for a in sys.orig_argv[1:]):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "PYTHONHASHSEED": "0"})


def load_predictions(name: str) -> list[dict]:
    """The rows of predictions/<name>.jsonl ({"id", "prediction", "references", ...}), in file order."""
    return read_jsonl(f"{layout.PREDICTIONS}/{name}.jsonl")


def write_scores(name: str, family: str, ids: list[str], scores: list[dict], metric_names, resamples: int, seed: int,
                 extra: dict | None = None) -> dict:
    """Write scores/<name>/<family>.jsonl, its summary with bootstrap CIs, and metrics/eval/<name>/<family>.json."""
    from .metrics import mean_ci

    write_jsonl(f"{layout.SCORES}/{name}/{family}.jsonl", ({"id": i, **s} for i, s in zip(ids, scores)))
    summary = {m: mean_ci([s[m] for s in scores], resamples=resamples, seed=seed) for m in metric_names}
    write_json(f"{layout.SCORES}/{name}/{family}.summary.json", {**summary, **(extra or {})})
    means = {m: (None if summary[m]["mean"] is None or math.isnan(summary[m]["mean"]) else round(summary[m]["mean"], 6))
             for m in metric_names}
    write_json(f"{layout.METRICS}/eval/{name}/{family}.json", means)
    return means


def publish_scores(name: str, family: str, rows: list[dict], scores: list[dict], metric_names, p) -> dict:
    """write_scores for the rows of predictions/<name>.jsonl with the study's bootstrap (p.stats.bootstrap_resamples,
    p.seed), then print `eval_<family> <name>: <metric> <mean>, ...`; returns the means."""
    means = write_scores(name, family, [r["id"] for r in rows], scores, metric_names, p.stats.bootstrap_resamples,
                         p.seed)
    print(f"eval_{family} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return means

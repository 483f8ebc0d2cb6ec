"""Which stages each change rebuilds: DVC reruns exactly the stages that depend on what changed.

Builds the study once in a temporary copy of the repository (the end-to-end test's reduced grid and
sizes: llama and mistral teachers, base teacher, SFT student, vanilla vs DSKD), commits it as the
baseline, then applies each change with `dvc exp run -S ...` from that baseline and compares the
stages DVC ran (or restored from its run cache) with the set the change should reach:

  kd.alg=dskd                      the DSKD cells exist already: only stats and report
  kd.temperature=1.0               every KD run and what reads it; no SFT, teacher cache or reference row
  base_models.pretrain_steps.llama the tiny profile's stand-in for a new pinned revision of one teacher:
                                   the llama teacher's chain only (base_models rebuilds all three models,
                                   and the unchanged ones come out identical, so nothing of theirs reruns)
  profiles.paper...llama.revision  a pin of the other profile: nothing
  grid.seeds=[0,1]                 the seed-1 runs, stats and report

Run:  .venv/bin/python bench/dvc_rebuilds.py      (about 10 minutes on 2 cores)
Writes bench/results/dvc_rebuilds.json and exits non-zero when a set differs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _conftest():
    """The tests' reduced study (tests/conftest.py: run_study): one definition of it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest

    return conftest


def stages_run(output: str) -> set[str]:
    """Stages DVC executed or restored from its run cache (both mean: its inputs changed)."""
    ran = set()
    for line in output.splitlines():
        if line.startswith("Running stage '") or (line.startswith("Stage '") and "is cached - skipping run" in line):
            ran.add(line.split("'")[1])
    return ran


def expected(names: list[str], change: str) -> set[str]:
    """The stages a change should reach, from what each stage reads (by name, not by asking DVC)."""
    study = {"stats", "report"}
    per_run = [n for n in names if n.split("@")[0] in ("kd", "generate", "eval_ngram", "eval_embed", "eval_llm")]
    if change == "kd.alg=dskd":
        return study
    if change == "kd.temperature=1.0":
        return set(per_run) | study
    if change == "base_models.pretrain_steps.llama=5":
        llama = {n for n in names if "@llama-" in n or n == "sft@llama"}
        return {"base_models"} | llama | study
    if change.startswith("profiles.paper."):
        return set()
    if change == "grid.seeds=[0,1]":
        return {n for n in per_run if n.endswith("-1")} | study
    raise ValueError(f"no expectation for {change}")


CHANGES = ["kd.alg=dskd", "kd.temperature=1.0", "base_models.pretrain_steps.llama=5",
           "profiles.paper.models.llama.revision=0000000000000000000000000000000000000000", "grid.seeds=[0,1]"]


def main() -> None:
    ct = _conftest()
    sh = ct.run_cmd
    results = []
    with tempfile.TemporaryDirectory(prefix="telekd-rebuilds-") as tmp:
        d = Path(tmp) / "repo"
        baseline_s = ct.run_study(d)["seconds"]
        sh(["git", "add", "-A"], d)
        sh(["git", "commit", "-qm", "baseline"], d)
        for change in CHANGES:
            t0 = time.perf_counter()
            out = sh(["dvc", "exp", "run", "-S", change], d)
            wall = time.perf_counter() - t0
            names = sh(["dvc", "stage", "list", "--name-only"], d).split()
            ran, want = stages_run(out), expected(names, change)
            results.append({"change": change, "ran": sorted(ran), "expected": sorted(want), "ok": ran == want,
                            "missing": sorted(want - ran), "extra": sorted(ran - want), "wall_s": round(wall, 1)})
            print(f"{'ok ' if ran == want else 'BAD'} {change}: {len(ran)} stages ran, {len(want)} expected, "
                  f"{wall:.0f}s" + ("" if ran == want else f"; missing {sorted(want - ran)}, extra {sorted(ran - want)}"))
            # back to the baseline: params, dvc.lock and the git-tracked (cache: false) outputs, then the cached ones
            sh(["git", "reset", "-q", "--hard"], d)
            sh(["dvc", "checkout", "--force"], d)
    import dvc

    doc = {"benchmark": "dvc_rebuilds", "baseline_repro_s": round(baseline_s, 1), "changes": results,
           "all_ok": all(r["ok"] for r in results),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "versions": {"dvc": dvc.__version__, "python": platform.python_version()},
           "command": "python bench/dvc_rebuilds.py"}
    out = ROOT / "bench/results/dvc_rebuilds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}; all as expected: {doc['all_ok']}")
    sys.exit(0 if doc["all_ok"] else 1)


if __name__ == "__main__":
    main()

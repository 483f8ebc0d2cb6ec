"""Which stages each change rebuilds: DVC reruns exactly the stages that depend on what changed.

Builds the study once in a temporary copy of the repository (the end-to-end test's reduced grid and
sizes: llama and mistral teachers, base teacher, SFT student, vanilla vs DSKD), commits it as the
baseline, then applies each change with `dvc exp run -S ...` from that baseline and compares the
stages DVC ran (or restored from its run cache) with what the change should reach: the stages that
read what changed must rerun, and those downstream of them may (DVC compares contents, so an
unchanged output stops the chain):

  kd.alg=dskd                      the DSKD cells exist already: only stats and report
  kd.temperature=1.0               the teacher caches (held at the temperature), every KD run and what reads
                                   them; no SFT or reference row
  base_models.pretrain_steps.llama the tiny profile's stand-in for a new pinned revision of one teacher:
                                   the llama teacher's chain only (base_models rebuilds all three models,
                                   and the unchanged ones come out identical, so nothing of theirs reruns)
  profiles.paper...llama.revision  a pin of the other profile: nothing
  grid.seeds=[0,1]                 the seed-1 runs, stats and report

Run:  .venv/bin/python bench/dvc_rebuilds.py      (about 10 minutes on 2 cores)
      .venv/bin/python bench/dvc_rebuilds.py --recheck bench/results/dvc_rebuilds.json   (verdicts only)
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


def expected(names: list[str], change: str) -> tuple[set[str], set[str]]:
    """(must, may): the stages that read what changed must rerun; those downstream of them may, when an
    upstream output's content changed (DVC compares contents, so e.g. identical predictions stop the chain).
    Derived from what each stage reads, by name, not by asking DVC."""
    study = {"stats", "report"}
    per_run = {n for n in names if n.split("@")[0] in ("kd", "generate", "eval_ngram", "eval_embed", "eval_llm")}
    kd = {n for n in per_run if n.startswith("kd@")}
    if change == "kd.alg=dskd":                       # read by stats and report only
        return study, study
    if change == "kd.temperature=1.0":                # read by the teacher caches (targets at T), every KD run, the report
        caches = {n for n in names if n.startswith("teacher_cache@")}
        return caches | kd | {"report"}, caches | per_run | study
    if change == "base_models.pretrain_steps.llama=5":  # a new llama teacher: its chain, nothing of mistral's
        must = {"base_models"} | {n for n in names if n.startswith(("teacher_cache@llama-", "kd@llama-"))}
        return must, must | {n for n in names if "@llama-" in n or n == "sft@llama"} | study
    if change.startswith("profiles.paper."):          # the other profile's pin: nothing
        return set(), set()
    if change == "grid.seeds=[0,1]":                  # the seed-1 runs are new; stats and report read grid
        new = {n for n in per_run if n.endswith("-1")} | study
        return new, new
    raise ValueError(f"no expectation for {change}")


def verdict(ran: set[str], names: list[str], change: str) -> dict:
    must, may = expected(names, change)
    return {"ran": sorted(ran), "must": sorted(must), "may": sorted(may), "ok": must <= ran <= may,
            "missing": sorted(must - ran), "unexpected": sorted(ran - may)}


CHANGES = ["kd.alg=dskd", "kd.temperature=1.0", "base_models.pretrain_steps.llama=5",
           "profiles.paper.models.llama.revision=0000000000000000000000000000000000000000", "grid.seeds=[0,1]"]


def recheck(path: Path) -> dict:
    """Apply `verdict` again to a results file's recorded runs (stage names: those it lists, when it has none)."""
    doc = json.loads(path.read_text())
    seen = sorted({n for r in doc["changes"] for k in ("ran", "expected", "must", "may", "names") for n in r.get(k, [])})
    base = [n for n in seen if not n.endswith("-1")]  # the baseline has seed 0 only: seed-1 runs come with the change

    def names(r):
        return r.get("names") or (seen if r["change"] == "grid.seeds=[0,1]" else base)

    doc["changes"] = [{"change": r["change"], **verdict(set(r["ran"]), names(r), r["change"]), "names": names(r),
                       "wall_s": r["wall_s"]} for r in doc["changes"]]
    doc["all_ok"] = all(r["ok"] for r in doc["changes"])
    return doc


def main() -> None:
    if sys.argv[1:2] == ["--recheck"]:  # the verdicts again, from a results file (no DVC run)
        out = Path(sys.argv[2])
        doc = recheck(out)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        for r in doc["changes"]:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['change']}: ran {len(r['ran'])}, must {len(r['must'])}, "
                  f"may {len(r['may'])}; missing {r['missing']}, unexpected {r['unexpected']}")
        sys.exit(0 if doc["all_ok"] else 1)
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
            r = {"change": change, **verdict(stages_run(out), names, change), "names": names, "wall_s": round(wall, 1)}
            results.append(r)
            print(f"{'ok ' if r['ok'] else 'BAD'} {change}: {len(r['ran'])} stages ran ({len(r['must'])} must, "
                  f"{len(r['may'])} may), {wall:.0f}s" + ("" if r["ok"] else f"; missing {r['missing']}, "
                                                           f"unexpected {r['unexpected']}"))
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

"""Which stages each change rebuilds: DVC reruns exactly the stages that depend on what changed.

Builds the study once in a temporary copy of the repository (the end-to-end test's reduced grid and
sizes: llama and mistral teachers, base teacher, SFT student, vanilla vs DSKD), commits it as the
baseline, then applies each change with `dvc exp run -S ...` from that baseline and compares the
stages DVC ran (or restored from its run cache) with what the change should reach: the stages that
read what changed must rerun, and those downstream of them may (DVC compares contents, so an
unchanged output stops the chain):

  kd.alg=dskd                      the DSKD cells exist already: only stats and report
  vanilla.divergence.temperature=1.0
                                   the teacher caches (one pass writes every algorithm's entry), the vanilla KD
                                   runs and what reads them; no DSKD or ULD run (their entries come out
                                   byte-identical), no SFT or reference row
  dskd.divergence.temperature=1.0  likewise: the teacher caches, the DSKD runs and what reads them; no vanilla run
  base_models.pretrain_steps.llama the tiny profile's stand-in for a new pinned revision of one teacher:
                                   the llama teacher's chain only (base_models rebuilds all three models,
                                   and the unchanged ones come out identical, so nothing of theirs reruns)
  profiles.paper...llama.revision  a pin of the other profile: nothing
  grid.seeds=[0,1]                 the seed-1 runs, stats and report

Run:  python bench/dvc_rebuilds.py      (about 10 minutes on 2 cores)
      python bench/dvc_rebuilds.py --recheck bench/results/dvc_rebuilds.json   (verdicts only, rewrites the file)
      python bench/dvc_rebuilds.py --smoke   (no DVC run: see below)
Writes bench/results/dvc_rebuilds.json and exits non-zero when a set differs.

--smoke checks the verdict logic without building a study: it parses a fixture of DVC's output
(stages_run), applies expected()/verdict() to every change on the recorded stage names of
bench/results/dvc_rebuilds.json (recheck, on a copy in --out-dir) and checks that a wrong set is
caught (a fixture run missing a must-stage and running a stage no change may reach). What it does not
cover: building the study and DVC itself.
"""

from __future__ import annotations

import argparse
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
    if change == "kd.temperature=1.0":  # the layout before per-algorithm entries (recorded results): every KD run
        caches = {n for n in names if n.startswith("teacher_cache@")}
        return caches | kd | {"report"}, caches | per_run | study
    if change in ("vanilla.divergence.temperature=1.0", "dskd.divergence.temperature=1.0"):
        # read by the teacher caches (that algorithm's entry), that algorithm's KD runs and the report; the other
        # algorithm's entry comes out byte-identical, so none of its runs may rerun
        alg = change.split(".")[0]
        caches = {n for n in names if n.startswith("teacher_cache@")}
        mine = {n for n in per_run if n.rsplit("-", 2)[-2] == alg}
        return caches | {n for n in mine if n.startswith("kd@")} | {"report"}, caches | mine | study
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


CHANGES = ["kd.alg=dskd", "vanilla.divergence.temperature=1.0", "dskd.divergence.temperature=1.0",
           "base_models.pretrain_steps.llama=5",
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


FIXTURE_OUTPUT = """Running stage 'kd@llama-sft-base-vanilla-0':
> python stages/vanilla.py --cell llama-sft-base-vanilla-s0
Stage 'kd@mistral-sft-base-vanilla-0' is cached - skipping run, checking out outputs
Stage 'prepare' didn't change, skipping
Running stage 'report':
"""


def smoke(a) -> None:
    import shutil
    import tempfile

    from common import write_result

    ran = stages_run(FIXTURE_OUTPUT)
    assert ran == {"kd@llama-sft-base-vanilla-0", "kd@mistral-sft-base-vanilla-0", "report"}, ran
    out_dir = Path(a.out_dir or tempfile.mkdtemp(prefix="telekd-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / "recorded.json"
    shutil.copy(ROOT / "bench/results/dvc_rebuilds.json", copy)
    doc = recheck(copy)
    names = doc["changes"][0]["names"]
    wrong = verdict({"prepare", "report"}, names, "kd.alg=dskd")  # stats missing, prepare unexpected
    assert not wrong["ok"] and wrong["missing"] == ["stats"] and wrong["unexpected"] == ["prepare"], wrong
    # vanilla's temperature: a DSKD run that reruns is caught, and the vanilla runs and the caches must run
    temp = "vanilla.divergence.temperature=1.0"
    must, may = expected(names, temp)
    dskd_kd = sorted(n for n in names if n.startswith("kd@") and "-dskd-" in n)
    assert dskd_kd and not set(dskd_kd) & may and any(n.startswith("teacher_cache@") for n in must), (must, may)
    assert all(n in must for n in names if n.startswith("kd@") and "-vanilla-" in n)
    leak = verdict(must | {dskd_kd[0]}, names, temp)
    assert not leak["ok"] and leak["unexpected"] == [dskd_kd[0]], leak
    a.out_dir = str(out_dir)
    write_result(a, "dvc_rebuilds", {
        "benchmark": "dvc_rebuilds", "fixture_stages_run": sorted(ran), "recorded_all_ok": doc["all_ok"],
        "recorded_verdicts": {r["change"]: r["ok"] for r in doc["changes"]},
        "wrong_set_caught": not wrong["ok"] and not leak["ok"],
        "covers": "DVC output parsing, must/may expectations and verdicts on the recorded runs; not the study or DVC"})
    sys.exit(0 if doc["all_ok"] else 1)


def main() -> None:
    from common import add_output_args, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recheck", default=None, help="a results file: apply the verdicts again (no DVC run)")
    add_output_args(ap, "no DVC run: parsing and verdicts on a fixture and on the recorded results (see above)")
    a = ap.parse_args()
    if a.smoke:
        return smoke(a)
    if a.recheck:  # the verdicts again, from a results file (no DVC run)
        out = Path(a.recheck)
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
           "versions": {"dvc": dvc.__version__, "python": platform.python_version()}}
    write_result(a, "dvc_rebuilds", doc)
    print(f"all as expected: {doc['all_ok']}")
    sys.exit(0 if doc["all_ok"] else 1)


if __name__ == "__main__":
    main()

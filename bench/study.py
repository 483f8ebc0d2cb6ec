"""Wall time of the study: `make repro` from a fresh clone, a no-op `dvc repro`, then `dvc exp run -S kd.alg=dskd`.

The repository is cloned (committed HEAD only) into a temporary folder; every DVC command's output
is streamed and time-stamped, and each "Running stage 'x':" line opens a stage that the next one
(or the command's end) closes, so the per-stage durations include the stage's process start-up and
DVC's own hashing and lock-file work.

By default the clone reuses this interpreter's virtual environment (--venv) and runs what
`make repro` runs after `make setup` (`python -m telekd.forkserver python -m telekd.lockfile repro`: every
stage a fork of one process that imported the libraries once, and dvc.lock kept parsed between stages); --plain
runs `dvc repro` alone, a fresh interpreter per stage;
--fresh-venv runs the real `make repro`, pip install included. --compare DIR compares every per-sample
score of the run with those of another study folder (telekd.score_diff, exact).

    python bench/study.py --compare .          # the full tiny study against this checkout's: bench/results/study.json
    python bench/study.py --target prepare --out-dir /tmp/study-check   # one real stage in a clone: a minute
    python bench/study.py --smoke              # no clone, no DVC: see below
    python bench/study.py --reduced --keep --skip-exp --out-dir /tmp/reduced   # the tests' reduced study

--smoke checks this script's own logic without running a study: it plans the same three commands
(`dvc repro`, no-op `dvc repro`, `dvc exp run -S kd.alg=dskd`), runs each as a child process that
prints a fixture of DVC's output lines (stages run, stages skipped), and parses, times, groups by
stage family and writes the result as the real run does. What it does not cover: cloning, DVC itself
and the stages.
"""

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_output_args, provenance, write_result

ROOT = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "RAGAS_DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def timed(cmd: list[str], cwd: Path, env: dict, log) -> dict:
    """Run cmd, time-stamp its output lines; return wall time, per-stage durations and skipped stages."""
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    starts, skipped = [], []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        log.write(f"[{now:8.2f}] {line}")
        if m := RUNNING.search(line):
            starts.append((m.group(1), now))
        elif m := SKIPPED.search(line):
            skipped.append(m.group(1))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if rc != 0:
        raise SystemExit(f"study: {' '.join(cmd)} failed with exit code {rc}: see {log.name}")
    ends = [t for _, t in starts[1:]] + [wall]
    stages = {name: round(end - start, 2) for (name, start), end in zip(starts, ends)}
    return {"command": " ".join(cmd), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "stages_run": len(stages),
            "stages_skipped": len(skipped), "stage_s": stages}


def by_family(stage_s: dict) -> dict:
    """Seconds and count per stage family (kd@llama-sft-base-dskd -> kd)."""
    fam: dict[str, dict] = {}
    for name, s in stage_s.items():
        f = fam.setdefault(name.split("@")[0], {"stages": 0, "total_s": 0.0})
        f["stages"] += 1
        f["total_s"] = round(f["total_s"] + s, 2)
    for f in fam.values():
        f["mean_s"] = round(f["total_s"] / f["stages"], 2)
    return dict(sorted(fam.items(), key=lambda kv: -kv[1]["total_s"]))


# --smoke: what DVC prints for each planned command (a reduced study's stage names)
FIXTURE = {
    "make_repro": ["Running stage 'prepare':", "> python stages/prepare.py", "Running stage 'base_models':",
                   "Running stage 'kd@llama-sft-base-vanilla-s0':", "Running stage 'kd@llama-sft-base-dskd-s0':",
                   "Running stage 'report':", "Updating lock file 'dvc.lock'"],
    "noop_repro": ["Stage 'prepare' didn't change, skipping", "Stage 'base_models' didn't change, skipping",
                   "Data and pipelines are up to date."],
    "exp_run_dskd": ["Stage 'prepare' didn't change, skipping", "Running stage 'stats':", "Running stage 'report':"],
}


def fixture_cmd(key: str) -> list[str]:
    """A child process that prints FIXTURE[key] line by line (the --smoke stand-in for a DVC command)."""
    return [sys.executable, "-c", f"import time\nfor line in {FIXTURE[key]!r}:\n    print(line, flush=True)\n"
                                  "    time.sleep(0.05)"]


def plan(target: list[str], plain: bool = False) -> dict:
    """The DVC commands the benchmark times, by result key: the study as `make repro` runs it (under the fork
    server, src/telekd/forkserver.py, with dvc.lock kept parsed, src/telekd/lockfile.py), or with `plain` as
    `dvc repro` alone (a fresh interpreter per stage, DVC as installed)."""
    dvc = ["dvc"] if plain else ["python", "-m", "telekd.forkserver", "python", "-m", "telekd.lockfile"]
    return {"make_repro": [*dvc, "repro", *target], "noop_repro": ["dvc", "repro", *target],
            "exp_run_dskd": [*dvc, "exp", "run", "-S", "kd.alg=dskd", *target]}


def smoke(a) -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="telekd-study-smoke-"))
    result = {"benchmark": "study", "target": "smoke fixture", "plan": {k: " ".join(v) for k, v in plan([]).items()},
              "covers": "command plan, output parsing, per-stage timing, stage families, result file; "
                        "not cloning, DVC or the stages"}
    with open(tmp / "study.log", "w") as log:
        for key in ("make_repro", "noop_repro", "exp_run_dskd"):
            result[key] = timed(fixture_cmd(key), tmp, dict(os.environ), log)
    full = result["make_repro"]
    result["families"] = by_family(full["stage_s"])
    result["summary_s"] = {k: result[k]["wall_s"] for k in ("make_repro", "noop_repro", "exp_run_dskd")}
    write_result(a, "study", result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", default=str(ROOT), help="what to clone (committed HEAD)")
    ap.add_argument("--venv", default=sys.prefix, help="virtual environment to reuse (its bin/ goes first on PATH)")
    ap.add_argument("--fresh-venv", action="store_true", help="run the real `make repro`, pip install included")
    ap.add_argument("--target", default=None, help="only this DVC target (e.g. prepare) to check the script")
    ap.add_argument("--skip-exp", action="store_true", help="leave out dvc exp run -S kd.alg=dskd")
    ap.add_argument("--reduced", action="store_true",
                    help="the tests' reduced study (tests/conftest.py: reduce_study) committed in the clone")
    ap.add_argument("--keep", action="store_true", help="keep the clone")
    ap.add_argument("--plain", action="store_true",
                    help="time plain `dvc repro`, without the fork server and telekd.lockfile")
    ap.add_argument("--compare", metavar="DIR", help="a study folder with an earlier run's scores/ (e.g. this "
                    "checkout): every per-sample score compared with the clone's (telekd.score_diff)")
    ap.add_argument("--shared", default="yes: other agents' work ran at the same time",
                    help="what else ran on the machine meanwhile, as recorded in the result")
    ap.add_argument("--compare-label", help="what --compare DIR holds, for the README table (e.g. plain dvc repro at "
                    "<commit>)")
    add_output_args(ap, "no clone and no DVC: the plan's commands replaced by fixture output (see above)")
    a = ap.parse_args()
    if a.smoke:
        return smoke(a)
    tmp = Path(tempfile.mkdtemp(prefix="telekd-study-"))
    clone = tmp / "telekd"
    subprocess.run(["git", "clone", "--quiet", a.repo, str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True).stdout
    if a.reduced:
        import yaml

        sys.path.insert(0, str(clone / "tests"))
        from conftest import reduce_study

        params = reduce_study(yaml.safe_load((clone / "params.yaml").read_text()))
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        subprocess.run([*git, "commit", "--quiet", "-am", "reduced study"], cwd=clone, check=True)
    env = {**os.environ, **OFFLINE}
    env["PYTHONPATH"] = str(clone / "src")  # the clone's code, never an editable install elsewhere
    target = [a.target] if a.target else []
    log_path = tmp / "study.log"
    result = {"benchmark": "study", "target": a.target or "all",
              "study": "reduced (tests/conftest.py: reduce_study)" if a.reduced else "tiny profile", "clone": str(clone)}
    # the clone holds committed HEAD only: that commit is what ran, uncommitted changes never reach it
    prov = {**provenance(), "commit": head.strip(), "dirty": False, "dirty_paths": []}
    with open(log_path, "w") as log:
        if a.fresh_venv:
            if a.target:
                raise SystemExit("study: --fresh-venv runs the whole `make repro`; drop --target")
            result["make_repro"] = timed(["make", "repro"], clone, env, log)
        else:
            env["PATH"] = f"{Path(a.venv) / 'bin'}:{env['PATH']}"
            for key in ("core.analytics false", "core.check_update false"):
                subprocess.run(["dvc", "config", *key.split()], cwd=clone, env=env, check=True)
            result["make_repro"] = timed(plan(target, a.plain)["make_repro"], clone, env, log)
            result["make_repro"]["note"] = f"make setup skipped: venv {a.venv} reused"
        if a.compare:   # telekd.score_diff, before `dvc exp run` changes the workspace: every value, exactly (==)
            from telekd.score_diff import STRICT, compare

            result["per_sample_scores_vs"] = {"reference": a.compare, "reference_label": a.compare_label or a.compare,
                                              "strict_families": list(STRICT), "families": compare(a.compare, clone)}
        result["noop_repro"] = timed(plan(target, a.plain)["noop_repro"], clone, env, log)
        if not a.skip_exp:
            result["exp_run_dskd"] = timed(plan(target, a.plain)["exp_run_dskd"], clone, env, log)
    full = result["make_repro"]
    result["families"] = by_family(full["stage_s"])
    result["slowest_stages"] = dict(sorted(full["stage_s"].items(), key=lambda kv: -kv[1])[:10])
    result["goals"] = {"make_repro_s": "<= 600", "noop_repro_s": "<= 5"}
    result["summary_s"] = {"make_repro": full["wall_s"], "noop_repro": result["noop_repro"]["wall_s"],
                           "exp_run_dskd": result.get("exp_run_dskd", {}).get("wall_s")}
    result["summary_cpu_s"] = {k: result[k]["cpu_s"] for k in ("make_repro", "noop_repro", "exp_run_dskd")
                               if k in result}
    result["load_at_end"] = os.getloadavg()
    import torch  # only for the versions line

    result.update({"machine": {"platform": f"{platform.machine()}, {os.cpu_count()} cores",
                               "shared": a.shared},
                   "versions": {"python": platform.python_version(), "torch": torch.__version__}})
    print(f"{'step':<16}{'wall s':>10}{'stages run':>12}{'skipped':>9}")
    for k in ("make_repro", "noop_repro", "exp_run_dskd"):
        if k in result:
            r = result[k]
            print(f"{k:<16}{r['wall_s']:>10.1f}{r['stages_run']:>12}{r['stages_skipped']:>9}")
    print("per stage family:", ", ".join(f"{f} {v['total_s']:.0f} s / {v['stages']}" for f, v in result["families"].items()))
    print(f"log {log_path}")
    write_result(a, "study", result, prov)
    if not a.keep:
        import shutil

        shutil.rmtree(clone)


if __name__ == "__main__":
    main()

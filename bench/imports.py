"""Start-up cost of each stage script: what it imports before and while doing its work.

For every stages/<x>.py two fresh processes are timed (CPU seconds of the child, immune to the
neighbours' load; `-X importtime` gives the breakdown):
  reach the interpreter plus the stage's module-level code (what runs before main());
  work  every import the stage makes plus every import inside the telekd functions it calls
        (followed through calls and `from .m import f`; imports on conditional branches, e.g. peft
        for a LoRA student, are counted): an upper bound of what one run of the stage loads.
The heaviest top-level packages of `work` are listed per stage, and the number of processes each
script runs in one study (`dvc stage list`, with eval_ref/generate_ref mapped to their scripts) turns
them into seconds per full study.

    python bench/imports.py [--reps 2] [--stages prepare,kd]
    python bench/imports.py --smoke     # the prepare stage only, 1 rep: checks the script in seconds
Writes bench/results/imports.json.
"""

import argparse
import ast
import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

from common import add_output_args, spread, write_result

ROOT = Path(__file__).resolve().parents[1]


def _line(node, pkg: str | None) -> list[str]:
    """Source lines of an import node; a relative import inside telekd is made absolute against `pkg`, the package
    of the importing module (telekd.kd for telekd/kd/run.py: `from .loop` is telekd.kd.loop, `from ..io` telekd.io)."""
    if isinstance(node, ast.Import):
        return [f"import {a.name}" for a in node.names]
    if node.module == "__future__":
        return []
    mod = node.module if node.level == 0 else importlib.util.resolve_name("." * node.level + (node.module or ""), pkg)
    return [f"from {mod} import {', '.join(a.name for a in node.names)}"]


def _source(name: str) -> Path | None:
    """The file of telekd module or package `name` (src/telekd/kd.py or src/telekd/kd/__init__.py), None if none."""
    base = ROOT / "src" / name.replace(".", "/")
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)


class Module:
    """A telekd module's top-level imports and, per function, its imports and the names it uses."""

    def __init__(self, name: str):
        path = _source(name)
        tree = ast.parse(path.read_text())
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.top = [ln for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for ln in _line(n, pkg)]
        self.funcs = {}
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                lines = [ln for x in ast.walk(n) if isinstance(x, (ast.Import, ast.ImportFrom)) for ln in _line(x, pkg)]
                names = {x.id for x in ast.walk(n) if isinstance(x, ast.Name)}
                self.funcs[n.name] = (lines, names)
        # names a package re-exports (`from .scoring import judge_rows` in telekd/judge/__init__.py): followed there
        self.reexports = {a.asname or a.name: ln.split()[1] for n in tree.body if isinstance(n, ast.ImportFrom)
                          for ln in _line(n, pkg) if ln.startswith("from telekd") for a in n.names}


def work_imports(stage: Path) -> list[str]:
    """The stage's own imports plus, following the telekd functions it names (calls within a module and
    `from .m import f` inside functions), every import those functions make, conditional ones included."""
    tree = ast.parse(stage.read_text())
    lines = [ln for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for ln in _line(n, "telekd")]
    todo = []
    for ln in lines:
        parts = ln.split()
        if parts[0] == "from" and parts[1].startswith("telekd"):
            names = [x.strip() for x in ln.split(" import ", 1)[1].split(",")]
            if parts[1] == "telekd":  # `from telekd import terms`: the attributes the stage uses
                for mod in names:
                    used = {x.attr for x in ast.walk(tree) if isinstance(x, ast.Attribute)
                            and isinstance(x.value, ast.Name) and x.value.id == mod}
                    todo += [(f"telekd.{mod}", f) for f in used] + [(f"telekd.{mod}", None)]
            else:
                todo += [(parts[1], f) for f in names]
    seen, mods = set(), {}
    while todo:
        mod, fn = todo.pop()
        if (mod, fn) in seen or _source(mod) is None:
            continue
        seen.add((mod, fn))
        m = mods.setdefault(mod, Module(mod))
        lines += m.top
        if fn in m.reexports and fn not in m.funcs:
            todo.append((m.reexports[fn], fn))
        if fn in m.funcs:
            f_lines, names = m.funcs[fn]
            lines += f_lines
            todo += [(mod, n) for n in names if n in m.funcs or n in m.reexports]
            for ln in f_lines:
                if ln.startswith("from telekd."):
                    todo += [(ln.split()[1], x.strip()) for x in ln.split(" import ", 1)[1].split(",")]
    return list(dict.fromkeys(lines))


def child_cpu(cmd: list[str], env: dict) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode not in (0,):
        raise SystemExit(f"imports: {' '.join(cmd[:4])} failed: {p.stderr[-500:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), p.stderr


def top_packages(importtime: str, k: int = 6) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time (seconds) from `-X importtime` output."""
    cum: dict[str, float] = {}
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, c, name = line.split("|")
        if name.startswith(" ") and not name.startswith("  "):  # depth 0
            pkg = name.strip().split(".")[0]
            cum[pkg] = cum.get(pkg, 0.0) + int(c) / 1e6
    return [(p, round(s, 2)) for p, s in sorted(cum.items(), key=lambda kv: -kv[1])[:k]]


def stage_counts() -> dict:
    # this Python's dvc: `.venv/bin/python bench/imports.py` works without the venv on PATH
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    scripts = {"generate_ref": ["generate"], "eval_ref": ["eval_ngram", "eval_embed", "eval_llm"]}  # dvc.yaml cmds
    counts: dict[str, int] = {}
    for name in out.stdout.split():
        stage, _, item = name.partition("@")
        # kd@<teacher>-<sft>-<sft>-<alg>-<seed> runs stages/<alg>.py (dvc.yaml's cmd)
        for script in [item.split("-")[-2]] if stage == "kd" else scripts.get(stage, [stage]):
            counts[script] = counts.get(script, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stages", default=None, help="comma-separated stage scripts (default: every stages/*.py)")
    add_output_args(ap, "the prepare stage only, 1 rep: checks the script in seconds")
    a = ap.parse_args()
    if a.smoke:
        a.reps, a.stages = 1, "prepare"
    chosen = None if a.stages is None else set(a.stages.split(","))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    counts = stage_counts()
    packages = {}
    base = spread([child_cpu([sys.executable, "-c", "pass"], env)[0] for _ in range(a.reps)])
    stages = {}
    for stage in sorted((ROOT / "stages").glob("*.py")):
        name = stage.stem
        if chosen is not None and name not in chosen:
            continue
        reached, works, trace = [], [], ""
        code = "\n".join(work_imports(stage))
        for _ in range(a.reps):
            reach = f"import runpy; runpy.run_path({str(stage)!r}, run_name='stage')"  # module level, not main()
            reached.append(child_cpu([sys.executable, "-c", reach], env)[0])
            cpu, trace = child_cpu([sys.executable, "-X", "importtime", "-c", code], env)
            works.append(cpu)
        for ln in code.splitlines():
            pkg = ln.split()[1].split(".")[0]
            if pkg not in packages and pkg not in sys.stdlib_module_names and pkg != "telekd":
                packages[pkg] = round(min(child_cpu([sys.executable, "-c", ln], env)[0] for _ in range(a.reps)), 2)
        n = counts.get(name, 0)
        stages[name] = {"reach_main_cpu_s": spread(reached), "work_imports_cpu_s": spread(works), "stages_in_study": n,
                        "study_total_s": round(n * min(works), 1),
                        "packages_cpu_s": {p: packages[p] for p in sorted(
                            {ln.split()[1].split(".")[0] for ln in code.splitlines()} & set(packages),
                            key=lambda p: -packages[p])},
                        "heaviest_importtime_wall_s": top_packages(trace),
                        "imports": code.splitlines()}
    result = {"benchmark": "imports", "interpreter_cpu_s": base, "stages": stages,
              "stages_measured": "all" if chosen is None else sorted(chosen),
              "package_import_cpu_s": dict(sorted(packages.items(), key=lambda kv: -kv[1])),
              "note": "package costs are each measured alone in a fresh process, so they include shared "
                      "dependencies (torch, transformers) and do not add up",
              "study_import_total_s": round(sum(s["study_total_s"] for s in stages.values()), 1),
              "machine": {"platform": f"{os.cpu_count()} cores", "shared": "yes; CPU seconds of the child processes"}}
    print(f"interpreter alone: {base['median']:.2f} CPU s")
    print(f"{'stage':<15}{'main s':>9}{'work s':>8}{'x stages':>9}{'study s':>9}  packages (CPU s, each alone)")
    for name, s in sorted(stages.items(), key=lambda kv: -kv[1]["study_total_s"]):
        print(f"{name:<15}{s['reach_main_cpu_s']['min']:>9.2f}{s['work_imports_cpu_s']['min']:>8.2f}{s['stages_in_study']:>9}"
              f"{s['study_total_s']:>9.0f}  " + ", ".join(f"{p} {t}" for p, t in list(s["packages_cpu_s"].items())[:5]))
    print(f"all stages of one study: {result['study_import_total_s']} CPU s of imports")
    write_result(a, "imports", result)


if __name__ == "__main__":
    main()

"""Every stage depends on the library code it runs: dvc.yaml's `deps:` of a stage list every module of src/telekd
that its script imports (a file, or a folder above it), so that changing that code reruns the stage.

A static check, nothing imported or run: from the stage script, imports are followed as they execute: a module's
top-level imports whenever it is imported, and a function's (or class's) own imports when the script or a function
already reached names it (calls within a module, `from .m import f`, a package's re-exports). The `kd` stage is
checked once per algorithm (`stages/${item.alg}.py`). A few modules are left out on purpose, each with its reason.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import lru_cache

import pytest
import yaml

from conftest import ROOT

ALGS = ("vanilla", "dskd", "uld")
# Modules no stage lists, on purpose: what they change reaches a stage another way.
NOT_DEPS = {
    "src/telekd/__init__.py": "environment defaults only (offline, no telemetry)",
    "src/telekd/io.py": "atomic writes and JSON(L) reading/writing: no value of a result depends on it",
    "src/telekd/layout.py": "paths of the study's folders: a changed path changes the stage's outs in dvc.yaml itself",
    "src/telekd/params.py": "validation: the values a stage reads are params.yaml's, which DVC tracks key by key",
}


def _source(module: str):
    """The file of a telekd module or package (repository-relative path), None when there is none."""
    base = ROOT / "src" / module.replace(".", "/")
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.exists():
            return f.relative_to(ROOT).as_posix()
    return None


def _pairs(node: ast.AST, package: str) -> list[tuple[str, str | None]]:
    """(module, name) pairs one import statement asks for among telekd's modules (name None: the module whole)."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.startswith("telekd")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        base = importlib.util.resolve_name("." * node.level + base, package)
    if not base.startswith("telekd"):
        return []
    return [((f"{base}.{a.name}", None) if _source(f"{base}.{a.name}") else (base, a.name)) for a in node.names]


@lru_cache(maxsize=None)
def _module(module: str):
    """(path, top-level import pairs, {function or class name: (its import pairs, names it uses)}) of a module."""
    path = _source(module)
    tree = ast.parse((ROOT / path).read_text())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    top = [pr for n in tree.body for pr in _pairs(n, package)]
    defs = {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = [pr for x in ast.walk(n) for pr in _pairs(x, package)]
            defs[n.name] = (inner, {x.id for x in ast.walk(n) if isinstance(x, ast.Name)})
    return path, top, defs


def reached(script: str) -> set[str]:
    """Paths of the telekd modules stages/<script>.py runs (see the module docstring)."""
    tree = ast.parse((ROOT / "stages" / f"{script}.py").read_text())
    todo = [pr for n in ast.walk(tree) for pr in _pairs(n, "")]
    files, seen = set(), set()
    while todo:
        module, name = todo.pop()
        if (module, name) in seen or _source(module) is None:
            continue
        seen.add((module, name))
        parts = module.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            todo.append((".".join(parts[:i]), None))
        path, top, defs = _module(module)
        if path not in files:
            files.add(path)
            todo += top
        used = list(defs) if name is None else [name] if name in defs else []
        for fn in used:  # a module used whole: any of its functions may run
            inner, names = defs[fn]
            todo += inner + [(module, n) for n in names if n in defs]
            todo += [pr for pr in top if pr[1] in names]
    return files


def _trivial_init(path: str) -> bool:
    """A package __init__.py holding nothing but its docstring (importing it runs nothing)."""
    if not path.endswith("__init__.py"):
        return False
    body = ast.parse((ROOT / path).read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _stages():
    out = {}
    for name, st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        cmd = " ".join(st["cmd"]) if isinstance(st["cmd"], list) else st["cmd"]
        deps = [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])]
        scripts = re.findall(r"stages/(\w+|\$\{item\.alg\})\.py", cmd)
        for alg in (ALGS if "${item.alg}" in cmd else (None,)):
            fill = (lambda s: s.replace("${item.alg}", alg)) if alg else (lambda s: s)
            out[f"{name}[{alg}]" if alg else name] = ([fill(s) for s in scripts], [fill(d) for d in deps])
    return out


STAGES = _stages()


def _listed(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_the_library_code_it_runs(stage):
    scripts, deps = STAGES[stage]
    need = set().union(*(reached(s) for s in scripts)) - set(NOT_DEPS)
    missing = sorted(p for p in need if not _listed(p, deps) and not _trivial_init(p))
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not list them in deps: add them"


@pytest.mark.parametrize("stage", sorted({s.split("[")[0] for s in STAGES}))
def test_stage_lists_no_library_code_it_never_runs(stage):
    """Across the algorithms of the kd matrix (their deps differ only through ${item.alg})."""
    cells = [k for k in STAGES if k.split("[")[0] == stage]
    need = set().union(*(reached(s) for k in cells for s in STAGES[k][0]))
    deps = {d for k in cells for d in STAGES[k][1] if d.startswith("src/")}
    extra = sorted(d for d in deps if not any(_listed(p, [d]) for p in need))
    assert not extra, f"dvc.yaml: stage {stage} lists {extra}, which it never imports: remove them"


def test_the_walk_follows_functions_packages_and_reexports():
    """Pins the walk: the uld script reaches the shared flow and the loop through run_cell, not DSKD's module; eval_llm
    reaches the judge's backends through the package's re-exports; base_models reaches checkpoint.check_finite but
    not cache.py (only checkpoint.fingerprint imports it)."""
    uld = reached("uld")
    assert {"src/telekd/kd/run.py", "src/telekd/kd/loop.py", "src/telekd/kd/uld.py", "src/telekd/examples.py"} <= uld
    assert "src/telekd/kd/dskd.py" not in uld and "src/telekd/kd/vanilla.py" not in uld
    assert {"src/telekd/judge/scoring.py", "src/telekd/judge/local.py"} <= reached("eval_llm")
    base = reached("base_models")
    assert "src/telekd/checkpoint.py" in base and "src/telekd/cache.py" not in base

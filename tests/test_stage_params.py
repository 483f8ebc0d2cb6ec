"""Every stage depends on exactly the params it reads: dvc.yaml's `params:` of a stage covers every params path that
its script (and the telekd functions it hands the params object to) reads, and declares nothing it never reads.

A static check: the params object `p = load_params()` is followed through attribute chains, aliases
(`t, kd = p.active.train, p.kd`), `getattr(p, cell.alg)` (the matrix's `${item.alg}`) and calls that pass it on
(`kd_inputs(p, ...)`, `JudgeConfig.from_params(p)`), walking the pydantic models of telekd.params so that a
method (`.model_dump()`) or a dict field ends the path.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import textwrap

import pytest
import yaml
from pydantic import BaseModel

from conftest import ROOT
from telekd import params as P

ACTIVE = "profiles.${profile}"
# Reads that are not dependencies under dvc.yaml, each with the reason.
NOT_UNDER_DVC = {
    ("kd", "seed"): "p.seed only when --cell has no -s<seed>; dvc.yaml always passes the seed",
    ("teacher_cache", "grid.teachers"): "a guard on --teacher only; dvc.yaml's matrix passes a teacher of "
                                        "grid.teachers (declared, adding a teacher would rebuild every cache)",
}
# Declared sections that are empty today (params.yaml `eval_ngram: {}`): a knob added there is read by the stage.
EMPTY_SECTIONS = {"eval_ngram"}


def _field_model(model, name):
    """The pydantic model of field `name` of `model` (None for a leaf or a dict/list field)."""
    ann = model.model_fields[name].annotation
    return ann if inspect.isclass(ann) and issubclass(ann, BaseModel) else None


class Reads(ast.NodeVisitor):
    """Params paths read in one function body, `roots` mapping local names to (path, pydantic model)."""

    def __init__(self, roots: dict, module, out: set, seen: set):
        self.roots, self.module, self.out, self.seen = dict(roots), module, out, seen

    def resolve(self, node):
        """(path, model) of an expression rooted at a params object, else None."""
        if isinstance(node, ast.Name):
            return self.roots.get(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and node.args:
            base = self.resolve(node.args[0])
            if base is not None and base[0] == "" and isinstance(node.args[1], ast.Attribute):
                return f"${{item.{node.args[1].attr}}}", None  # getattr(p, cell.alg): the matrix axis's section
            if base is not None and base[0] == "":  # getattr(p, a), a one of kd.alg / kd.versus: an algorithm's section
                self.out.update(P.Alg.__args__)
                return None
            if base is not None:
                return base[0], None
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is None:
                return None
            path, model = base
            if model is None:
                return base  # past a leaf, a dict or a dynamic section: the path read stays the prefix
            if model is P.Params and node.attr == "active":
                self.out.add("profile")
                return ACTIVE, P.Profile
            if node.attr in model.model_fields:
                return (f"{path}.{node.attr}" if path else node.attr), _field_model(model, node.attr)
            return base  # a method (model_dump) or a property: the whole object is read
        return None

    def visit_Assign(self, node):
        targets, values = node.targets[0], node.value
        pairs = (list(zip(targets.elts, values.elts)) if isinstance(targets, ast.Tuple) and isinstance(values, ast.Tuple)
                 else [(targets, values)])
        for t, v in pairs:
            r = self.resolve(v)
            if isinstance(t, ast.Name) and r is not None:
                self.roots[t.id] = r  # an alias: read where it is used, not here
            else:
                self.visit(v)

    def visit_Name(self, node):
        r = self.roots.get(node.id) if isinstance(node.ctx, ast.Load) else None
        if r is not None and r[0]:
            self.out.add(r[0])  # an alias used whole (passed on, iterated)

    def visit_Attribute(self, node):
        r = self.resolve(node)
        if r is not None and r[0]:
            self.out.add(r[0])
            return  # the maximal chain is recorded; do not record its prefixes
        self.generic_visit(node)

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "getattr":
            return  # resolved above
        for i, a in enumerate(node.args):
            r = self.resolve(a)
            if r is not None and r[0] == "":  # the whole params object handed to a telekd function
                fn = self.function(node.func)
                assert fn is not None, f"{self.module.__name__}: cannot follow {ast.unparse(node.func)}(p, ...)"
                analyse(fn, {list(inspect.signature(fn).parameters)[i + isinstance(fn, classmethod)]: ("", P.Params)},
                        self.out, self.seen)

    def function(self, func):
        """The telekd function a call names (module-level import or `Class.method`), None otherwise."""
        names = ast.unparse(func).split(".")
        obj = self.module
        for n in names:
            obj = getattr(obj, n, None) or _imported(self.module, n)
            if obj is None:
                return None
        return obj if getattr(obj, "__module__", "").startswith("telekd") else None


def _imported(module, name):
    """`name` as imported inside any function of `module` (stages import lazily)."""
    src = module._src if isinstance(module, _SourceModule) else inspect.getsource(module)
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:  # a relative import inside the telekd package
            base = importlib.util.resolve_name("." * node.level + base, module.__name__.rpartition(".")[0])
        if base.startswith("telekd"):
            for a in node.names:
                if (a.asname or a.name) == name:
                    mod = importlib.import_module(base)
                    return getattr(mod, a.name, None) or importlib.import_module(f"{base}.{a.name}")
    return None


def analyse(fn, roots: dict, out: set, seen: set) -> None:
    fn = getattr(fn, "__func__", fn)
    if fn in seen:
        return
    seen.add(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    Reads(roots, inspect.getmodule(fn), out, seen).visit(tree)


def stage_reads(script: str) -> set[str]:
    """Params paths that stages/<script>.py reads (its main() and what it passes the params object to)."""
    src = (ROOT / "stages" / f"{script}.py").read_text()
    tree = ast.parse(src)
    roots = set()  # p = load_params(), or name, p = stage_args(...) (telekd.evaluation)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            t, f = node.targets[0], ast.unparse(node.value.func)
            if f == "load_params" and isinstance(t, ast.Name):
                roots.add(t.id)
            elif f == "stage_args" and isinstance(t, ast.Tuple):
                roots.add(t.elts[1].id)
    assert roots, f"stages/{script}.py: no `p = load_params()` found"
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    out: set[str] = set()
    Reads({n: ("", P.Params) for n in roots}, _SourceModule(script, src), out, set()).visit(main)
    return out


class _SourceModule:
    """Enough of a module for Reads.function: the stage's globals and its function-level imports."""

    def __init__(self, name, src):
        self.__name__, self._src = f"stages/{name}.py", src

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        obj = _imported(self, name)
        if obj is None:
            raise AttributeError(name)
        return obj


def _stages():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in dvc.items():
        cmds = st["cmd"] if isinstance(st["cmd"], list) else [st["cmd"]]
        scripts = sorted({m for c in cmds for m in re.findall(r"stages/(\w+|\$\{item\.alg\})\.py", c)})
        declared = {x for x in st.get("params", []) if isinstance(x, str)}
        out[name] = (scripts, declared)
    return out


STAGES = _stages()


def script_reads(script: str) -> set[str]:
    """stage_reads, with `stages/${item.alg}.py` the union over the algorithms' scripts, each one's own section
    read as `${item.alg}` (the section the matrix resolves for its cells)."""
    if script != "${item.alg}":
        return stage_reads(script)
    out = set()
    for alg in P.Alg.__args__:
        out |= {"${item.alg}" + r[len(alg):] if r == alg or r.startswith(alg + ".") else r for r in stage_reads(alg)}
    return out


def _covers(declared: str, read: str) -> bool:
    return read == declared or read.startswith(declared + ".")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_exactly_the_params_it_reads(stage):
    scripts, declared = STAGES[stage]
    reads = set().union(*(script_reads(s) for s in scripts))
    reads -= {k for (st, k) in NOT_UNDER_DVC if st == stage}
    undeclared = sorted(r for r in reads if not any(_covers(d, r) for d in declared))
    unread = sorted(d for d in declared - EMPTY_SECTIONS if not any(_covers(d, r) or _covers(r, d) for r in reads))
    assert not undeclared, f"{stage} reads params it does not declare in dvc.yaml: {undeclared}"
    assert not unread, f"{stage} declares params it never reads: {unread}"


def test_empty_sections_are_empty():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert all(raw[k] == {} for k in EMPTY_SECTIONS)


@pytest.mark.parametrize("alg", ["vanilla", "dskd", "uld"])
def test_the_analysis_sees_what_the_kd_stage_reads(alg):
    """Pins the analysis itself: each algorithm's script reads the shared kd.* and its own section only, including
    what kd_inputs, KDConfig.from_params and the shared flow (telekd.kd.run) read."""
    r = stage_reads(alg)
    assert {"kd.kd_rate", "kd.use_cache", "teacher_cache.top_k", "teacher_cache.hidden", "prompt.system",
            "profiles.${profile}.dtype", "profiles.${profile}.train.lr", "models.trust_remote_code", alg} <= r
    others = {"vanilla", "dskd", "uld"} - {alg}
    assert not any(x.split(".")[0] in others for x in r), r
    assert not any(x.startswith("kd.") and x not in ("kd.kd_rate", "kd.use_cache") for x in r), r


def test_dvc_resolves_each_cell_to_its_own_algorithm_section(tmp_path, monkeypatch):
    """As `dvc exp run -S kd.alg=uld` leaves it: the ULD cell depends on uld's section and not on vanilla's or dskd's,
    the DSKD cell on dskd's (DVC 3.67 resolves `${item.alg}` in params, cmd and deps): its own script, its own
    module and its own teacher-cache entry; no cell declares a shared divergence."""
    import shutil

    from dvc.repo import Repo

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (ROOT / "params.yaml").read_text()
    assert "  alg: vanilla " in text
    (tmp_path / "params.yaml").write_text(text.replace("  alg: vanilla ", "  alg: uld ", 1))
    monkeypatch.chdir(tmp_path)  # DVC resolves stage addresses against the working directory
    Repo.init(".", no_scm=True)
    with Repo(".") as repo:
        def params(name):
            (stage,) = repo.stage.collect(name)
            return {k for dep in stage.deps if hasattr(dep, "params") and dep.params for k in dep.params}

        uld, dskd = params("kd@llama-base-base-uld-0"), params("kd@llama-base-base-dskd-0")
        cmd = repo.stage.collect("kd@llama-base-base-uld-0")[0].cmd
        deps = {d.def_path for d in repo.stage.collect("kd@llama-base-base-dskd-0")[0].deps
                if not getattr(d, "params", None)}
    assert "uld" in uld and not {"vanilla", "dskd"} & uld
    assert not any(k.startswith("kd.") and k not in ("kd.kd_rate", "kd.use_cache") for k in uld | dskd)
    assert "dskd" in dskd and not {"vanilla", "uld"} & dskd
    assert "stages/uld.py --cell llama-base-base-uld-s0" in cmd
    assert {"stages/dskd.py", "src/telekd/kd/dskd.py", "cache/teacher/llama-base/dskd"} <= deps
    assert not any("vanilla" in d or "uld" in d for d in deps), deps

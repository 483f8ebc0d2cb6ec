"""Reading the study's outputs into plain values for the report (numbers and names only).

Reads metrics/ (headline means, runs, models, data counts), scores/<run>/<family>.summary.json (means and
bootstrap CIs), logs/timing/ (throughput) and the stats table (report/stats_table.json). Never prediction
text or contexts (TeleQuAD's licence allows tables and figures only). A missing file reads as empty: the
report of a fresh checkout still builds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..layout import Cell
from ..metric_names import FAMILIES, METRICS

HYP_ORDER = ("H_T", "H_S", "H_B", "H_Alg")


def read_json(path: Path):
    """The JSON document at `path`, or None when the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


def is_num(v) -> bool:
    """True for an int or float that is not a bool and not NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def parse(name: str):
    """(teacher, teacher_sft, student_sft, alg) of a cell or run name (…-s<seed>), or None for a reference row."""
    if name.startswith("ref-"):
        return None
    try:
        c = Cell.parse(name)
    except ValueError:
        return None
    return c.teacher, c.teacher_sft, c.student_sft, c.alg


def setting(name: str) -> str:
    """The SFT setting of a cell or run name as `T_<teacher_sft>,S_<student_sft>`; "" for a reference row."""
    t = parse(name)
    return f"T_{t[1]},S_{t[2]}" if t else ""


def summaries(metrics_dir: Path, scores_dir: Path | None, names: list[str], runs: dict[str, list[str]] | None = None,
              resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, dict]]:
    """name -> metric -> {mean, ci_low, ci_high, n, n_nan}.

    A name with one run (`runs`, default: itself) reads that run's summary files (headline means when absent);
    a cell with several seeds pools them: per-question means over its runs, with a fresh bootstrap CI.
    """
    runs = runs or {}
    out = {}
    for name in names:
        rs = runs.get(name, [name])
        if len(rs) > 1 and scores_dir is not None:
            from ..metrics import mean_ci
            from ..stats import read_cell_scores

            seeds = [Cell.parse(r).seed for r in rs]
            pooled = read_cell_scores(scores_dir, name, seeds) or {}
            out[name] = {m: mean_ci(list(pooled.get(m, {}).values()), resamples=resamples, seed=seed) for m in METRICS}
            continue
        per = {}
        for fam, metrics in FAMILIES.items():
            s = read_json(scores_dir / rs[0] / f"{fam}.summary.json") if scores_dir else None
            head = read_json(metrics_dir / "eval" / rs[0] / f"{fam}.json") or {}
            for m in metrics:
                if s and isinstance(s.get(m), dict):
                    per[m] = s[m]
                else:
                    v = head.get(m)
                    per[m] = {"mean": v if is_num(v) else None, "ci_low": None, "ci_high": None, "n": None, "n_nan": None}
        out[name] = per
    return out


def order_rows(rows: list[dict]) -> list[dict]:
    """Stats rows grouped by hypothesis (H_T, H_S, H_B, H_Alg), then teacher, then setting (stable)."""
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    rank = {h: i for i, h in enumerate(HYP_ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r["hypothesis"], len(rank)), teachers.index(r["teacher"]),
                                       settings.index(r["setting"])))


def ref_models(refs: list[str]) -> list[str]:
    """The models of the reference rows `ref-<model>-<sft>`, in order, once each (the stage's sft.models)."""
    return list(dict.fromkeys(r[len("ref-"):].rsplit("-", 1)[0] for r in refs if r.startswith("ref-")))


def vocab_match(metrics_dir: Path, teacher: str, run_names: list[str]) -> bool | None:
    """Whether `teacher` has the student's vocabulary, as recorded by the pipeline (telekd.align.same_vocab):
    the field `vocab_match` of metrics/teacher_cache/<teacher>-{base,sft}.json, else of the first of the teacher's
    runs in metrics/kd/<run>.json; None when none of them records it (a study not yet run)."""
    docs = [metrics_dir / "teacher_cache" / f"{teacher}-{ts}.json" for ts in ("base", "sft")]
    docs += [metrics_dir / "kd" / f"{r}.json" for r in run_names if parse(r) and parse(r)[0] == teacher]
    for d in docs:
        v = (read_json(d) or {}).get("vocab_match")
        if isinstance(v, bool):
            return v
    return None


def vocab_label(match: bool | None) -> str:
    """How the report names a teacher's recorded vocabulary match (`vocab_match`)."""
    return {True: "same vocabulary", False: "different vocabulary"}.get(match, "vocabulary not recorded")


def sft_rows(metrics_dir: Path, logs_dir: Path | None, models: list[str]) -> list[list]:
    """Rows [model, steps, train loss first/last, val loss before/best, best step, tokens/s] of the SFT runs of
    `models` that have one (metrics/sft/<model>.json; tokens/s from logs/timing/sft/, apart from the tracked metrics)."""
    rows = []
    for r in models:
        s = read_json(metrics_dir / "sft" / f"{r}.json")
        if s:
            s = {**s, **((read_json(logs_dir / "timing" / "sft" / f"{r}.json") if logs_dir else None) or {})}
            rows.append([r, s.get("steps"), s.get("train_loss_first"), s.get("train_loss_last"),
                         s.get("eval_loss_initial"), s.get("eval_loss_best"), s.get("best_step"), s.get("tokens_per_s")])
    return rows


def kd_rows(metrics_dir: Path, logs_dir: Path | None, run_names: list[str]) -> list[list]:
    """Rows [run, algorithm, same vocabulary, val CE before/after, aligned fraction, mapped mass, tokens/s] of the
    distillation runs (metrics/kd/<run>.json; tokens/s from logs/timing/kd/)."""
    rows = []
    for c in run_names:
        k = {**(read_json(metrics_dir / "kd" / f"{c}.json") or {}),
             **((read_json(logs_dir / "timing" / "kd" / f"{c}.json") if logs_dir else None) or {})}
        rows.append([c, k.get("algorithm"), k.get("vocab_match"), k.get("val_ce_before"), k.get("val_ce_after"),
                     k.get("aligned_fraction"), k.get("mapped_mass"), k.get("tokens_per_s")])
    return rows


def empty_answers(metrics_dir: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """run -> (empty answers, answers) from the generate stage's metrics/generate/<run>.json (an answer is empty
    when nothing is left after stripping); runs without the file are left out."""
    out = {}
    for name in names:
        d = read_json(metrics_dir / "generate" / f"{name}.json")
        if d and is_num(d.get("empty_answers")) and is_num(d.get("answers")):
            out[name] = (int(d["empty_answers"]), int(d["answers"]))
    return out


def judge_counts(scores_dir: Path | None, names: list[str]) -> tuple[int, int]:
    """(samples judged, judge failures) summed over the runs' scores/<run>/llm.summary.json."""
    heads = [read_json(scores_dir / c / "llm.summary.json") or {} for c in names] if scores_dir else []
    return sum(h.get("judged", 0) or 0 for h in heads), sum(h.get("judge_failures", 0) or 0 for h in heads)


@dataclass
class Study:
    """Everything the report states, read once: paths, the run's settings, data and model facts, the stats
    rows (ordered by `order_rows`) with their test settings, and the score summaries (`summaries`).

    `teachers`: the cells' teachers in grid order; `models`: the reference rows' models (sft.models);
    `vocab_match`: teacher -> whether it has the student's vocabulary (`vocab_match`; None: not recorded)."""

    metrics_dir: Path
    scores_dir: Path | None
    logs_dir: Path | None
    profile: str
    data_source: str
    settings: dict
    algs: list[str]
    cells: list[str]
    refs: list[str]
    teachers: list[str]
    models: list[str]
    vocab_match: dict[str, bool | None]
    seeds: list[int] | None
    runs: dict[str, list[str]]
    run_names: list[str]
    prep: dict
    base_models: dict
    stat_rows: list[dict]
    alpha: float
    correction: str
    alternative: str
    summ: dict
    summ_runs: dict | None
    sft_rows: list[list]
    kd_rows: list[list]
    judged: int
    judge_failures: int
    empty: dict[str, tuple[int, int]]

    def vocab_teacher(self, same: bool) -> str | None:
        """The first teacher (grid order) whose recorded vocabulary match is `same`; None when there is none."""
        return next((t for t in self.teachers if self.vocab_match.get(t) is same), None)


def collect(metrics_dir: str | Path, cells: list[str], refs: list[str], profile: str, data_source: str, *,
            scores_dir: str | Path | None = None, logs_dir: str | Path | None = None,
            stats_table: str | Path | None = None, settings: dict | None = None,
            seeds: list[int] | None = None) -> Study:
    """Read the study's outputs into a `Study` (arguments as `telekd.report.build`)."""
    m = Path(metrics_dir)
    sc = Path(scores_dir) if scores_dir else None
    lg = Path(logs_dir) if logs_dir else None
    st = settings or {}
    algs = st.get("algs") or list(dict.fromkeys(parse(c)[3] for c in cells if parse(c)))
    stats_doc = (read_json(Path(stats_table)) if stats_table else None) or {}
    runs = {c: [Cell.parse(c).run(s).name for s in seeds] if seeds else [c] for c in cells}
    run_names = [r for c in cells for r in runs[c]]
    summ = summaries(m, sc, cells + refs, runs, resamples=st.get("resamples", 2000), seed=st.get("seed", 0))
    summ_runs = summaries(m, sc, run_names) if seeds and len(seeds) > 1 else None
    judged, failures = judge_counts(sc, run_names + refs)
    teachers = list(dict.fromkeys(parse(c)[0] for c in cells if parse(c)))
    models = ref_models(refs)
    return Study(metrics_dir=m, scores_dir=sc, logs_dir=lg, profile=profile, data_source=data_source, settings=st,
                 algs=algs, cells=cells, refs=refs, teachers=teachers, models=models,
                 vocab_match={t: vocab_match(m, t, run_names) for t in teachers}, seeds=seeds, runs=runs,
                 run_names=run_names,
                 prep=read_json(m / "prepare.json") or {}, base_models=read_json(m / "base_models.json") or {},
                 stat_rows=order_rows(stats_doc.get("rows", [])), alpha=stats_doc.get("alpha", st.get("alpha", 0.05)),
                 correction=stats_doc.get("correction", st.get("correction", "holm")),
                 alternative=stats_doc.get("alternative", st.get("alternative", "greater")), summ=summ,
                 summ_runs=summ_runs, sft_rows=sft_rows(m, lg, models), kd_rows=kd_rows(m, lg, run_names), judged=judged,
                 judge_failures=failures, empty=empty_answers(m, run_names + refs))

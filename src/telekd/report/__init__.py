"""The study's report as Markdown (renders on GitHub and offline) with PNG figures.

Reads only numbers: metrics/ (headline means, runs, models, data counts), scores/*/*.summary.json
(means and CIs), logs/ (loss curves) and the stats table. Never prediction text or contexts
(TeleQuAD's licence allows tables and figures only). Figures are drawn with matplotlib's Agg
backend at 100 dpi.

Modules: `collect` reads the outputs into a `Study` of plain values, `figures` draws the PNGs, `tables`
formats the Markdown tables, `sections` writes one report section per function, `settings` states the
run's params.
"""

from __future__ import annotations

from pathlib import Path

from ..metric_names import METRICS
from . import sections
from .collect import collect
from .figures import draw


def build(metrics_dir: str | Path, cells: list[str], refs: list[str], profile: str, data_source: str, *,
          scores_dir: str | Path | None = None, logs_dir: str | Path | None = None,
          stats_table: str | Path | None = None, figures_dir: str | Path | None = None, figures_link: str = "figures",
          settings: dict | None = None, seeds: list[int] | None = None, scores_json: str | Path | None = None) -> str:
    """The report's Markdown; figures are written into `figures_dir` (linked as `figures_link/<name>.png`).

    `cells` are study cells (teacher-teacher_sft-student_sft-alg); with `seeds` each has the runs
    <cell>-s<seed>, pooled in the tables (several seeds add a seed-variance table). Without `seeds`
    the names are read as they are. `settings`: what the report states about the run (judge, split,
    hyper-parameters), from params.yaml (`telekd.report.settings.from_params`). `scores_json`: where to
    write the means per cell and reference row as a JSON array (`dvc plots` draws one bar chart per metric
    from it). Any input may be missing: the report then says so and has fewer figures.
    """
    s = collect(metrics_dir, cells, refs, profile, data_source, scores_dir=scores_dir, logs_dir=logs_dir,
                stats_table=stats_table, settings=settings, seeds=seeds)
    if scores_json is not None:
        from ..io import write_json

        write_json(scores_json, [{"name": n, **{x: s.summ[n][x]["mean"] for x in METRICS}} for n in cells + refs])
    figs = draw(s, Path(figures_dir) if figures_dir else None, figures_link)
    mds = [sections.header(s), sections.conclusions(s), sections.data(s), sections.models(s),
           sections.sft(s, figs), sections.students(s), sections.references(s, figs),
           sections.distillation(s, figs), sections.statistics(s, figs), sections.gaps(s)]
    return "\n".join(md for md in mds if md)

"""Stage report: report/README.md and report/figures/*.png from the study's metrics, scores and logs."""

from pathlib import Path

from telekd import layout
from telekd.forkserver import run_stage
from telekd.io import atomic_path, write_text
from telekd.layout import Cell
from telekd.params import load_params


def main() -> None:
    """Write report/README.md, report/figures/ and report/scores.json from the study's metrics and scores."""
    p = load_params()
    from telekd.report import build
    from telekd.report.settings import from_params

    settings = from_params(p)
    cells = [Cell(t, ts, ss, a).name for t in p.grid.teachers for ts in p.grid.teacher_sft
             for ss in p.grid.student_sft for a in settings["algs"]]
    refs = [f"ref-{m}-{s}" for m in p.sft.models for s in ("base", "sft")]
    with atomic_path("report/figures") as figures:  # a fresh folder: no stale figure survives
        figures.mkdir()
        md = build(layout.METRICS, cells, refs, p.profile, p.data.source, scores_dir=layout.SCORES,
                   logs_dir=layout.LOGS, stats_table="report/stats_table.json", figures_dir=figures,
                   figures_link="figures", settings=settings, seeds=list(p.grid.seeds), scores_json="report/scores.json")
        n_figs = len(list(Path(figures).glob("*.png")))
    write_text("report/README.md", md)
    print(f"report: report/README.md ({len(cells)} cells, {len(refs)} reference rows, {n_figs} figures)")


if __name__ == "__main__":
    run_stage(main)

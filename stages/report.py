"""Stage report: report/README.md and report/figures/*.png from the study's metrics, scores and logs."""

from pathlib import Path

from telekd import layout
from telekd.io import atomic_path, write_text
from telekd.layout import Cell
from telekd.params import load_params


def main() -> None:
    p = load_params()
    from telekd.report import build

    algs = list(dict.fromkeys([p.kd.alg, p.kd.versus]))
    cells = [Cell(t, ts, ss, a).name for t in p.grid.teachers for ts in p.grid.teacher_sft
             for ss in p.grid.student_sft for a in algs]
    refs = [f"ref-{m}-{s}" for m in p.sft.models for s in ("base", "sft")]
    prof = p.active
    settings = {
        "algs": algs,
        "judge_backend": p.eval_llm.backend, "judge_model": prof.eval.judge_model,
        "judge_max_samples": prof.eval.max_samples, "judge_max_chars": prof.eval.max_chars,
        "judge_max_items": prof.eval.max_items,
        "bertscore_model": prof.eval.bertscore_model, "embed_model": p.eval_embed.model,
        "split_group_by": p.split.group_by, "split_fractions": dict(p.split.fractions), "split_seed": p.split.seed,
        "train": prof.train.model_dump(), "generate": prof.generate.model_dump(),
        "kd": {"kd_rate": p.kd.kd_rate, "projector_lr": p.dskd.projector_lr,  # each algorithm's divergence, one if equal
               **{k: v if v == w else f"{v} (vanilla), {w} (DSKD)" for k, v, w in (
                   ("temperature", p.vanilla.divergence.temperature, p.dskd.divergence.temperature),
                   ("divergence", p.vanilla.divergence.kind, p.dskd.divergence.kind))}},
        "alpha": p.stats.alpha, "alternative": p.stats.alternative, "correction": p.stats.correction,
        "resamples": p.stats.bootstrap_resamples, "seed": p.seed,
    }
    with atomic_path("report/figures") as figures:  # a fresh folder: no stale figure survives
        figures.mkdir()
        md = build(layout.METRICS, cells, refs, p.profile, p.data.source, scores_dir=layout.SCORES,
                   logs_dir=layout.LOGS, stats_table="report/stats_table.json", figures_dir=figures,
                   figures_link="figures", settings=settings, seeds=list(p.grid.seeds), scores_json="report/scores.json")
        n_figs = len(list(Path(figures).glob("*.png")))
    write_text("report/README.md", md)
    print(f"report: report/README.md ({len(cells)} cells, {len(refs)} reference rows, {n_figs} figures)")


if __name__ == "__main__":
    main()

"""Stage stats: the hypotheses as paired cell comparisons, tested per teacher, setting and metric.

A cell's per-question score is its mean over its runs (grid.seeds). Writes the paper-style summary
(H0 rejected in k of m metrics) to metrics/stats.json and the full table (every p-value, statistic,
effect, CI, n, decision) to report/stats_table.json.
"""

from telekd import layout
from telekd.forkserver import run_stage
from telekd.io import write_json
from telekd.params import load_params


def main() -> None:
    """Test every hypothesis on the cells' scores; write metrics/stats.json and report/stats_table.json."""
    p = load_params()
    from telekd.stats import analyse, hypotheses, read_cell_scores, summary, table

    algs = list(dict.fromkeys([p.kd.alg, p.kd.versus]))
    grid = hypotheses(p.grid.teachers, p.grid.teacher_sft, p.grid.student_sft, algs)
    names = sorted({h[k] for h in grid for k in ("treatment", "control")})
    scores = {n: s for n in names if (s := read_cell_scores(layout.SCORES, n, p.grid.seeds)) is not None}
    missing = [n for n in names if n not in scores]
    if missing:
        print(f"stats: no scores for {', '.join(missing)}; their comparisons are skipped")
    comparisons = hypotheses(p.grid.teachers, p.grid.teacher_sft, p.grid.student_sft, algs, available=scores)
    s = p.stats
    rows = analyse(comparisons, scores, alpha=s.alpha, alternative=s.alternative, correction=s.correction,
                   resamples=s.bootstrap_resamples, seed=p.seed)
    opts = dict(alpha=s.alpha, alternative=s.alternative, correction=s.correction)
    write_json("report/stats_table.json", {**table(rows, **opts, resamples=s.bootstrap_resamples, seed=p.seed),
                                           "seeds": list(p.grid.seeds)})
    write_json(f"{layout.METRICS}/stats.json", summary(rows, **opts))
    print(f"stats: {len(comparisons)} hypothesis x teacher x setting, {len(rows)} metric comparisons")


if __name__ == "__main__":
    run_stage(main)

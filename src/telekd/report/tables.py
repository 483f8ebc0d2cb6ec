"""The report's Markdown tables: cell formatting, score tables per metric family, and the rows of the
best-cell, seed-variance and hypothesis tables (from the values `collect` read)."""

from __future__ import annotations

import math

from ..metric_names import FAMILIES, METRIC_LABEL, METRICS
from .collect import setting


def fmt(v) -> str:
    """A table cell: "–" for None or NaN, yes/no for a bool, 3 decimals for a float (thousands grouped, no
    decimals, from 1000 up), str() otherwise."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; each row's values formatted by `fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def figure(link: str, alt: str) -> str:
    """A Markdown image."""
    return f"![{alt}]({link})"


def mean_ci(s: dict) -> str:
    """"mean (ci_low–ci_high)" of a summary, the mean alone without a CI, "–" without a mean."""
    if not s or s.get("mean") is None:
        return "–"
    if s.get("ci_low") is None or s.get("ci_high") is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ({s['ci_low']:.3f}–{s['ci_high']:.3f})"


def family_table(summ: dict, names: list[str], fam: str) -> str:
    """One row per name: mean (95% CI) of each metric of family `fam`, and n (the most questions scored)."""
    metrics = FAMILIES[fam]
    rows = []
    for name in names:
        ns = [summ[name][m].get("n") for m in metrics if summ[name][m].get("n") is not None]
        rows.append([f"`{name}`"] + [mean_ci(summ[name][m]) for m in metrics] + [max(ns) if ns else None])
    return table(["cell"] + [METRIC_LABEL[m] for m in metrics] + ["n"], rows)


def seed_spread(summ_runs: dict[str, dict[str, dict]], runs: dict[str, list[str]], cells: list[str]) -> list[list]:
    """Rows [cell, runs, SD across seeds of the runs' means for each metric] (sample SD; None below two runs)."""
    import statistics

    rows = []
    for c in cells:
        sds = []
        for m in METRICS:
            means = [summ_runs[r][m]["mean"] for r in runs[c] if summ_runs[r][m].get("mean") is not None]
            sds.append(statistics.stdev(means) if len(means) >= 2 else None)
        rows.append([f"`{c}`", len(runs[c])] + sds)
    return rows


def best_cells(summ: dict, cells: list[str]) -> list[list]:
    """Rows [metric, best cell, its setting, its mean]: the distilled cell with the highest mean per metric. When
    several cells share the highest mean the row reads `tie: n cells` with setting "tie" (a tie favours no cell;
    taking the max of (mean, name) would hand it to the name that sorts last)."""
    rows = []
    for m in METRICS:
        scored = {c: summ[c][m]["mean"] for c in cells if summ[c][m].get("mean") is not None}
        if scored:
            v = max(scored.values())
            top = [c for c, x in scored.items() if x == v]
            rows.append([METRIC_LABEL[m], f"`{top[0]}`", setting(top[0]), v] if len(top) == 1 else
                        [METRIC_LABEL[m], f"tie: {len(top)} cells", "tie", v])
    return rows


def hypothesis_rows(stat_rows: list[dict]) -> list[list]:
    """One row per hypothesis × teacher × setting: treatment vs control, n (a range where metrics differ),
    **k/m** (H0 rejected in k of m tested metrics), median rank-biserial effect, the metrics rejected on."""
    rows = []
    for key in dict.fromkeys((r["hypothesis"], r["teacher"], r["setting"]) for r in stat_rows):
        rs = [r for r in stat_rows if (r["hypothesis"], r["teacher"], r["setting"]) == key]
        tested = [r for r in rs if r.get("p_adj") is not None]
        rej = [METRIC_LABEL.get(r["metric"], r["metric"]) for r in tested if r.get("reject")]
        effs = sorted(r["rank_biserial"] for r in tested if r.get("rank_biserial") is not None)
        med = effs[len(effs) // 2] if len(effs) % 2 else (sum(effs[len(effs) // 2 - 1:len(effs) // 2 + 1]) / 2 if effs else None)
        ns = [r["n"] for r in tested]
        rows.append([key[0], key[1], key[2], f"`{rs[0]['treatment']}` vs `{rs[0]['control']}`",
                     f"{min(ns)}–{max(ns)}" if ns and min(ns) != max(ns) else (ns[0] if ns else 0),
                     f"**{len(rej)}/{len(tested)}**", med, ", ".join(rej) or "–"])
    return rows


def empty_line(empty: dict[str, tuple[int, int]], names: list[str]) -> str:
    """One sentence on the runs among `names` that left answers empty (metrics/generate/<run>.json): "" when no
    count is recorded, "none" when every answer has text, else each such run with k/n, largest first."""
    known = [n for n in names if n in empty]
    if not known:
        return ""
    bad = sorted((n for n in known if empty[n][0]), key=lambda n: (-empty[n][0], names.index(n)))
    head = "Empty answers (nothing left after stripping; metrics/generate/<run>.json): "
    if not bad:
        return head + f"none in {len(known)} runs."
    return head + ", ".join(f"`{n}` {empty[n][0]}/{empty[n][1]}" for n in bad) + (
        f"; the other {len(known) - len(bad)} runs none." if len(bad) < len(known) else ".")

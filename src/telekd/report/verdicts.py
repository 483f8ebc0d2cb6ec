"""The paper's claims judged on this run's tests: per claim × teacher × setting a verdict (supports, contradicts,
mixed, cannot decide), the effect sizes behind it, and for an undecided row the test questions its effect would
need (telekd.power). Reads the rows of report/stats_table.json (telekd.stats) and nothing else.

The verdict rule (`verdict`), per hypothesis × teacher × setting (the family of the row's m tested metrics):
- a metric *supports* the claim when the primary test rejects H0 (one-sided Wilcoxon, the study's correction
  across the family, `reject`) and the treatment is ranked higher (matched-pairs rank-biserial > 0);
- a metric *contradicts* it when the two-sided Wilcoxon p, adjusted with the same correction across the same
  family (`p_adj_two_sided`), is ≤ α and the control is ranked higher (rank-biserial < 0). The direction is read
  from the ranks, what the Wilcoxon test tests, not from the mean difference (the two rarely disagree);
- the row *supports* with ≥ 1 supporting metric and none contradicting, *contradicts* with the reverse, is
  *mixed* with both and *cannot decide* with neither.
"""

from __future__ import annotations

import math
import statistics

from ..metric_names import METRIC_LABEL
from ..power import POWER, WILCOXON_ARE, detectable_dz, questions_needed

# The headline metrics of the conclusions table: one lexical and one semantic view of an answer (HEADLINE_WHY).
HEADLINE = ("rougeL", "bertscore_f1")
HEADLINE_WHY = ("ROUGE-L F1 and BERTScore F1, one per metric family that scores every question without a judge: "
                "ROUGE-L (longest common subsequence) is the word-overlap metric not tied to one n-gram length, "
                "BERTScore F1 balances the precision and recall of meaning-level similarity")


def _label(metric: str) -> str:
    return METRIC_LABEL.get(metric, metric)


def family(stat_rows: list[dict], h: str, teacher: str, setting_: str) -> list[dict]:
    """The stats rows of one hypothesis × teacher × setting (one per metric)."""
    return [r for r in stat_rows if (r["hypothesis"], r["teacher"], r["setting"]) == (h, teacher, setting_)]


def tested(rows: list[dict]) -> list[dict]:
    """The rows of a family that were tested (an adjusted p exists): the m of k/m."""
    return [r for r in rows if r.get("p_adj") is not None]


def sides(rows: list[dict], alpha: float) -> tuple[list[str], list[str]]:
    """(metrics supporting, metrics contradicting) the hypothesis in one family, by the rule of the module
    docstring; metric keys in the rows' order."""
    pro = [r["metric"] for r in tested(rows) if r.get("reject") and (r.get("rank_biserial") or 0) > 0]
    con = [r["metric"] for r in tested(rows) if r.get("p_adj_two_sided") is not None
           and r["p_adj_two_sided"] <= alpha and (r.get("rank_biserial") or 0) < 0]
    return pro, con


def verdict(rows: list[dict], alpha: float) -> str:
    """"supports", "contradicts", "mixed" or "cannot decide" for one family of stats rows (module docstring)."""
    pro, con = sides(rows, alpha)
    return "mixed" if pro and con else "supports" if pro else "contradicts" if con else "cannot decide"


def effect_summary(rows: list[dict]) -> tuple[float, float, float] | None:
    """(median, min, max) of the matched-pairs rank-biserial over the family's tested metrics (None where every
    difference is zero); None when no metric has one."""
    r = [x["rank_biserial"] for x in tested(rows) if x.get("rank_biserial") is not None]
    return (statistics.median(r), min(r), max(r)) if r else None


def powered(rows: list[dict]) -> list[dict]:
    """The tested rows the power figures use: those scored on at least half as many questions as the family's
    best-covered metric. A metric the judge scored on a capped handful of questions is left out: a d_z from a few
    pairs is noise."""
    t = tested(rows)
    most = max((r["n"] for r in t), default=0)
    return [r for r in t if 2 * r["n"] >= most]


def largest_dz(rows: list[dict]) -> dict | None:
    """The `powered` row with the largest |Cohen's d_z| (first in the rows' order on a tie); None when none has a
    d_z (every difference zero, or none varies)."""
    rs = [r for r in powered(rows) if r.get("cohen_dz") is not None]
    return max(rs, key=lambda r: abs(r["cohen_dz"])) if rs else None


def power(rows: list[dict], alpha: float, alternative: str = "greater") -> dict | None:
    """For one family: its largest-|d_z| metric and the test questions the Wilcoxon test needs to detect that d_z
    with 80% power at α/m (Holm's first step; telekd.power.questions_needed), one-sided (two-sided for a d_z
    against the hypothesis, whose test here is two-sided, or with `alternative` two-sided); and the smallest |d_z|
    this family's n (the fewest pairs of its `powered` metrics) detects likewise (one-sided). None without a tested
    metric. m counts every tested metric (the family Holm corrects over).

    Returns {metric, dz, needed (questions, rounded up; None without a d_z, math.inf for d_z 0), n, m, alpha_m,
    detectable}.
    """
    t = tested(rows)
    if not t:
        return None
    m, n = len(t), min(r["n"] for r in powered(rows))
    a = alpha / m
    best = largest_dz(rows)
    needed = None
    if best is not None:
        dz = best["cohen_dz"]
        needed = questions_needed(dz, a, POWER, two_sided=dz < 0 or alternative == "two-sided")
        needed = needed if math.isinf(needed) else math.ceil(needed)
    return {"metric": best["metric"] if best else None, "dz": best["cohen_dz"] if best else None, "needed": needed,
            "n": n, "m": m, "alpha_m": a,
            "detectable": detectable_dz(n, a, POWER, alternative == "two-sided") if n * WILCOXON_ARE >= 2 else None}


def delta_ci(rows: list[dict], metric: str) -> str:
    """"+0.012 [-0.005, +0.030]": the family's mean difference on `metric` with its bootstrap 95% CI; "–" untested."""
    r = next((x for x in tested(rows) if x["metric"] == metric), None)
    if r is None or r.get("mean_difference") is None:
        return "–"
    ci = f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if r.get("ci_low") is not None else ""
    return f"{r['mean_difference']:+.3f}{ci}"


def power_cell(p: dict | None, verdict_: str) -> str:
    """The table's power cell: "d_z +0.12 (BLEU-1): 560" for an undecided row, "n/a" where no metric has a d_z,
    "–" for a decided row."""
    if verdict_ != "cannot decide":
        return "–"
    if p is None or p["dz"] is None:
        return "n/a (no difference varies)"
    need = "never (mean difference 0)" if math.isinf(p["needed"]) else f"{p['needed']:,}"
    return f"d_z {p['dz']:+.2f} ({_label(p['metric'])}): {need}"


def _effect_cell(rows: list[dict]) -> str:
    """"+0.28 [+0.22, +0.52]": median [min, max] rank-biserial, "(on j of m)" when j < m metrics have one."""
    eff = effect_summary(rows)
    if eff is None:
        return "–"
    j = sum(r.get("rank_biserial") is not None for r in tested(rows))
    m = len(tested(rows))
    return f"{eff[0]:+.2f} [{eff[1]:+.2f}, {eff[2]:+.2f}]" + (f" (on {j} of {m})" if j < m else "")


def claim_rows(keys: list[tuple[str, str, str]], claim: str, stat_rows: list[dict], alpha: float,
               alternative: str = "greater") -> list[list]:
    """The conclusions table's rows of one claim, one per tested (hypothesis, teacher, setting) of `keys`: [claim,
    teacher, setting, k/m, rank-biserial median [min, max], Δ per HEADLINE metric [95% CI], verdict, power cell]."""
    out = []
    for h, teacher, setting_ in keys:
        rows = family(stat_rows, h, teacher, setting_)
        if not rows:
            continue
        t = tested(rows)
        eff = effect_summary(rows)
        v = verdict(rows, alpha)
        out.append([claim, teacher, setting_, f"{sum(bool(r.get('reject')) for r in t)}/{len(t)}",
                    _effect_cell(rows),
                    *[delta_ci(rows, m) for m in HEADLINE], f"**{v}**",
                    power_cell(power(rows, alpha, alternative), v)])
    return out


def _listed(metrics: list[str], m: int, most: int = 3) -> str:
    """"all 11 metrics" when every one of the m tested, else the first `most` labels and how many more."""
    if len(metrics) == m and m > 1:
        return f"all {m} metrics"
    names = [_label(x) for x in metrics]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _undecided(fams: list[tuple[str, str, list[dict]]], alpha: float, alternative: str, correction: str) -> str:
    """Why the undecided families of a claim decide nothing: their largest effect against what n detects."""
    ps = [(st, p) for st, _, rows in fams if (p := power(rows, alpha, alternative))]
    with_dz = [(st, p) for st, p in ps if p["dz"] is not None]
    if not with_dz:
        same = all(r.get("n_nonzero") == 0 for _, _, rows in fams for r in tested(rows))
        return "the two cells score identically on every question" if same else "no difference varies across questions"
    st, p = max(with_dz, key=lambda x: abs(x[1]["dz"]))
    rows = next(rows for s_, _, rows in fams if s_ == st)
    most = max((r.get("n_nonzero") or 0) for r in powered(rows))
    differ = f"; {f'in {st} ' if len(fams) > 1 else ''}no metric differs on more than {most} of {p['n']} questions"
    if 0.5 ** most > p["alpha_m"]:  # the exact one-sided Wilcoxon p on k non-zero differences is at least 2^-k
        differ += f", and on {most} differences a Wilcoxon p is at least 2^-{most} = {0.5 ** most:.3f} > α/m"
    elif most >= p["n"] / 2:
        differ = ""
    where = f"{_label(p['metric'])}{f', {st}' if len(fams) > 1 else ''}"
    if p["detectable"] is not None and abs(p["dz"]) >= p["detectable"]:
        return (f"the largest effect, d_z {p['dz']:+.2f} ({where}), is within reach of n = {p['n']} "
                f"(|d_z| ≥ {p['detectable']:.2f}) yet no metric is significant after {correction}{differ}")
    need = "no n" if math.isinf(p["needed"]) else f"≈ {p['needed']:,} questions"
    reach = f"below the |d_z| {p['detectable']:.2f} that" if p["detectable"] is not None else "beyond what"
    return (f"the largest effect, d_z {p['dz']:+.2f} ({where}), is {reach} n = {p['n']} detects with "
            f"{POWER:.0%} power at α/m = {p['alpha_m']:.4f}; detecting it needs {need}{differ}")


def why(keys: list[tuple[str, str, str]], stat_rows: list[dict], alpha: float, alternative: str = "greater",
        correction: str = "holm") -> str:
    """One line saying why a claim's rows get their verdicts: the metrics each decided row rests on, and for the
    undecided rows their largest effect against the effect n detects (`_undecided`); "" when nothing was tested."""
    fams = [(f"{t} {st}", v, rows) for h, t, st in keys if (rows := family(stat_rows, h, t, st))
            for v in [verdict(rows, alpha)]]
    decided: dict[str, list[str]] = {}  # the same reason for several settings is said once
    for st, v, rows in fams:
        pro, con = sides(rows, alpha)
        m = len(tested(rows))
        if v != "cannot decide":
            reason = f"{v}: " + "; ".join(x for x in (f"treatment better on {_listed(pro, m)}" if pro else "",
                                                      f"control better on {_listed(con, m)}" if con else "") if x)
            decided.setdefault(reason, []).append(st)
    parts = [f"{', '.join(sts)} {reason}" for reason, sts in decided.items()]
    undecided = [(st, v, rows) for st, v, rows in fams if v == "cannot decide"]
    if undecided:
        parts.append(f"cannot decide ({', '.join(st for st, _, _ in undecided)}): "
                     + _undecided(undecided, alpha, alternative, correction))
    return "; ".join(parts)


def _means(summ: dict, name: str) -> str | None:
    vals = [(summ.get(name) or {}).get(m, {}).get("mean") for m in HEADLINE]
    return None if all(v is None for v in vals) else " / ".join("–" if v is None else f"{v:.3f}" for v in vals)


def size_gap(summ: dict, cells: list[str], refs: list[str], teachers: list[str], models: list[str],
             base_models: dict) -> str:
    """The paper's open question on the teacher–student size gap in one line: each model's own reference rows
    (ref-<model>-base/sft, teachers first) with its parameter count (metrics/base_models.json), and the best
    distilled cell (highest mean on the first HEADLINE metric), on the HEADLINE metrics; "" without reference
    scores."""
    parts = []
    for mdl in [t for t in teachers if t in models] + [m for m in models if m not in teachers]:
        vals = [f"{x.replace('sft', 'SFT')} {v}" for x in ("base", "sft") if f"ref-{mdl}-{x}" in refs
                and (v := _means(summ, f"ref-{mdl}-{x}")) is not None]
        p = (base_models.get("models", {}).get(mdl) or {}).get("parameters")
        size = f" ({p / 1e6:.1f}M)" if isinstance(p, int) and p >= 1e6 else f" ({p / 1e6:.2f}M)" if isinstance(p, int) else ""
        if vals:
            parts.append(f"{'teacher ' if mdl in teachers else ''}{mdl}{size} {', '.join(vals)}")
    if not parts:
        return ""
    scored = {c: summ[c][HEADLINE[0]]["mean"] for c in cells if (summ.get(c) or {}).get(HEADLINE[0], {}).get("mean") is not None}
    if scored:
        top = [c for c, v in scored.items() if v == max(scored.values())]
        best = f"`{top[0]}`" if len(top) == 1 else f"`{top[0]}` (one of {len(top)} tied)"
        parts.append(f"best distilled student (by {_label(HEADLINE[0])}) {best} {_means(summ, top[0])}")
    return (f"**Size gap** (the paper's open question; {' / '.join(_label(m) for m in HEADLINE)}, parameters in "
            "brackets): " + "; ".join(parts) + ".")

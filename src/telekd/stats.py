"""The study's hypotheses as pairs of cells, tested on paired per-question scores.

H_T   teacher SFT helps:  T_sft,S_base vs T_base,S_base   (per algorithm)
H_S   student SFT helps:  T_base,S_sft vs T_base,S_base   (per algorithm)
H_B   SFT of both helps:  T_sft,S_sft  vs T_base,S_base   (per algorithm)
H_Alg the compared algorithm beats kd.alg in each SFT setting (kd.versus vs kd.alg)

Each hypothesis is tested per teacher (same / different vocabulary) and per setting, on each of the
14 metrics, on the test questions both cells scored (the same questions in every cell; a NaN/None
score drops that question from that comparison only, and the n used is reported).

- Primary test: Wilcoxon signed-rank test (`scipy.stats.wilcoxon`) of the differences
  treatment − control, one-sided in the hypothesis's direction (`stats.alternative`; `greater`
  means treatment > control) and, for reference, two-sided. Zero differences follow Wilcoxon's
  original rule (`zero_method="wilcox"`): they are dropped before ranking, so a question that both
  cells answer equally well carries no evidence either way. scipy's `method="auto"` is used: the
  exact null distribution for n ≤ 50 without ties or zeros, an exact permutation over all sign
  flips for n ≤ 13 with ties or zeros, the normal approximation otherwise (no continuity
  correction). Differences that are all zero give p = 1 (nothing to reject), without calling scipy.
  The rank-based statistics (this test and the effect size) see the differences rounded to
  `DECIMALS` (6) places: every score is in 0–1, and floating-point noise (0.5 − 0.4 ≠ 0.2 − 0.1;
  BERTScore varies in the 7th digit with batch composition) would otherwise break ties between
  equal differences and turn exact ties between cells into tiny wins or losses.
- Secondary test: paired t-test (`scipy.stats.ttest_rel`), same alternatives; null when the
  differences have no variation (at `DECIMALS` places; the t statistic is undefined).
- Multiple testing: the 14 metrics of one hypothesis × teacher × setting form one family;
  the primary p-values are adjusted with `statsmodels.stats.multitest.multipletests`
  (`stats.correction`: holm | bonferroni | fdr_bh | none), and H0 is rejected where the adjusted
  p ≤ `stats.alpha` (statsmodels' own rule). Metrics without a p-value (n < 2, no scores) are
  left out of the family: m counts the metrics actually tested.
- Effect size: matched-pairs rank-biserial correlation in Kerby's simple-difference form,
  r = (R+ − R−) / (R+ + R−), R± the sums of the ranks of |d| (average ranks for ties) over the
  positive / negative differences, zeros dropped as in the test. r ∈ [−1, 1], positive when the
  treatment scores higher; null when every difference is zero.
- Standardised effect (for power, telekd.power): Cohen's d_z = mean difference / SD of the differences
  (ddof 1), null when the differences have no variation. `p_adj_two_sided` adjusts the two-sided
  p-values across the same family, for the report's test of the opposite direction.
- Uncertainty: percentile bootstrap 95% CI of the mean difference (`scipy.stats.bootstrap` on the
  paired differences, `stats.bootstrap_resamples` resamples, seeded with the study's seed; the
  same method as the per-cell CIs of the eval stages).

A comparison with n < 2 pairs reports every test as null with a `reason`; nothing here raises on
degenerate data.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from .layout import Cell
from .metric_names import FAMILIES, METRICS
HYPOTHESES = {
    "H_T": "teacher SFT helps (T_sft,S_base vs T_base,S_base)",
    "H_S": "student SFT helps (T_base,S_sft vs T_base,S_base)",
    "H_B": "SFT of both helps (T_sft,S_sft vs T_base,S_base)",
    "H_Alg": "kd.versus beats kd.alg (same SFT setting)",
}
CORRECTIONS = ("holm", "bonferroni", "fdr_bh", "none")
DECIMALS = 6  # resolution of a score difference for ranking (scores are in 0-1)


# -----------------------------------------------------------------------------
# pairing


def hypotheses(teachers, teacher_sft, student_sft, algs, available=None) -> list[dict]:
    """Every (hypothesis, teacher, setting) whose two cells are both in the grid: treatment vs control.

    `algs` is [kd.alg, kd.versus] with duplicates merged; H_Alg needs both. `available` (cell names),
    when given, further drops comparisons whose cells have no scores.
    """
    cells = {Cell(t, ts, ss, a).name for t in teachers for ts in teacher_sft for ss in student_sft for a in algs}
    if available is not None:
        cells &= set(available)
    out = []
    for t in teachers:
        for a in algs:
            for h, (ts, ss) in {"H_T": ("sft", "base"), "H_S": ("base", "sft"), "H_B": ("sft", "sft")}.items():
                out.append({"hypothesis": h, "teacher": t, "setting": a,
                            "treatment": Cell(t, ts, ss, a).name, "control": Cell(t, "base", "base", a).name})
        if len(algs) == 2:
            base_alg, alt = algs
            for ts in ("base", "sft"):
                for ss in ("base", "sft"):
                    out.append({"hypothesis": "H_Alg", "teacher": t, "setting": f"T_{ts},S_{ss}",
                                "treatment": Cell(t, ts, ss, alt).name, "control": Cell(t, ts, ss, base_alg).name})
    return [h for h in out if h["treatment"] in cells and h["control"] in cells]


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def paired(treatment: dict[str, float | None], control: dict[str, float | None]) -> tuple[list[float], list[float]]:
    """Scores of the questions both cells have, NaN/None dropped pairwise (order of `treatment`)."""
    ids = [i for i in treatment if i in control and _ok(treatment[i]) and _ok(control[i])]
    return [float(treatment[i]) for i in ids], [float(control[i]) for i in ids]


def mean_difference(treatment: list[float], control: list[float]) -> float | None:
    """Mean of the paired differences treatment - control (in the metric's units); None for no pairs."""
    return sum(t - c for t, c in zip(treatment, control)) / len(treatment) if treatment else None


def read_scores(scores_dir: str | Path, name: str) -> dict[str, dict[str, float | None]] | None:
    """metric -> question id -> score for one cell or reference row (the 14 metrics only);
    None when the cell has no score files at all."""
    import json

    out: dict[str, dict] = {}
    found = False
    for fam, metrics in FAMILIES.items():
        path = Path(scores_dir) / name / f"{fam}.jsonl"
        if not path.exists():
            continue
        found = True
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                for m in metrics:
                    if m in row:
                        v = row[m]
                        out.setdefault(m, {})[row["id"]] = float(v) if isinstance(v, (int, float)) else None
    return out if found else None


def read_cell_scores(scores_dir: str | Path, cell: str, seeds) -> dict[str, dict[str, float | None]] | None:
    """metric -> question id -> the cell's score averaged over its runs <cell>-s<seed> (grid.seeds).

    A question's mean uses the runs that scored it (a judge failure in one run drops only that run's score);
    None when no run of the cell has score files.
    """
    runs = [s for seed in seeds if (s := read_scores(scores_dir, f"{cell}-s{seed}")) is not None]
    if not runs:
        return None
    out: dict[str, dict] = {}
    for m in {m for r in runs for m in r}:
        ids = dict.fromkeys(i for r in runs for i in r.get(m, {}))
        for i in ids:
            vals = [float(r[m][i]) for r in runs if _ok(r.get(m, {}).get(i))]
            out.setdefault(m, {})[i] = sum(vals) / len(vals) if vals else None
    return out


# -----------------------------------------------------------------------------
# one comparison


def signed_rank_sums(diff) -> tuple[float, float, int]:
    """(R+, R−, number of non-zero differences): ranks of |d| over the non-zero differences, ties averaged."""
    import numpy as np
    from scipy.stats import rankdata

    d = np.asarray(diff, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 0.0, 0.0, 0
    r = rankdata(np.abs(d))  # average ranks for ties
    return float(r[d > 0].sum()), float(r[d < 0].sum()), int(d.size)


def rank_biserial(diff) -> float | None:
    """Matched-pairs rank-biserial correlation (Kerby 2014): (R+ − R−)/(R+ + R−), zeros dropped."""
    rp, rm, n = signed_rank_sums(diff)
    return None if n == 0 else (rp - rm) / (rp + rm)


def wilcoxon_test(diff, alternative: str = "greater") -> dict:
    """Wilcoxon signed-rank test of the differences (scipy.stats.wilcoxon, zero_method "wilcox": zeros dropped):
    statistic and p for `alternative` ("greater": treatment above control), and two-sided p; p None with a reason
    for fewer than 2 pairs, p 1 when every difference is zero."""
    import numpy as np
    from scipy.stats import wilcoxon

    d = np.asarray(diff, dtype=float)
    if d.size < 2:
        return {"statistic": None, "p": None, "p_two_sided": None, "reason": f"n={d.size} < 2 pairs"}
    if not np.any(d != 0):
        return {"statistic": 0.0, "p": 1.0, "p_two_sided": 1.0, "reason": "all differences are zero"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = wilcoxon(d, zero_method="wilcox", alternative=alternative)
        two = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return {"statistic": float(one.statistic), "p": float(one.pvalue), "p_two_sided": float(two.pvalue),
            "reason": None}


def ttest(treatment, control, alternative: str = "greater") -> dict:
    """Paired t-test (scipy.stats.ttest_rel) of treatment - control: statistic, p for `alternative`, two-sided p;
    None with a reason for fewer than 2 pairs or differences without variation (at DECIMALS decimals)."""
    import numpy as np
    from scipy.stats import ttest_rel

    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    d = t - c
    if d.size < 2:
        return {"statistic": None, "p": None, "p_two_sided": None, "reason": f"n={d.size} < 2 pairs"}
    if np.ptp(np.round(d, DECIMALS)) == 0:
        return {"statistic": None, "p": None, "p_two_sided": None, "reason": "differences have no variation"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = ttest_rel(t, c, alternative=alternative)
        two = ttest_rel(t, c, alternative="two-sided")
    return {"statistic": float(one.statistic), "p": float(one.pvalue), "p_two_sided": float(two.pvalue),
            "reason": None}


def bootstrap_ci(diff, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple:
    """Percentile bootstrap CI (scipy.stats.bootstrap, seeded) of the mean difference, in the metric's units;
    (None, None) for n < 2, a point for constant data."""
    import numpy as np
    from scipy.stats import bootstrap

    d = np.asarray(diff, dtype=float)
    if d.size < 2:
        return None, None
    if np.ptp(np.round(d, DECIMALS)) == 0:
        return float(d.mean()), float(d.mean())
    res = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def effect_dz(diff) -> tuple[float | None, float | None]:
    """(SD of the paired differences with ddof 1, Cohen's d_z = mean / SD) in the metric's units and unitless
    (Cohen 1988 ch. 2; Lakens 2013 eq. 6); (None, None) for n < 2; SD 0.0 and d_z None when the differences have no
    variation at DECIMALS places (d_z undefined, as the t statistic)."""
    import numpy as np

    d = np.asarray(diff, dtype=float)
    if d.size < 2:
        return None, None
    if np.ptp(np.round(d, DECIMALS)) == 0:
        return 0.0, None
    sd = float(np.std(d, ddof=1))
    return sd, float(d.mean()) / sd


def compare(treatment: list[float], control: list[float], alternative: str = "greater", resamples: int = 2000,
            seed: int = 0) -> dict:
    """Every statistic of one paired comparison (treatment − control); p_adj/reject are added by `adjust`."""
    import numpy as np

    d = np.asarray(treatment, dtype=float) - np.asarray(control, dtype=float)
    dr = np.round(d, DECIMALS)  # for the rank-based statistics (module docstring)
    n = int(d.size)
    w = wilcoxon_test(dr, alternative)
    t = ttest(treatment, control, alternative)
    lo, hi = bootstrap_ci(d, resamples, seed)
    rp, rm, nz = signed_rank_sums(dr)
    sd, dz = effect_dz(d)
    return {
        "n": n, "n_nonzero": nz,
        "mean_treatment": float(np.mean(treatment)) if n else None,
        "mean_control": float(np.mean(control)) if n else None,
        "mean_difference": float(d.mean()) if n else None,
        "ci_low": lo, "ci_high": hi, "sd_difference": sd, "cohen_dz": dz,
        "w_statistic": w["statistic"], "p": w["p"], "p_two_sided": w["p_two_sided"],
        "r_plus": rp, "r_minus": rm, "rank_biserial": rank_biserial(dr),
        "t_statistic": t["statistic"], "t_p": t["p"], "t_p_two_sided": t["p_two_sided"],
        "reason": w["reason"], "t_reason": t["reason"],
    }


# -----------------------------------------------------------------------------
# multiple testing


def adjust(pvalues: list[float | None], method: str = "holm", alpha: float = 0.05) -> tuple[list, list]:
    """Adjusted p-values and rejections (p_adj <= alpha) for one family, by statsmodels' multipletests `method`
    (holm, ...; "none" leaves p as it is); None entries (untested) stay None. ValueError for an unknown method."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r} is not one of {CORRECTIONS}")
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    adj: list = [None] * len(pvalues)
    rej: list = [None] * len(pvalues)
    if not idx:
        return adj, rej
    ps = [float(pvalues[i]) for i in idx]
    if method == "none":
        out_p, out_r = ps, [p <= alpha for p in ps]
    else:
        from statsmodels.stats.multitest import multipletests

        r, p_adj, _, _ = multipletests(ps, alpha=alpha, method=method)
        out_p, out_r = [float(x) for x in p_adj], [bool(x) for x in r]
    for i, p, r in zip(idx, out_p, out_r):
        adj[i], rej[i] = p, r
    return adj, rej


# -----------------------------------------------------------------------------
# the whole study


def analyse(comparisons: list[dict], scores: dict[str, dict], *, metrics=METRICS, alpha: float = 0.05,
            alternative: str = "greater", correction: str = "holm", resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (hypothesis, teacher, setting, metric): the tests, effect, CI and the family-wise decision.

    `comparisons` from `hypotheses()`; `scores` maps cell name -> metric -> question id -> score.
    """
    rows = []
    for h in comparisons:
        treat, ctrl = scores.get(h["treatment"]) or {}, scores.get(h["control"]) or {}
        family = []
        for metric in metrics:
            tm, cm = treat.get(metric, {}), ctrl.get(metric, {})
            t, c = paired(tm, cm)
            row = {**h, "metric": metric, **compare(t, c, alternative, resamples, seed),
                   "n_dropped": len(set(tm) | set(cm)) - len(t)}
            family.append(row)
        p_adj, reject = adjust([r["p"] for r in family], correction, alpha)
        p_adj2, _ = adjust([r["p_two_sided"] for r in family], correction, alpha)
        for r, pa, rj, pa2 in zip(family, p_adj, reject, p_adj2):
            r["p_adj"], r["reject"], r["p_adj_two_sided"] = pa, rj, pa2
        rows += family
    return rows


def summary(rows: list[dict], *, alpha: float, alternative: str, correction: str) -> dict:
    """The paper-style summary (H0 rejected in k of m metrics) per hypothesis × teacher × setting: small,
    for `dvc metrics show`."""
    rejected: dict = {}
    for r in rows:
        s = rejected.setdefault(r["hypothesis"], {}).setdefault(r["teacher"], {}).setdefault(
            r["setting"], {"k": 0, "m": 0})
        if r["p_adj"] is not None:
            s["m"] += 1
            s["k"] += int(bool(r["reject"]))
    return {
        "test": "wilcoxon signed-rank", "alternative": alternative, "correction": correction, "alpha": alpha,
        "metrics": len(METRICS), "comparisons": len(rows),
        "hypotheses": len({(r["hypothesis"], r["teacher"], r["setting"]) for r in rows}),
        "rejected": rejected,
    }


def table(rows: list[dict], *, alpha: float, alternative: str, correction: str, resamples: int, seed: int) -> dict:
    """The full machine-readable table (report/stats_table.json)."""
    return {
        "alpha": alpha, "alternative": alternative, "correction": correction,
        "bootstrap_resamples": resamples, "seed": seed, "metrics": list(METRICS),
        "hypotheses": HYPOTHESES,
        "columns": {
            "p": f"Wilcoxon signed-rank p, alternative={alternative} (treatment - control), zero_method=wilcox",
            "p_two_sided": "Wilcoxon signed-rank p, two-sided",
            "p_adj": f"p adjusted with {correction} across the metrics of one hypothesis x teacher x setting",
            "reject": f"p_adj <= {alpha}",
            "p_adj_two_sided": f"p_two_sided adjusted with {correction} across the same metrics (the report's test of "
                               "the direction opposite to the hypothesis)",
            "sd_difference": "sample SD (ddof 1) of the paired differences, in the metric's units",
            "cohen_dz": "Cohen's d_z = mean_difference / sd_difference (null without variation)",
            "w_statistic": "scipy's Wilcoxon statistic for `alternative` (R+ for one-sided, min(R+, R-) two-sided)",
            "t_statistic, t_p, t_p_two_sided": "paired t-test (secondary)",
            "rank_biserial": "(R+ - R-)/(R+ + R-), zeros dropped (Kerby)",
            "ci_low, ci_high": "percentile bootstrap 95% CI of the mean difference",
            "n": "question pairs with both scores; n_dropped: pairs lost to a missing/NaN score",
        },
        "rows": rows,
    }

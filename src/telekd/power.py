"""Power of the study's paired test: how many test questions an observed effect needs, and the smallest effect
a given number of questions can detect.

The effect is Cohen's d_z of the paired differences, d_z = mean(d) / SD(d) (ddof 1; Cohen 1988, *Statistical
Power Analysis for the Behavioral Sciences*, ch. 2, the paired case; Lakens 2013, Front. Psychol. 4:863, eq. 6),
as `telekd.stats.compare` writes it (`cohen_dz`). The power of the paired t-test at d_z comes from statsmodels
(`statsmodels.stats.power.TTestPower`: the noncentral t distribution with n − 1 degrees of freedom).

The study's primary test is the Wilcoxon signed-rank test, whose power has no closed form. It is taken from the
t-test's by the asymptotic relative efficiency (A.R.E.) of the Wilcoxon test against the t-test: n_W = n_t / ARE
with ARE = 3/π ≈ 0.955, its value for normally distributed differences (Hodges & Lehmann 1956, Ann. Math.
Statist. 27:324–335; Lehmann 1975, *Nonparametrics: Statistical Methods Based on Ranks*). This is G*Power's
"A.R.E." method for the Wilcoxon tests (Faul et al. 2007, Behav. Res. Methods 39:175–191; G*Power 3 manual,
"Wilcoxon signed-rank test (matched pairs)"). The ARE is at least 0.864 for any continuous symmetric
distribution and exceeds 1 for heavy tails, so 3/π is the normal-theory figure, neither a bound nor exact. Zero
differences, which Wilcoxon's rule drops, are not modelled: with many zeros (identical answers) the figure is
rough, in either direction.

The family-wise α of a row of m metrics corrected with Holm is met at Holm's first step when p ≤ α/m (the
Bonferroni bound), so the α used here is α/m: conservative for every metric but the one with the smallest p.
"""

from __future__ import annotations

import math

WILCOXON_ARE = 3 / math.pi  # A.R.E. of the Wilcoxon signed-rank test vs the t-test, normal differences
POWER = 0.8


def _check(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha}: must be in (0, 1), e.g. the stats.alpha of params.yaml divided by m")
    if not 0 < power < 1:
        raise ValueError(f"power {power}: must be in (0, 1), e.g. 0.8")


def questions_needed(dz: float, alpha: float, power: float = POWER, two_sided: bool = False) -> float:
    """Test questions (pairs) the Wilcoxon signed-rank test needs to detect a paired effect `dz` (Cohen's d_z,
    mean difference / SD of the differences, unitless) with probability `power` at level `alpha`: n_t / (3/π),
    n_t the paired t-test's n from statsmodels' TTestPower.solve_power (module docstring). One-sided in the
    direction of `dz` unless `two_sided`. Returns a float (round it up to count questions); math.inf for dz 0.

    Errors: ValueError for alpha or power outside (0, 1) or a NaN/infinite dz.
    """
    _check(alpha, power)
    if not math.isfinite(dz):
        raise ValueError(f"dz {dz}: must be a finite effect size (mean difference / SD of the differences)")
    if dz == 0:
        return math.inf
    from statsmodels.stats.power import TTestPower

    n_t = TTestPower().solve_power(effect_size=abs(dz), alpha=alpha, power=power,
                                   alternative="two-sided" if two_sided else "larger")
    return float(n_t) / WILCOXON_ARE


def detectable_dz(n: int, alpha: float, power: float = POWER, two_sided: bool = False) -> float:
    """The smallest |d_z| the Wilcoxon signed-rank test detects with probability `power` at level `alpha` on `n`
    test questions: the paired t-test's effect at n × 3/π questions (statsmodels' TTestPower.solve_power), one-sided
    unless `two_sided`.

    Errors: ValueError for alpha or power outside (0, 1), or n × 3/π < 2 (no test with fewer than two pairs).
    """
    _check(alpha, power)
    n_t = n * WILCOXON_ARE
    if n_t < 2:
        raise ValueError(f"n {n}: too few questions for a power figure (need n × 3/π ≥ 2, i.e. n ≥ 3)")
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(nobs=n_t, alpha=alpha, power=power,
                                          alternative="two-sided" if two_sided else "larger"))

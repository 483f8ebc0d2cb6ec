"""telekd.power against closed-form sample sizes computed here from normal quantiles (scipy.stats.norm only)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from telekd import power as pw


def guenther_n(dz: float, alpha: float, power: float = 0.8, two_sided: bool = False) -> float:
    """The paired t-test's n by Guenther's correction of the normal approximation (Guenther 1981, Am. Stat.
    35:243-244): n = ((z_{1-a} + z_power) / d)^2 + z_{1-a}^2 / 2, a = alpha (alpha/2 two-sided)."""
    za = norm.ppf(1 - (alpha / 2 if two_sided else alpha))
    return ((za + norm.ppf(power)) / dz) ** 2 + za ** 2 / 2


@pytest.mark.parametrize("dz, alpha", [(0.5, 0.05), (0.2, 0.05 / 11), (-0.2, 0.05 / 11), (0.1, 0.05 / 14),
                                       (0.8, 0.01)])
def test_questions_needed_matches_the_normal_approximation(dz, alpha):
    """n_W × 3/π is the t-test's n: within 0.1 question of Guenther's formula (its error is O(1/n)), and above the
    plain normal approximation n = ((z_{1-α} + z_0.8) / d)^2 by less than 6% for |d| ≤ 0.5 (the t's heavier tails)."""
    n_w = pw.questions_needed(dz, alpha)
    n_t = n_w * 3 / math.pi
    assert n_t == pytest.approx(guenther_n(abs(dz), alpha), abs=0.1)
    plain = ((norm.ppf(1 - alpha) + norm.ppf(0.8)) / dz) ** 2
    if abs(dz) <= 0.5:
        assert plain < n_t < 1.06 * plain
    assert n_w == pytest.approx(n_t / pw.WILCOXON_ARE) and pw.WILCOXON_ARE == pytest.approx(0.954930, abs=1e-6)


def test_questions_needed_by_hand():
    # d_z 0.2, α 0.05/11 one-sided: z = 2.6121 and 0.8416, ((2.6121 + 0.8416) / 0.2)^2 = 297.60, + 2.6121²/2 = 301.01
    # questions for the t-test, / (3/π) = 315.2 for the Wilcoxon test (statsmodels: 301.011)
    assert pw.questions_needed(0.2, 0.05 / 11) == pytest.approx(301.01 * math.pi / 3, abs=0.05)
    # two-sided at α is one-sided at α/2 (up to the other tail's negligible share)
    assert pw.questions_needed(0.5, 0.05, two_sided=True) == pytest.approx(guenther_n(0.5, 0.05, two_sided=True)
                                                                          * math.pi / 3, abs=0.1)
    assert pw.questions_needed(0.5, 0.05, two_sided=True) > pw.questions_needed(0.5, 0.05)
    assert pw.questions_needed(0.0, 0.05) == math.inf


def test_detectable_dz_inverts_questions_needed():
    d = pw.detectable_dz(100, 0.05 / 11)
    assert pw.questions_needed(d, 0.05 / 11) == pytest.approx(100, abs=1e-3)
    # by hand, normal approximation at n_t = 100 × 3/π = 95.49: (2.6121 + 0.8416) / sqrt(95.49) = 0.3534; the t-test
    # needs slightly more: 0.3596
    assert 0.3534 < d == pytest.approx(0.3596, abs=1e-3)
    assert pw.detectable_dz(400, 0.05 / 11) < d


def test_bad_inputs_name_themselves():
    with pytest.raises(ValueError, match="alpha 1.5"):
        pw.questions_needed(0.2, 1.5)
    with pytest.raises(ValueError, match="power 0"):
        pw.questions_needed(0.2, 0.05, power=0)
    with pytest.raises(ValueError, match="dz nan"):
        pw.questions_needed(float("nan"), 0.05)
    with pytest.raises(ValueError, match="n 2: too few"):
        pw.detectable_dz(2, 0.05)

"""telekd.stats against scipy/statsmodels called directly, on fixed data with ties, zeros and NaNs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as ss
from statsmodels.stats.multitest import multipletests

from telekd import stats as st

# Fixed paired scores: ties in |d|, zero differences, a NaN and a None (dropped pairwise).
TREAT = {"q1": 0.50, "q2": 0.40, "q3": 0.90, "q4": 0.30, "q5": 0.70, "q6": 0.20, "q7": 0.65, "q8": 0.10,
         "q9": 0.80, "q10": 0.55, "q11": float("nan"), "q12": 0.30, "q13": 0.45, "q14": 0.60, "q15": 0.75,
         "q16": 0.35, "q17": 0.95}
CTRL = {"q1": 0.40, "q2": 0.40, "q3": 0.70, "q4": 0.40, "q5": 0.50, "q6": 0.20, "q7": 0.45, "q8": 0.00,
        "q9": 0.60, "q10": 0.55, "q11": 0.30, "q12": None, "q13": 0.35, "q14": 0.40, "q15": 0.85,
        "q16": 0.15, "q17": 0.75}


def clean():
    ids = [i for i in TREAT if i != "q11" and i != "q12"]
    return np.array([TREAT[i] for i in ids]), np.array([CTRL[i] for i in ids])


def test_paired_drops_nan_and_none_pairwise():
    t, c = st.paired(TREAT, CTRL)
    tt, cc = clean()
    assert len(t) == 15 and np.allclose(t, tt) and np.allclose(c, cc)
    assert st.paired({"a": 1.0, "b": 2.0}, {"b": 1.0, "c": 0.0}) == ([2.0], [1.0])


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_wilcoxon_and_ttest_match_scipy(alternative):
    t, c = st.paired(TREAT, CTRL)
    tt, cc = clean()
    d = tt - cc
    dr = np.round(d, st.DECIMALS)  # 0.5 - 0.4 and 0.2 - 0.1 are the same difference
    assert len(set(np.abs(dr[dr != 0]))) < len(set(np.abs(d[d != 0])))  # ties that float noise would break
    r = st.compare(t, c, alternative=alternative, resamples=500, seed=3)
    ref = ss.wilcoxon(dr, zero_method="wilcox", alternative=alternative)
    ref2 = ss.wilcoxon(dr, zero_method="wilcox", alternative="two-sided")
    assert r["n"] == 15 and r["n_nonzero"] == int(np.sum(dr != 0)) == 12
    assert r["p"] == pytest.approx(ref.pvalue) and r["w_statistic"] == pytest.approx(ref.statistic)
    assert r["p_two_sided"] == pytest.approx(ref2.pvalue)
    tr = ss.ttest_rel(tt, cc, alternative=alternative)
    assert r["t_p"] == pytest.approx(tr.pvalue) and r["t_statistic"] == pytest.approx(tr.statistic)
    assert r["t_p_two_sided"] == pytest.approx(ss.ttest_rel(tt, cc).pvalue)
    assert r["mean_difference"] == pytest.approx(d.mean())
    boot = ss.bootstrap((d,), np.mean, n_resamples=500, method="percentile", rng=np.random.default_rng(3))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((boot.confidence_interval.low, boot.confidence_interval.high))
    assert r["reason"] is None and r["t_reason"] is None


def test_wilcoxon_large_sample_uses_normal_approximation_like_scipy():
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(0.05, 0.2, 80), 1)  # rounded: many ties and zeros
    w = st.wilcoxon_test(d, "greater")
    assert w["p"] == pytest.approx(ss.wilcoxon(d, zero_method="wilcox", alternative="greater").pvalue)
    assert w["p_two_sided"] == pytest.approx(ss.wilcoxon(d, zero_method="wilcox").pvalue)


def test_rank_biserial_by_hand():
    # d = 1, -2, 3, 0, 3: zero dropped; |d| ranks 1 -> 1, 2 -> 2, 3 and 3 -> 3.5 each
    # R+ = 1 + 3.5 + 3.5 = 8, R- = 2, r = (8 - 2) / (8 + 2) = 0.6
    assert st.signed_rank_sums([1, -2, 3, 0, 3]) == (8.0, 2.0, 4)
    assert st.rank_biserial([1, -2, 3, 0, 3]) == pytest.approx(0.6)
    assert st.rank_biserial([0.1, 0.2]) == 1.0 and st.rank_biserial([-0.1, -0.2]) == -1.0
    assert st.rank_biserial([0, 0]) is None
    # consistent with scipy's one-sided statistic (R+) for the fixed data
    tt, cc = clean()
    dr = np.round(tt - cc, st.DECIMALS)
    rp, rm, _ = st.signed_rank_sums(dr)
    assert rp == pytest.approx(ss.wilcoxon(dr, alternative="greater").statistic)


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh"])
def test_adjust_matches_statsmodels_and_keeps_untested(method):
    ps = [0.01, 0.04, None, 0.03, 0.2, 0.005, None, 0.5]
    adj, rej = st.adjust(ps, method, alpha=0.05)
    given = [p for p in ps if p is not None]
    ref_rej, ref_adj, _, _ = multipletests(given, alpha=0.05, method=method)
    assert [a for a in adj if a is not None] == pytest.approx(list(ref_adj))
    assert [r for r in rej if r is not None] == list(ref_rej)
    assert adj[2] is None and rej[2] is None and adj[6] is None
    assert all((a <= 0.05) == r for a, r in zip(adj, rej) if a is not None)


def test_adjust_holm_by_hand_and_none():
    adj, rej = st.adjust([0.01, 0.02, 0.04], "holm", 0.05)
    assert adj == pytest.approx([0.03, 0.04, 0.04]) and rej == [True, True, True]
    adj, rej = st.adjust([0.01, 0.06], "none", 0.05)
    assert adj == [0.01, 0.06] and rej == [True, False]
    assert st.adjust([None, None], "holm") == ([None, None], [None, None])
    with pytest.raises(ValueError):
        st.adjust([0.1], "sidak-ish")


def test_sd_and_cohen_dz_by_hand():
    """Differences 0.1, 0.3, -0.1, 0.5: mean 0.2, squared deviations 0.01 + 0.01 + 0.09 + 0.09 = 0.2, SD (ddof 1)
    sqrt(0.2 / 3) = 0.258199, d_z = 0.2 / 0.258199 = sqrt(0.6) = 0.774597."""
    r = st.compare([0.4, 0.5, 0.2, 0.9], [0.3, 0.2, 0.3, 0.4], resamples=200)
    assert r["sd_difference"] == pytest.approx(0.258199, abs=1e-6)
    assert r["cohen_dz"] == pytest.approx(math.sqrt(0.6), abs=1e-9)
    neg = st.compare([0.3, 0.2, 0.3, 0.4], [0.4, 0.5, 0.2, 0.9], resamples=200)
    assert neg["cohen_dz"] == pytest.approx(-math.sqrt(0.6), abs=1e-9)  # sign follows treatment - control
    tt, cc = clean()
    r = st.compare(*st.paired(TREAT, CTRL), resamples=200)
    assert r["sd_difference"] == pytest.approx(np.std(tt - cc, ddof=1))
    assert r["cohen_dz"] == pytest.approx((tt - cc).mean() / np.std(tt - cc, ddof=1))
    assert st.effect_dz([0.1, 0.1 + 1e-12, 0.1]) == (0.0, None)  # no variation at DECIMALS: d_z undefined
    assert st.effect_dz([0.3]) == (None, None) and st.effect_dz([]) == (None, None)


def test_all_zero_differences_do_not_crash():
    r = st.compare([0.2, 0.5, 0.0], [0.2, 0.5, 0.0], resamples=200)
    assert r["p"] == 1.0 and r["p_two_sided"] == 1.0 and r["w_statistic"] == 0.0
    assert r["reason"] == "all differences are zero"
    assert r["rank_biserial"] is None and r["t_p"] is None and "variation" in r["t_reason"]
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0) and r["mean_difference"] == 0.0
    assert r["sd_difference"] == 0.0 and r["cohen_dz"] is None
    big = st.wilcoxon_test(np.zeros(60))  # > 50 pairs: scipy would return NaN here
    assert big["p"] == 1.0


def test_constant_nonzero_differences_skip_only_the_ttest():
    r = st.compare([0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5], resamples=200)  # 0.1 up to float noise
    assert r["p"] == pytest.approx(ss.wilcoxon([0.1] * 4, alternative="greater").pvalue)
    assert r["t_p"] is None and r["t_reason"] and r["rank_biserial"] == 1.0
    assert r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_pairs_reports_null_with_reason(n):
    r = st.compare([0.5] * n, [0.1] * n, resamples=200)
    assert r["n"] == n and r["p"] is None and r["p_two_sided"] is None and r["t_p"] is None
    assert r["ci_low"] is None and "< 2" in r["reason"]
    assert r["sd_difference"] is None and r["cohen_dz"] is None
    assert (r["mean_difference"] is None) == (n == 0)


CELLS_FULL = dict(teachers=["llama", "mistral"], teacher_sft=["base", "sft"], student_sft=["base", "sft"])


def test_hypotheses_full_grid_pairs_the_right_cells():
    hs = st.hypotheses(**CELLS_FULL, algs=["vanilla", "dskd"])
    assert len(hs) == 20  # per teacher: 3 hypotheses x 2 algorithms + 4 H_Alg settings
    by = {(h["hypothesis"], h["teacher"], h["setting"]): (h["treatment"], h["control"]) for h in hs}
    assert by[("H_T", "llama", "dskd")] == ("llama-sft-base-dskd", "llama-base-base-dskd")
    assert by[("H_S", "mistral", "vanilla")] == ("mistral-base-sft-vanilla", "mistral-base-base-vanilla")
    assert by[("H_B", "mistral", "dskd")] == ("mistral-sft-sft-dskd", "mistral-base-base-dskd")
    assert by[("H_Alg", "mistral", "T_sft,S_base")] == ("mistral-sft-base-dskd", "mistral-sft-base-vanilla")
    assert by[("H_Alg", "llama", "T_base,S_base")] == ("llama-base-base-dskd", "llama-base-base-vanilla")


def test_hypotheses_reduced_grid_skips_missing_cells():
    # the end-to-end test's grid: base teachers, SFT student, two algorithms -> only H_Alg at T_base,S_sft
    hs = st.hypotheses(["llama", "mistral"], ["base"], ["sft"], ["vanilla", "dskd"])
    assert [(h["hypothesis"], h["teacher"], h["setting"]) for h in hs] == [
        ("H_Alg", "llama", "T_base,S_sft"), ("H_Alg", "mistral", "T_base,S_sft")]
    # one algorithm: no H_Alg
    hs = st.hypotheses(["llama"], ["base", "sft"], ["base"], ["dskd"])
    assert [(h["hypothesis"], h["treatment"]) for h in hs] == [("H_T", "llama-sft-base-dskd")]
    # cells without scores are skipped
    hs = st.hypotheses(**CELLS_FULL, algs=["vanilla", "dskd"],
                       available={"llama-base-base-vanilla", "llama-sft-sft-vanilla", "llama-sft-sft-dskd"})
    assert [(h["hypothesis"], h["setting"]) for h in hs] == [("H_B", "vanilla"), ("H_Alg", "T_sft,S_sft")]


def _scores(rng, shift, n=30):
    out = {}
    for m in st.METRICS:
        if m in st.FAMILIES["llm"]:
            out[m] = {f"q{i}": None for i in range(n)}
        else:
            out[m] = {f"q{i}": float(np.clip(rng.beta(2, 5) + shift, 0, 1)) for i in range(n)}
    return out


def test_analyse_and_summary():
    rng = np.random.default_rng(1)
    scores = {"llama-base-base-vanilla": _scores(rng, 0.0), "llama-sft-base-vanilla": _scores(rng, 0.3)}
    comps = st.hypotheses(["llama"], ["base", "sft"], ["base"], ["vanilla"], available=scores)
    rows = st.analyse(comps, scores, alpha=0.05, alternative="greater", correction="holm", resamples=200, seed=0)
    assert len(rows) == 14 and [r["metric"] for r in rows] == list(st.METRICS)
    tested = [r for r in rows if r["p"] is not None]
    assert len(tested) == 11  # the LLM metrics have no scores
    ref_rej, ref_adj, _, _ = multipletests([r["p"] for r in tested], alpha=0.05, method="holm")
    assert [r["p_adj"] for r in tested] == pytest.approx(list(ref_adj))
    _, ref_adj2, _, _ = multipletests([r["p_two_sided"] for r in tested], alpha=0.05, method="holm")
    assert [r["p_adj_two_sided"] for r in tested] == pytest.approx(list(ref_adj2))
    assert all(r["p_adj_two_sided"] is None for r in rows if r["p"] is None)
    assert all(r["n_dropped"] == 30 and r["reason"] for r in rows if r["metric"] == "faithfulness")
    s = st.summary(rows, alpha=0.05, alternative="greater", correction="holm")
    assert s["rejected"]["H_T"]["llama"]["vanilla"] == {"k": int(sum(ref_rej)), "m": 11}
    assert s["rejected"]["H_T"]["llama"]["vanilla"]["k"] >= 9  # a 0.3 shift is obvious
    assert s["comparisons"] == 14 and s["hypotheses"] == 1
    json.dumps(st.table(rows, alpha=0.05, alternative="greater", correction="holm", resamples=200, seed=0),
               allow_nan=False)  # strict JSON: no NaN anywhere


def test_read_scores(tmp_path):
    d = tmp_path / "llama-base-base-vanilla"
    d.mkdir()
    (d / "ngram.jsonl").write_text('{"id": "a", "bleu1": 0.5, "rouge1": NaN}\n{"id": "b", "bleu1": 1, "note": 3}\n')
    (d / "llm.jsonl").write_text('{"id": "a", "faithfulness": null, "judge_error": "x"}\n')
    s = st.read_scores(tmp_path, "llama-base-base-vanilla")
    assert s["bleu1"] == {"a": 0.5, "b": 1.0} and math.isnan(s["rouge1"]["a"])
    assert s["faithfulness"] == {"a": None} and "note" not in s
    assert st.read_scores(tmp_path, "missing") is None


def test_read_cell_scores_means_over_seeds(tmp_path):
    """A cell's score per question is the mean over its runs <cell>-s<seed>; a run's None drops only that run."""
    rows = {0: [{"id": "a", "bleu1": 0.2, "rouge1": None}, {"id": "b", "bleu1": 0.4, "rouge1": 0.5}],
            1: [{"id": "a", "bleu1": 0.6, "rouge1": None}, {"id": "b", "bleu1": 0.0, "rouge1": 0.1}],
            2: [{"id": "a", "bleu1": 0.1, "rouge1": 0.9}, {"id": "b", "bleu1": 0.2, "rouge1": float("nan")}]}
    for seed, rs in rows.items():
        d = tmp_path / f"llama-base-base-vanilla-s{seed}"
        d.mkdir()
        (d / "ngram.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    s = st.read_cell_scores(tmp_path, "llama-base-base-vanilla", [0, 1])
    assert s["bleu1"] == pytest.approx({"a": 0.4, "b": 0.2})
    assert s["rouge1"]["a"] is None and s["rouge1"]["b"] == pytest.approx(0.3)
    three = st.read_cell_scores(tmp_path, "llama-base-base-vanilla", [0, 1, 2])
    assert three["rouge1"] == pytest.approx({"a": 0.9, "b": 0.3})  # NaN and None dropped per run
    assert st.read_cell_scores(tmp_path, "llama-base-base-vanilla", [7]) is None

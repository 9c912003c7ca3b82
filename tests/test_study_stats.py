"""The study's statistics (issue 18) against scipy, printed tables, hand computations and simulation:
Student t quantiles, intervals and p-values, Holm's correction, the minimal detectable effect, Spearman's correlation and the paired differences of policies (moved from test_study.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats

from dma_jax.study.stats import (
    holm,
    min_detectable_effect,
    paired,
    paired_scores,
    paired_t_p,
    rankdata,
    spearman,
    t_interval,
    t_quantile,
    t_two_sided_p,
)


# ---------------------------------------------------------------------------------- Student's t
@pytest.mark.parametrize("q, df, table", [(0.975, 2, 4.302653), (0.975, 11, 2.200985), (0.975, 15, 2.131450),
                                          (0.995, 1, 63.656741), (0.95, 30, 1.697261), (0.8, 9, 0.883404)])
def test_t_quantile_matches_printed_tables(q, df, table):
    assert t_quantile(q, df) == pytest.approx(table, abs=1e-6)
    assert t_quantile(1 - q, df) == pytest.approx(-table, abs=1e-6)


@pytest.mark.parametrize("df", [0.5, 1, 2, 3, 7, 29, 120, 1e4])
def test_t_quantile_and_p_match_scipy(df):
    for q in (1e-6, 0.001, 0.025, 0.3, 0.5, 0.7, 0.9, 0.975, 0.9995, 1 - 1e-6):
        assert t_quantile(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-9, abs=1e-12)
    for t in (0.0, 0.4, 1.0, 2.5, 8.0, 60.0):
        assert t_two_sided_p(t, df) == pytest.approx(2 * scipy.stats.t.sf(t, df), rel=1e-9, abs=1e-300)
    assert t_two_sided_p(math.inf, df) == 0.0


def test_t_quantile_rejects_bad_arguments():
    for q, df in ((0.0, 3), (1.0, 3), (0.5, 0), (float("nan"), 3)):
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(q, df)


def test_t_interval_by_hand_and_against_scipy():
    # [1, 2, 3]: mean 2, std 1, se 1/sqrt(3), half-width t_{0.975,2} se = 4.302653 / sqrt(3) = 2.484138
    mean, lo, hi, se = t_interval([1.0, 2.0, 3.0])
    assert (mean, se) == pytest.approx((2.0, 1 / math.sqrt(3)))
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    x = np.random.default_rng(0).normal(0.3, 2.0, 12)
    mean, lo, hi, se = t_interval(x, level=0.9)
    want = scipy.stats.t.interval(0.9, 11, loc=x.mean(), scale=scipy.stats.sem(x))
    assert (lo, hi) == pytest.approx(want, rel=1e-9) and se == pytest.approx(scipy.stats.sem(x))
    one = t_interval([0.7])
    assert one[0] == 0.7 and all(math.isnan(v) for v in one[1:])
    for bad in ([], [1.0, float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="t_interval"):
            t_interval(bad)


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    # 4000 samples of n = 5 normals: coverage 0.95 with a binomial standard error of 0.0034; tolerance 0.015.
    x_RxN = np.random.default_rng(1).normal(1.0, 3.0, size=(4000, 5))
    covered = [lo <= 1.0 <= hi for _, lo, hi, _ in map(t_interval, x_RxN)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


def test_paired_t_p_matches_scipy_ttest_rel():
    rng = np.random.default_rng(2)
    for n in (2, 3, 8, 40):
        a, b = rng.normal(size=n), rng.normal(0.4, 1.0, size=n)
        assert paired_t_p(a - b) == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert paired_t_p([0.5, 0.5, 0.5]) == 0.0 and paired_t_p([0.0, 0.0]) == 1.0
    assert math.isnan(paired_t_p([0.3]))


# ---------------------------------------------------------------------------------- Holm
def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # 2 x 0.5 = 1, capped and carried
    np.testing.assert_allclose(holm([0.2]), [0.2])
    for bad in ([1.2], [-0.1, 0.5], [float("nan")], [[0.1]]):
        with pytest.raises(ValueError, match="holm"):
            holm(bad)


def test_holm_adjusted_p_is_the_smallest_level_that_rejects():
    # Holm's procedure at level alpha: walk the sorted p-values, reject while (m - k) p_(k) <= alpha, stop at
    # the first that fails. An adjusted p-value is rejected exactly at the levels alpha >= it.
    p_M = np.random.default_rng(3).uniform(0, 0.1, 9) ** 2
    adj_M = holm(p_M)
    for alpha in np.concatenate([adj_M, adj_M * (1 - 1e-9), np.linspace(0, 1, 201)]):
        rejected = set()
        for k, i in enumerate(np.argsort(p_M)):
            if p_M[i] * (p_M.size - k) > alpha:
                break
            rejected.add(int(i))
        assert rejected == {i for i in range(p_M.size) if adj_M[i] <= alpha}, alpha


# ---------------------------------------------------------------------------------- minimal detectable effect
def test_min_detectable_effect_by_hand_normal_limit_and_exact_power():
    # n = 10: (t_{0.975,9} + t_{0.8,9}) / sqrt(10) = (2.262157 + 0.883404) / 3.162278 = 0.994714
    assert min_detectable_effect(1.0, 10) == pytest.approx(0.994714, abs=2e-6)
    assert min_detectable_effect(2.5, 10) == pytest.approx(2.5 * 0.994714, abs=1e-5)
    z = scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)  # 2.801585
    assert min_detectable_effect(1.0, 100_000) == pytest.approx(z / math.sqrt(100_000), rel=1e-4)
    # The power of the paired t-test at that effect (noncentral t) is 0.8 up to the approximation's error.
    for n in (5, 12, 40):
        c, delta = t_quantile(0.975, n - 1), min_detectable_effect(1.0, n) * math.sqrt(n)
        power = scipy.stats.nct.sf(c, n - 1, delta) + scipy.stats.nct.cdf(-c, n - 1, delta)
        assert power == pytest.approx(0.8, abs=0.01), n
    with pytest.raises(ValueError, match="min_detectable_effect"):
        min_detectable_effect(1.0, 1)


# ---------------------------------------------------------------------------------- paired_scores
def test_paired_scores_reports_the_paired_t_interval():
    a = {0: 1.30, 1: 1.10, 2: 1.25, 3: 1.42, 9: 5.0}
    b = {0: 1.20, 1: 1.12, 2: 1.05, 3: 1.30, 7: 0.0}
    p = paired_scores(a, b, "A", "B")
    d = np.array([0.10, -0.02, 0.20, 0.12])
    assert p["seeds"] == [0, 1, 2, 3] and p["n"] == 4 and p["wins"] == 3
    assert p["mean"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(scipy.stats.sem(d))
    want = scipy.stats.t.interval(0.95, 3, loc=d.mean(), scale=scipy.stats.sem(d))
    assert (p["lo"], p["hi"]) == pytest.approx(want, rel=1e-9)
    assert p["p"] == pytest.approx(scipy.stats.ttest_1samp(d, 0.0).pvalue, rel=1e-9)
    assert "boot_lo" not in p  # no percentile bootstrap over 4 seeds: it would be no 95% interval
    one = paired_scores({0: 1.0}, {0: 0.5}, "A", "B")
    assert one["mean"] == 0.5 and math.isnan(one["lo"]) and math.isnan(one["p"])
    assert paired_scores({0: 1.0}, {1: 1.0}, "A", "B") is None


@pytest.mark.parametrize("value", [0.2, 0.25, 0.1, -0.3])
def test_constant_differences_have_an_exact_zero_se(value):
    # std of [0.2] * 3 is 1.96e-17 (the mean is not exactly 0.2), [0.25] * 3 gives exactly 0: a ratio to the SE
    # (t, H / SE) must not depend on which
    for n in (2, 3, 4):
        mean, lo, hi, se = t_interval([value] * n)
        assert se == 0.0 and lo == hi == mean
        assert paired_t_p([value] * n) == 0.0
    assert paired_t_p([0.0] * 3) == 1.0


# ---------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("n, ties", [(5, False), (12, True), (40, True)])
def test_spearman_and_ranks_match_scipy(n, ties):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    y = x + rng.normal(size=n) if not ties else rng.integers(0, 3, n).astype(float)
    np.testing.assert_allclose(rankdata(x), scipy.stats.rankdata(x, method="average"))
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_edge_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_paired_pairs_by_seed():
    # a has seeds 0, 1, 2 and b seeds 1, 2, 3: only 1 and 2 pair (by seed id, not by position)
    run = lambda policy, seed, final: SimpleNamespace(policy=policy, seed=seed, balanced_T1=np.array([1.0, final]))
    a = [run("agent-cql", 0, 1.5), run("agent-cql", 1, 1.2), run("agent-cql", 2, 1.1), run("fixed-0.3", 1, 9.0)]
    b = [run("fixed-0.3", 1, 1.0), run("fixed-0.3", 2, 1.3), run("fixed-0.3", 3, 0.0)]
    p = paired(a, "agent-cql", b, "fixed-0.3")
    assert p["seeds"] == [1, 2] and p["diffs"] == pytest.approx([0.2, -0.2])
    assert p["mean"] == pytest.approx(0.0, abs=1e-12) and p["wins"] == 1
    want = scipy.stats.t.interval(0.95, 1, loc=0.0, scale=scipy.stats.sem([0.2, -0.2]))
    assert (p["lo"], p["hi"]) == pytest.approx(want, rel=1e-9)
    assert paired(a, "agent-cql", b, "source-only") is None

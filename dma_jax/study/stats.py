"""The study's statistics (numpy, no scipy): ranks, Spearman's correlation, Student t intervals and tests, the minimum
detectable effect, Holm's correction and the paired difference of two policies (the bootstrap over seeds and
evaluation units is `unit_bootstrap`).

`paired_scores` reports the paired t 95% interval of the mean difference (`lo`, `hi`, `se`, `p`; the SE is
`numerics.se_of_mean`). The t distribution is computed here (the regularized incomplete beta by its continued
fraction, inverted by bisection), so run time needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from dma_jax.history import RunHistory
from dma_jax.numerics import se_of_mean


def rankdata(x_N) -> np.ndarray:
    """1-based ranks; tied values get the mean of the ranks they span (scipy's method='average')."""
    x_N = np.asarray(x_N, np.float64)
    ranks_N = np.empty(x_N.size)
    ranks_N[np.argsort(x_N, kind="stable")] = np.arange(1, x_N.size + 1)
    _, group_N, counts = np.unique(x_N, return_inverse=True, return_counts=True)
    return (np.bincount(group_N, weights=ranks_N) / counts)[group_N]


def spearman(x_N, y_N) -> float:
    """Spearman's rank correlation; NaN when either side is constant or there are fewer than 2 points."""
    x_N, y_N = np.asarray(x_N, np.float64), np.asarray(y_N, np.float64)
    if x_N.shape != y_N.shape or x_N.ndim != 1:
        raise ValueError(f"spearman: need two 1-d arrays of one length, got {x_N.shape} and {y_N.shape}")
    rx, ry = rankdata(x_N) - (x_N.size + 1) / 2, rankdata(y_N) - (y_N.size + 1) / 2
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------- Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz; converges for x < (a + 1) / (a + b + 2))."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b), a, b > 0, x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if df <= 0 or math.isnan(t):
        return float("nan")
    return 0.0 if math.isinf(t) else betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` > 0 degrees of freedom (bisection on the incomplete beta)."""
    if not 0.0 < q < 1.0 or not df > 0:
        raise ValueError(f"t_quantile: need 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * min(q, 1.0 - q)  # P(|T| >= t) = I_{df/(df+t^2)}(df/2, 1/2), increasing in x = df/(df+t^2)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if betainc(df / 2.0, 0.5, mid) < tail else (lo, mid)
    x = 0.5 * (lo + hi)
    t = math.sqrt(df * (1.0 - x) / x)
    return t if q > 0.5 else -t


def _sample(x_N, who: str, min_n: int = 1) -> np.ndarray:
    x_N = np.asarray(x_N, np.float64)
    if x_N.ndim != 1 or x_N.size < min_n or not np.all(np.isfinite(x_N)):
        raise ValueError(f"{who}: need a 1-d array of at least {min_n} finite values, got shape {x_N.shape}"
                         + ("" if np.all(np.isfinite(x_N)) else " with NaN/inf"))
    return x_N


def t_interval(x_N, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, lo, hi, se): the t interval of the mean of x (for paired differences: the paired t interval).

    se = std(ddof=1) / sqrt(n); lo, hi = mean -/+ t_{(1+level)/2, n-1} se. One value: lo, hi, se are NaN."""
    x_N = _sample(x_N, "t_interval")
    mean = float(x_N.mean())
    if x_N.size < 2:
        return mean, float("nan"), float("nan"), float("nan")
    se = se_of_mean(x_N)
    half = t_quantile(0.5 + level / 2.0, x_N.size - 1) * se
    return mean, mean - half, mean + half, se


def paired_t_p(d_N) -> float:
    """Two-sided p-value of the paired t-test (mean of the differences d is zero); NaN for one difference."""
    d_N = _sample(d_N, "paired_t_p")
    if d_N.size < 2:
        return float("nan")
    mean, se = float(d_N.mean()), se_of_mean(d_N)
    if se == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return t_two_sided_p(mean / se, d_N.size - 1)


def min_detectable_effect(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test of n pairs (differences' std `sd`) detects with
    probability `power`: (t_{(1+level)/2, n-1} + t_{power, n-1}) sd / sqrt(n), the usual approximation of the
    noncentral t's power: at n = 12 and 16 (the study's sizes) within 0.1% of the exact value; it understates
    below n ~ 5 (n = 3: 3.10 sd against the exact 3.26 sd, power 0.77 rather than 0.8)."""
    if n < 2 or not sd >= 0 or not 0 < level < 1 or not 0 < power < 1:
        raise ValueError(f"min_detectable_effect: need n >= 2, sd >= 0, level and power in (0, 1); got n={n}, "
                         f"sd={sd}, level={level}, power={power}")
    return (t_quantile(0.5 + level / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, made monotone, capped at 1), in the input's order."""
    p_M = np.asarray(p_values, np.float64)
    if p_M.ndim != 1 or not np.all((p_M >= 0) & (p_M <= 1)):
        raise ValueError(f"holm: need a 1-d array of p-values in [0, 1], got {p_values!r}")
    order = np.argsort(p_M, kind="stable")
    stepped = np.maximum.accumulate((p_M.size - np.arange(p_M.size)) * p_M[order])
    adj_M = np.empty_like(p_M)
    adj_M[order] = np.minimum(stepped, 1.0)
    return adj_M


# ---------------------------------------------------------------------------------- paired policies
def paired_scores(a: Mapping[int, float], b: Mapping[int, float], name_a: str, name_b: str) -> dict | None:
    """a − b over their common seeds ({seed: score} each); None without a common seed.

    {"a", "b", "seeds", "diffs", "n", "mean", "lo", "hi", "se", "p" (the paired t 95% interval and two-sided
    p-value; NaN with one seed), "wins" (seeds where a is ahead)}. No percentile bootstrap over the seeds: with
    a few seeds it is no 95% interval (3 seeds: [min, max]; SCIENCE.md); `unit_bootstrap` is the one bootstrap."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d_N = np.array([a[s] - b[s] for s in seeds], np.float64)
    mean, lo, hi, se = t_interval(d_N)
    return {"a": name_a, "b": name_b, "seeds": seeds, "diffs": d_N.tolist(), "n": len(seeds), "mean": mean,
            "lo": lo, "hi": hi, "se": se, "p": paired_t_p(d_N), "wins": int((d_N > 0).sum())}


def final_scores(runs: Sequence[RunHistory], policy: str) -> dict[int, float]:
    """{seed: final balanced score} of the runs of `policy`."""
    return {r.seed: float(r.balanced_T1[-1]) for r in runs if r.policy == policy}


def paired(runs_a: Sequence[RunHistory], policy_a: str, runs_b: Sequence[RunHistory], policy_b: str) -> dict | None:
    """Final balanced score of policy_a minus policy_b, paired by seed, with the paired t 95% CI."""
    return paired_scores(final_scores(runs_a, policy_a), final_scores(runs_b, policy_b), policy_a, policy_b)

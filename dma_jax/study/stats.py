"""The study's statistics (numpy only): ranks, Spearman's correlation, the bootstrap and paired differences.

`bootstrap_ci` is the percentile bootstrap of the mean of paired differences (fixed seed); `spearman` is
Pearson's correlation of average ranks (ties share the mean of their ranks), as scipy.stats.spearmanr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dma_jax.history import RunHistory


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


def bootstrap_ci(x_N, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x (resampling its entries with replacement)."""
    x_N = np.asarray(x_N, np.float64)
    if x_N.ndim != 1 or x_N.size == 0:
        raise ValueError(f"bootstrap_ci: need a non-empty 1-d array, got shape {x_N.shape}")
    idx_BxN = np.random.default_rng(seed).integers(0, x_N.size, size=(n_boot, x_N.size))
    means_B = x_N[idx_BxN].mean(axis=1)
    tail = (1.0 - level) / 2
    return float(np.quantile(means_B, tail)), float(np.quantile(means_B, 1.0 - tail))


def paired_scores(a: Mapping[int, float], b: Mapping[int, float], name_a: str, name_b: str) -> dict | None:
    """a − b over their common seeds ({seed: score} each) with a bootstrap 95% CI; None without a common seed.

    {"a", "b", "seeds", "diffs", "mean", "lo", "hi", "wins" (seeds where a is ahead)}."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d_N = np.array([a[s] - b[s] for s in seeds])
    lo, hi = bootstrap_ci(d_N)
    return {"a": name_a, "b": name_b, "seeds": seeds, "diffs": d_N.tolist(), "mean": float(d_N.mean()),
            "lo": lo, "hi": hi, "wins": int((d_N > 0).sum())}


def final_scores(runs: Sequence[RunHistory], policy: str) -> dict[int, float]:
    """{seed: final balanced score} of the runs of `policy`."""
    return {r.seed: float(r.balanced_T1[-1]) for r in runs if r.policy == policy}


def paired(runs_a: Sequence[RunHistory], policy_a: str, runs_b: Sequence[RunHistory], policy_b: str) -> dict | None:
    """Final balanced score of policy_a minus policy_b, paired by seed, with a bootstrap 95% CI."""
    return paired_scores(final_scores(runs_a, policy_a), final_scores(runs_b, policy_b), policy_a, policy_b)

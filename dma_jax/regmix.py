"""RegMix (Liu et al. 2024, arXiv 2407.01492) on the sweep: regress the return on the average mixture, predict
it on a large set of candidate mixtures, answer with the mean of the best predicted ones (a static mixture).

`fit_lightgbm` is RegMix as its authors built it (sail-sg/regmix, regression_fitting/regression.ipynb): a
LightGBM regressor (gbdt, L2 objective, 1000 rounds at learning rate 1e-2), the answer the mean of the top 100
candidates (policy `regmix`). Two departures, both for small sweeps: no early stopping (the authors stop on a
held-out set of runs; a sweep of 8-256 trajectories has none to spare), and `min_child_samples` scaled to the
sweep (LightGBM's default 20 is 2-4% of the authors' 512-1000 runs; the same share of a 64-run sweep is 3, and
20 would leave a sweep of under 40 runs no split at all). `fit_linear` is the earlier ridge regression
(policy `regmix-linear`).

Candidates: the authors fit on mixtures drawn from a Dirichlet around the corpus' token shares and draw their
candidates from the same distribution. A sweep's average mixtures come from its own sampler, so the candidates
here are the sweep's average mixtures and Dirichlet draws centred on each of them (two concentrations): the
distribution the regressor was fitted on, where it does not extrapolate. They are drawn with `CANDIDATE_SEED`,
never the CPT seed: RegMix's mixture is one answer for every CPT seed.
"""

from __future__ import annotations

import numpy as np

from dma_jax.errors import DmaError

CANDIDATE_SEED = 0
TOP_K = 100  # RegMix averages its top 100 candidates
LGBM_SEED = 42  # the authors' seed
LGBM_ROUNDS = 1000
LGBM_LEARNING_RATE = 1e-2


def sweep_mixtures(actions_NxTxD, returns_N, where: str = "regmix") -> tuple[np.ndarray, np.ndarray]:
    """(average mixture per trajectory [N, D], return [N]) after checking shapes and values."""
    actions_NxTxD, returns_N = np.asarray(actions_NxTxD, np.float64), np.asarray(returns_N, np.float64)
    if actions_NxTxD.ndim != 3 or min(actions_NxTxD.shape) == 0:
        raise DmaError(f"{where}: actions must be a non-empty [N, T, D] array, got shape {actions_NxTxD.shape}")
    N, _, D = actions_NxTxD.shape
    if returns_N.shape != (N,):
        raise DmaError(f"{where}: returns must have shape ({N},) to match actions {actions_NxTxD.shape}, "
                       f"got {returns_N.shape}")
    if D < 2:
        raise DmaError(f"{where}: a mixture needs at least 2 domains, got D={D}")
    for name, arr in (("actions", actions_NxTxD), ("returns", returns_N)):
        bad = np.flatnonzero(~np.isfinite(arr.reshape(N, -1)).all(axis=1))
        if bad.size:
            raise DmaError(f"{where}: {name} of trajectory {int(bad[0])} ({bad.size} in all) are not finite")
    if np.any(actions_NxTxD < 0) or not np.allclose(actions_NxTxD.sum(-1), 1.0, atol=1e-4):
        raise DmaError(f"{where}: actions must be mixtures (non-negative, summing to 1 over the last axis)")
    return actions_NxTxD.mean(axis=1), returns_N


def candidates(X_NxD: np.ndarray, n_candidates: int, seed: int = CANDIDATE_SEED) -> np.ndarray:
    """The sweep's mixtures and ~n_candidates Dirichlet draws centred on them (concentrations 20 D and 100 D)."""
    N, D = X_NxD.shape
    rng = np.random.default_rng(seed)
    per_mixture = max(n_candidates // (2 * N), 1)
    cands = [X_NxD]
    for concentration in (20.0 * D, 100.0 * D):
        alpha_NxD = concentration * X_NxD + 1e-3
        cands.append(np.concatenate([rng.dirichlet(a, size=per_mixture) for a in alpha_NxD]))
    return np.concatenate(cands)


def _mean_of_top(C_MxD: np.ndarray, pred_M: np.ndarray, k: int) -> np.ndarray:
    best = C_MxD[np.argsort(-pred_M, kind="stable")[:k]].mean(axis=0)
    return best / best.sum()


def fit_linear(actions_NxTxD, returns_N, n_candidates: int = 20000, seed: int = CANDIDATE_SEED,
               ridge: float = 1e-3, top_share: float = 0.01, where: str = "regmix-linear"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of the return on the average mixture; (best mixture [D], coefficients [D + 1]).

    A linear fit searched over the whole simplex would only extrapolate toward a corner; over the candidates
    it leans toward the best direction within the sweep's range. The answer is the mean of the top `top_share`
    of the candidates by predicted return."""
    X_NxD, y_N = sweep_mixtures(actions_NxTxD, returns_N, where)
    N, D = X_NxD.shape
    A = np.concatenate([X_NxD, np.ones((N, 1))], axis=1)
    coef = np.linalg.solve(A.T @ A + ridge * np.eye(D + 1), A.T @ y_N)
    C_MxD = candidates(X_NxD, n_candidates, seed)
    k = max(1, round(top_share * len(C_MxD)))
    return _mean_of_top(C_MxD, C_MxD @ coef[:D] + coef[D], k), coef


def fit_lightgbm(actions_NxTxD, returns_N, n_candidates: int = 100_000, seed: int = CANDIDATE_SEED,
                 top_k: int = TOP_K, where: str = "regmix"):
    """RegMix: a LightGBM regressor of the return on the average mixture; (best mixture [D], the model).

    Reproducible: fixed `seed`, `deterministic=True`, one thread, column-wise histograms."""
    import lightgbm

    X_NxD, y_N = sweep_mixtures(actions_NxTxD, returns_N, where)
    N = len(X_NxD)
    # LightGBM's own training API (its scikit-learn wrapper needs scikit-learn); the parameters are what
    # LGBMRegressor(n_estimators=1000, learning_rate=1e-2, random_state=42, ...) passes to it
    params = {"boosting_type": "gbdt", "objective": "regression", "learning_rate": LGBM_LEARNING_RATE,
              "min_child_samples": int(np.clip(round(0.04 * N), 2, 20)), "seed": LGBM_SEED, "deterministic": True,
              "force_col_wise": True, "num_threads": 1, "verbose": -1}
    model = lightgbm.train(params, lightgbm.Dataset(X_NxD, y_N, params=params), num_boost_round=LGBM_ROUNDS)
    C_MxD = candidates(X_NxD, n_candidates, seed)
    return _mean_of_top(C_MxD, model.predict(C_MxD), top_k), model

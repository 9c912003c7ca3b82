"""The two-level bootstrap of a paired difference of returns (issue 18.5): seeds, then evaluation units.

A return's noise has two sources: the CPT seed (data order, and through `protocol.agent_seed_for` the agent's
training seed) and the finite evaluation set (benchmark items, held-out windows). The paired t interval over
seeds holds the first; this bootstrap holds both. Each replicate draws S seeds with replacement, and the items
of each field and the held-out windows of each domain with replacement (strata: the evaluation draws a fixed
number per field and per domain). Every run was scored on the same set, so seeds and units are crossed: one
draw of units per replicate serves all its drawn seeds and both policies of the pair; the field scores are
recomputed from the drawn units exactly as
`evaluation.normalise` computes them (pooled bits per byte and held-out loss; the base model's values held
fixed, as for `field_score_se`), the balanced score taken, and the mean over the drawn seeds of a - b kept.

Read from the re-scored final models (`study.rescore`: their per-unit raw metrics, `units`), so the interval is
of the re-scored return (more items than the CPT's in-loop feedback), said so wherever it is reported.
The accuracy term (`eval.acc_weight`, 0 by default) uses each run's full-set chance level (the items' choice
counts are not stored per unit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from dma_jax.config import EvalConfig
from dma_jax.study.stats import t_quantile

UNIT_KEYS = ("item_nll", "item_bytes", "item_correct", "item_correct_norm", "item_field", "window_nll",
             "window_tokens", "domain_field", "domain_scored", "chance")
BASE_KEYS = ("answer_bpb", "field_loss", "accuracy", "acc_norm", "chance")
LN2 = float(np.log(2.0))


def units_doc(raw: Mapping) -> dict:
    """The per-unit entries of `evaluation.evaluate`'s raw output, as JSON lists (what a rescore doc keeps)."""
    return {k: np.asarray(raw[k]).tolist() for k in UNIT_KEYS}


def base_doc(raw: Mapping) -> dict:
    return {k: np.asarray(raw[k]).tolist() for k in BASE_KEYS}


def _stack(docs: Sequence[Mapping]) -> dict[str, np.ndarray]:
    out = {k: np.stack([np.asarray(d[k], np.float64) for d in docs]) for k in UNIT_KEYS}
    for k in ("item_field", "domain_field", "domain_scored"):
        if not (out[k] == out[k][:1]).all():
            raise ValueError(f"two-level bootstrap: the runs were scored on different evaluation sets ({k} differs)")
    return out


def _balanced(score_xF: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return score_xF.mean(-1)
    if how == "min":
        return score_xF.min(-1)
    return score_xF.shape[-1] / (1.0 / np.maximum(score_xF, 1e-6)).sum(-1)  # harmonic (evaluation.balanced_score)


class _Draws:
    """Indices of B replicates: S drawn seeds; per field, items; per domain, windows (rng None: all, in order)."""

    def __init__(self, u: Mapping[str, np.ndarray], B: int, rng: np.random.Generator | None):
        S, F = u["item_nll"].shape[0], u["chance"].shape[1]
        field_I = u["item_field"][0].astype(int)
        D, E = u["window_nll"].shape[1:]
        self.seed_BxS = rng.integers(0, S, size=(B, S)) if rng else np.tile(np.arange(S), (B, 1))
        # the units are drawn once per replicate and shared by its seed slots: every run was scored on the same
        # set, so an item's effect is common to all seeds (crossed, not nested; nested draws would average it
        # away over the S slots and understate the item variance S-fold)
        self.items = []  # per field: [B, 1, n_f] item ids
        for f in range(F):
            ids = np.flatnonzero(field_I == f)
            self.items.append(ids[rng.integers(0, ids.size, size=(B, 1, ids.size))] if rng
                              else np.broadcast_to(ids, (B, 1, ids.size)))
        self.windows = (rng.integers(0, E, size=(B, 1, D, E)) if rng
                        else np.broadcast_to(np.arange(E), (B, 1, D, E)))


def _field_scores(u: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], ec: EvalConfig,
                  dr: _Draws) -> np.ndarray:
    """[B, S, F] field scores of one policy's runs under the draws."""
    s_BxS = dr.seed_BxS
    F = u["chance"].shape[1]
    acc_key = "item_correct" if ec.acc_metric == "acc" else "item_correct_norm"
    bpb, acc = [], []
    for f in range(F):
        take = lambda k: u[k][s_BxS[..., None], dr.items[f]]  # noqa: E731,B023
        bpb.append(take("item_nll").sum(-1) / take("item_bytes").sum(-1) / LN2)
        acc.append(take(acc_key).mean(-1))
    bpb_BxSxF, acc_BxSxF = np.stack(bpb, -1), np.stack(acc, -1)
    D = u["window_nll"].shape[1]
    d_ix = np.arange(D)[None, None, :, None]
    s_ix = s_BxS[..., None, None]
    nll_BxSxD = u["window_nll"][s_ix, d_ix, dr.windows].sum(-1)
    tok_BxSxD = u["window_tokens"][s_ix, d_ix, dr.windows].sum(-1)
    member_DxF = (u["domain_field"][0].astype(int)[:, None] == np.arange(F)) * u["domain_scored"][0][:, None]
    loss_BxSxF = (nll_BxSxD @ member_DxF) / (tok_BxSxD @ member_DxF)
    chance_BxSxF = u["chance"][s_BxS]
    centred = lambda a, c: (a - c) / (1.0 - c)  # noqa: E731  (evaluation.centred)
    acc0_F = np.asarray(base["accuracy" if ec.acc_metric == "acc" else "acc_norm"], np.float64)
    return (1.0 + ec.bpb_weight * (1.0 - bpb_BxSxF / np.asarray(base["answer_bpb"], np.float64))
             + ec.loss_weight * (1.0 - loss_BxSxF / np.asarray(base["field_loss"], np.float64))
             + ec.acc_weight * (centred(acc_BxSxF, chance_BxSxF)
                                - centred(acc0_F, np.asarray(base["chance"], np.float64))))


def _scores(u, base, ec: EvalConfig, dr: _Draws) -> np.ndarray:
    """[B, S] balanced scores of one policy's runs under the draws."""
    return _balanced(_field_scores(u, base, ec, dr), ec.balanced)


def field_scores(units: Mapping, base: Mapping, ec: EvalConfig = EvalConfig()) -> np.ndarray:
    """[F] field scores of one run from its units, all of them (no resampling): what `evaluation.normalise`
    gives (a test checks it)."""
    u = _stack([units])
    return _field_scores(u, {k: np.asarray(base[k], np.float64) for k in BASE_KEYS}, ec, _Draws(u, 1, None))[0, 0]


def paired(units_a: Sequence[Mapping], units_b: Sequence[Mapping], base: Mapping, ec: EvalConfig = EvalConfig(),
           n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """a - b: the re-scored balanced scores of two policies on the same S seeds (in order), with the two-level
    bootstrap: {"n", "mean" (all units, the point estimate), "se_boot" (the replicates' standard deviation),
    "se" (se_boot x sqrt(S / (S - 1))), "lo", "hi" (mean -/+ t_{(1+level)/2, S-1} se)}.

    Not the replicates' percentiles: resampling S seeds gives the seed part of the variance with divisor S, not
    S - 1, and a normal tail where the mean of S seeds has a t tail, so a percentile interval over 12 seeds
    covers ~88% rather than 95% when the seeds dominate (a simulation, 400 studies; this interval 94.5% in the
    same simulation, the paired t interval 93.5%). The correction is exact for
    the seed part and slightly wide (conservative) for the units' part, which needs none (many units)."""
    if len(units_a) != len(units_b) or len(units_a) < 2:
        raise ValueError(f"two-level bootstrap: need the same >= 2 seeds for both policies, got {len(units_a)} "
                         f"and {len(units_b)}")
    both = _stack([*units_a, *units_b])  # one evaluation set for every run (checked)
    ua, ub = ({k: v[i * len(units_a):(i + 1) * len(units_a)] for k, v in both.items()} for i in (0, 1))
    base = {k: np.asarray(base[k], np.float64) for k in BASE_KEYS}
    full = _Draws(ua, 1, None)
    mean = float((_scores(ua, base, ec, full) - _scores(ub, base, ec, full)).mean())
    rng = np.random.default_rng(seed)
    reps, chunk = [], 250
    for start in range(0, n_boot, chunk):
        dr = _Draws(ua, min(chunk, n_boot - start), rng)
        reps.append((_scores(ua, base, ec, dr) - _scores(ub, base, ec, dr)).mean(-1))
    reps_B = np.concatenate(reps)
    S = len(units_a)
    se_boot = float(reps_B.std(ddof=1))
    se = se_boot * math.sqrt(S / (S - 1))
    half = t_quantile(0.5 + level / 2.0, S - 1) * se
    return {"n": S, "mean": mean, "lo": mean - half, "hi": mean + half, "se": se, "se_boot": se_boot}

"""The two-level bootstrap over seeds and evaluation units (study.unit_bootstrap): its point estimate is the
evaluation's own score (a second code path: evaluation.normalise), its spread the analytic two-stage variance."""

import math

import jax
import numpy as np
import pytest
import scipy.stats

from dma_jax.config import EvalConfig
from dma_jax.evaluation import normalise
from dma_jax.study import unit_bootstrap as ub
from tests.test_evaluation import _known_raw, setup  # noqa: F401  (setup: a pytest fixture)

CFGS = [EvalConfig(), EvalConfig(bpb_weight=0.2, loss_weight=0.3, acc_weight=0.5),
        EvalConfig(bpb_weight=0.0, loss_weight=0.4, acc_weight=0.6, acc_metric="acc")]


@pytest.mark.parametrize("cfg", CFGS)
def test_field_scores_from_units_equal_normalise(cfg):
    raw, base = _known_raw(1), _known_raw(2)
    raw["domain_scored"] = np.array([1.0, 0.0, 1.0], np.float32)  # an unscored domain is left out of its field
    raw["field_loss"] = np.array([raw["window_nll"][0].sum() / raw["window_tokens"][0].sum(),
                                  raw["window_nll"][2].sum() / raw["window_tokens"][2].sum()])
    want = np.asarray(normalise(raw, base, cfg)["field_score"])
    got = ub.field_scores(ub.units_doc(raw), ub.base_doc(base), cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_field_scores_of_a_real_evaluation(setup):  # noqa: F811
    lm, _, es, fn = setup
    raw_a = fn(lm.init(jax.random.key(1)), es)
    raw_0 = fn(lm.init(jax.random.key(2)), es)
    want = np.asarray(normalise(raw_a, raw_0)["field_score"])
    np.testing.assert_allclose(ub.field_scores(ub.units_doc(raw_a), ub.base_doc(raw_0)), want, rtol=1e-5)


def _linear_runs(S, n_items, D, E, seed, unit_effect):
    """Runs whose scores are linear in unit means: every item 1 byte, every window 10 tokens. Per seed a shift
    (the seed effect) and fresh unit noise; `unit_effect`: each item's and window's own offset, the same on every
    seed (the evaluation set is shared, so what an item adds to a - b is shared too)."""
    rng = np.random.default_rng(seed)
    F = len(n_items)
    item_field = np.repeat(np.arange(F), n_items)
    domain_field = np.arange(D) % F
    item_eff, win_eff = rng.exponential(unit_effect, item_field.size), rng.exponential(unit_effect, (D, E))
    runs = []
    for s in range(S):
        shift = rng.normal() * 0.05
        runs.append({"item_nll": 1.0 + shift + item_eff + rng.exponential(0.3, item_field.size),
                     "item_bytes": np.ones(item_field.size), "item_correct": np.zeros(item_field.size),
                     "item_correct_norm": np.zeros(item_field.size), "item_field": item_field,
                     "window_nll": 10 * (2.0 + shift + win_eff + rng.exponential(0.2, (D, E))),
                     "window_tokens": np.full((D, E), 10.0), "domain_field": domain_field,
                     "domain_scored": np.ones(D), "chance": np.full(F, 0.25)})
    return runs


def _crossed_var(X_SxN):
    """(seed part is left to the caller) the unit parts of a crossed bootstrap of the mean of X: the unit
    effects' variance / N + the interaction's / (S N), both ddof 0 (two-way decomposition of X)."""
    S, N = X_SxN.shape
    g = X_SxN.mean()
    col = X_SxN.mean(0) - g
    inter = X_SxN - X_SxN.mean(1, keepdims=True) - X_SxN.mean(0, keepdims=True) + g
    return (col**2).mean() / N + (inter**2).mean() / (S * N)


@pytest.mark.parametrize("S, n_items, D, E, unit_effect", [(6, (20, 12), 4, 5, 0.4), (3, (9,), 2, 3, 0.0),
                                                            (8, (15,), 2, 6, 1.0)])
def test_bootstrap_sd_is_the_crossed_variance(S, n_items, D, E, unit_effect):
    # A replicate's mean of a - b = the mean over drawn seeds of d_s (seed part: var0(d) / S) + for each stratum
    # (a field's items, a domain's windows; drawn independently, shared by the seed slots) its weight^2 x
    # (unit effects' variance / n + interaction's / (S n)); the cross terms vanish (two-way centring).
    a, b = _linear_runs(S, n_items, D, E, 1, unit_effect), _linear_runs(S, n_items, D, E, 2, 0.0)
    F = len(n_items)
    base = {"answer_bpb": np.full(F, 1.5), "field_loss": np.full(F, 2.2), "accuracy": np.zeros(F),
            "acc_norm": np.zeros(F), "chance": np.full(F, 0.25)}
    cfg = EvalConfig()  # 0.5 bits per byte + 0.5 held-out loss, balanced mean
    c_item = cfg.bpb_weight / (F * math.log(2) * 1.5)  # d score / d mean item nll, per field
    c_win = cfg.loss_weight / (F * 2.2 * 10.0)  # d score / d mean window nll of a field (10 tokens each)
    di = np.stack([rb["item_nll"] - ra["item_nll"] for ra, rb in zip(a, b)])  # a - b of -c * nll: b's minus a's
    dw = np.stack([rb["window_nll"] - ra["window_nll"] for ra, rb in zip(a, b)])
    field_I, field_D = a[0]["item_field"], a[0]["domain_field"]
    d_S, units = np.zeros(S), 0.0
    for f in range(F):
        d_S += c_item * di[:, field_I == f].mean(1)
        units += c_item**2 * _crossed_var(di[:, field_I == f])
        doms = np.flatnonzero(field_D == f)
        for k in doms:
            d_S += c_win / doms.size * dw[:, k].mean(1)
            units += (c_win / doms.size) ** 2 * _crossed_var(dw[:, k])
    sd = math.sqrt(d_S.var() / S + units)
    B = 8000
    out = ub.paired(a, b, base, cfg, n_boot=B, seed=3)
    assert out["mean"] == pytest.approx(d_S.mean(), rel=1e-9)
    assert out["se_boot"] == pytest.approx(sd, rel=4 / math.sqrt(2 * B))
    assert out["se"] == pytest.approx(out["se_boot"] * math.sqrt(S / (S - 1)), rel=1e-12)
    if unit_effect >= 1.0:  # the shared unit effects dominate: a seeds-only interval would be far too narrow
        assert out["se"] > 2 * math.sqrt(d_S.var(ddof=1) / S)
    half = scipy.stats.t.ppf(0.975, S - 1) * out["se"]
    assert (out["lo"], out["hi"]) == pytest.approx((out["mean"] - half, out["mean"] + half), rel=1e-9)
    assert ub.paired(a, b, base, cfg, n_boot=B, seed=3) == out


@pytest.mark.parametrize("S", [3, 12])
def test_without_unit_noise_the_interval_is_the_paired_t_interval(S):
    # Every item and window of a run scores the same: resampling units changes nothing, the replicates vary by
    # the seeds alone, and the corrected SE (x sqrt(S / (S - 1))) with the t quantile is the paired t interval
    # of the seeds' differences (scipy), up to the Monte Carlo error of the replicates' sd.
    rng = np.random.default_rng(S)
    a = [dict(r) for r in _linear_runs(S, (10, 6), 4, 3, 0, 0.0)]
    b = [dict(r) for r in _linear_runs(S, (10, 6), 4, 3, 1, 0.0)]
    for runs in (a, b):
        for r in runs:
            r["item_nll"] = np.full_like(r["item_nll"], 1.0 + rng.normal() * 0.05)
            r["window_nll"] = np.full_like(r["window_nll"], 20.0 + rng.normal())
    base = {"answer_bpb": np.full(2, 1.5), "field_loss": np.full(2, 2.2), "accuracy": np.zeros(2),
            "acc_norm": np.zeros(2), "chance": np.full(2, 0.25)}
    d_S = np.array([ub.field_scores(ra, base).mean() - ub.field_scores(rb, base).mean() for ra, rb in zip(a, b)])
    B = 8000
    out = ub.paired(a, b, base, n_boot=B, seed=5)
    assert out["mean"] == pytest.approx(d_S.mean(), rel=1e-9)
    assert out["se"] == pytest.approx(scipy.stats.sem(d_S), rel=4 / math.sqrt(2 * B))
    lo, hi = scipy.stats.t.interval(0.95, S - 1, loc=d_S.mean(), scale=scipy.stats.sem(d_S))
    tol = 4 / math.sqrt(2 * B) * (hi - lo) / 2
    assert out["lo"] == pytest.approx(lo, abs=tol) and out["hi"] == pytest.approx(hi, abs=tol)


def test_bootstrap_input_errors():
    a = _linear_runs(2, (4,), 2, 2, 0, 0.1)
    base = {"answer_bpb": [1.0], "field_loss": [1.0], "accuracy": [0.0], "acc_norm": [0.0], "chance": [0.25]}
    with pytest.raises(ValueError, match="two-level bootstrap"):
        ub.paired(a, a[:1], base)
    other = [dict(r, domain_scored=np.array([1.0, 0.0])) for r in a]
    with pytest.raises(ValueError, match="different evaluation sets"):
        ub.paired(a, other, base)

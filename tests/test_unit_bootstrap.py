"""The two-level bootstrap over seeds and evaluation units (study.unit_bootstrap): its point estimate is the
evaluation's own score (a second code path: evaluation.normalise), its spread the analytic two-stage variance."""

import math

import jax
import numpy as np
import pytest

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


def _linear_runs(S, n_items, D, E, seed):
    """Runs whose scores are linear in unit means: every item 1 byte, every window 10 tokens, one field per
    domain pair; per seed a shift (seed effect) plus unit noise."""
    rng = np.random.default_rng(seed)
    F = len(n_items)
    item_field = np.repeat(np.arange(F), n_items)
    domain_field = np.arange(D) % F
    runs = []
    for s in range(S):
        shift = rng.normal() * 0.05
        runs.append({"item_nll": 1.0 + shift + rng.exponential(0.3, item_field.size),
                     "item_bytes": np.ones(item_field.size), "item_correct": np.zeros(item_field.size),
                     "item_correct_norm": np.zeros(item_field.size), "item_field": item_field,
                     "window_nll": 10 * (2.0 + shift + rng.exponential(0.2, (D, E))),
                     "window_tokens": np.full((D, E), 10.0), "domain_field": domain_field,
                     "domain_scored": np.ones(D), "chance": np.full(F, 0.25)})
    return runs


@pytest.mark.parametrize("S, n_items, D, E", [(6, (20, 12), 4, 5), (3, (9,), 2, 3)])
def test_bootstrap_sd_is_the_two_stage_variance(S, n_items, D, E):
    a, b = _linear_runs(S, n_items, D, E, 1), _linear_runs(S, n_items, D, E, 2)
    F = len(n_items)
    base = {"answer_bpb": np.full(F, 1.5), "field_loss": np.full(F, 2.2), "accuracy": np.zeros(F),
            "acc_norm": np.zeros(F), "chance": np.full(F, 0.25)}
    cfg = EvalConfig()  # 0.5 bits per byte + 0.5 held-out loss, balanced mean
    c_item = cfg.bpb_weight / (F * math.log(2) * 1.5)  # d score / d mean item nll, per field
    c_win = cfg.loss_weight / (F * 2.2 * 10.0)  # d score / d window nll (10 tokens each), per pooled mean
    d_S, v_S = [], []
    for ra, rb in zip(a, b):
        di = rb["item_nll"] - ra["item_nll"]  # a - b of -c * nll: b's nll minus a's
        dw = rb["window_nll"] - ra["window_nll"]
        d, v = 0.0, 0.0
        for f in range(F):
            items = di[ra["item_field"] == f]
            doms = np.flatnonzero(ra["domain_field"] == f)
            d += c_item * items.mean() + c_win * dw[doms].mean()
            v += c_item**2 * items.var() / items.size
            v += c_win**2 * sum(dw[k].var() for k in doms) / (E * doms.size**2)
        d_S.append(d)
        v_S.append(v)
    d_S = np.array(d_S)
    sd = math.sqrt((np.mean((d_S - d_S.mean()) ** 2) + np.mean(v_S)) / S)
    B = 8000
    out = ub.paired(a, b, base, cfg, n_boot=B, seed=3)
    assert out["mean"] == pytest.approx(d_S.mean(), rel=1e-9)
    assert out["se"] == pytest.approx(sd, rel=4 / math.sqrt(2 * B))
    assert out["lo"] < out["mean"] < out["hi"]
    assert ub.paired(a, b, base, cfg, n_boot=B, seed=3) == out


def test_bootstrap_input_errors():
    a = _linear_runs(2, (4,), 2, 2, 0)
    base = {"answer_bpb": [1.0], "field_loss": [1.0], "accuracy": [0.0], "acc_norm": [0.0], "chance": [0.25]}
    with pytest.raises(ValueError, match="two-level bootstrap"):
        ub.paired(a, a[:1], base)

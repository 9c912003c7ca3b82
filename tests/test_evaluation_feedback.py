"""The evaluation's feedback vector, score weights, balanced score and its SE, and rewards (split from
test_evaluation.py, which checks the scorer, the normalised scores and the eval set against numpy)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.errors import DmaError
from dma_jax.evaluation import (
    EvalConfig, balanced_score, balanced_se, domain_loss_index, feedback_names, feedback_vector,
    field_score_index, field_score_se_index, rewards,
)


def test_feedback_layout():
    doms, fields = ["s/a", "m/b"], ["source", "math"]
    names = feedback_names(doms, fields)
    assert names == ["loss/s/a", "loss/m/b", *[f"{p}/{f}" for p in ("score", "score_se", "bpb_ratio", "loss_ratio",
                                                                     "acc_delta", "acc_norm_delta") for f in fields]]
    norm = {"domain_loss": jnp.array([1.5, 0.25]), "field_score": jnp.array([1.1, 0.9]),
            "field_score_se": jnp.array([0.01, 0.02]), "bpb_ratio": jnp.array([0.8, 1.2]),
            "field_loss_ratio": jnp.array([0.9, 1.1]), "accuracy_delta": jnp.array([0.2, -0.3]),
            "acc_norm_delta": jnp.array([0.1, 0.0])}
    vec = np.asarray(feedback_vector(norm))
    assert vec.shape == (len(names),) == (14,)
    np.testing.assert_allclose(vec[domain_loss_index(doms, fields)], [1.5, 0.25])
    np.testing.assert_allclose(vec[field_score_index(doms, fields)], [1.1, 0.9])
    np.testing.assert_allclose(vec[field_score_se_index(doms, fields)], [0.01, 0.02])


def test_eval_config_weights_sum_to_one():
    assert (EvalConfig().bpb_weight, EvalConfig().loss_weight, EvalConfig().acc_weight) == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="must sum to 1"):
        EvalConfig(acc_weight=0.5)


def test_balanced_se_is_the_delta_method():
    s, se = np.array([[0.9, 1.2], [1.0, 1.0]]), np.array([[0.03, 0.04], [0.01, 0.02]])
    np.testing.assert_allclose(balanced_se(s, se, "mean"), [0.025, math.sqrt(5e-4) / 2], rtol=1e-6)
    np.testing.assert_allclose(balanced_se(s, se, "min"), [0.03, 0.01], rtol=1e-6)
    # harmonic: numerical gradient of B
    eps, grad = 1e-4, []
    for f in range(2):
        up = s[0].copy()
        up[f] += eps
        grad.append((float(balanced_score(up, "harmonic")) - float(balanced_score(s[0], "harmonic"))) / eps)
    np.testing.assert_allclose(balanced_se(s[0], se[0], "harmonic"), math.sqrt(sum((g * e) ** 2 for g, e in zip(grad, se[0]))),
                               rtol=1e-3)


def test_balanced_score_and_rewards_telescope():
    s = jnp.array([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(balanced_score(s, "mean"), [3.5 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(balanced_score(s, "min"), [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(balanced_score(s, "harmonic"), [3 / 3.5, 1.0], rtol=1e-6)
    assert np.isfinite(float(balanced_score(jnp.array([0.0, 1.0]), "harmonic")))
    with pytest.raises(DmaError, match="how='max'"):
        balanced_score(s, "max")
    b = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    r = np.asarray(rewards(b))
    assert r.shape == (4, 5)
    np.testing.assert_allclose(r[:, 2], b[:, 3] - b[:, 2], rtol=1e-6)
    np.testing.assert_allclose(r.sum(axis=1), b[:, -1] - b[:, 0], rtol=1e-5, atol=1e-6)

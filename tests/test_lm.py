import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.config import ModelConfig
from dma_jax.models.lm import count_params, param_count_formula
from dma_jax.models.lm import LMDef
from tests.np_lm import forward as np_forward

CFGS = {
    "tied_mha": ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16),
    "untied_gqa": ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                              max_seq_len=16, tie_embeddings=False, rope_theta=500.0),
}


def _random_params(lm, seed):
    """Random weights of a larger scale than the init, so every part of the maths matters."""
    params = lm.init(seed)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    new = [rng.normal(1.0 if x.ndim == 1 else 0.0, 0.3, x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_forward_matches_numpy(name):
    cfg = CFGS[name]
    lm = LMDef.build(cfg)
    params = _random_params(lm, 1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 11))
    got = np.asarray(lm.apply(params, jnp.asarray(tokens)))
    want = np_forward(jax.tree.map(np.float64, params), cfg, tokens)
    assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, np.abs(want).max()), np.max(np.abs(got - want))


def test_forward_with_segments_matches_numpy():
    cfg = CFGS["untied_gqa"]
    lm = LMDef.build(cfg)
    params = _random_params(lm, 3)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    got = np.asarray(lm.apply(params, jnp.asarray(tokens), jnp.asarray(segments)))
    want = np_forward(jax.tree.map(np.float64, params), cfg, tokens, segments)
    assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, np.abs(want).max())


def test_causality_future_token_changes_no_earlier_logit():
    cfg = CFGS["untied_gqa"]
    lm = LMDef.build(cfg)
    params = _random_params(lm, 5)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 12))
    base = np.asarray(lm.apply(params, jnp.asarray(tokens)))
    for t in (3, 7, 11):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
        out = np.asarray(lm.apply(params, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-4  # the changed position itself does change


@pytest.mark.parametrize("name", sorted(CFGS))
def test_param_count_formula(name):
    cfg = CFGS[name]
    lm = LMDef.build(cfg)
    assert count_params(lm.init(0)) == param_count_formula(cfg)
    # Independent hand count for the tied MHA config: V*D + L*(2D + 4D^2 + 3*D*F) + D.
    if name == "tied_mha":
        assert param_count_formula(cfg) == 50 * 32 + 2 * (2 * 32 + 4 * 32 * 32 + 3 * 32 * 48) + 32


def test_bf16_compute_close_to_f32():
    cfg = CFGS["tied_mha"]
    lm32 = LMDef.build(cfg)
    lm16 = LMDef.build(cfg.model_copy(update={"compute_dtype": "bfloat16"}))
    params = lm32.init(0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)))
    a, b = lm32.apply(params, tokens), lm16.apply(params, tokens)
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05
    assert float(jnp.abs(a - b).max()) > 0.0  # really computed in bf16

"""`model.remat`: `jax.checkpoint` around each block changes no number, keeps what each policy says, and `dma plan`
estimates the activations per policy and names the least recomputing one that fits.

The per-policy estimate is checked against JAX's own list of the residuals the backward pass keeps
(`saved_residuals`, per layer: the difference between 3 and 2 layers) and an analytic count. XLA's compiled
memory analysis is no check here: on CPU its scheduler places the recomputation early, so the temporaries of a
train step are within 5% of each other under none, dots and full (measured: 28.7 / 27.4 / 27.4 MB, 6 layers).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

from dma_jax.config import ModelConfig, load_config
from dma_jax.models.lm import REMAT, LMDef
from dma_jax.perf import memory as plan_mod
from dma_jax.train import loss_fn
from tests.paths import DEMO

B, L = 2, 24
SEG_BxL = np.stack([np.repeat([1, 2, 0], [9, 11, 4]), np.repeat([3, 4], [5, 19])]).astype(np.int32)
MODEL = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=L)


def _batch():
    tok = np.random.default_rng(1).integers(0, MODEL.vocab_size, (B, L + 1))
    return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
            "mask": jnp.asarray(SEG_BxL != 0, jnp.float32), "segment_ids": jnp.asarray(SEG_BxL)}


def _loss_and_grads(cfg):
    lm = LMDef.build(cfg)
    params = lm.init(0)
    grad_fn = jax.value_and_grad(lambda p: loss_fn(p, lm, _batch())[0])
    policies = [e.params.get("policy") for e in jax.make_jaxpr(grad_fn)(params).eqns if "policy" in e.params]
    return jax.jit(grad_fn)(params), policies


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_no_number(remat):
    """Loss and every parameter gradient as without remat, and the jaxpr really holds one checkpoint of that
    policy per block. Not bitwise: XLA fuses the recomputed block differently (measured at the init: loss equal,
    gradients within 2.6e-7 of each leaf's largest; with random weights of std 0.3, 4e-6), hence 1e-6 of it."""
    (l_ref, g_ref), none_policies = _loss_and_grads(MODEL)
    (l_got, g_got), policies = _loss_and_grads(MODEL.model_copy(update={"remat": remat}))
    assert none_policies == [] and policies == [REMAT[remat]] * MODEL.n_layers
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        assert float(jnp.abs(a - b).max()) <= 1e-6 * float(jnp.abs(b).max())


def _kept_per_layer(cfg, seq_len=128) -> int:
    """Bytes JAX keeps for the backward pass per layer: residuals of 3 layers minus those of 2 (inputs excluded)."""
    batch = {k: jax.ShapeDtypeStruct((B, seq_len), dt) for k, dt in
             (("inputs", jnp.int32), ("targets", jnp.int32), ("mask", jnp.float32), ("segment_ids", jnp.int32))}

    def kept(n_layers):
        lm = LMDef.build(cfg.model_copy(update={"n_layers": n_layers, "max_seq_len": seq_len}))
        res = saved_residuals(lambda p, b: loss_fn(p, lm, b)[0], lm.abstract_params, batch)
        return sum(math.prod(a.shape) * a.dtype.itemsize for a, where in res if "argument" not in where)

    return kept(3) - kept(2)


@pytest.mark.parametrize("attention", ["xla", "splash"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_estimate_per_remat_policy(dtype, attention):
    """Per layer: under dots and full the plan's estimate is JAX's residual count exactly, and both are the
    analytic count (dots: block input, q/k/v and output projections, gate and up; full: the block input); without
    remat the estimate is below JAX's count (which lists elementwise temporaries XLA fuses away) but not far."""
    cfg = MODEL.model_copy(update={"compute_dtype": dtype, "attention": attention})
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff
    c, T = jnp.dtype(dtype).itemsize, B * 128
    analytic = {"dots": T * (D + (H + 2 * G) * K + D + 2 * F) * c, "full": T * D * c}
    backend = "tpu" if attention == "splash" else "cpu"  # the plan's kernel: splash is a flash kernel on TPU
    for remat in ("none", "dots", "full"):
        c3 = cfg.model_copy(update={"remat": remat, "n_layers": 3, "max_seq_len": 128})
        estimate = (plan_mod.activation_bytes(c3, B, 128, backend=backend)
                    - plan_mod.activation_bytes(c3.model_copy(update={"n_layers": 2}), B, 128, backend=backend))
        jax_kept = _kept_per_layer(c3)
        if remat == "none":
            assert 0.4 * jax_kept <= estimate <= jax_kept, (estimate, jax_kept)
        else:
            assert estimate == jax_kept == analytic[remat], (remat, estimate, jax_kept, analytic[remat])


def test_plan_names_the_least_recomputing_policy_that_fits():
    cfg = load_config(DEMO.parent / "paper-math.yaml", variant="tiny")
    t = plan_mod.target_plan(cfg, 8, 2**40)
    by = t["activations_by_remat"]
    assert by["none"] > by["dots"] > by["full"] and t["activations"] == by["none"] and t["remat_that_fits"] == "none"
    rest = t["total"] - t["activations"]
    between = math.ceil((rest + by["dots"]) / plan_mod.HEADROOM) + 1  # dots fits, none does not
    assert plan_mod.target_plan(cfg, 8, between)["remat_that_fits"] == "dots"
    assert plan_mod.target_plan(cfg, 8, int(rest / plan_mod.HEADROOM))["remat_that_fits"] is None
    full = cfg.model_copy(update={"target": cfg.target.model_copy(update={"remat": "full"})})
    assert plan_mod.target_plan(full, 8, between)["activations"] == by["full"]
    s = plan_mod.sweep_plan(cfg, 8, 2**40)
    assert s["activations"] == s["activations_by_remat"]["none"] and s["remat_that_fits"] == "none"
    text = plan_mod.format_memory_plan(full, plan_mod.memory_plan(full))
    assert "activ. GiB per remat policy" in text and "(target: full, proxy: none)" in text

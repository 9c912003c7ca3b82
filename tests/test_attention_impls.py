"""`model.attention`: each kernel against a float64 numpy attention and against the `xla` reference, forward and
gradients, with packed documents (several segments per row, a padding segment 0) and grouped-query heads; which
kernel `auto` means on each backend; the config's dump and the checkpoint check.

What runs on this CPU machine: `xla`; `cudnn` through its XLA fallback (`jax.nn.dot_product_attention` with
`implementation=None`: cuDNN's kernel itself needs a GPU, not tested here); `splash` through the Pallas TPU
splash-attention kernel in Pallas interpret mode (`interpret=True`), the kernel's own code and custom VJP.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.config import ModelConfig, dump_config, load_config
from dma_jax.errors import DmaError
from dma_jax.models import attention
from dma_jax.models.lm import LMDef
from dma_jax.train import check_model_meta, loss_fn
from tests.paths import DEMO

B, L, H, G, K = 2, 40, 4, 2, 8  # L not a multiple of 128: splash pads
# row 0: three documents then padding (segment 0); row 1: two documents
SEG_BxL = np.stack([np.repeat([1, 2, 3, 0], [10, 15, 8, 7]), np.repeat([4, 5], [31, 9])]).astype(np.int32)
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _np_attention(q, k, v, seg):
    """float64 causal attention within segments, from the definition (GQA: query head h reads kv head h // R)."""
    R, n = q.shape[2] // k.shape[2], q.shape[1]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        allowed = np.tril(np.ones((n, n), bool)) & (seg[b][:, None] == seg[b][None, :])
        for h in range(q.shape[2]):
            s = q[b, :, h] @ k[b, :, h // R].T / np.sqrt(q.shape[-1])
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // R]
    return out


def _qkv(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(0, 1.0, s), dtype) for s in ((B, L, H, K), (B, L, G, K), (B, L, G, K))]


def _run(impl, dtype):
    """(output, (dq, dk, dv) of a random cotangent) of `impl` on the fixed inputs, jitted."""
    q, k, v = _qkv(dtype)
    seg = jnp.asarray(SEG_BxL)
    mask = attention.causal_mask(seg, B, L)
    f = lambda q, k, v: attention.attend(impl, q, k, v, mask, seg)  # noqa: E731
    ct = jnp.asarray(np.random.default_rng(9).normal(0, 1.0, (B, L, H, K)), dtype)
    out, vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
    return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in jax.jit(vjp)(ct)]


@pytest.fixture(scope="module")
def reference():
    return {dt: _run("xla", dt) for dt in TOL}


def test_xla_reference_is_the_definition(reference):
    q, k, v = (np.asarray(x, np.float64) for x in _qkv("float32"))
    want = _np_attention(q, k, v, SEG_BxL)
    np.testing.assert_allclose(reference["float32"][0], want, atol=1e-5)
    # the documents matter: past the first document of a row, one document per row gives other outputs
    assert np.abs(_np_attention(q, k, v, np.ones_like(SEG_BxL)) - want)[:, 10:].min(axis=(1, 2)).max() > 1e-3


@pytest.mark.parametrize("dtype", sorted(TOL))
@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_kernel_matches_the_xla_reference(impl, dtype, reference):
    """Forward and gradients wrt q, k, v within 1e-5 (float32) / 2e-2 (bfloat16) of `xla`, relative to their
    scale; forward also against the float64 definition."""
    out, grads = _run(impl, dtype)
    ref_out, ref_grads = reference[dtype]
    tol = TOL[dtype]
    np.testing.assert_allclose(out, ref_out, atol=tol)
    for g, r in zip(grads, ref_grads):
        assert np.abs(g - r).max() <= tol * max(1.0, np.abs(r).max()), np.abs(g - r).max()
    if dtype == "float32":
        q, k, v = (np.asarray(x, np.float64) for x in _qkv("float32"))
        np.testing.assert_allclose(out, _np_attention(q, k, v, SEG_BxL), atol=1e-5)


MODEL = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=L,
                    tie_embeddings=False)


def _loss_and_grads(cfg):
    """(loss, parameter gradients) of the LM under `cfg` on fixed random weights and packed rows."""
    rng = np.random.default_rng(3)
    lm = LMDef.build(cfg)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(1.0 if x.ndim == 1 else 0.0, 0.3, x.shape), jnp.float32),
                          lm.init(0))
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, L + 1)))
    seg = jnp.asarray(SEG_BxL)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": (seg != 0).astype(jnp.float32), "segment_ids": seg}
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, lm, batch)[0]))(params)


@pytest.fixture(scope="module")
def model_reference():
    return _loss_and_grads(MODEL)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_model_loss_and_parameter_gradients_match_xla(impl, model_reference):
    """The whole LM (`model.attention=impl`) on packed rows: loss and every parameter's gradient as with `xla`."""
    l_ref, g_ref = model_reference
    l_got, g_got = _loss_and_grads(MODEL.model_copy(update={"attention": impl}))
    assert abs(float(l_got) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))


def test_auto_and_impossible_choices():
    bf16 = MODEL.model_copy(update={"compute_dtype": "bfloat16"})
    auto = lambda cfg, backend: attention.resolve(cfg.model_copy(update={"attention": "auto"}), backend)  # noqa: E731
    assert [auto(bf16, b) for b in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "xla"]
    assert auto(MODEL, "gpu") == "xla"  # cuDNN flash attention has no float32 kernel
    assert auto(bf16.model_copy(update={"d_model": 36, "n_heads": 3, "n_kv_heads": None}), "gpu") == "xla"  # K=12
    assert attention.resolve(MODEL.model_copy(update={"attention": "cudnn"}), "cpu") == "cudnn"  # XLA fallback
    with pytest.raises(DmaError, match="attention=cudnn: cuDNN flash attention takes bfloat16"):
        attention.resolve(MODEL.model_copy(update={"attention": "cudnn"}), "gpu")
    with pytest.raises(DmaError, match="attention=splash: a TPU"):
        attention.resolve(MODEL.model_copy(update={"attention": "splash"}), "gpu")


def test_execution_fields_in_the_config_and_checkpoint_check():
    """Defaults stay out of the dumped config (run folders and hashes of the default unchanged); set ones are
    dumped and load back; a checkpoint may be resumed with another dtype, kernel or remat, not another shape."""
    cfg = load_config(DEMO, ["target.attention=splash", "target.remat=dots"], variant="tiny")
    d = dump_config(cfg)
    assert "attention" not in d["proxy"] and "remat" not in d["proxy"] and d["proxy"]["compute_dtype"] == "float32"
    assert (d["target"]["attention"], d["target"]["remat"]) == ("splash", "dots")
    assert ModelConfig(**d["target"]) == cfg.target
    with pytest.raises(Exception, match="attention"):
        ModelConfig(attention="flash")
    saved = {"model": dump_config(load_config(DEMO, [], variant="tiny"))["target"]}
    check_model_meta(saved, d["target"] | {"compute_dtype": "bfloat16"}, "target", "ckpt")
    with pytest.raises(DmaError, match=r"differs in target\.d_model\)"):
        check_model_meta(saved, d["target"] | {"d_model": 8}, "target", "ckpt")

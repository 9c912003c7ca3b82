"""Decoder-only LM, LLaMA-style: RMSNorm, rotary embeddings, SwiGLU, optional GQA.

Parameters are float32 and carry logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`); `dma_jax.sharding` maps them to mesh axes. The
hot path is functional: `nnx.split` once, then `jax.jit` a pure function that
`nnx.merge`s (see `dma_jax.train`). `cfg.compute_dtype` is the matmuls' dtype (parameters are cast inside
each), `cfg.attention` picks the attention kernel (`dma_jax.models.attention`), `cfg.remat` what each block
keeps for the backward pass (`REMAT`). Shapes: B batch, L length, D d_model,
H heads, G kv heads, K head dim, F d_ff, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dma_jax.config import ModelConfig
from dma_jax.errors import DmaError
from dma_jax.models import attention

# What the backward pass keeps of each block (`ModelConfig.remat`; "none": everything, no `jax.checkpoint`):
# "dots" the outputs of the matmuls without batch dimensions (q/k/v/o projections, MLP gate and up; the
# attention matrices and elementwise ops are recomputed), "full" only the block's inputs.
REMAT = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
         "full": jax.checkpoint_policies.nothing_saveable}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    return nnx.Param(nnx.initializers.normal(std)(rngs.params(), shape, jnp.float32), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x32 = x_BxLxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...][None, None, :]).astype(x_BxLxD.dtype)


def rope_tables(positions_BxL: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, L, K] in the half-split layout of Hugging Face LLaMA."""
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BxLxK2 = positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq_K2[None, None, :]
    angles_BxLxK = jnp.concatenate([angles_BxLxK2, angles_BxLxK2], axis=-1)
    return jnp.cos(angles_BxLxK), jnp.sin(angles_BxLxK)


def apply_rope(x_BxLxHxK: jax.Array, cos_BxLxK: jax.Array, sin_BxLxK: jax.Array) -> jax.Array:
    half = x_BxLxHxK.shape[-1] // 2
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxLxK[:, :, None, :], sin_BxLxK[:, :, None, :]
    x32 = x_BxLxHxK.astype(jnp.float32)
    return (x32 * cos + rotated.astype(jnp.float32) * sin).astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        std = cfg.init_std
        self.wq_DxHxK = _param(rngs, (D, H, K), ("embed", "heads", "head_dim"), std)
        self.wk_DxGxK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std)
        self.wv_DxGxK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std)
        self.wo_HxKxD = _param(rngs, (H, K, D), ("heads", "head_dim", "embed"), std / (2 * cfg.n_layers) ** 0.5)
        self.cfg = cfg

    def __call__(self, x_BxLxD, cos_BxLxK, sin_BxLxK, mask_BxLxL, segment_ids_BxL):
        dt = x_BxLxD.dtype
        q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq_DxHxK[...].astype(dt))
        k_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wk_DxGxK[...].astype(dt))
        v_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wv_DxGxK[...].astype(dt))
        q_BxLxHxK = apply_rope(q_BxLxHxK, cos_BxLxK, sin_BxLxK)
        k_BxLxGxK = apply_rope(k_BxLxGxK, cos_BxLxK, sin_BxLxK)
        out_BxLxHxK = attention.attend(attention.resolve(self.cfg), q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL,
                                       segment_ids_BxL)
        return jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo_HxKxD[...].astype(dt))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.w_gate_DxF = _param(rngs, (D, F), ("embed", "mlp"), std)
        self.w_up_DxF = _param(rngs, (D, F), ("embed", "mlp"), std)
        self.w_down_FxD = _param(rngs, (F, D), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x_BxLxD):
        dt = x_BxLxD.dtype
        gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate_DxF[...].astype(dt))
        up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up_DxF[...].astype(dt))
        return jnp.einsum("blf,fd->bld", jax.nn.silu(gate_BxLxF) * up_BxLxF, self.w_down_FxD[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_BxLxD, cos_BxLxK, sin_BxLxK, mask_BxLxL, segment_ids_BxL):
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), cos_BxLxK, sin_BxLxK, mask_BxLxL, segment_ids_BxL)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class LM(nnx.Module):
    """`LM(cfg, rngs)(tokens_BxL, segment_ids_BxL=None, positions_BxL=None, mask_BxLxL=None) -> logits_BxLxV`
    (float32).

    `segment_ids_BxL` (optional) marks packed documents: a token attends only to
    earlier tokens of its own segment, and positions restart at each segment.
    `positions_BxL` / `mask_BxLxL` (optional) replace the positions / the attention pattern those give: each
    token's rotary position, and whether query i may attend key j (bool; e.g. the shared-context rows of
    `dma_jax.eval_set`). An explicit mask needs the `xla` attention kernel.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_VxD = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head_DxV = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
                 positions_BxL: jax.Array | None = None, mask_BxLxL: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        chex.assert_rank(tokens_BxL, 2)
        B, L = tokens_BxL.shape
        dt = jnp.dtype(cfg.compute_dtype)
        impl = attention.resolve(cfg)
        if positions_BxL is not None:
            chex.assert_equal_shape([tokens_BxL, positions_BxL])
        elif segment_ids_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
        else:
            chex.assert_equal_shape([tokens_BxL, segment_ids_BxL])
            positions_BxL = segment_positions(segment_ids_BxL)
        if mask_BxLxL is not None:
            if impl != "xla":
                raise DmaError(f"model attention={cfg.attention} ({impl}): an explicit attention mask needs "
                               "attention=xla")
            chex.assert_shape(mask_BxLxL, (B, L, L))
        elif impl == "xla":  # the `xla` kernel reads a [B, L, L] mask (built once for all layers), others the ids
            mask_BxLxL = attention.causal_mask(segment_ids_BxL, B, L)
        cos_BxLxK, sin_BxLxK = rope_tables(positions_BxL, cfg.head_dim, cfg.rope_theta)
        x_BxLxD = jnp.take(self.embed_VxD[...], tokens_BxL, axis=0).astype(dt)
        block_fn = Block.__call__ if cfg.remat == "none" else nnx.remat(Block.__call__, policy=REMAT[cfg.remat])
        for block in self.blocks:
            x_BxLxD = block_fn(block, x_BxLxD, cos_BxLxK, sin_BxLxK, mask_BxLxL, segment_ids_BxL)
        x_BxLxD = self.final_norm(x_BxLxD)
        head_DxV = self.embed_VxD[...].T if cfg.tie_embeddings else self.lm_head_DxV[...]
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dt))
        return logits_BxLxV.astype(jnp.float32)


def segment_positions(segment_ids_BxL: jax.Array) -> jax.Array:
    """Position of each token within its segment (segments are contiguous runs)."""
    L = segment_ids_BxL.shape[1]
    idx_BxL = jnp.broadcast_to(jnp.arange(L), segment_ids_BxL.shape)
    starts_BxL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxL[:, :1], bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1
    )
    start_idx_BxL = jax.lax.cummax(jnp.where(starts_BxL, idx_BxL, 0), axis=1)
    return idx_BxL - start_idx_BxL


def param_count_formula(cfg: ModelConfig) -> int:
    """Closed-form parameter count (tests compare it with the built model)."""
    D, F, V, H, G, K = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    per_block = 2 * D + D * H * K + 2 * D * G * K + H * K * D + 3 * D * F
    head = 0 if cfg.tie_embeddings else D * V
    return V * D + cfg.n_layers * per_block + D + head


def count_params(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(x.size for x in jax.tree.leaves(state)))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3x the forward matmuls (output head and attention included)."""
    D, F, V, H, G, K = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    matmul_params = cfg.n_layers * (D * H * K + 2 * D * G * K + H * K * D + 3 * D * F) + D * V
    attention = cfg.n_layers * 2 * seq_len * H * K  # QK^T and PV, full (non-causal) count
    return 3.0 * 2.0 * (matmul_params + attention)


Params = dict  # pure nested dict of arrays (nnx.to_pure_dict of the LM's Params)


@dataclasses.dataclass(frozen=True)
class LMDef:
    """Everything static about an LM: its graph, parameter shapes and logical axes."""

    cfg: ModelConfig
    graphdef: Any
    abstract_params: Params
    logical_axes: Params

    @classmethod
    def build(cls, cfg: ModelConfig) -> LMDef:
        abstract = nnx.eval_shape(lambda: LM(cfg, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract, nnx.Param)
        axes = jax.tree.map(
            lambda v: v.get_metadata().get("logical_axes"), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        return cls(cfg, graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes))

    def init(self, seed: int) -> Params:
        graphdef, state = nnx.split(LM(self.cfg, nnx.Rngs(seed)), nnx.Param)
        del graphdef
        return nnx.to_pure_dict(state)

    def apply(self, params: Params, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
              positions_BxL: jax.Array | None = None, mask_BxLxL: jax.Array | None = None) -> jax.Array:
        """Logits [B, L, V] of `params` (`LM.__call__`'s arguments)."""
        return nnx.merge(self.graphdef, params)(tokens_BxL, segment_ids_BxL, positions_BxL, mask_BxLxL)

"""The LM's attention kernels, one per `ModelConfig.attention`. All compute the same thing: causal
softmax(q k^T / sqrt(K)) v within each document (segment) of a packed row, with grouped-query heads;
they differ in what they materialise and where they run.

- `xla`: einsums over the full L x L float32 logits under a boolean mask (the reference; any backend).
- `cudnn`: `jax.nn.dot_product_attention`, cuDNN's fused flash attention on GPU (bfloat16/float16
  only); on other backends the same call with JAX's XLA implementation. Documents enter as a boolean
  [B, 1, L, L] mask next to `is_causal` (the public API has no segment ids).
- `splash`: the Pallas splash-attention kernel (TPU), segment ids inside the kernel, so neither logits
  nor a mask are materialised; on CPU it runs in Pallas interpret mode (slow: for tests). Rows are
  padded to a multiple of 128 (the kernel's block) with a segment of their own.
- `auto`: cudnn on GPU with a bfloat16 compute dtype and a head dim the kernel takes, splash on TPU,
  xla otherwise.

Shapes: B batch, L length, H query heads, G kv heads, R = H / G query heads per kv head, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dma_jax.config import ModelConfig
from dma_jax.errors import DmaError

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # the splash kernel's smallest block (TPU lanes): rows are padded to a multiple of it


def _cudnn_takes(cfg: ModelConfig) -> str | None:
    """Why cuDNN flash attention cannot run this model on GPU (None if it can)."""
    if cfg.compute_dtype != "bfloat16":
        return f"cuDNN flash attention takes bfloat16 on GPU, compute_dtype is {cfg.compute_dtype}"
    if cfg.head_dim % 8 or cfg.head_dim > 128:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and <= 128, got {cfg.head_dim}"
    return None


def resolve(cfg: ModelConfig, backend: str | None = None) -> str:
    """The implementation `cfg.attention` means on `backend` (default: JAX's); a DmaError if it cannot run."""
    backend = backend or jax.default_backend()
    name = cfg.attention
    if name == "auto":
        if backend == "gpu" and _cudnn_takes(cfg) is None:
            return "cudnn"
        return "splash" if backend == "tpu" else "xla"
    if name == "cudnn" and backend == "gpu" and (why := _cudnn_takes(cfg)):
        raise DmaError(f"model attention=cudnn: {why} (use attention=xla or compute_dtype=bfloat16)")
    if name == "splash" and backend not in ("tpu", "cpu"):
        raise DmaError(f"model attention=splash: a TPU (Pallas Mosaic) kernel, not for backend {backend}")
    return name


def causal_mask(segment_ids_BxL: jax.Array | None, B: int, L: int) -> jax.Array:
    """[B, L, L] bool: query i may attend to key j (j <= i, same segment). The `xla` kernel's input."""
    causal_LxL = jnp.tril(jnp.ones((L, L), dtype=bool))
    if segment_ids_BxL is None:
        return jnp.broadcast_to(causal_LxL, (B, L, L))
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_LxL[None] & same_BxLxL


def xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL):
    dt = q_BxLxHxK.dtype
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    R = H // G  # query heads per kv head
    # Layout [B, G, R*L, K] x [B, G, M, K]: one batched matmul per (batch, kv head), fast on every backend.
    q_BxGxNxK = q_BxLxHxK.reshape(B, L, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * L, K)
    k_BxGxMxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_BxGxMxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    logits_BxGxNxM = jnp.einsum("bgnk,bgmk->bgnm", q_BxGxNxK, k_BxGxMxK).astype(jnp.float32)
    logits_BxGxRxLxM = logits_BxGxNxM.reshape(B, G, R, L, L) / jnp.sqrt(jnp.float32(K))
    logits_BxGxRxLxM = jnp.where(mask_BxLxL[:, None, None], logits_BxGxRxLxM, jnp.finfo(jnp.float32).min)
    probs_BxGxNxM = jax.nn.softmax(logits_BxGxRxLxM, axis=-1).astype(dt).reshape(B, G, R * L, L)
    out_BxGxNxK = jnp.einsum("bgnm,bgmk->bgnk", probs_BxGxNxM, v_BxGxMxK)
    return out_BxGxNxK.reshape(B, G, R, L, K).transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, on_gpu: bool):
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        mask_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_Bx1xLxL, is_causal=True,
                                        implementation="cudnn" if on_gpu else None)


@functools.lru_cache(maxsize=16)
def _splash_kernel(R: int, L: int, interpret: bool):
    """The multi-query splash kernel of R query heads over one kv head, rows of L (a multiple of 128)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = next(b for b in (512, 256, SPLASH_BLOCK) if L % b == 0)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((L, L)) for _ in range(R)])
    with jax.ensure_compile_time_eval():  # its mask tables are constants, cached across traces: never tracers
        kernel = sa.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return lambda q_RxLxK, k_LxK, v_LxK, seg_L: kernel(q_RxLxK, k_LxK, v_LxK, segment_ids=sa.SegmentIds(seg_L, seg_L))


def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret: bool):
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    R = H // G
    P = -L % SPLASH_BLOCK  # padding: its own segment (-1), which no real token attends to
    seg_BxL = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    seg_BxLp = jnp.pad(seg_BxL, ((0, 0), (0, P)), constant_values=-1)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, P), (0, 0), (0, 0)))  # noqa: E731
    q_BxLpxHxK = pad(q_BxLxHxK * jnp.asarray(K ** -0.5, q_BxLxHxK.dtype))
    q_BxGxRxLpxK = q_BxLpxHxK.reshape(B, L + P, G, R, K).transpose(0, 2, 3, 1, 4)
    k_BxGxLpxK, v_BxGxLpxK = (pad(x).transpose(0, 2, 1, 3) for x in (k_BxLxGxK, v_BxLxGxK))
    kernel = _splash_kernel(R, L + P, interpret)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out_BxGxRxLpxK = jax.vmap(per_kv_head)(q_BxGxRxLpxK, k_BxGxLpxK, v_BxGxLpxK, seg_BxLp)
    return out_BxGxRxLpxK.transpose(0, 3, 1, 2, 4).reshape(B, L + P, H, K)[:, :L]


def attend(impl: str, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL, segment_ids_BxL):
    """Attention output [B, L, H, K] by `impl` (a `resolve`d name): `xla` reads `mask_BxLxL` (`causal_mask`, or
    any explicit pattern: `LM`'s `mask_BxLxL`), the others `segment_ids_BxL` (None: one document per row)."""
    if impl == "xla":
        return xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL)
    backend = jax.default_backend()
    if impl == "cudnn":
        return cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, on_gpu=backend == "gpu")
    return splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret=backend != "tpu")

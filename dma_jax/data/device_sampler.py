"""On-device batch sampler for the proxy sweep.

All domains' training tokens sit in one int32 device array; each trajectory
draws, per row, a domain id from its current mixture and a uniform window from
that domain's pool, inside jit. The sweep vmaps this over the trajectory axis
(sharded over the "traj" mesh axis), so no proxy ever waits on the host.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.errors import DmaError

_INT32_MAX = np.iinfo(np.int32).max


class TokenPools(NamedTuple):
    """Per-domain token pools, concatenated; a pytree that lives on device.

    Domain d's pool is `tokens_T[starts_D[d] : starts_D[d] + lengths_D[d]]`.
    """

    tokens_T: jax.Array
    starts_D: jax.Array
    lengths_D: jax.Array


def make_pools(per_domain_tokens: Sequence[np.ndarray], seq_len: int) -> TokenPools:
    """Concatenate per-domain 1-D token arrays into `TokenPools`.

    Every domain must hold at least `seq_len + 1` tokens (one input window plus
    its shifted target), since `sample_batch` cannot raise inside jit.
    """
    if seq_len < 1:
        raise DmaError(f"device_sampler: seq_len={seq_len} must be >= 1")
    if len(per_domain_tokens) == 0:
        raise DmaError("device_sampler: per_domain_tokens is empty; need at least one domain")
    pools = []
    for d, tokens in enumerate(per_domain_tokens):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DmaError(
                f"device_sampler: domain {d} tokens must be a 1-D integer array, "
                f"got shape {tokens.shape} dtype {tokens.dtype}"
            )
        if tokens.size < seq_len + 1:
            raise DmaError(
                f"device_sampler: domain {d} has {tokens.size} tokens, "
                f"fewer than seq_len+1={seq_len + 1}"
            )
        if tokens.min() < 0 or tokens.max() > _INT32_MAX:
            raise DmaError(f"device_sampler: domain {d} has token ids outside [0, 2**31)")
        pools.append(tokens.astype(np.int32))
    lengths_D = np.array([p.size for p in pools], dtype=np.int64)
    if lengths_D.sum() > _INT32_MAX:
        raise DmaError(
            f"device_sampler: {lengths_D.sum()} tokens in total exceed the int32 index range"
        )
    starts_D = np.concatenate([[0], np.cumsum(lengths_D)[:-1]])
    return TokenPools(
        tokens_T=jnp.asarray(np.concatenate(pools)),
        starts_D=jnp.asarray(starts_D, dtype=jnp.int32),
        lengths_D=jnp.asarray(lengths_D, dtype=jnp.int32),
    )


def sample_batch(
    pools: TokenPools, weights_D: jax.Array, key: jax.Array, batch_size: int, seq_len: int
) -> tuple[jax.Array, jax.Array]:
    """Draw `batch_size` windows of `seq_len + 1` tokens from a mixture.

    Row b takes domain `domain_B[b] ~ Categorical(weights_D)` (weights need not
    be normalised; zero-weight domains are never drawn; weights must be >= 0
    with a positive sum) and a uniform start in [0, length_d - (seq_len + 1)].
    Returns (tokens_BxL1 int32 [B, L+1], domain_B int32 [B]).
    """
    key_domain, key_start = jax.random.split(key)
    logits_D = jnp.where(weights_D > 0, jnp.log(weights_D), -jnp.inf)
    domain_B = jax.random.categorical(key_domain, logits_D, shape=(batch_size,)).astype(jnp.int32)
    last_start_B = pools.lengths_D[domain_B] - (seq_len + 1)
    offset_B = jax.random.randint(key_start, (batch_size,), 0, last_start_B + 1, dtype=jnp.int32)
    start_B = pools.starts_D[domain_B] + offset_B
    index_BxL1 = start_B[:, None] + jnp.arange(seq_len + 1, dtype=jnp.int32)[None, :]
    return pools.tokens_T[index_BxL1], domain_B


def sample_batches(
    pools: TokenPools, weights_NxD: jax.Array, keys_N: jax.Array, batch_size: int, seq_len: int
) -> tuple[jax.Array, jax.Array]:
    """`sample_batch` vmapped over N trajectories: ([N, B, L+1], [N, B]).

    Pools are shared (replicated); weights and keys carry the trajectory axis.
    """
    return jax.vmap(sample_batch, in_axes=(None, 0, 0, None, None))(
        pools, weights_NxD, keys_N, batch_size, seq_len
    )

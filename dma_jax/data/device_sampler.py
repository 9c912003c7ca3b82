"""On-device batches for the proxy sweep, drawn by the CPT mixer's rule (`data.mixer`) inside jit.

Pools. Each domain's first packed records (`tokens`, `segment_ids` [R, record_len],
at most `sweep.pool_tokens_per_domain` tokens) are cut into windows of
`seq_len + 1` tokens with stride `seq_len` (record positions k*seq_len ..
k*seq_len + seq_len, k < (record_len - 1) // seq_len; a window whose targets
are all padding is dropped), so the proxy predicts each record position once.
A window keeps its segment ids: attention stays within a document and padding
(segment 0) targets are masked, as `train.host_batch` does for CPT. The windows
of all domains are stacked into one replicated device array; domain d's windows
are rows starts_D[d] .. starts_D[d] + sizes_D[d] - 1, in a fixed shuffle (seed).

Counts. Per batch, exactly as `DomainMixer._counts`: counts_D = largest-remainder
rounding of weight * B plus the fraction each domain was still owed after the
previous batch (ties to the lower domain index; a zero weight gets nothing and
its carry resets). The carry lives in the `lax.scan` over a stage's steps and
starts at 0 at each re-weighting step.

Order. Domain d is read as an infinite stream: element k lies in epoch
e = k // R_d at position i = k % R_d and names window (a * i + b) mod R_d, with
a (coprime to R_d) and b drawn from (proxy key, d, e): a per-proxy order with no
window repeated within an epoch. Each stage owns the stream elements
[stage * S * B, (stage + 1) * S * B) of every domain (the ones it does not use
are skipped), so no state crosses stages. The rows of a batch (domain blocks in
domain order) are then permuted with the step's key. Keys depend only on
(seed, trajectory id, stage, step): chunking and the device count change no number.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.errors import DmaError

_INT32_MAX = np.iinfo(np.int32).max
_MAX_WINDOWS = 2**30  # (a * i) mod R is computed by doubling in int32: R must stay below 2**30
_SHUFFLE_TAG = 2


class RecordPools(NamedTuple):
    """Every domain's windows of packed records, stacked; a pytree that lives on device (module doc)."""

    tokens_WxL1: jax.Array  # int32 [W, seq_len + 1]
    segment_ids_WxL1: jax.Array  # int32 [W, seq_len + 1]; 0 = padding
    starts_D: jax.Array  # int32 [D]: first row of each domain
    sizes_D: jax.Array  # int32 [D]: R_d, windows of each domain
    units_DxU: jax.Array  # int32 [D, U]: multipliers coprime to R_d (padded with 1)
    num_units_D: jax.Array  # int32 [D]


class Cursor(NamedTuple):
    """What a proxy's sampler carries from one batch to the next within a stage."""

    carry_D: jax.Array  # float32 [D]: rows each domain is still owed (the mixer's carry)
    next_D: jax.Array  # int32 [D]: the next stream element of each domain


def pool_records(records, max_tokens: int) -> dict[str, np.ndarray]:
    """The first records of a domain (a `PackedRecords`, or any sequence of {"tokens", "segment_ids"}), as many as
    hold `max_tokens` tokens (at least one): {"tokens", "segment_ids"} int32 [R, record_len]."""
    if len(records) == 0:
        raise DmaError("device_sampler: a domain has no records")
    record_len = len(records[0]["tokens"])
    n = min(len(records), max(1, int(max_tokens) // record_len))
    rows = records.__getitems__(list(range(n))) if hasattr(records, "__getitems__") else records[:n]
    return {key: np.stack([np.asarray(r[key], np.int32) for r in rows]) for key in ("tokens", "segment_ids")}


def cut_windows(tokens_RxL: np.ndarray, segment_ids_RxL: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `seq_len + 1` tokens, stride `seq_len`, record by record; windows with no target dropped."""
    record_len = tokens_RxL.shape[1]
    k = (record_len - 1) // seq_len
    starts_K = np.arange(k) * seq_len
    index_KxL1 = starts_K[:, None] + np.arange(seq_len + 1)[None, :]
    tok_WxL1 = tokens_RxL[:, index_KxL1].reshape(-1, seq_len + 1)
    seg_WxL1 = segment_ids_RxL[:, index_KxL1].reshape(-1, seq_len + 1)
    keep_W = (seg_WxL1[:, 1:] != 0).any(axis=1)
    return tok_WxL1[keep_W], seg_WxL1[keep_W]


def make_pools(per_domain_records: Sequence[dict], seq_len: int, seed: int) -> RecordPools:
    """`RecordPools` from each domain's packed records {"tokens", "segment_ids"} [R, record_len] (module doc).

    Records must hold at least `seq_len + 1` tokens and every domain at least one window, since the sampler
    cannot raise inside jit.
    """
    if seq_len < 1:
        raise DmaError(f"device_sampler: seq_len={seq_len} must be >= 1")
    if len(per_domain_records) == 0:
        raise DmaError("device_sampler: per_domain_records is empty; need at least one domain")
    tokens, segments = [], []
    for d, recs in enumerate(per_domain_records):
        tok, seg = np.asarray(recs["tokens"]), np.asarray(recs["segment_ids"])
        if tok.ndim != 2 or tok.shape != seg.shape or not all(np.issubdtype(a.dtype, np.integer) for a in (tok, seg)):
            raise DmaError(f"device_sampler: domain {d}: tokens {tok.shape} {tok.dtype} and segment_ids "
                           f"{seg.shape} {seg.dtype} must be integer arrays of one shape [R, record_len]")
        if tok.shape[1] < seq_len + 1:
            raise DmaError(f"device_sampler: domain {d}: records of {tok.shape[1]} tokens are shorter than "
                           f"seq_len+1={seq_len + 1}")
        if tok.size and (tok.min() < 0 or tok.max() > _INT32_MAX or seg.min() < 0 or seg.max() > _INT32_MAX):
            raise DmaError(f"device_sampler: domain {d} has token or segment ids outside [0, 2**31)")
        tok_WxL1, seg_WxL1 = cut_windows(tok.astype(np.int32), seg.astype(np.int32), seq_len)
        if len(tok_WxL1) == 0:
            raise DmaError(f"device_sampler: domain {d} has no window of seq_len+1={seq_len + 1} tokens "
                           "with a target that is not padding")
        order_W = np.random.default_rng([seed, _SHUFFLE_TAG, d]).permutation(len(tok_WxL1))
        tokens.append(tok_WxL1[order_W])
        segments.append(seg_WxL1[order_W])
    sizes_D = np.array([len(t) for t in tokens], np.int64)
    if sizes_D.sum() >= _MAX_WINDOWS:
        raise DmaError(f"device_sampler: {sizes_D.sum()} windows in all exceed {_MAX_WINDOWS}; "
                       "lower sweep.pool_tokens_per_domain")
    units = [np.flatnonzero(np.gcd(np.arange(r), r) == 1) for r in sizes_D]  # r == 1: [0]
    units_DxU = np.ones((len(units), max(len(u) for u in units)), np.int32)
    for d, u in enumerate(units):
        units_DxU[d, :len(u)] = u
    return RecordPools(
        tokens_WxL1=jnp.asarray(np.concatenate(tokens)),
        segment_ids_WxL1=jnp.asarray(np.concatenate(segments)),
        starts_D=jnp.asarray(np.concatenate([[0], np.cumsum(sizes_D)[:-1]]), jnp.int32),
        sizes_D=jnp.asarray(sizes_D, jnp.int32),
        units_DxU=jnp.asarray(units_DxU),
        num_units_D=jnp.asarray([len(u) for u in units], jnp.int32),
    )


# ------------------------------------------------------------------------------ inside jit


def largest_remainder(shares_D: jax.Array, total: int) -> jax.Array:
    """Integer counts [D] summing to `total`, closest to `shares_D * total` (shares >= 0, sum 1): floor every
    quota, then one more to the largest fractional parts, ties to the lower index; a zero share gets nothing."""
    quotas_D = shares_D * total
    floor_D = jnp.floor(quotas_D)
    remaining = jnp.clip(total - floor_D.sum(), 0, shares_D.shape[0]).astype(jnp.int32)
    frac_D = jnp.where(shares_D > 0, quotas_D - floor_D, -1.0)
    order_D = jnp.argsort(-frac_D, stable=True)
    rank_D = jnp.zeros_like(order_D).at[order_D].set(jnp.arange(order_D.shape[0], dtype=order_D.dtype))
    return floor_D.astype(jnp.int32) + (rank_D < remaining).astype(jnp.int32)


def mixture_counts(weights_D: jax.Array, carry_D: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """This batch's counts [D] and the new carry: `DomainMixer._counts` in jnp (module doc)."""
    active_D = weights_D > 0
    owed_D = jnp.where(active_D, weights_D * batch_size + carry_D, 0.0)
    quota_D = jnp.maximum(owed_D, 0.0)
    quota_D = jnp.where(quota_D.sum() > 0, quota_D, weights_D)  # only if the carries summed to -B
    counts_D = largest_remainder(quota_D / quota_D.sum(), batch_size)
    return counts_D, jnp.where(active_D, owed_D - counts_D, 0.0)


def stage_cursor(num_domains: int, stage: jax.Array, steps: int, batch_size: int) -> Cursor:
    """The cursor at the start of a stage: no carry; each domain at the first stream element the stage owns."""
    first = jnp.asarray(stage, jnp.int32) * (steps * batch_size)
    return Cursor(jnp.zeros(num_domains, jnp.float32), jnp.full(num_domains, first, jnp.int32))


def stage_keys(proxy_key: jax.Array, stage: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order key, stage key) of a proxy: the order key spans stages (epochs); step s uses fold_in(stage key, s)."""
    order_key, stages_key = jax.random.split(proxy_key)
    return order_key, jax.random.fold_in(stages_key, stage)


def _mulmod(a_B: jax.Array, x_B: jax.Array, m_B: jax.Array) -> jax.Array:
    """(a * x) mod m in int32 for 0 <= a, x < m < 2**30, by doubling over the bits of x."""
    r_B = jnp.zeros_like(a_B)
    for bit in range(30, -1, -1):
        r_B = (2 * r_B) % m_B
        r_B = jnp.where((x_B >> bit) & 1, (r_B + a_B) % m_B, r_B)
    return r_B


def _windows(pools: RecordPools, order_key: jax.Array, domain_B: jax.Array, element_B: jax.Array) -> jax.Array:
    """Pool rows of stream elements `element_B` of domains `domain_B` (the per-proxy affine order, module doc)."""
    size_B = pools.sizes_D[domain_B]
    epoch_B, pos_B = element_B // size_B, element_B % size_B

    def affine(d, e):
        key_a, key_b = jax.random.split(jax.random.fold_in(jax.random.fold_in(order_key, d), e))
        a = pools.units_DxU[d, jax.random.randint(key_a, (), 0, pools.num_units_D[d])]
        return a, jax.random.randint(key_b, (), 0, pools.sizes_D[d])

    a_B, b_B = jax.vmap(affine)(domain_B, epoch_B)
    return pools.starts_D[domain_B] + (_mulmod(a_B, pos_B, size_B) + b_B) % size_B


def draw_batch(pools: RecordPools, weights_D: jax.Array, cursor: Cursor, order_key: jax.Array,
               step_key: jax.Array, batch_size: int) -> tuple[dict[str, jax.Array], Cursor]:
    """One batch of a proxy: ({"tokens", "segment_ids" [B, L+1], "domain", "window" [B]}, the next cursor).

    Weights must be >= 0 with a positive sum (normalised here, as the mixer does).
    """
    counts_D, carry_D = mixture_counts(weights_D, cursor.carry_D, batch_size)
    ends_D = jnp.cumsum(counts_D)
    row_B = jnp.arange(batch_size, dtype=jnp.int32)
    domain_B = jnp.searchsorted(ends_D, row_B, side="right").astype(jnp.int32)
    element_B = cursor.next_D[domain_B] + row_B - (ends_D - counts_D)[domain_B]
    window_B = _windows(pools, order_key, domain_B, element_B)
    perm_B = jax.random.permutation(step_key, batch_size)
    window_B, domain_B = window_B[perm_B], domain_B[perm_B]
    rows = {"tokens": pools.tokens_WxL1[window_B], "segment_ids": pools.segment_ids_WxL1[window_B],
            "domain": domain_B, "window": window_B}
    return rows, Cursor(carry_D, cursor.next_D + counts_D)


def draw_stage(pools: RecordPools, weights_D: jax.Array, proxy_key: jax.Array, stage: jax.Array, steps: int,
               batch_size: int) -> dict[str, jax.Array]:
    """The S batches of one proxy's stage, as the sweep draws them: each field with a leading [S] axis."""
    order_key, stage_key = stage_keys(proxy_key, stage)

    def body(cursor, s):
        rows, cursor = draw_batch(pools, weights_D, cursor, order_key, jax.random.fold_in(stage_key, s), batch_size)
        return cursor, rows

    start = stage_cursor(pools.sizes_D.shape[0], stage, steps, batch_size)
    return jax.lax.scan(body, start, jnp.arange(steps))[1]


def train_batch(rows: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Next-token batch from drawn windows, as `train.host_batch` builds it from packed records: padding
    (segment 0) targets are masked; input segment ids keep attention within a document."""
    tokens_BxL1, seg_BxL1 = rows["tokens"], rows["segment_ids"]
    return {"inputs": tokens_BxL1[:, :-1], "targets": tokens_BxL1[:, 1:],
            "mask": (seg_BxL1[:, 1:] != 0).astype(jnp.float32), "segment_ids": seg_BxL1[:, :-1]}

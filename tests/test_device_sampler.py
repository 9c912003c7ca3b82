"""The sweep's on-device sampler follows the CPT mixer's rule.

Checked against independent computations: per-batch counts against a numpy re-implementation of
largest-remainder-with-carry and against the counts the CPT mixer (`DomainMixer`) realises; drawn rows
against windows the test cuts from the records itself; masks against `train.host_batch`; tokens encode
(domain, document, position), so a row that crossed documents or domains would show.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dma_jax.data import device_sampler as ds
from dma_jax.data.mixer import DomainMixer
from dma_jax.data.packing import pack_documents
from dma_jax.errors import DmaError
from dma_jax.sweep import proxy_keys
from dma_jax.train import host_batch

RECORD_LEN, SEQ_LEN, EOS = 9, 4, 1  # two windows per record: positions 0..4 and 4..8
DOCS_PER_DOMAIN = [3, 30, 25, 12, 20]
CODE_DOMAIN, CODE_DOC = 100_000, 1_000  # token = 2 + d * CODE_DOMAIN + doc * CODE_DOC + position


def _records(d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(d)
    docs = [2 + d * CODE_DOMAIN + i * CODE_DOC + np.arange(rng.integers(1, 14)) for i in range(DOCS_PER_DOMAIN[d])]
    recs = list(pack_documents(docs, RECORD_LEN, EOS))
    return {k: np.stack([r[k] for r in recs]) for k in ("tokens", "segment_ids")}


RECORDS = [_records(d) for d in range(len(DOCS_PER_DOMAIN))]
POOLS = ds.make_pools(RECORDS, SEQ_LEN, seed=0)


def _reference_counts(weights_D: np.ndarray, steps: int, batch_size: int) -> np.ndarray:
    """[S, D]: the mixer's rule, written out in float64: floor of (w * B + carry) renormalised to B, the remaining
    rows to the largest fractional parts (lower index first on ties), carry = owed - counts, 0 for zero weights."""
    w = np.asarray(weights_D, np.float64)
    carry, out = np.zeros(len(w)), []
    for _ in range(steps):
        owed = np.where(w > 0, w * batch_size + carry, 0.0)
        quota = np.maximum(owed, 0.0)
        quota = quota / quota.sum() * batch_size
        counts = np.floor(quota).astype(int)
        for d in sorted(range(len(w)), key=lambda d: (-(quota[d] - counts[d]), d))[:batch_size - counts.sum()]:
            counts[d] += 1
        carry = np.where(w > 0, owed - counts, 0.0)
        out.append(counts)
    return np.array(out)


def _mixer_counts(weights_D: np.ndarray, steps: int, batch_size: int) -> np.ndarray:
    """[S, D]: the domain counts of the batches the CPT mixer draws under a fixed mixture."""
    sources = [[{"tokens": np.zeros(2, np.int32)}] * 7 for _ in weights_D]
    w = np.asarray(weights_D, np.float64) / np.sum(weights_D, dtype=np.float64)
    with DomainMixer(sources, [f"d{d}" for d in range(len(w))], batch_size, lambda step: w, seed=0) as mixer:
        return np.array([np.bincount(next(mixer)["domain"], minlength=len(w)) for _ in range(steps)])


STEPS, BATCH = 50, 8
# No two domains' fractional quotas tie within the stage in exact arithmetic (where float rounding decides a tie,
# in the CPT mixer's float64 too): weight differences times B times s are never integers for s <= S.
WEIGHTS_NxD = np.array([[0.02, 0.5123, 0.4677, 0.0, 0.0],  # a 2% domain at B = 8
                        [0.3127, 0.0, 0.2461, 0.0, 0.4412],  # zero weights in the middle
                        [0.0, 0.0, 0.0, 1.0, 0.0],
                        *np.random.default_rng(1).dirichlet(np.ones(5), 3)], np.float32)


@jax.jit
def _draw_stages(weights_NxD, ids_N, stage):
    return jax.vmap(lambda w, k: ds.draw_stage(POOLS, w, k, stage, STEPS, BATCH))(weights_NxD, proxy_keys(7, ids_N))


@pytest.fixture(scope="module")
def drawn():
    return jax.tree.map(np.asarray, _draw_stages(jnp.asarray(WEIGHTS_NxD), jnp.arange(len(WEIGHTS_NxD)), 3))


def _counts_SxD(domain_SxB):
    return np.stack([np.bincount(row, minlength=POOLS.sizes_D.shape[0]) for row in domain_SxB])


def test_counts_are_the_cpt_mixers(drawn):
    """Every proxy (vmapped, each with its own mixture) gets, batch by batch, the counts the numpy rule and the CPT
    mixer give; over the stage each domain is within one row of weight * S * B; zero weights are never drawn."""
    for w_D, domain_SxB in zip(WEIGHTS_NxD, drawn["domain"]):
        counts_SxD = _counts_SxD(domain_SxB)
        np.testing.assert_array_equal(counts_SxD, _reference_counts(w_D, STEPS, BATCH))
        np.testing.assert_array_equal(counts_SxD, _mixer_counts(w_D, STEPS, BATCH))
        cumulative_SxD = np.cumsum(counts_SxD, 0)
        quota_SxD = np.arange(1, STEPS + 1)[:, None] * BATCH * w_D.astype(np.float64)[None, :]
        assert np.abs(cumulative_SxD - quota_SxD).max() < 1 + 1e-4
        assert (counts_SxD[:, w_D == 0] == 0).all()
    two_percent = _counts_SxD(drawn["domain"][0])[:, 0]
    assert two_percent.sum() == 8 and two_percent.max() == 1  # 0.02 * 50 * 8 rows, one batch at a time


def test_ties_go_to_the_lower_domain_index():
    """Dyadic weights: every quota is exact in float32 and float64, so ties are real and must break as the mixer's."""
    w_D = np.array([0.125, 0.375, 0.25, 0.0, 0.25], np.float32)

    def body(carry_D, _):
        counts_D, carry_D = ds.mixture_counts(jnp.asarray(w_D), carry_D, 4)
        return carry_D, counts_D

    counts_SxD = np.asarray(jax.lax.scan(body, jnp.zeros(5), None, length=8)[1])
    np.testing.assert_array_equal(counts_SxD[:2], [[1, 1, 1, 0, 1], [0, 2, 1, 0, 1]])  # by hand
    np.testing.assert_array_equal(counts_SxD, _reference_counts(w_D, 8, 4))
    np.testing.assert_array_equal(counts_SxD, _mixer_counts(w_D, 8, 4))


def test_rows_are_windows_of_the_stored_records(drawn):
    """Each drawn row (tokens and segment ids) is a window cut here from its domain's records, at stride seq_len;
    a segment holds one document; the `window` index names the pool row that holds it."""
    windows = []
    for d, recs in enumerate(RECORDS):
        cut = set()
        for tok, seg in zip(recs["tokens"], recs["segment_ids"]):
            for start in (0, SEQ_LEN):
                if (seg[start + 1:start + SEQ_LEN + 1] != 0).any():
                    cut.add((tok[start:start + SEQ_LEN + 1].tobytes(), seg[start:start + SEQ_LEN + 1].tobytes()))
        assert len(cut) == int(POOLS.sizes_D[d])
        windows.append(cut)
    tok_RxL1, seg_RxL1 = drawn["tokens"].reshape(-1, SEQ_LEN + 1), drawn["segment_ids"].reshape(-1, SEQ_LEN + 1)
    for tok, seg, d, w in zip(tok_RxL1, seg_RxL1, drawn["domain"].ravel(), drawn["window"].ravel()):
        assert (tok.tobytes(), seg.tobytes()) in windows[d]
        np.testing.assert_array_equal(POOLS.tokens_WxL1[w], tok)
        for s in np.unique(seg[seg > 0]):
            text = tok[(seg == s) & (tok != EOS)]
            assert len({(t - 2) // CODE_DOC for t in text}) <= 1 and ((text - 2) // CODE_DOMAIN == d).all()


def test_train_batch_masks_as_host_batch_does():
    rows = {"tokens": np.asarray(POOLS.tokens_WxL1), "segment_ids": np.asarray(POOLS.segment_ids_WxL1)}
    ours, host = ds.train_batch(jax.tree.map(jnp.asarray, rows)), host_batch(rows)
    assert ours.keys() == host.keys() and host["mask"].min() == 0  # the pools hold padding
    for key in host:
        np.testing.assert_array_equal(np.asarray(ours[key]), host[key], err_msg=key)


def test_each_domain_is_read_without_replacement_within_an_epoch():
    """24 windows in one domain, 8 rows a step: every 3 steps read each window exactly once; each epoch and each
    proxy has its own order."""
    recs = {"tokens": np.arange(12 * RECORD_LEN, dtype=np.int32).reshape(12, RECORD_LEN),
            "segment_ids": np.ones((12, RECORD_LEN), np.int32)}
    pools = ds.make_pools([recs], SEQ_LEN, seed=0)
    draw = jax.jit(jax.vmap(lambda k: ds.draw_stage(pools, jnp.ones(1), k, 1, 6, 8)))
    window_NxSxB = np.asarray(draw(proxy_keys(0, jnp.arange(2)))["window"])
    epochs = window_NxSxB.reshape(2, 2, 24)  # stage 1 starts at stream element 48: epochs 2 and 3
    for proxy in range(2):
        for epoch in range(2):
            np.testing.assert_array_equal(np.sort(epochs[proxy, epoch]), np.arange(24))
        assert not np.array_equal(epochs[proxy, 0], epochs[proxy, 1])
    assert not np.array_equal(epochs[0], epochs[1])


def test_a_proxys_batches_depend_on_its_id_not_its_chunk(drawn):
    again = _draw_stages(jnp.asarray(WEIGHTS_NxD[[4, 1]]), jnp.array([4, 1]), 3)
    for key in drawn:
        np.testing.assert_array_equal(np.asarray(again[key])[1], drawn[key][1], err_msg=key)
    other_stage = _draw_stages(jnp.asarray(WEIGHTS_NxD[[4, 1]]), jnp.array([4, 1]), 2)
    assert not np.array_equal(np.asarray(other_stage["window"])[1], drawn["window"][1])


def test_sharded_over_traj_axis_matches_single_device(drawn):
    mesh = Mesh(np.array(jax.devices()[:3]), ("traj",))
    traj = NamedSharding(mesh, P("traj"))
    fn = jax.jit(lambda w, ids: _draw_stages(w, ids, 3), in_shardings=(traj, traj), out_shardings=traj)
    out = fn(jax.device_put(WEIGHTS_NxD, traj), jax.device_put(np.arange(len(WEIGHTS_NxD), dtype=np.int32), traj))
    assert out["window"].sharding.is_equivalent_to(traj, 3)
    for key in drawn:
        np.testing.assert_array_equal(np.asarray(out[key]), drawn[key], err_msg=key)


def test_pools_cut_records_into_windows_and_respect_the_cap():
    rec = {"tokens": np.arange(2, 2 + RECORD_LEN, dtype=np.int32)[None],
           "segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0, 0, 0]], np.int32)}
    pools = ds.make_pools([rec], SEQ_LEN, seed=0)  # window 4..8 has targets 2, 0, 0, 0: kept
    np.testing.assert_array_equal(np.sort(np.asarray(pools.tokens_WxL1)[:, 0]), [2, 6])
    rec["segment_ids"][0, 5:] = 0  # now window 4..8 targets only padding: dropped
    assert int(ds.make_pools([rec], SEQ_LEN, seed=0).sizes_D[0]) == 1
    recs = [{"tokens": np.full(RECORD_LEN, i), "segment_ids": np.ones(RECORD_LEN)} for i in range(10)]
    np.testing.assert_array_equal(ds.pool_records(recs, 3 * RECORD_LEN + 1)["tokens"][:, 0], [0, 1, 2])
    assert len(ds.pool_records(recs, 1)["tokens"]) == 1


@pytest.mark.parametrize("records, seq_len, match", [
    ([RECORDS[0]], 0, "seq_len=0"),
    ([], SEQ_LEN, "empty"),
    ([RECORDS[0]], RECORD_LEN, "shorter than seq_len"),
    ([{"tokens": np.zeros((2, 9)), "segment_ids": np.zeros((2, 9))}], SEQ_LEN, "integer"),
    ([{"tokens": np.zeros((2, 9), int), "segment_ids": np.zeros((2, 8), int)}], SEQ_LEN, "one shape"),
    ([{"tokens": -np.ones((2, 9), int), "segment_ids": np.ones((2, 9), int)}], SEQ_LEN, "outside"),
    ([RECORDS[0], {"tokens": np.ones((1, 9), int), "segment_ids": np.eye(1, 9, dtype=int)}], SEQ_LEN, "domain 1"),
])
def test_make_pools_rejects_bad_input(records, seq_len, match):
    with pytest.raises(DmaError, match=match):
        ds.make_pools(records, seq_len, seed=0)

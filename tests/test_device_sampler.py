"""Tests for the on-device sampler: windows, domain frequencies, vmap and sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from dma_jax.data.device_sampler import make_pools, sample_batch, sample_batches
from dma_jax.errors import DmaError

SEQ_LEN = 4
# Domain 0 holds exactly one window, so its start must always be 0.
LENGTHS = [SEQ_LEN + 1, 50, 120, 31, 90]
CODE = 10_000  # token = domain * CODE + position: domain and offset are readable from the token.


def _domains():
    return [d * CODE + np.arange(n, dtype=np.int64) for d, n in enumerate(LENGTHS)]


def _sample(weights, seed, batch_size, seq_len=SEQ_LEN):
    pools = make_pools(_domains(), seq_len)
    fn = jax.jit(sample_batch, static_argnames=("batch_size", "seq_len"))
    tokens, domain = fn(pools, jnp.asarray(weights, jnp.float32), jax.random.key(seed),
                        batch_size=batch_size, seq_len=seq_len)
    return np.asarray(tokens), np.asarray(domain)


def test_pools_layout():
    pools = make_pools(_domains(), SEQ_LEN)
    np.testing.assert_array_equal(pools.lengths_D, LENGTHS)
    np.testing.assert_array_equal(pools.starts_D, np.cumsum([0] + LENGTHS[:-1]))
    assert pools.tokens_T.dtype == jnp.int32 and pools.tokens_T.shape == (sum(LENGTHS),)


def test_windows_are_contiguous_slices_of_the_drawn_domain():
    domains = _domains()
    tokens, domain = _sample(np.ones(5), seed=0, batch_size=4000)
    assert tokens.shape == (4000, SEQ_LEN + 1) and tokens.dtype == np.int32
    assert domain.shape == (4000,) and domain.dtype == np.int32
    np.testing.assert_array_equal(tokens // CODE, np.repeat(domain[:, None], SEQ_LEN + 1, axis=1))
    starts = tokens[:, 0] % CODE
    for row, d, s in zip(tokens, domain, starts):
        np.testing.assert_array_equal(row, domains[d][s : s + SEQ_LEN + 1])
    for d, n in enumerate(LENGTHS):
        s_d = starts[domain == d]
        # Every window fits; with many draws the first and last valid start both occur.
        assert s_d.min() == 0 and s_d.max() == n - (SEQ_LEN + 1), (d, s_d.min(), s_d.max())


def test_zero_weight_domain_never_drawn():
    _, domain = _sample([0.3, 0.0, 0.3, 0.0, 0.4], seed=1, batch_size=5000)
    assert not np.isin(domain, [1, 3]).any()
    assert set(np.unique(domain)) == {0, 2, 4}


def test_domain_frequencies_match_weights():
    weights = np.array([0.05, 0.15, 0.2, 0.25, 0.35])
    n = 20_000
    # Unnormalised weights must give the same distribution.
    _, domain = _sample(weights * 3.0, seed=2, batch_size=n)
    counts = np.bincount(domain, minlength=5)
    pvalue = stats.chisquare(counts, weights * n).pvalue
    assert pvalue > 1e-3, (counts, pvalue)


def test_frequency_test_detects_wrong_weights():
    # Guard on the chi-square check itself: swapped weights are rejected.
    weights = np.array([0.05, 0.15, 0.2, 0.25, 0.35])
    _, domain = _sample(weights[::-1], seed=2, batch_size=20_000)
    counts = np.bincount(domain, minlength=5)
    assert stats.chisquare(counts, weights * 20_000).pvalue < 1e-3


def _batched_inputs(n):
    rng = np.random.default_rng(3)
    weights_NxD = rng.dirichlet(np.ones(5), size=n).astype(np.float32)
    weights_NxD[::3, 2] = 0.0
    keys_N = jax.random.split(jax.random.key(4), n)
    return jnp.asarray(weights_NxD), keys_N


def test_vmap_matches_single_calls():
    pools = make_pools(_domains(), SEQ_LEN)
    weights_NxD, keys_N = _batched_inputs(6)
    fn = jax.jit(sample_batches, static_argnames=("batch_size", "seq_len"))
    tokens_NxBxL1, domain_NxB = fn(pools, weights_NxD, keys_N, batch_size=16, seq_len=SEQ_LEN)
    assert tokens_NxBxL1.shape == (6, 16, SEQ_LEN + 1) and domain_NxB.shape == (6, 16)
    single = jax.jit(sample_batch, static_argnames=("batch_size", "seq_len"))
    for i in range(6):
        tokens, domain = single(pools, weights_NxD[i], keys_N[i], batch_size=16, seq_len=SEQ_LEN)
        np.testing.assert_array_equal(tokens_NxBxL1[i], tokens)
        np.testing.assert_array_equal(domain_NxB[i], domain)
    # Different keys give different batches.
    assert not np.array_equal(tokens_NxBxL1[0], tokens_NxBxL1[1])


def test_sharded_over_traj_axis_matches_single_device():
    devices = jax.devices()
    n = 2 * len(devices)
    pools = make_pools(_domains(), SEQ_LEN)
    weights_NxD, keys_N = _batched_inputs(n)
    fn = functools.partial(sample_batches, batch_size=32, seq_len=SEQ_LEN)
    expected = jax.jit(fn)(pools, weights_NxD, keys_N)

    mesh = Mesh(np.array(devices), ("traj",))
    traj, replicated = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
    sharded_fn = jax.jit(fn, in_shardings=(replicated, traj, traj), out_shardings=(traj, traj))
    tokens, domain = sharded_fn(
        jax.device_put(pools, replicated),
        jax.device_put(weights_NxD, traj),
        jax.device_put(keys_N, traj),
    )
    assert tokens.sharding.is_equivalent_to(traj, tokens.ndim)
    np.testing.assert_array_equal(tokens, expected[0])
    np.testing.assert_array_equal(domain, expected[1])


@pytest.mark.parametrize(
    "domains, seq_len, match",
    [
        ([np.arange(10), np.arange(4)], 4, "domain 1 has 4 tokens"),
        ([np.arange(10)], 0, "seq_len=0"),
        ([], 4, "empty"),
        ([np.arange(10.0)], 4, "integer"),
        ([np.arange(20).reshape(2, 10)], 4, "1-D"),
        ([np.arange(-1, 10)], 4, "outside"),
    ],
)
def test_make_pools_rejects_bad_input(domains, seq_len, match):
    with pytest.raises(DmaError, match=match):
        make_pools(domains, seq_len)

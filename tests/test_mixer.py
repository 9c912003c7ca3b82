"""Tests for the Grain domain mixer: rounding, counts, epochs, resume, threads, errors."""

import itertools
import json

import numpy as np
import pytest

from dma_jax.data.mixer import DomainMixer, largest_remainder_counts, measure_throughput
from dma_jax.errors import DmaError

SEQ_LEN = 6


def record_tokens(domain: int, index: int) -> np.ndarray:
    """Tokens of record `index` of domain `domain`: encodes both, so rows are traceable."""
    return domain * 100_000 + index * 10 + np.arange(SEQ_LEN)


def make_sources(sizes):
    return [[record_tokens(d, i) for i in range(size)] for d, size in enumerate(sizes)]


def fixed(weights):
    return lambda step: np.asarray(weights)


def brute_force_counts(weights, total):
    """Integer vector summing to total closest (L2) to weights*total; ties -> lower index first."""
    quotas = np.asarray(weights) * total
    best_key, best = None, None
    for counts in itertools.product(range(total + 1), repeat=len(weights)):
        if sum(counts) != total:
            continue
        key = (float(np.sum((np.asarray(counts) - quotas) ** 2)), [-c for c in counts])
        if best_key is None or key < best_key:
            best_key, best = key, counts
    return np.asarray(best)


@pytest.mark.parametrize(
    "weights, total, expected",
    [
        ([1 / 3, 1 / 3, 1 / 3], 10, [4, 3, 3]),
        ([0.25, 0.25, 0.25, 0.25], 10, [3, 3, 2, 2]),
        ([0.5, 0.5, 0.0], 3, [2, 1, 0]),
        ([0.0, 1.0, 0.0], 5, [0, 5, 0]),
        ([0.1, 0.2, 0.7], 10, [1, 2, 7]),
        ([0.5, 0.3, 0.2, 0.0], 7, [4, 2, 1, 0]),
        ([0.2, 0.8], 0, [0, 0]),
    ],
)
def test_largest_remainder_analytic(weights, total, expected):
    np.testing.assert_array_equal(largest_remainder_counts(np.asarray(weights), total), expected)


def test_largest_remainder_matches_brute_force_with_exact_ties():
    # Weights k/16 and totals <= 16 make every quota exact in float, so ties are real ties.
    rng = np.random.default_rng(0)
    for _ in range(60):
        num_domains = int(rng.integers(2, 5))
        cuts = np.sort(rng.integers(0, 17, size=num_domains - 1))
        weights = np.diff(np.concatenate([[0], cuts, [16]])) / 16
        total = int(rng.integers(0, 13))
        np.testing.assert_array_equal(
            largest_remainder_counts(weights, total), brute_force_counts(weights, total),
            err_msg=f"weights={weights} total={total}",
        )


def test_largest_remainder_random_bounds():
    rng = np.random.default_rng(1)
    for _ in range(500):
        num_domains = int(rng.integers(1, 60))
        weights = rng.dirichlet(np.ones(num_domains)) * (rng.random(num_domains) > 0.3)
        if weights.sum() == 0:
            weights[0] = 1.0
        weights /= weights.sum()
        total = int(rng.integers(0, 5000))
        counts = largest_remainder_counts(weights, total)
        assert counts.sum() == total
        assert np.all(np.abs(counts - weights * total) < 1)
        assert np.all(counts[weights == 0] == 0)


def test_batch_counts_carry_the_rounding_and_rows_match_records():
    mixer = DomainMixer(make_sources([9, 11, 5, 4]), ["a", "b", "c", "d"], 7,
                        fixed([0.5, 0.3, 0.2, 0.0]), seed=3)
    # Quotas 3.5, 2.1, 1.4 per batch, by hand: batch 1 rounds to 4, 2, 1 (owed -0.5, 0.1, 0.4);
    # batch 2's quotas 3.0, 2.2, 1.8 round to 3, 2, 2; batch 3's 3.5, 2.3, 1.2 to 4, 2, 1.
    expected_counts = [[4, 2, 1, 0], [3, 2, 2, 0], [4, 2, 1, 0]]
    for i in range(6):
        batch = next(mixer)
        assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (7, SEQ_LEN)
        assert batch["domain"].dtype == np.int32 and batch["record_id"].dtype == np.int64
        if i < 3:
            np.testing.assert_array_equal(np.bincount(batch["domain"], minlength=4), expected_counts[i])
        expected = [record_tokens(d, i) for d, i in zip(batch["domain"], batch["record_id"])]
        np.testing.assert_array_equal(batch["tokens"], np.stack(expected))


def test_small_weights_get_their_share_over_batches():
    """A domain below one example per batch is not rounded away: after k batches every domain's count is
    within one example of k * B * weight (per-batch rounding alone gave the 3% domains nothing, ever)."""
    weights = np.array([0.47, 0.47, 0.03, 0.03])
    mixer = DomainMixer(make_sources([200, 200, 200, 200]), ["a", "b", "c", "d"], 16, fixed(weights), seed=1)
    total = np.zeros(4)
    for k in range(1, 41):
        total += np.bincount(next(mixer)["domain"], minlength=4)
        assert np.all(np.abs(total - k * 16 * weights) < 1), (k, total)
    assert total[2] >= 19 and total[3] >= 19  # 40 * 16 * 0.03 = 19.2


def test_rows_are_permuted_within_batch():
    mixer = DomainMixer(make_sources([50, 50]), ["a", "b"], 16, fixed([0.5, 0.5]), seed=0)
    domains = [next(mixer)["domain"] for _ in range(4)]
    sorted_order = np.repeat([0, 1], 8)
    assert any(not np.array_equal(d, sorted_order) for d in domains)


def test_weight_change_takes_effect_at_next_batch():
    calls = []

    def policy(step):
        calls.append(step)
        return np.array([1.0, 0.0]) if step < 3 else np.array([0.25, 0.75])

    mixer = DomainMixer(make_sources([20, 20]), ["a", "b"], 8, policy, seed=0)
    counts = [np.bincount(next(mixer)["domain"], minlength=2) for _ in range(5)]
    np.testing.assert_array_equal(counts, [[8, 0]] * 3 + [[2, 6]] * 2)
    assert calls == [0, 1, 2, 3, 4]
    assert mixer.get_state()["weight_history"] == [[0, [1.0, 0.0]], [3, [0.25, 0.75]]]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    size = 12
    # Domain 0 gets exactly one row per batch, so its read order is visible.
    mixer = DomainMixer(make_sources([size, 30]), ["a", "b"], 4, fixed([0.25, 0.75]), seed=5)
    order = []
    for _ in range(3 * size):
        batch = next(mixer)
        order.extend(batch["record_id"][batch["domain"] == 0].tolist())
    epochs = [order[e * size:(e + 1) * size] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(size))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_resume_from_json_state_is_exact():
    def policy(step):
        return np.array([0.6, 0.4, 0.0]) if step % 4 < 2 else np.array([0.1, 0.2, 0.7])

    sources, names = make_sources([7, 13, 5]), ["x", "y", "z"]
    uninterrupted = DomainMixer(sources, names, 10, policy, seed=11)
    reference = [next(uninterrupted) for _ in range(12)]

    first = DomainMixer(sources, names, 10, policy, seed=11)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state["step"] == 5

    resumed = DomainMixer(sources, names, 10, policy, seed=11)
    fresh_first = next(DomainMixer(sources, names, 10, policy, seed=11))
    resumed.set_state(state)
    for want in reference[5:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Guard: without the state a fresh mixer yields the first batch, not batch 5.
    assert not np.array_equal(fresh_first["record_id"], reference[5]["record_id"])
    assert resumed.get_state()["weight_history"] == uninterrupted.get_state()["weight_history"]


def test_state_round_trips_through_orbax_json(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    mixer = DomainMixer(make_sources([5, 6]), ["a", "b"], 4, fixed([0.5, 0.5]), seed=2)
    for _ in range(3):
        next(mixer)
    checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    checkpointer.save(tmp_path / "mixer", args=ocp.args.JsonSave(mixer.get_state()))
    restored = checkpointer.restore(tmp_path / "mixer", args=ocp.args.JsonRestore())
    assert restored == mixer.get_state()


def test_threads_give_identical_batches():
    def policy(step):
        return np.array([0.2, 0.5, 0.3]) if step % 2 else np.array([0.0, 0.5, 0.5])

    sources, names = make_sources([17, 9, 23]), ["a", "b", "c"]
    serial = DomainMixer(sources, names, 32, policy, seed=4)
    with DomainMixer(sources, names, 32, policy, seed=4, num_threads=4) as threaded:
        for _ in range(8):
            want, got = next(serial), next(threaded)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_dict_records_keep_all_fields():
    sources = [[{"tokens": record_tokens(d, i), "segment_ids": np.full(SEQ_LEN, i)}
                for i in range(6)] for d in range(2)]
    mixer = DomainMixer(sources, ["a", "b"], 4, fixed([0.5, 0.5]), seed=0)
    batch = next(mixer)
    assert set(batch) == {"tokens", "segment_ids", "domain", "record_id"}
    np.testing.assert_array_equal(batch["segment_ids"][:, 0], batch["record_id"])


def test_array_record_source_with_decode(tmp_path):
    grain = pytest.importorskip("grain")
    from array_record.python.array_record_module import ArrayRecordWriter

    paths = []
    for d, size in enumerate([5, 8]):
        path = str(tmp_path / f"domain{d}.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        for i in range(size):
            writer.write(record_tokens(d, i).astype(np.int32).tobytes())
        writer.close()
        paths.append(path)
    sources = [grain.sources.ArrayRecordDataSource([path]) for path in paths]
    with pytest.raises(DmaError, match="decode="):
        next(DomainMixer(sources, ["a", "b"], 4, fixed([0.5, 0.5]), seed=0))
    mixer = DomainMixer(sources, ["a", "b"], 4, fixed([0.5, 0.5]), seed=0,
                        decode=lambda raw: {"tokens": np.frombuffer(raw, np.int32)})
    batch = next(mixer)
    expected = [record_tokens(d, i) for d, i in zip(batch["domain"], batch["record_id"])]
    np.testing.assert_array_equal(batch["tokens"], np.stack(expected))


@pytest.mark.parametrize(
    "weights, pattern",
    [
        ([0.6, -0.1, 0.5], r"'b' is -0\.1 .*>= 0"),
        ([0.5, float("nan"), 0.5], r"'b' is nan .*finite"),
        ([0.5, 0.5], r"shape \(2,\), expected \(3,\)"),
        ([0.3, 0.3, 0.3], r"sum to 0\.9"),
    ],
)
def test_bad_weights_raise_naming_value(weights, pattern):
    mixer = DomainMixer(make_sources([4, 4, 4]), ["a", "b", "c"], 4, fixed(weights), seed=0)
    with pytest.raises(DmaError, match=pattern):
        next(mixer)
    assert mixer.get_state()["step"] == 0 and mixer.get_state()["cursors"] == [0, 0, 0]


def test_state_with_other_domains_or_seed_refused():
    sources = make_sources([4, 4])
    state = DomainMixer(sources, ["a", "b"], 2, fixed([0.5, 0.5]), seed=0).get_state()
    with pytest.raises(DmaError, match=r"only in state \['b'\], only in mixer \['c'\]"):
        DomainMixer(sources, ["a", "c"], 2, fixed([0.5, 0.5]), seed=0).set_state(state)
    with pytest.raises(DmaError, match="seed is 0"):
        DomainMixer(sources, ["a", "b"], 2, fixed([0.5, 0.5]), seed=1).set_state(state)
    with pytest.raises(DmaError, match="domain_sizes"):
        DomainMixer(make_sources([4, 5]), ["a", "b"], 2, fixed([0.5, 0.5]), seed=0).set_state(state)


def test_constructor_errors():
    with pytest.raises(DmaError, match="'b' is empty"):
        DomainMixer([[record_tokens(0, 0)], []], ["a", "b"], 2, fixed([0.5, 0.5]), seed=0)
    with pytest.raises(DmaError, match="2 sources but 3 domain_names"):
        DomainMixer(make_sources([2, 2]), ["a", "b", "c"], 2, fixed([0.5, 0.5]), seed=0)


def test_measure_throughput_runs():
    mixer = DomainMixer(make_sources([64, 64]), ["a", "b"], 16, fixed([0.5, 0.5]), seed=0)
    assert measure_throughput(mixer, 3) > 0
    assert mixer.step == 3

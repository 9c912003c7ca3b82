"""`DomainSpace.split`: more domains than were prepared (issue 18, point 6), each a record range of one.

Checked against the prepared data read directly (the shards through `PackedRecords`, the manifest's own token
counts) and against the unsplit space through a second code path (policies' spreads summed per prepared domain).
"""

from __future__ import annotations

import numpy as np
import pytest

from dma_jax.config import load_config
from dma_jax.data.domains import DomainSpace, RecordRange
from dma_jax.data.mixer import DomainMixer
from dma_jax.errors import DmaError
from dma_jax.eval_set import EvalSet, scored_domains
from dma_jax.policies import SpaceInfo
from tests.paths import DEMO

UNSCORED = ("source/web_prose", "math/forum_solutions")


@pytest.fixture(scope="module")
def spaces(prepared_world):
    full = DomainSpace.load(prepared_world.data_dir).subset(["source", "math"])
    return full, full.split(2)


def test_parts_are_the_prepared_records_cut_in_order(spaces):
    full, split = spaces
    assert split.num_domains == 2 * full.num_domains
    assert split.names[:2] == [f"{full.names[0]}.1of2", f"{full.names[0]}.2of2"]
    assert split.part_of == [n for n in full.names for _ in range(2)]
    assert split.fields_of_domain == [f for f in full.fields_of_domain for _ in range(2)]
    manifest = {d["name"]: d for d in full.manifest["domains"]}
    for d, name in enumerate(full.names):
        for which in ("train", "heldout"):
            whole = full.records(d, which)
            first, second = split.records(2 * d, which), split.records(2 * d + 1, which)
            assert isinstance(first, RecordRange) and len(first) + len(second) == len(whole)
            assert abs(len(first) - len(second)) <= 1
            joined = [first[i] for i in range(len(first))] + [second[i] for i in range(len(second))]
            for i in (0, len(first) - 1, len(first), len(whole) - 1):  # both sides of the cut, and the ends
                np.testing.assert_array_equal(joined[i]["tokens"], whole[i]["tokens"])
                np.testing.assert_array_equal(joined[i]["segment_ids"], whole[i]["segment_ids"])
            # token counts of the parts add up to what `dma prepare` recorded for the whole domain
            counts = split.train_tokens if which == "train" else split.heldout_tokens
            assert counts[2 * d] + counts[2 * d + 1] == manifest[name][which]["tokens"]
            assert counts[2 * d] > 0 and counts[2 * d + 1] > 0
    # the parts' tokens are the prepared domain's tokens, in order
    np.testing.assert_array_equal(np.concatenate([split.tokens(0, "heldout"), split.tokens(1, "heldout")]),
                                  full.tokens(0, "heldout"))


def test_record_range_indexing(spaces):
    full, split = spaces
    first, whole = split.records(0), full.records(0)
    np.testing.assert_array_equal(first[-1]["tokens"], whole[len(first) - 1]["tokens"])
    with pytest.raises(IndexError):
        first[len(first)]
    with pytest.raises(DmaError, match="record range"):
        RecordRange(whole, 0, len(whole) + 1)


def test_unscored_domains_and_exclusions_follow_the_prepared_domain(spaces, prepared_world, tmp_path):
    full, split = spaces
    flags = scored_domains(split, UNSCORED)
    assert flags == [p not in UNSCORED for p in split.part_of] and not all(flags)
    cfg = load_config(DEMO, prepared_world.run_overrides(tmp_path), variant="tiny")
    es = EvalSet.for_space(split, cfg.eval)
    np.testing.assert_array_equal(np.asarray(es.domain_scored_D), np.asarray(flags, np.float32))
    # policies: a split space's mixture, summed over each domain's parts, is the unsplit space's mixture
    info, info_full = SpaceInfo.of(split, "math"), SpaceInfo.of(full, "math")
    for exclude in ((), UNSCORED):
        w, w_full = info.target_share(0.3, exclude=exclude), info_full.target_share(0.3, exclude=exclude)
        np.testing.assert_allclose(w.reshape(-1, 2).sum(1), w_full, atol=1e-12)
    scored = info.target_share(0.3, exclude=UNSCORED)
    assert all(scored[i] == 0 for i, p in enumerate(split.part_of) if p in UNSCORED)
    # without() by the prepared name drops every part
    assert not set(split.without(["math/forum_solutions"]).part_of) & {"math/forum_solutions"}


def test_mixer_reads_each_part_only(spaces):
    full, split = spaces
    weights = np.full(split.num_domains, 1.0 / split.num_domains)
    mixer = DomainMixer([split.records(d) for d in range(split.num_domains)], split.names, 2 * split.num_domains,
                        lambda step: weights, seed=0)
    batch = next(mixer)
    np.testing.assert_array_equal(np.bincount(batch["domain"], minlength=split.num_domains), 2)
    for row, d, rid in zip(batch["tokens"], batch["domain"], batch["record_id"]):
        part = split.records(int(d))
        assert 0 <= rid < len(part)
        whole = full.records(full.names.index(split.part_of[int(d)]))  # the prepared domain, read directly
        offset = 0 if int(d) % 2 == 0 else len(split.records(int(d) - 1))
        np.testing.assert_array_equal(row, whole[offset + int(rid)]["tokens"])


def test_split_refuses_too_many_parts(spaces):
    full, _ = spaces
    n = min(len(full.records(d, "heldout")) for d in range(full.num_domains))
    with pytest.raises(DmaError, match=r"heldout records, too few to split into"):
        full.split(n + 1)
    with pytest.raises(DmaError, match="parts must be >= 1"):
        full.split(0)
    assert full.split(1) is full


def test_heldout_kept_whole_or_too_short_named(spaces, prepared_world, tmp_path):
    full, _ = spaces
    train_only = full.split(2, heldout=False)
    assert train_only.num_domains == 2 * full.num_domains
    for d in range(full.num_domains):  # train cut in two, held-out the whole domain's in both parts
        assert len(train_only.records(2 * d)) + len(train_only.records(2 * d + 1)) == len(full.records(d))
        for k in (2 * d, 2 * d + 1):
            np.testing.assert_array_equal(train_only.tokens(k, "heldout"), full.tokens(d, "heldout"))
    # a held-out part too short for one window: the error names the domain and the setting
    cfg = load_config(DEMO, prepared_world.run_overrides(tmp_path), variant="tiny")
    shortest = int(min(full.heldout_tokens))
    parts = next(k for k in range(2, 64) if shortest // k < cfg.eval.max_len + 1)
    try:
        space = full.split(parts)
    except DmaError:
        pytest.skip("held-out records run out before tokens do")
    with pytest.raises(DmaError, match=r"domain '.*\.\d+of\d+': held-out stream .*eval.max_len="):
        EvalSet.for_space(space, cfg.eval)

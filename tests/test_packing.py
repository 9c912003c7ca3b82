"""Packing, record bytes, shards and the held-out rule, checked against independent
reconstructions (concatenated streams, the documented byte layout, hashlib)."""

import copy
import hashlib
import os
import struct
import zlib

import grain
import numpy as np
import pytest

from dma_jax.data.packing import (decode_record, encode_record, is_heldout, pack_documents,
                                  read_records, select_documents, verify_shards, write_shards)
from dma_jax.errors import DmaError

EOS = 2


def _random_docs(rng, n: int, max_len: int) -> list[list[int]]:
    """Documents of ids >= 3 (never EOS), lengths 0..max_len, some longer than a record."""
    return [rng.integers(3, 300, size=rng.integers(0, max_len + 1)).tolist() for _ in range(n)]


def _expected_segments(docs, seq_len: int) -> np.ndarray:
    """Segment ids of the concatenated stream: a new segment at every document start
    and at every record start, numbered from 1 within each record."""
    lengths = [len(d) + 1 for d in docs]
    total = sum(lengths)
    starts = np.zeros(total, bool)
    starts[np.cumsum([0] + lengths[:-1])] = True
    starts[::seq_len] = True
    segs = np.zeros(total, np.int64)
    for r in range(0, total, seq_len):
        segs[r:r + seq_len] = np.cumsum(starts[r:r + seq_len])
    return segs


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_pack_matches_concatenated_stream(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = _random_docs(rng, 60, 40)
    records = list(pack_documents(docs, seq_len, EOS))
    stream = np.concatenate([np.array(d + [EOS], np.int64) for d in docs])

    assert len(records) == -(-len(stream) // seq_len)
    for rec in records:
        assert rec["tokens"].shape == rec["segment_ids"].shape == (seq_len,)
        assert rec["tokens"].dtype == rec["segment_ids"].dtype == np.int32
    tokens_RxL = np.stack([r["tokens"] for r in records])
    segs_RxL = np.stack([r["segment_ids"] for r in records])
    real = segs_RxL.reshape(-1) > 0
    np.testing.assert_array_equal(tokens_RxL.reshape(-1)[real], stream)
    # Padding (segment 0, pad id 0) only at the end of the last record.
    n_pad = seq_len * len(records) - len(stream)
    assert not real[len(stream):].any() and real[:len(stream)].all()
    assert (tokens_RxL.reshape(-1)[len(stream):] == 0).all() and n_pad < seq_len
    np.testing.assert_array_equal(segs_RxL.reshape(-1)[real], _expected_segments(docs, seq_len))


def test_documents_recoverable_from_segments():
    rng = np.random.default_rng(1)
    docs = _random_docs(rng, 40, 30) + [[5] * 15, [], [6] * 16]  # exact fills, empty doc
    recovered, current = [], []
    for rec in pack_documents(docs, 16, EOS):
        for s in range(1, rec["segment_ids"].max() + 1):
            piece = rec["tokens"][rec["segment_ids"] == s].tolist()
            current += piece
            if piece[-1] == EOS:  # a segment ending in EOS ends its document
                recovered.append(current[:-1])
                current = []
    assert current == [] and recovered == docs


def test_pack_pad_id_and_edge_cases():
    recs = list(pack_documents([[3, 4, 5]], 8, EOS, pad_id=7))
    assert len(recs) == 1
    np.testing.assert_array_equal(recs[0]["tokens"], [3, 4, 5, 2, 7, 7, 7, 7])
    np.testing.assert_array_equal(recs[0]["segment_ids"], [1, 1, 1, 1, 0, 0, 0, 0])
    # A document filling a record exactly: its EOS opens the next record alone.
    recs = list(pack_documents([[3, 4, 5, 6], [9]], 4, EOS))
    np.testing.assert_array_equal(recs[1]["tokens"], [2, 9, 2, 0])
    np.testing.assert_array_equal(recs[1]["segment_ids"], [1, 2, 2, 0])
    assert list(pack_documents([], 4, EOS)) == []
    np.testing.assert_array_equal(next(pack_documents(np.array([[3, 4]]), 2, EOS))["tokens"],
                                  [3, 4])


@pytest.mark.parametrize("doc", [[3, -1], [3.5, 4.0], [[3, 4]], [2**31]])
def test_pack_rejects_bad_ids(doc):
    with pytest.raises(DmaError, match="document 1"):
        list(pack_documents([[3], doc], 4, EOS))


def test_pack_rejects_bad_arguments():
    for kwargs in ({"seq_len": 0, "eos_id": 2}, {"seq_len": 4, "eos_id": -1},
                   {"seq_len": 4, "eos_id": 2, "pad_id": 2**31}):
        with pytest.raises(DmaError):
            list(pack_documents([[3]], **kwargs))


def _record(rng, seq_len):
    return {"tokens": rng.integers(0, 2**31 - 1, seq_len, dtype=np.int64).astype(np.int32),
            "segment_ids": np.sort(rng.integers(0, 5, seq_len)).astype(np.int32)}


def test_record_bytes_follow_documented_layout():
    rng = np.random.default_rng(0)
    rec = _record(rng, 11)
    data = encode_record(rec)
    assert len(data) == 16 + 8 * 11
    payload = data[16:]
    assert struct.unpack("<4sIII", data[:16]) == (b"DMAR", 1, 11, zlib.crc32(payload))
    np.testing.assert_array_equal(np.frombuffer(payload[:44], "<i4"), rec["tokens"])
    np.testing.assert_array_equal(np.frombuffer(payload[44:], "<i4"), rec["segment_ids"])
    back = decode_record(data, 11)
    for key in ("tokens", "segment_ids"):
        assert back[key].dtype == np.int32 and back[key].flags.writeable
        np.testing.assert_array_equal(back[key], rec[key])


def test_decode_rejects_corruption():
    data = encode_record(_record(np.random.default_rng(1), 8))
    flipped = bytearray(data)
    flipped[40] ^= 0x10
    cases = {
        "truncated": data[:-1], "bytes, expected": data + b"\0", "checksum": bytes(flipped),
        "magic": b"XXXX" + data[4:], "version": data[:4] + struct.pack("<I", 2) + data[8:],
    }
    for match, bad in cases.items():
        with pytest.raises(DmaError, match=match):
            decode_record(bad, 8)
    with pytest.raises(DmaError, match="bytes, expected"):
        decode_record(data, 9)
    seq_mismatch = encode_record({"tokens": np.zeros(4, np.int32),
                                  "segment_ids": np.zeros(4, np.int32)})
    with pytest.raises(DmaError, match="holds seq_len 5, expected 4"):
        decode_record(seq_mismatch[:8] + struct.pack("<I", 5) + seq_mismatch[12:], 4)
    with pytest.raises(DmaError):
        encode_record({"tokens": np.zeros(4, np.int32), "segment_ids": np.zeros(3, np.int32)})
    with pytest.raises(DmaError):
        encode_record({"tokens": np.full(2, -1), "segment_ids": np.zeros(2, np.int32)})


def _write(tmp_path, n=23, per_shard=5, seq_len=6):
    rng = np.random.default_rng(n)
    records = [_record(rng, seq_len) for _ in range(n)]
    infos = write_shards(iter(records), tmp_path / "out", "dom", per_shard)
    return records, infos


def test_shards_round_trip_with_global_index(tmp_path):
    records, infos = _write(tmp_path)
    out = tmp_path / "out"
    assert [i["path"] for i in infos] == [f"dom-{k:05d}.array_record" for k in range(5)]
    assert [i["num_records"] for i in infos] == [5, 5, 5, 5, 3]
    assert sorted(os.listdir(out)) == [i["path"] for i in infos]  # no temp files left
    for info in infos:
        assert info["sha256"] == hashlib.sha256((out / info["path"]).read_bytes()).hexdigest()
    verify_shards(infos, out)

    source = read_records([out / i["path"] for i in infos], 6)
    assert len(source) == 23
    for i in [0, 4, 5, 9, 10, 17, 22, -1, -23]:
        for key in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(source[i][key], records[i][key])
    batch = source.__getitems__([22, 0, 7, 7, 13])
    for got, i in zip(batch, [22, 0, 7, 7, 13]):
        np.testing.assert_array_equal(got["tokens"], records[i]["tokens"])
    with pytest.raises(IndexError):
        source[23]
    clone = copy.deepcopy(source)  # what Grain does to hand a source to a worker
    np.testing.assert_array_equal(clone[12]["tokens"], records[12]["tokens"])
    via_grain = grain.MapDataset.source(source).map(lambda r: r["tokens"].sum())
    assert [int(x) for x in via_grain] == [int(r["tokens"].sum()) for r in records]


def test_empty_stream_and_failed_stream(tmp_path):
    assert write_shards(iter([]), tmp_path / "empty", "dom", 4) == []

    def failing():
        rng = np.random.default_rng(0)
        for _ in range(6):
            yield _record(rng, 3)
        raise ValueError("source broke")

    with pytest.raises(ValueError, match="source broke"):
        write_shards(failing(), tmp_path / "fail", "dom", 4)
    assert os.listdir(tmp_path / "fail") == ["dom-00000.array_record"]  # no partial shard
    with pytest.raises(DmaError):
        write_shards(iter([]), tmp_path, "dom", 0)


def test_verify_and_read_detect_damaged_shards(tmp_path):
    _, infos = _write(tmp_path)
    out = tmp_path / "out"
    path = out / infos[2]["path"]
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    with pytest.raises(DmaError, match="dom-00002.array_record: sha256"):
        verify_shards(infos, out)
    with pytest.raises(DmaError, match="dom-00002.array_record: no readable records"):
        read_records([out / i["path"] for i in infos], 6)
    modified = bytearray(data)
    modified[300] ^= 0xFF  # inside the first chunk (the file is padded to 128 KiB)
    path.write_bytes(bytes(modified))
    with pytest.raises(DmaError, match="dom-00002.array_record: sha256"):
        verify_shards(infos, out)
    with pytest.raises(DmaError, match="dom-00002.array_record"):
        source = read_records([out / i["path"] for i in infos], 6)
        [source[i] for i in range(len(source))]
    path.unlink()
    with pytest.raises(DmaError, match="dom-00002.array_record: shard file not found"):
        verify_shards(infos, out)
    with pytest.raises(DmaError, match="missing field 'sha256'"):
        verify_shards([{"path": infos[0]["path"], "num_records": 5}], out)


def test_heldout_rule_partitions_documents():
    rng = np.random.default_rng(3)
    docs = ["".join(rng.choice(list("abcdefgh"), 12)) + str(i) for i in range(4000)]
    docs += docs[:50]  # exact duplicates
    held = list(select_documents(iter(docs), 0.1, seed=7, heldout=True))
    train = list(select_documents(iter(docs), 0.1, seed=7, heldout=False))
    assert not set(held) & set(train)
    assert sorted(held + train) == sorted(docs)
    flags = [is_heldout(d, 0.1, 7) for d in docs]  # order within each split is kept
    assert held == [d for d, f in zip(docs, flags) if f]
    n = 4000
    assert abs(sum(flags[:n]) - 0.1 * n) < 4 * np.sqrt(n * 0.1 * 0.9)
    other_seed = [is_heldout(d, 0.1, 8) for d in docs[:n]]
    assert other_seed != flags[:n]
    assert not any(is_heldout(d, 0.0, 7) for d in docs[:200])
    assert all(is_heldout(d, 1.0, 7) for d in docs[:200])
    with pytest.raises(DmaError, match="heldout_fraction"):
        is_heldout("x", 1.5, 0)

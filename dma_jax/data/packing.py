"""Packed records: documents -> fixed-length token records -> ArrayRecord shards.

Packing. Documents are laid end to end, each followed by `eos_id`, and cut into
records of exactly `seq_len` tokens: {"tokens": int32[L], "segment_ids": int32[L]}.
Within a record, segment ids number the pieces 1, 2, 3, ...; 0 marks padding,
which only the last record of a stream has. A document cut by a record's end
continues in the next record as that record's segment 1. So a segment ends its
document iff its last token is `eos_id`; otherwise the document continues in the
next record (ambiguous only if a document itself contains `eos_id` right at a cut).

Record bytes (little-endian, no pickle), version 1, 16 + 8 * L bytes:
    offset 0   magic b"DMAR"
    offset 4   uint32 version (1)
    offset 8   uint32 seq_len L
    offset 12  uint32 CRC-32 of the payload (the 8 * L bytes that follow)
    offset 16  int32[L] tokens, then int32[L] segment_ids

Shards: ArrayRecord files (group_size:1, Grain's random-access format) named
PREFIX-00000.array_record, ..., each written under a temporary name and renamed,
described by {"path", "num_records", "sha256"}: the manifest's record of a shard.

Held-out split: decided per document *before* packing, from a hash of (seed,
text), so no document straddles train and held-out and exact duplicates fall on
the same side. The held-out share is Binomial(N, fraction), not exact.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from dma_jax.errors import DmaError

MAGIC = b"DMAR"
VERSION = 1
_HEADER = struct.Struct("<4sIII")  # magic, version, seq_len, crc32 of the payload
_INT32_MAX = 2**31 - 1
_HASH_CHUNK = 1 << 20


def pack_documents(token_docs: Iterable[Sequence[int]], seq_len: int, eos_id: int,
                   pad_id: int = 0) -> Iterator[dict]:
    """Records of exactly `seq_len` tokens packed greedily from `token_docs` (module doc)."""
    if seq_len < 1:
        raise DmaError(f"packing: seq_len must be >= 1, got {seq_len}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= value <= _INT32_MAX:
            raise DmaError(f"packing: {name} {value} is not a non-negative int32")
    tokens_L = np.full(seq_len, pad_id, np.int32)
    segments_L = np.zeros(seq_len, np.int32)
    fill, segment = 0, 0
    for doc_index, doc in enumerate(token_docs):
        piece_P = np.append(_doc_ids(doc, doc_index), np.int32(eos_id))
        start = 0
        while start < len(piece_P):
            n = min(seq_len - fill, len(piece_P) - start)
            segment += 1
            tokens_L[fill:fill + n] = piece_P[start:start + n]
            segments_L[fill:fill + n] = segment
            fill, start = fill + n, start + n
            if fill == seq_len:
                yield {"tokens": tokens_L.copy(), "segment_ids": segments_L.copy()}
                tokens_L[:] = pad_id
                segments_L[:] = 0
                fill, segment = 0, 0
    if fill:
        yield {"tokens": tokens_L, "segment_ids": segments_L}


def encode_record(rec: dict) -> bytes:
    """The version-1 bytes of a packed record (layout in the module doc)."""
    tokens_L = np.asarray(rec["tokens"])
    segments_L = np.asarray(rec["segment_ids"])
    if tokens_L.ndim != 1 or tokens_L.shape != segments_L.shape:
        raise DmaError(f"packed record: tokens {tokens_L.shape} and segment_ids "
                       f"{segments_L.shape} must be 1-D of one length")
    for name, a in (("tokens", tokens_L), ("segment_ids", segments_L)):
        if not np.issubdtype(a.dtype, np.integer) or (a.size and not (
                0 <= a.min() and a.max() <= _INT32_MAX)):
            raise DmaError(f"packed record: {name} must be non-negative int32 values")
    payload = tokens_L.astype("<i4").tobytes() + segments_L.astype("<i4").tobytes()
    return _HEADER.pack(MAGIC, VERSION, len(tokens_L), zlib.crc32(payload)) + payload


def decode_record(data: bytes, seq_len: int, where: str = "packed record") -> dict:
    """The record in `data`; DmaError naming `where` if it is not an intact version-1
    record of `seq_len` tokens."""
    expected = _HEADER.size + 8 * seq_len
    if len(data) != expected:
        raise DmaError(f"{where}: {len(data)} bytes, expected {expected} for seq_len "
                       f"{seq_len} (truncated or corrupted)")
    magic, version, header_len, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DmaError(f"{where}: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise DmaError(f"{where}: record format version {version}, this code reads {VERSION}")
    if header_len != seq_len:
        raise DmaError(f"{where}: record holds seq_len {header_len}, expected {seq_len}")
    payload = memoryview(data)[_HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise DmaError(f"{where}: checksum mismatch (corrupted)")
    both_2xL = np.frombuffer(payload, "<i4").reshape(2, seq_len).astype(np.int32)
    return {"tokens": both_2xL[0], "segment_ids": both_2xL[1]}


def write_shards(records: Iterable[dict], out_dir: str | os.PathLike, prefix: str,
                 records_per_shard: int) -> list[dict]:
    """Write `records` into ArrayRecord shards in `out_dir`, each renamed into place only
    when complete; returns [{"path": name in out_dir, "num_records", "sha256"}]."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if records_per_shard < 1:
        raise DmaError(f"write_shards: records_per_shard must be >= 1, got {records_per_shard}")
    if not prefix or os.sep in prefix:
        raise DmaError(f"write_shards: prefix {prefix!r} must be a non-empty file name")
    os.makedirs(out_dir, exist_ok=True)
    infos: list[dict] = []
    writer, tmp, count = None, None, 0
    try:
        for rec in records:
            if writer is None:
                tmp = os.path.join(out_dir, f".{_shard_name(prefix, len(infos))}.{os.getpid()}.tmp")
                writer, count = _ar_write(ArrayRecordWriter, tmp, tmp, "group_size:1"), 0
            _ar_write(writer.write, tmp, encode_record(rec))
            count += 1
            if count == records_per_shard:
                writer, full = None, writer
                infos.append(_finish_shard(full, tmp, out_dir, prefix, len(infos), count))
        if writer is not None:
            writer, last = None, writer
            infos.append(_finish_shard(last, tmp, out_dir, prefix, len(infos), count))
    finally:
        if writer is not None:  # stopped mid-shard by an error: drop the partial file
            with contextlib.suppress(RuntimeError):
                writer.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return infos


def verify_shards(infos: Sequence[dict], base_dir: str | os.PathLike) -> None:
    """Check that each shard in `infos` exists under `base_dir` with its recorded sha256
    and record count; DmaError naming the first shard that does not."""
    for i, info in enumerate(infos):
        missing = [k for k in ("path", "num_records", "sha256") if k not in info]
        if missing:
            raise DmaError(f"shard info {i}: missing field {missing[0]!r}")
        path = os.path.join(base_dir, info["path"])
        if not os.path.isfile(path):
            raise DmaError(f"{path}: shard file not found")
        digest = _sha256(path)
        if digest != info["sha256"]:
            raise DmaError(f"{path}: sha256 {digest[:16]}... differs from the recorded "
                           f"{str(info['sha256'])[:16]}... (truncated or modified)")
        count = _count_records(path)
        if count != info["num_records"]:
            raise DmaError(f"{path}: {count} records, expected {info['num_records']}")


def read_records(shard_paths: Sequence[str | os.PathLike], seq_len: int) -> "PackedRecords":
    """Random access to the packed records of `shard_paths`, in order (a Grain source)."""
    return PackedRecords(shard_paths, seq_len)


class PackedRecords:
    """Decoded records of ArrayRecord shards under one global index 0..len-1.

    Readers open lazily (so the object pickles cheaply into Grain workers); an
    empty or truncated shard is refused when the object is built.
    """

    def __init__(self, shard_paths: Sequence[str | os.PathLike], seq_len: int):
        if not shard_paths:
            raise DmaError("read_records: no shard paths given")
        self.paths = [os.fspath(p) for p in shard_paths]
        self.seq_len = seq_len
        counts = []
        for path in self.paths:
            if not os.path.isfile(path):
                raise DmaError(f"{path}: shard file not found")
            counts.append(_count_records(path))
            if counts[-1] == 0:
                raise DmaError(f"{path}: no readable records (empty, truncated or not ArrayRecord)")
        self._ends = np.cumsum(counts).tolist()  # global index one past each shard's last
        self._readers: list = [None] * len(self.paths)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Records at `indices`, read shard by shard (one read call per shard)."""
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for out_pos, index in enumerate(indices):
            shard, position = self._locate(index)
            by_shard.setdefault(shard, []).append((out_pos, position))
        out: list = [None] * len(indices)
        for shard, pairs in by_shard.items():
            where = self.paths[shard]
            try:
                blobs = self._reader(shard).read([position for _, position in pairs])
            except RuntimeError as e:
                raise DmaError(f"{where}: corrupted ArrayRecord file "
                               f"({str(e).splitlines()[0]})") from None
            for (out_pos, position), blob in zip(pairs, blobs):
                out[out_pos] = decode_record(blob, self.seq_len, f"{where}: record {position}")
        return out

    def _locate(self, index: int) -> tuple[int, int]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def _reader(self, shard: int):
        from array_record.python.array_record_module import ArrayRecordReader

        with self._lock:
            if self._readers[shard] is None:
                self._readers[shard] = ArrayRecordReader(
                    self.paths[shard], "readahead_buffer_size:0,max_parallelism:0")
            return self._readers[shard]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_readers"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._readers = [None] * len(self.paths)
        self._lock = threading.Lock()


def is_heldout(text: str, heldout_fraction: float, seed: int) -> bool:
    """Whether document `text` belongs to the held-out split (module doc)."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise DmaError(f"heldout_fraction must lie in [0, 1], got {heldout_fraction}")
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(text.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") < heldout_fraction * 2.0**64


def select_documents(docs: Iterable[str], heldout_fraction: float, seed: int,
                     heldout: bool) -> Iterator[str]:
    """The documents of `docs` in the held-out split (`heldout=True`) or in train.

    Run once per split over a fresh iterator of the same source: the two passes
    partition the documents, and only the selected ones get tokenized.
    """
    return (text for text in docs if is_heldout(text, heldout_fraction, seed) == heldout)


def _doc_ids(doc: Sequence[int], doc_index: int) -> np.ndarray:
    """`doc` as int32[n], checked to be 1-D non-negative int32 ids."""
    ids = np.asarray(doc)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise DmaError(f"packing: document {doc_index} is not a 1-D sequence of integer ids")
    if ids.size and not (0 <= ids.min() and ids.max() <= _INT32_MAX):
        raise DmaError(f"packing: document {doc_index} has token ids outside [0, 2**31)")
    return ids.astype(np.int32)


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.array_record"


def _finish_shard(writer, tmp: str, out_dir, prefix: str, index: int, count: int) -> dict:
    """Close `writer`, fsync its file and rename it to its final shard name."""
    _ar_write(writer.close, tmp)
    name = _shard_name(prefix, index)
    digest = _sha256(tmp, fsync=True)
    os.replace(tmp, os.path.join(out_dir, name))
    return {"path": name, "num_records": count, "sha256": digest}


def _ar_write(fn, where: str, *args):
    """`fn(*args)`, an ArrayRecord writer call, with its RuntimeError as a DmaError."""
    try:
        return fn(*args)
    except RuntimeError as e:
        raise DmaError(f"{where}: ArrayRecord write failed ({str(e).splitlines()[0]})") from None


def _sha256(path: str, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _count_records(path: str) -> int:
    """Records in an ArrayRecord file; 0 if it cannot be read (the reader fails silently)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except RuntimeError:
        return 0
    if not reader.ok():
        with contextlib.suppress(RuntimeError):  # closing a failed reader raises its error
            reader.close()
        return 0
    try:
        return reader.num_records()
    finally:
        reader.close()

"""Corpus sources: the documents (str) of one domain input, in a deterministic order.

Four kinds of input, each an iterator so that a corpus is never held in memory:
  - text files (globs): one document per file;
  - JSONL: one document per line, the text under `text_field`;
  - TFDS datasets already prepared in a local `data_dir` (random-access
    ArrayRecord or Parquet, read without TensorFlow; never downloaded);
  - existing ArrayRecord shards whose records are UTF-8 text or JSON objects.
Every source yields every document, empty ones included; what to skip is the
caller's choice. Bad input raises DmaError naming the file (and line or record).
Text, JSONL and ArrayRecord paths and globs may be `gs://...` (read through etils.epath;
an ArrayRecord file is copied to a local temporary file first: the reader opens local
files only).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from etils import epath

from dma_jax.errors import DmaError

_CHUNK = 512  # records read per call from a random-access source
_TFDS_SPLIT_ERRORS = (ValueError, NotImplementedError)  # what TFDS raises for an unknown split or file format


def expand_patterns(patterns: Sequence[str], what: str = "file") -> list[str]:
    """Files named by `patterns` (paths or globs), each glob sorted, duplicates dropped."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in map(os.fspath, patterns):
        if glob.has_magic(pattern):
            matches = _remote_glob(pattern) if _remote(pattern) else [
                p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
            if not matches:
                raise DmaError(f"{pattern}: pattern matches no {what}")
        elif epath.Path(pattern).is_file() if _remote(pattern) else os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise DmaError(f"{pattern}: {what} not found")
        paths.extend(p for p in matches if p not in paths)
    return paths


def _remote(path: str) -> bool:
    return "://" in path


def _remote_glob(pattern: str) -> list[str]:
    """Files matching a `gs://` glob, sorted: the parts before the first wildcard are the folder."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    folder = epath.Path("/".join(parts[:first]))
    return sorted(os.fspath(p) for p in folder.glob("/".join(parts[first:])) if p.is_file())


def _open(path: str):
    return epath.Path(path).open("rb") if _remote(path) else open(path, "rb")


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str]:
    """`path` itself if local, else a temporary local copy of the remote file (deleted after)."""
    if not _remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dma-array-record-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        with epath.Path(path).open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        yield local


def iter_text_files(patterns: Sequence[str]) -> Iterator[str]:
    """One document per UTF-8 file named by `patterns` (paths or globs)."""
    for path in expand_patterns(patterns, "text file"):
        with _open(path) as f:
            data = f.read()
        yield _utf8(data, path)


def iter_jsonl(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """One document per non-blank line of a JSONL file: the string under `text_field`."""
    path = os.fspath(path)
    try:
        f = _open(path)
    except OSError as e:
        raise DmaError(f"{path}: cannot read JSONL file ({e.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            line = _utf8(raw, where)
            if line.strip():
                yield _json_text(line, text_field, where)


def iter_tfds(name: str, split: str, data_dir: str | os.PathLike | None,
              text_field: str = "text") -> Iterator[str]:
    """Documents of a TFDS split prepared in `data_dir`, in the split's stored order.

    Equivalent to `tfds.data_source(name, split=split, data_dir=data_dir, download=False)`,
    with the builder checked first so that "not there" is one clear error rather than
    TFDS's note about file formats. Nothing is ever downloaded. The dataset must have
    been prepared with `file_format="array_record"` (or parquet): TFRecord has no
    random access.
    """
    import tensorflow_datasets as tfds  # slow to import: only when a domain uses TFDS

    where = f"tfds dataset {name!r} in data_dir {os.fspath(data_dir) if data_dir else None!r}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ValueError as e:  # DatasetNotFoundError is a ValueError too
        reason = "not found" if isinstance(e, tfds.core.registered.DatasetNotFoundError) \
            else f"bad name ({_first_line(e)})"
        raise DmaError(f"{where}: {reason} (dma never downloads; prepare it there first)") from None
    if not builder.is_prepared():
        raise DmaError(f"{where}: not prepared there (dma never downloads; prepare it first "
                       "with file_format='array_record')")
    try:
        source = builder.as_data_source(split=split)
    except _TFDS_SPLIT_ERRORS as e:
        raise DmaError(f"{where}, split {split!r}: {_first_line(e)}") from None
    for start in range(0, len(source), _CHUNK):
        examples = source.__getitems__(range(start, min(start + _CHUNK, len(source))))
        for index, example in enumerate(examples, start=start):
            ex_where = f"{where}, split {split!r}, example {index}"
            if text_field not in example:
                raise DmaError(f"{ex_where}: no feature {text_field!r} "
                               f"(features: {', '.join(sorted(example))})")
            value = example[text_field]
            if isinstance(value, bytes):
                value = _utf8(value, ex_where)
            if not isinstance(value, str):
                raise DmaError(f"{ex_where}: feature {text_field!r} is "
                               f"{type(value).__name__}, not text")
            yield value


def iter_array_record_texts(patterns: Sequence[str], text_field: str | None = None
                            ) -> Iterator[str]:
    """Documents of ArrayRecord shards: each record UTF-8 text, or (with `text_field`)
    a JSON object whose `text_field` is the document."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in expand_patterns(patterns, "ArrayRecord file"):
        with _local_copy(path) as local:
            yield from _array_record_docs(ArrayRecordReader, path, local, text_field)


def _array_record_docs(reader_cls, path: str, local: str, text_field: str | None) -> Iterator[str]:
    reader = reader_cls(local)
    if not reader.ok() or reader.num_records() == 0:
        with contextlib.suppress(RuntimeError):  # closing a failed reader raises its error
            reader.close()
        raise DmaError(f"{path}: no readable records (empty, truncated or not ArrayRecord)")
    num_records = reader.num_records()
    try:
        for start in range(0, num_records, _CHUNK):
            try:
                records = reader.read(start, min(start + _CHUNK, num_records))
            except RuntimeError as e:
                raise DmaError(f"{path}: corrupted ArrayRecord file "
                               f"({_first_line(e)})") from None
            for index, record in enumerate(records, start=start):
                where = f"{path}: record {index}"
                text = _utf8(record, where)
                yield text if text_field is None else _json_text(text, text_field, where)
    finally:
        reader.close()


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DmaError(f"{where}: not UTF-8 text (bad byte at offset {e.start})") from None


def _json_text(line: str, text_field: str, where: str) -> str:
    """The string under `text_field` of the JSON object in `line`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DmaError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DmaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise DmaError(f"{where}: no field {text_field!r}")
    if not isinstance(obj[text_field], str):
        raise DmaError(f"{where}: field {text_field!r} is {type(obj[text_field]).__name__}, "
                       "not a string")
    return obj[text_field]


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

"""Small file helpers: atomic writes (temp name, then rename) and JSONL logs, local or on `gs://`.

Paths with a scheme (`gs://bucket/...`, what `run.out_dir` may be on a pod slice) are
`etils.epath` paths; local ones stay `pathlib.Path`. An object store has no rename and no
append, but an object write is all-or-nothing (the object appears whole when the upload
closes), so a remote "atomic" write is a plain write, and a remote JSONL log rewrites
the whole object on every append (logs here are small: one line per step).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Union

from etils import epath

from dma_jax.errors import DmaError

AnyPath = Union[Path, epath.Path]

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def upath(path: str | os.PathLike) -> AnyPath:
    """`path` as a `pathlib.Path`, or an `epath.Path` when it has a scheme (`gs://...`):
    `pathlib.Path("gs://b/k")` would silently be the local path `gs:/b/k`."""
    if isinstance(path, epath.Path) and not isinstance(path, Path):
        return path
    text = os.fspath(path)
    return epath.Path(text) if is_remote(text) else Path(text)


def rmtree(path: AnyPath) -> None:
    """Delete a folder (or a remote prefix) if it exists."""
    if is_remote(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = upath(path)
    if is_remote(path):
        path.write_bytes(data)  # one object upload: readers see the old object or the new one
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = upath(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):  # not the last line: damage, not a kill
                raise DmaError(f"{path}: line {i + 1} is not JSON but later lines are: the log was damaged, not cut "
                               "by a kill (a resume would drop the records after it); repair or delete it") from None
            break  # the last line, cut by a kill: dropped on rewrite
    return out


def rewrite_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class NullLog:
    """A `JsonlLog` that writes nothing: the logs of processes other than 0 in a multi-host run."""

    def truncate_after(self, step: int) -> None:
        pass

    def append(self, record: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLog:
    """Append-only metrics log; `truncate_after(step)` on resume drops records past the checkpoint.
    Remote (`gs://`): the records are kept in memory and the whole object is rewritten at most
    every `flush_every_s` seconds and on `flush()`, which the stages call before every checkpoint
    save (a resume truncates to the checkpoint's step, so nothing logged before it is lost)."""

    def __init__(self, path: str | os.PathLike, flush_every_s: float = 60.0):
        self.path = upath(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records = read_jsonl(self.path) if is_remote(self.path) else None
        self._flush_every_s, self._written, self._dirty = flush_every_s, time.monotonic(), False

    def truncate_after(self, step: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        rewrite_jsonl(self.path, kept)
        if self._records is not None:
            self._records, self._dirty = kept, False
            self._written = time.monotonic()

    def append(self, record: dict) -> None:
        if self._records is not None:
            self._records.append(record)
            self._dirty = True
            if time.monotonic() - self._written >= self._flush_every_s:
                self.flush()
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


    def flush(self) -> None:
        """Remote: write the whole log now if it changed (local appends are written at once)."""
        if self._records is not None and self._dirty:
            rewrite_jsonl(self.path, self._records)
            self._written, self._dirty = time.monotonic(), False

    def close(self) -> None:
        self.flush()


def read_json_file(path: str | os.PathLike, missing: str) -> Any:
    """Parse a JSON file; DmaError '<path>: <missing>' if absent, '<path>: not valid JSON (...)' if broken."""
    from dma_jax.errors import DmaError

    path = upath(path)
    if not path.is_file():
        raise DmaError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DmaError(f"{path}: not valid JSON ({e})") from None

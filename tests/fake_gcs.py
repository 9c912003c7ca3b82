"""A fake `gs://` for tests: objects live in a local folder, and what GCS cannot do fails.

`install(root)` makes every `gs://bucket/key` path -- through `etils.epath` (fsspec's `gs`
protocol, what a real run reaches through gcsfs) and through Orbax's TensorStore arrays (its
`gcs` kvstore, swapped for a `file` one under the same root) -- read and write
`<root>/bucket/key`. Like GCS it refuses appends and read-write opens (objects are written
whole), and makes parent "folders" on write (GCS has none). Code that wrongly treats a
`gs://` string as a local path (`pathlib.Path("gs://b/k")` is `gs:/b/k`) writes under a
`gs:` folder of the working directory instead, which `stray_local_paths` finds.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

_PREFIXES = ("gs://", "gcs://")


class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = ""  # set by install()

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's argument, ignored
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for p in _PREFIXES:
            if path.startswith(p):
                path = path[len(p):]
                break
        if not path.startswith(cls.root):
            path = os.path.join(cls.root, path)
        return path.rstrip("/") or cls.root

    def _unroot(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def glob(self, path, **kwargs):
        return [self._unroot(p) for p in super().glob(path, **kwargs)]

    def walk(self, path, *args, **kwargs):
        for root, dirs, files in super().walk(path, *args, **kwargs):
            yield "gs://" + self._unroot(root), dirs, files

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode or "+" in mode:
            raise PermissionError(f"fake GCS: objects cannot be appended to or updated in place ({path}, mode {mode!r})")
        return super()._open(path, mode, **kwargs)


@contextlib.contextmanager
def install(root: Path) -> Iterator[Path]:
    """Routes gs:// to `root` for the duration (this process only)."""
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    FakeGCS.root = str(root)
    from fsspec.registry import _registry

    saved = {p: _registry.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    FakeGCS.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore(path: str) -> dict:
        return {"driver": "file", "path": FakeGCS._strip_protocol(path)}

    originals = (gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled)
    gcs_utils.get_kvstore_for_gcs = kvstore
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # (asks the bucket's settings)
    try:
        yield root
    finally:
        gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled = originals
        for p, cls in saved.items():
            if cls is None:
                _registry.pop(p, None)
            else:
                _registry[p] = cls
        backend.fsspec_backend._get_filesystem.cache_clear()


def stray_local_paths(cwd: Path) -> list[Path]:
    """Files written by code that took a gs:// string for a local path."""
    return sorted(p for p in Path(cwd).rglob("*") if "gs:" in p.parts or "gcs:" in p.parts)

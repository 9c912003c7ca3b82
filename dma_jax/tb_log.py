"""TensorBoard event files beside every stage's JSONL log (`tensorboard --logdir <run.out_dir>` shows all stages).

`tensorboardX` writes the files; this module only says what goes in them and where:
- `TbLog(folder)` takes the calls a `JsonlLog` takes. `append(record)` writes every numeric scalar of the record
  as one tag at global step `record["step"]`: nested dicts are flattened (`{"mixture": {"math": 0.3}}` is the tag
  `mixture/math`); strings, lists, booleans and None are left out (they stay in the JSONL).
- Resume: an event file cannot be cut, so `truncate_after(step)` opens the next event file with tensorboardX's
  `purge_step=step + 1`, a `SessionLog.START` at that step: TensorBoard drops every earlier point at a later
  step, so a killed-and-resumed run shows each step once, the resumed run's value (`truncate_after(-1)`: a fresh
  start, nothing kept). The Python loader (`EventAccumulator`, `tensorboard --load_fast=false`) honours it; the
  Rust loader drops a tag's later points when that tag's step goes back, which a deterministic re-run does.
- `flush()` (before each checkpoint) closes the file, so the points up to the checkpoint are on disk; the next
  point opens a new file. Each writer opens a new file, `events.out.tfevents.<time>.<host>.<n>`, with `n` the number of event files
  already there: files sort in the order they were written (TensorBoard reads them in name order, and applies a
  purge to the files before it), and two writers in the same second do not share a name.
- Remote folders (`gs://...`): the events go through `etils.epath`, like `io_utils.JsonlLog`'s remote log: the
  writer keeps its file's bytes and rewrites the whole object on every flush (tensorboardX's own `gs://` writer
  needs google-cloud-storage, which this project does not install).
- The folder is `tb_dir(<the folder of the stage's log>)`. `stage_log(jsonl_path, primary)` is what a stage
  opens: on process 0 the JSONL log and its events together; on the other processes of a multi-host run a
  `NullLog` (process 0 writes the files).
"""

from __future__ import annotations

import io
import os
from numbers import Real

from tensorboardX import SummaryWriter, record_writer

from dma_jax.io_utils import AnyPath, JsonlLog, NullLog, atomic_write_bytes, is_remote, upath

TB_DIR = "tb"


def tb_dir(stage_dir: str | os.PathLike) -> AnyPath:
    """The event files' folder of a stage whose logs are in `stage_dir`."""
    return upath(stage_dir) / TB_DIR


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """{tag: value} of every numeric scalar of `record` but its top-level `step`, nested dicts as `a/b`."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, Real) and not isinstance(value, bool) and not (key == "step" and not prefix):
            out[f"{prefix}{key}"] = float(value)  # Python and numpy ints and floats
    return out


class _ObjectFile:
    """An event file on an object store: its bytes, written whole (one object upload) on every flush."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        atomic_write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _ObjectStore:
    """tensorboardX's writer factory for one URL scheme (`record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _ObjectFile:
        return _ObjectFile(path)

    def directory_check(self, path: str) -> None:
        pass  # an object store has no folders


class TbLog:
    """A `JsonlLog`'s calls (`truncate_after`, `append`, `flush`, `close`) written as TensorBoard scalars in
    `folder`. The event file is opened at the first `append` (a stage with nothing left to do writes none)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = upath(folder)
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None

    def truncate_after(self, step: int) -> None:
        """Hide every point of earlier files at a step > `step` (the checkpoint the stage resumes from)."""
        self.close()
        self._purge_step = step + 1

    def _open(self) -> SummaryWriter:
        logdir = os.fspath(self.folder)
        if is_remote(self.folder):
            record_writer.register_writer_factory(logdir.split("://", 1)[0], _ObjectStore())
        n = sum(1 for p in self.folder.glob("events.out.tfevents.*")) if self.folder.is_dir() else 0
        # flush_secs: a crash loses at most this much of the points since the last checkpoint's `flush`
        writer = SummaryWriter(logdir, purge_step=self._purge_step, flush_secs=60, filename_suffix=f".{n:04d}")
        self._purge_step = None  # the purge is in this file; a later file must not hide this file's points
        return writer

    def append(self, record: dict) -> None:
        values = scalars(record)
        if not values:
            return
        if self._writer is None:
            self._writer = self._open()
        step = int(record["step"])
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Every point appended so far is in the file when this returns (the stages call it before a checkpoint,
        whose resume writes only later steps again). tensorboardX's own `flush` does not wait for the queue its
        background thread drains, so points queued just before a checkpoint were lost by a kill after it; closing
        the writer joins that thread. The next point opens the next event file."""
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class StageLog:
    """Several logs as one: each call goes to each (a stage's JSONL log and its TensorBoard events)."""

    def __init__(self, *logs):
        self.logs = logs

    def truncate_after(self, step: int) -> None:
        for log in self.logs:
            log.truncate_after(step)

    def append(self, record: dict) -> None:
        for log in self.logs:
            log.append(record)

    def flush(self) -> None:
        for log in self.logs:
            log.flush()

    def close(self) -> None:
        for log in self.logs:
            log.close()


def events(stage_dir: str | os.PathLike, primary: bool) -> TbLog | NullLog:
    """TensorBoard events only (a stage whose JSONL holds no metrics): `tb_dir(stage_dir)` on process 0."""
    return TbLog(tb_dir(stage_dir)) if primary else NullLog()


def stage_log(jsonl_path: str | os.PathLike, primary: bool) -> StageLog | NullLog:
    """A stage's metrics log: the JSONL at `jsonl_path` and its events in `tb_dir` beside it, on process 0."""
    path = upath(jsonl_path)
    return StageLog(JsonlLog(path), TbLog(tb_dir(path.parent))) if primary else NullLog()

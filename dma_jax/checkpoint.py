"""Orbax checkpoints with composite items: model/optimizer state, JSON metadata, data-iterator state.

Layout: `<dir>/<step>/{state,meta,data}`. Orbax writes each step to a temporary
directory and renames it when complete, so a save killed mid-way leaves the
previous step restorable; leftover temporaries are removed on the next open.
Restoring takes an abstract target whose leaves carry shardings, so a checkpoint
saved on one mesh restores onto another. Directories are `etils.epath` paths, so
`gs://bucket/...` works (pathlib would turn it into `gs:/bucket/...`); on an
accelerator saves are asynchronous (the device-to-host copy blocks, the write
does not), and every read or close first waits for the save in flight.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dma_jax import faults
from dma_jax.errors import DmaError

log = logging.getLogger(__name__)


@jax.jit
def _finite_flags(tree: Any) -> jax.Array:
    """One compiled reduction over every float leaf (not one small program per leaf shape)."""
    flags = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack(flags)) if flags else jax.numpy.bool_(True)


def _all_finite(tree: Any) -> bool:
    return bool(_finite_flags(tree))


class _FaultBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's local default (write into a temporary directory, then rename) with the test hook
    `ckpt.save_mid` just before a step's rename: everything is written, nothing is committed."""

    async def finalize(self, *args, **kwargs):
        if self.get_final().name.isdigit():  # the step directory, not one of its items
            faults.maybe_fault("ckpt.save_mid")
        return await super().finalize(*args, **kwargs)


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
    """`directory` as an epath: URLs (`gs://...`) kept as they are, local paths made absolute."""
    text = os.fspath(directory)
    return epath.Path(text) if "://" in text else epath.Path(text).absolute()


def _async_by_default() -> bool:
    """Async saves on GPU/TPU. Orbax's async save needs the jax.distributed client when there are
    several processes, so a multi-host run without it (see sharding.maybe_initialize_distributed) saves
    synchronously instead of failing."""
    if jax.default_backend() == "cpu":
        return False
    return jax.process_count() == 1 or jax.distributed.is_initialized()


class Checkpointer:
    """Keep-last-N checkpoints of (state pytree, meta JSON, data-iterator JSON)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool | None = None,
                 create: bool = True):
        """`async_save=None`: asynchronous on an accelerator, synchronous on CPU. `create=False` for a reader: no
        folder is made (a missing one has no checkpoint) and no temporary folder is cleaned up. Use it as a context manager (or `close()` it) so that
        an error while reading does not leave Orbax's threads to fail at interpreter exit."""
        self.directory = checkpoint_path(directory)
        if async_save is None:
            async_save = _async_by_default()
        options = ocp.CheckpointManagerOptions(
            # a reader leaves temporary folders alone (they may be a running writer's); Orbax's async clean-up
            # thread is also what printed a traceback at interpreter exit after a reader's one-line error
            max_to_keep=keep, create=create, enable_async_checkpointing=async_save, cleanup_tmp_directories=create,
            temporary_path_class=_FaultBeforeCommit if faults.armed("ckpt.save_mid") else None,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None, data: dict | None = None,
             check_finite: bool = True) -> None:
        """Save `step`; refuses a state with NaN/Inf (never becomes 'latest')."""
        if check_finite and not _all_finite(state):
            raise DmaError(f"{self.directory}: refusing to save step {step}: the state has NaN/Inf values")
        faults.maybe_fault("ckpt.save_begin")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta or {}),
            data=ocp.args.JsonSave(data or {}),
        )
        previous = self.latest_step()
        try:
            self.manager.save(step, args=args, force=True)
        except (ValueError, OSError) as e:  # Orbax reports a full disk as ValueError(RESOURCE_EXHAUSTED ...)
            if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
                raise
            raise DmaError(f"{self.directory}: disk full while saving step {step} (the last complete checkpoint, "
                           f"step {previous}, is intact); free space and re-run the same command") from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default latest) without touching the arrays."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise DmaError(f"{self.directory}: no checkpoint to restore")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError, TypeError, UnicodeDecodeError) as e:
            raise DmaError(f"{self.directory}/{step}: cannot read the checkpoint's meta ({_first_line(e)})") from None
        if not isinstance(out.meta, (dict, type(None))):
            raise DmaError(f"{self.directory}/{step}: the checkpoint's meta is not a JSON object")
        return dict(out.meta or {})

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore (state, meta, data) at `step` (default latest) onto `abstract_state`'s shardings."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise DmaError(f"{self.directory}: no checkpoint to restore")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint: ValueError, tensorstore errors...
            older = [s for s in self.manager.all_steps() if s < step]
            hint = (f"delete {self.directory}/{step} to resume from step {max(older)}" if older
                    else f"delete {self.directory} to start over")
            raise DmaError(f"{self.directory}/{step}: cannot restore checkpoint ({_first_line(e)[:200]}); "
                           f"{hint}") from None
        if not _all_finite(out.state):  # saves refuse NaN, so this is a damaged or foreign checkpoint
            raise DmaError(f"{self.directory}/{step}: the checkpoint's state holds NaN/Inf values")
        return out.state, dict(out.meta or {}), dict(out.data or {})

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def finite_scalar(x: Any) -> bool:
    return math.isfinite(float(np.asarray(x)))

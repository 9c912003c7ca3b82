"""Orbax checkpoints with composite items: model/optimizer state, JSON metadata, data-iterator state.

Layout: `<dir>/<step>/{state,meta,data}`. Orbax writes each step to a temporary
directory and renames it when complete, so a save killed mid-way leaves the
previous step restorable; leftover temporaries are removed on the next open.
Restoring takes an abstract target whose leaves carry shardings, so a checkpoint
saved on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dma_jax.errors import DmaError

log = logging.getLogger(__name__)


@jax.jit
def _finite_flags(tree: Any) -> jax.Array:
    """One compiled reduction over every float leaf (not one small program per leaf shape)."""
    flags = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack(flags)) if flags else jax.numpy.bool_(True)


def _all_finite(tree: Any) -> bool:
    return bool(_finite_flags(tree))


class Checkpointer:
    """Keep-last-N checkpoints of (state pytree, meta JSON, data-iterator JSON)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta or {}),
            data=ocp.args.JsonSave(data or {}),
        )
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default latest) without touching the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise DmaError(f"{self.directory}: no checkpoint to restore")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta or {})

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore (state, meta, data) at `step` (default latest) onto `abstract_state`'s shardings."""
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
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DmaError(f"{self.directory}/{step}: cannot restore checkpoint ({first[:300]})") from None
        return out.state, dict(out.meta or {}), dict(out.data or {})

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def finite_scalar(x: Any) -> bool:
    return math.isfinite(float(np.asarray(x)))

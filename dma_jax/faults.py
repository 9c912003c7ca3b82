"""Interruptions: SIGTERM as a stop flag for the training loops, and a test-only fault hook.

SIGTERM (what a TPU preemption notice sends) becomes a flag that a loop checks at
its safe points: the loop saves a checkpoint there and raises `Preempted`; the
CLI prints its one-line message and exits with `PREEMPTED_EXIT_CODE` (128 + 15,
what a shell reports for a process ended by SIGTERM). Re-running the same
command resumes.

`maybe_fault(event)` lets the fault-injection tests (tests/test_faults.py) stop a
stage at a chosen point instead of guessing a wall-clock delay: with
`DMA_FAULT_AT="<event>:<n>"` (or `"<event>:<n>:TERM"`) the process sends itself
SIGKILL (or SIGTERM) at the n-th occurrence of `event`. The variable is read at
each call (so it may be set after import; a new value starts a new count); with
it unset a call is one environment lookup. Events:
  prepare.document   a document was tokenized (mid-way through writing a domain's shards)
  prepare.domain_done  a domain's `done.json` was written
  prepare.manifest   every domain and benchmark is written, the manifest is not
  pretrain.step      one pre-training optimizer step was dispatched
  sweep.stage_done   a re-weighting step of a chunk was checkpointed
  agent.dispatch     one dispatch of `updates_per_dispatch` agent updates finished
  cpt.step           one CPT optimizer step was dispatched
  cpt.stage_done     a CPT re-weighting step was checkpointed
  ckpt.save_begin    `Checkpointer.save` was called, nothing written yet
  ckpt.save_mid      Orbax wrote the step into its temporary directory, not yet renamed (committed)
"""

from __future__ import annotations

import functools
import os
import signal

from dma_jax.errors import DmaError

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving a checkpoint; the message says where and what to do."""


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks at its safe points (context manager)."""

    active: "SigtermFlag | None" = None  # the innermost installed flag, read by `stop_requested`

    def __init__(self):
        self.stop = False
        self._prev = None
        self._outer = None

    def __enter__(self):
        try:
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._prev = None
        self._outer, SigtermFlag.active = SigtermFlag.active, self
        self.stop = self._outer is not None and self._outer.stop  # a SIGTERM already seen stays seen
        return self

    def _handle(self, *_):
        self.stop = True

    def __exit__(self, *exc):
        SigtermFlag.active = self._outer
        if self._outer is not None:
            self._outer.stop = self._outer.stop or self.stop
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def stop_on_sigterm(fn):
    """Decorator: SIGTERM during `fn` sets a flag (`stop_requested()`) instead of ending the process."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with SigtermFlag():
            return fn(*args, **kwargs)

    return wrapper


def stop_requested() -> bool:
    """True once SIGTERM arrived. With several processes (a pod slice), True when any process got it, so that
    all stop after the same step (every process calls this at the same points of the same loop)."""
    stop = SigtermFlag.active is not None and SigtermFlag.active.stop
    import jax

    if jax.process_count() == 1:
        return stop
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(jax.numpy.asarray(stop)).any())


class _FaultSpec:
    """A parsed DMA_FAULT_AT value: signal `sig` at the `n`-th `event`; `seen` counts the events so far."""

    def __init__(self, raw: str):
        parts = raw.split(":")
        try:
            if len(parts) not in (2, 3) or int(parts[1]) < 1 or (len(parts) == 3 and parts[2] not in ("KILL", "TERM")):
                raise ValueError
        except ValueError:
            raise DmaError(f"DMA_FAULT_AT={raw!r}: expected '<event>:<n>' or '<event>:<n>:TERM' (n >= 1)") from None
        self.raw = raw
        self.event, self.n = parts[0], int(parts[1])
        self.sig = signal.SIGTERM if parts[-1] == "TERM" else signal.SIGKILL
        self.seen = 0


_spec: _FaultSpec | None = None  # the spec of the current DMA_FAULT_AT value, made on first use


def _current() -> _FaultSpec | None:
    """The spec DMA_FAULT_AT asks for now (read at each use, parsed once per value), or None when unset."""
    global _spec
    raw = os.environ.get("DMA_FAULT_AT") or None
    if raw is None:
        _spec = None
    elif _spec is None or _spec.raw != raw:
        _spec = _FaultSpec(raw)
    return _spec


def armed(event: str) -> bool:
    """True when DMA_FAULT_AT names `event` (lets a caller set up a hook only when a test asks for it)."""
    spec = _current()
    return spec is not None and spec.event == event


def maybe_fault(event: str) -> None:
    """Signal this process at the n-th `event` if DMA_FAULT_AT asks for it (module doc); else nothing."""
    spec = _current()
    if spec is None or spec.event != event:
        return
    spec.seen += 1
    if spec.seen == spec.n:
        os.kill(os.getpid(), spec.sig)

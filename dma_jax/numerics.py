"""Numerical health of the training loops: a NaN/Inf loss or a loss spike stops the stage or skips the step
(and `se_of_mean`, the one standard error of a mean that headroom and the study's statistics share).

Config (`optim.*` for the LM stages, `agent.*` for the agent): `on_nonfinite: stop|skip`
and `max_loss_spike` (a loss above m + (max_loss_spike - 1) |m|, m the running mean of the earlier good
losses, counts as bad: max_loss_spike x m when m > 0; None: spikes are not checked).

- stop: the host checks the losses it already reads (per step in pretrain, per
  dispatch or re-weighting step elsewhere) and raises a one-line `DmaError` naming
  the stage, the step and the value before anything is checkpointed, so the last
  good checkpoint stays the latest.
- skip: the step itself (inside jit) keeps the previous state when its loss is bad
  (`keep_if`); the threshold comes from the host's running mean, passed in as an
  argument, so no extra host sync is needed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.errors import DmaError

log = logging.getLogger(__name__)

EMA_DECAY = 0.9  # running mean of good losses: mean <- 0.9 mean + 0.1 loss


def step_ok(loss: jax.Array, max_loss: jax.Array, *others: jax.Array) -> jax.Array:
    """True when `loss` (and every other metric) is finite and the loss is at most `max_loss` (on device)."""
    ok = jnp.isfinite(loss) & (loss <= max_loss)
    for x in others:
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def se_of_mean(x_N) -> float:
    """Standard error of the mean of a sample, sd(ddof=1) / sqrt(n): NaN with one value, exactly 0.0 when all are
    equal (np.std leaves a rounding residue there, 1.96e-17 for [0.2] * 3 but 0 for [0.25] * 3, and a ratio to the
    SE, a t statistic or H / SE, must not depend on which). The one definition: headroom, the study's gate and its
    t intervals use it."""
    x_N = np.asarray(x_N, np.float64)
    if x_N.size < 2:
        return math.nan
    return 0.0 if np.ptp(x_N) == 0 else float(x_N.std(ddof=1) / math.sqrt(x_N.size))


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `ok`, else `old` (leaf by leaf; a skipped step leaves the state as it was)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class LossGuard:
    """Host side of the check: a running mean of good losses, the spike threshold, stop or count skips.

    `stage` names the stage in messages; `where_good` is called on a failure and
    returns a phrase naming the last good checkpoint.
    """

    def __init__(self, stage: str, on_nonfinite: str, max_loss_spike: float | None, setting: str = "optim"):
        if on_nonfinite not in ("stop", "skip"):
            raise DmaError(f"{setting}.on_nonfinite={on_nonfinite!r} must be 'stop' or 'skip'")
        self.stage, self.skip, self.ratio, self.setting = stage, on_nonfinite == "skip", max_loss_spike, setting
        self.mean: float | None = None
        self.skipped = 0

    def state(self) -> dict:
        """What a checkpoint keeps of the guard (JSON), so a resumed run checks its next losses against the same
        running mean as an uninterrupted one (a fresh guard would accept any loss until its first good one)."""
        return {"mean": self.mean, "skipped": self.skipped}

    def restore(self, state: dict | None) -> "LossGuard":
        """Back to `state()`'s values (None or {}: a checkpoint written before the guard was kept: as new)."""
        state = state or {}
        self.mean = None if state.get("mean") is None else float(state["mean"])
        self.skipped = int(state.get("skipped", 0))
        return self

    def max_loss(self) -> float:
        """The spike threshold for the next steps (inf while spikes are off or nothing is known yet):
        mean + (max_loss_spike - 1) x |mean|, i.e. max_loss_spike x mean for a positive mean, and as far above a
        negative one (an agent's log-likelihood loss can be negative: ratio x mean would lie below the mean there)."""
        if self.ratio is None or self.mean is None:
            return math.inf
        return self.mean + (self.ratio - 1.0) * abs(self.mean)

    def problem(self, loss: float, max_loss: float | None = None) -> str | None:
        """Why `loss` is bad (None if it is good) against `max_loss` (default: the current threshold)."""
        max_loss = self.max_loss() if max_loss is None else max_loss
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if loss > max_loss:
            return (f"loss spike: {loss:.4g} is above {max_loss:.4g}, the running mean {self.mean:.4g} + "
                    f"{self.ratio - 1:.3g} x |mean| ({self.setting}.max_loss_spike={self.ratio})")
        return None

    def check(self, step: int, loss: float, last_good: str, max_loss: float | None = None,
              who: str = "") -> bool:
        """Check one step's loss: True if good (it joins the running mean); stop raises, skip counts.

        `max_loss` is the threshold the device used for this step (skip mode); `who`
        names a proxy or metric in the message.
        """
        loss = float(loss)
        why = self.problem(loss, max_loss)
        if why is None:
            self.mean = loss if self.mean is None else EMA_DECAY * self.mean + (1 - EMA_DECAY) * loss
            return True
        where = f"{self.stage}{' ' + who if who else ''}: {why} at step {step}"
        if not self.skip:
            raise DmaError(f"{where}; stopped, last good checkpoint: {last_good} (lower the learning rate, or set "
                           f"{self.setting}.on_nonfinite=skip)")
        self.skipped += 1
        log.warning("%s: step skipped (%s.on_nonfinite=skip), %d skipped so far", where, self.setting, self.skipped)
        return False

    def check_many(self, steps_S: np.ndarray, losses_S: np.ndarray, last_good: str, max_loss: float | None = None,
                   who: str = "") -> int:
        """`check` for the losses of several steps in order; returns how many were good."""
        return sum(self.check(int(s), float(v), last_good, max_loss, who) for s, v in zip(steps_S, losses_S))


def last_good(ckpt) -> str:
    """'step K in DIR' for a Checkpointer (or 'none' before the first save)."""
    step = ckpt.latest_step()
    return f"step {step} in {ckpt.directory}" if step is not None else f"none yet in {ckpt.directory}"


def guarded_scan(update, state: Any, n_updates: int, loss_key: str, max_loss: jax.Array | None) -> tuple[Any, dict]:
    """`n_updates` of `update(state) -> (state, metrics)` under `lax.scan`; metrics are their mean.

    With `max_loss` (on_nonfinite=skip) an update whose metrics are NaN/Inf or whose
    `loss_key` is above `max_loss` keeps the previous state (but a `key` field still
    advances, so the next update draws another batch); the mean is over the kept
    updates and `skipped` counts the others.
    """
    if max_loss is None:
        state, metrics = jax.lax.scan(lambda s, _: update(s), state, None, length=n_updates)
        return state, jax.tree.map(lambda m: m.mean(0), metrics)

    def body(s, _):
        new, m = update(s)
        ok = step_ok(m[loss_key], max_loss, *m.values())
        kept = keep_if(ok, new, s)
        if hasattr(new, "key") and hasattr(kept, "_replace"):
            kept = kept._replace(key=new.key)
        return kept, (m, ok)

    state, (metrics, ok_n) = jax.lax.scan(body, state, None, length=n_updates)
    n_ok = ok_n.sum()
    mean = jax.tree.map(lambda m: jnp.where(ok_n, m, 0).sum(0) / jnp.maximum(n_ok, 1), metrics)
    return state, dict(mean, skipped=(n_updates - n_ok).astype(jnp.float32))

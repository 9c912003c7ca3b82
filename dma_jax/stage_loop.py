"""The one resumable loop of every training stage (pretrain, sweep, cpt, agent): unit -> checkpoint -> SIGTERM.

A stage restores its state and finds `start` itself (what it restores differs), then hands
`StageLoop.run` two functions: `unit(i)` does unit i (an optimizer step, a re-weighting step,
a dispatch of agent updates) including its numerics guard, and `save(done)` checkpoints after
`done` units. The loop owns what must not differ between stages:
- checkpoint when `due(done)`, at the last unit, and whenever a stop was requested;
- SIGTERM through `faults.stop_requested()`, which on a pod slice is True on every host once any
  host got the signal, so all hosts checkpoint the same unit and stop together (no host is left
  waiting in a collective); the stop raises `Preempted` with the one-line message the CLI prints;
- the fault-injection events of the tests (`event_before_save`, `event_after_save`);
- the progress bar (`bar_scale` bar ticks per unit), closed, with the checkpointer and the stage's metrics
  log (its TensorBoard event file), on every exit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tqdm.auto import tqdm

from dma_jax.faults import Preempted, SigtermFlag, maybe_fault, stop_requested


@dataclasses.dataclass
class StageLoop:
    name: str  # "pretrain proxy", "sweep", "cpt fixed-0.3 seed 0", "agent sft": messages and the progress bar
    ckpt: object  # checkpoint.Checkpointer: its directory is named on a stop; closed when the loop ends
    total: int  # units
    unit_name: str = "step"
    progress: bool = True
    bar_scale: int = 1  # progress-bar ticks per unit (the agent counts updates, its units are dispatches)
    due: Callable[[int], bool] = lambda done: True  # checkpoint after `done` units? (besides the last / a stop)
    describe_stop: Callable[[int], str] | None = None  # "after re-weighting step 3/5" for the SIGTERM message
    event_before_save: str | None = None  # maybe_fault(...) after each unit, before its checkpoint
    event_after_save: str | None = None  # maybe_fault(...) after each unit's checkpoint
    log: object | None = None  # the stage's metrics log (tb_log.stage_log / tb_log.events): closed when the loop ends
    bar: tqdm | None = None

    def run(self, start: int, unit: Callable[[int], None], save: Callable[[int], None]) -> None:
        """Units start .. total-1; raises `Preempted` after checkpointing when SIGTERM arrived (on any host)."""
        self.bar = tqdm(total=self.total * self.bar_scale, initial=start * self.bar_scale, desc=self.name,
                        unit=self.unit_name, disable=not self.progress, dynamic_ncols=True)
        try:
            with SigtermFlag():
                for i in range(start, self.total):
                    unit(i)
                    done = i + 1
                    self.bar.update(self.bar_scale)
                    if self.event_before_save:
                        maybe_fault(self.event_before_save)
                    saved = self.due(done) or done == self.total
                    if saved:
                        save(done)
                        if self.event_after_save:
                            maybe_fault(self.event_after_save)
                    if stop_requested():  # every host answers the same: all stop after this unit
                        if not saved:
                            save(done)
                        what = self.describe_stop(done) if self.describe_stop else f"at {self.unit_name} {done}"
                        raise Preempted(f"{self.name}: stopped by SIGTERM {what} (checkpoint in "
                                        f"{self.ckpt.directory}); re-run the same command to resume")
        finally:
            self.bar.close()
            self.ckpt.close()
            if self.log is not None:
                self.log.close()

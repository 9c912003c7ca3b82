"""The mixture-schedule file (`dma-schedule-v1`): the mixture of each re-weighting step of a CPT run, and the
optimizer step at which it starts, as JSON and as CSV. Written by `dma export schedule`, replayed by
`dma cpt --policy schedule:FILE` (`policies.make_policy`); this module is its only reader and writer.

JSON: {"format": "dma-schedule-v1", "source": what made it, "domain_names": [D names], "steps_per_stage": S,
"train_weights": [[0, {domain: weight}], [S, {...}], ..., [(T-1)*S, {...}]]}. `train_weights` is levanter's staged
mixture as it stands: `LMMixtureDatasetConfig.train_weights` takes a dict {domain: weight} or a list of
(start step, {domain: weight}) pairs (stanford-crfm/levanter, src/levanter/data/text.py); the start is an optimizer
step counted from 0 (the steps done before the mixture starts), which levanter turns into a sequence index through
its batch schedule (`rescale_mixture_schedule_for_batch_schedule`, src/levanter/data/mixture.py, whose
`MixtureDataset` wants the first stage at 0, increasing starts, and each start a multiple of `mixture_block_size`
sequences once rescaled). Re-weighting step t of our CPT trains on optimizer steps t*S+1 .. (t+1)*S (counted from
1), so its mixture starts at t*S. A bare list (levanter's `train_weights` alone) is read too.

CSV: header `stage,start_step,<domain>,...`, then one row per re-weighting step.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Sequence

import numpy as np

from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_json, atomic_write_text, upath

FORMAT = "dma-schedule-v1"
_SUM_TOL = 1e-6  # what `policies.SafePolicy` accepts as a mixture


@dataclasses.dataclass(frozen=True)
class MixtureSchedule:
    """T mixtures over D named domains, mixture t used from optimizer step `start_steps[t]` (counted from 0)."""

    domain_names: tuple[str, ...]
    start_steps: tuple[int, ...]  # [T]
    weights_TxD: np.ndarray  # float64

    def for_domains(self, names: Sequence[str], where: str) -> np.ndarray:
        """The weights [T, D] with columns in the order of `names`; the domain sets must be equal."""
        only_file = sorted(set(self.domain_names) - set(names))
        only_run = sorted(set(names) - set(self.domain_names))
        if only_file or only_run:
            raise DmaError(f"{where}: the schedule's domains are not this run's domain space (only in the file: "
                           f"{only_file}; only in the run: {only_run})")
        return self.weights_TxD[:, [self.domain_names.index(n) for n in names]]


def make(source: str, domain_names: Sequence[str], steps_per_stage: int, weights_TxD) -> dict:
    """The JSON document of T mixtures, mixture t starting at optimizer step t * steps_per_stage."""
    w_TxD = np.asarray(weights_TxD, np.float64)
    return {"format": FORMAT, "source": source, "domain_names": list(domain_names), "steps_per_stage": steps_per_stage,
            "train_weights": [[t * steps_per_stage, dict(zip(domain_names, w_D.tolist()))]
                              for t, w_D in enumerate(w_TxD)]}


def write(doc: dict, json_path: AnyPath, csv_path: AnyPath) -> None:
    """The document as JSON and as CSV (floats written in full: both read back to the same bits)."""
    atomic_write_json(json_path, doc)
    names = doc["domain_names"]
    buf = io.StringIO()
    rows = csv.writer(buf, lineterminator="\n")
    rows.writerow(["stage", "start_step", *names])
    for t, (start, w) in enumerate(doc["train_weights"]):
        rows.writerow([t, start, *(repr(float(w[n])) for n in names)])
    atomic_write_text(csv_path, buf.getvalue())


def read(path: AnyPath) -> MixtureSchedule:
    """A schedule file, CSV if its name ends in .csv, else JSON; each problem is a one-line DmaError naming it."""
    path = upath(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DmaError(f"{path}: cannot read the schedule file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DmaError(f"{path}: not a text file (a schedule is JSON or CSV)") from None
    sched = _from_csv(text, str(path)) if path.name.lower().endswith(".csv") else _from_json(text, str(path))
    _check_weights(sched, str(path))
    return sched


def check_stages(sched: MixtureSchedule, num_stages: int, steps_per_stage: int, where: str) -> None:
    """One mixture per re-weighting step of this CPT, starting at 0, S, 2S, ..."""
    if len(sched.start_steps) != num_stages:
        raise DmaError(f"{where}: {len(sched.start_steps)} mixture stage(s), but this CPT has "
                       f"cpt.num_stages={num_stages}")
    for t, start in enumerate(sched.start_steps):
        if start != t * steps_per_stage:
            raise DmaError(f"{where}: stage {t} starts at step {start}, but with cpt.steps_per_stage="
                           f"{steps_per_stage} it starts at {t * steps_per_stage} (starts 0, S, 2S, ...)")


def _from_json(text: str, where: str) -> MixtureSchedule:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DmaError(f"{where}: not valid JSON ({e})") from None
    if isinstance(obj, dict):
        if obj.get("format", FORMAT) != FORMAT:
            raise DmaError(f"{where}: format is {obj['format']!r}, this version reads {FORMAT!r}")
        if "train_weights" not in obj:
            raise DmaError(f"{where}: no 'train_weights' (a list of [start step, {{domain: weight}}] pairs)")
        obj = obj["train_weights"]
    if not isinstance(obj, list) or not obj:
        raise DmaError(f"{where}: train_weights must be a non-empty list of [start step, {{domain: weight}}] pairs")
    starts, rows, names = [], [], None
    for t, stage in enumerate(obj):
        if not (isinstance(stage, list) and len(stage) == 2 and _is_int(stage[0]) and isinstance(stage[1], dict)
                and stage[1]):
            raise DmaError(f"{where}: train_weights[{t}] must be [start step, {{domain: weight}}], got {stage!r:.80}")
        if names is None:
            names = tuple(stage[1])
        elif set(stage[1]) != set(names):
            raise DmaError(f"{where}: train_weights[{t}] names other domains than train_weights[0] "
                           f"({sorted(set(stage[1]) ^ set(names))})")
        bad = [d for d, w in stage[1].items() if not (isinstance(w, (int, float)) and not isinstance(w, bool))]
        if bad:
            raise DmaError(f"{where}: train_weights[{t}]: weight of {bad[0]!r} is {stage[1][bad[0]]!r}, not a number")
        starts.append(stage[0])
        rows.append([float(stage[1][d]) for d in names])
    return MixtureSchedule(names, tuple(starts), np.asarray(rows, np.float64))


def _from_csv(text: str, where: str) -> MixtureSchedule:
    table = [r for r in csv.reader(io.StringIO(text)) if r]
    if not table or table[0][:2] != ["stage", "start_step"] or len(table[0]) < 3:
        raise DmaError(f"{where}: not a schedule CSV (header must be stage,start_step,<domain>,...)")
    names = tuple(table[0][2:])
    if len(set(names)) != len(names):
        raise DmaError(f"{where}: a domain appears twice in the header")
    starts, rows = [], []
    for i, row in enumerate(table[1:], start=2):
        if len(row) != len(table[0]):
            raise DmaError(f"{where}: line {i} has {len(row)} values for {len(table[0])} columns")
        try:
            stage, start, weights = int(row[0]), int(row[1]), [float(x) for x in row[2:]]
        except ValueError:
            raise DmaError(f"{where}: line {i} is not numbers ({','.join(row)[:80]})") from None
        if stage != i - 2:
            raise DmaError(f"{where}: line {i} is stage {stage}, expected {i - 2} (stages in order from 0)")
        starts.append(start)
        rows.append(weights)
    if not rows:
        raise DmaError(f"{where}: no stage rows under the header")
    return MixtureSchedule(names, tuple(starts), np.asarray(rows, np.float64))


def _check_weights(sched: MixtureSchedule, where: str) -> None:
    """Every mixture finite, non-negative and summing to 1 (within 1e-6): refused, not renormalised."""
    for t, w_D in enumerate(sched.weights_TxD):
        for d, w in zip(sched.domain_names, w_D.tolist()):
            if not math.isfinite(w) or w < 0:
                raise DmaError(f"{where}: stage {t}: weight of {d!r} is {w!r} (must be a finite number >= 0)")
        if abs(w_D.sum() - 1.0) > _SUM_TOL:
            raise DmaError(f"{where}: stage {t}: weights sum to {w_D.sum():.9g}, not 1 (within {_SUM_TOL:g}); "
                           "not renormalised: fix the file")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

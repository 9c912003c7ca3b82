"""Grain-based domain mixer that feeds the target model during CPT.

Upstream, each domain is one Grain `MapDataset`: record indices
`range(n) -> shuffle(seed_d) -> repeat()`, then a read of that record from the
domain's random-access source. Grain reseeds the shuffle each epoch, so element
k of a domain's infinite stream is computable in O(1) from k and no record
repeats before its epoch ends. The mixer, in the main process, asks the policy
for this step's weights, turns them into exact per-batch counts
(largest-remainder rounding of weight * B plus the fraction each domain was owed
after the previous batch, so a domain weighted below one example per batch still
gets its share over consecutive batches — cumulative counts stay within one
example of the cumulative quota; zero weights get nothing), reads the next `counts[d]`
stream elements of every domain at its cursor, and permutes the rows with a
per-step key. Nothing is buffered after the mixer, so a new mixture takes effect
at the very next batch. The state (step, cursors, carry, weight history) is JSON and
restores exactly with no replay.
"""

import concurrent.futures
import math
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from dma_jax.errors import DmaError

WEIGHT_SUM_TOLERANCE = 1e-6
_DOMAIN_SEED_TAG = 0
_BATCH_SEED_TAG = 1

Policy = Callable[[int], Any]
Decode = Callable[[Any], Mapping[str, Any]]


def validate_weights(weights: Any, domain_names: Sequence[str], where: str) -> np.ndarray:
    """Returns the weights as float64 [D]; DmaError naming the bad value otherwise."""
    weights_D = np.asarray(weights, dtype=np.float64)
    num_domains = len(domain_names)
    if weights_D.shape != (num_domains,):
        raise DmaError(
            f"{where}: weights have shape {weights_D.shape}, expected ({num_domains},) "
            f"(one per domain: {', '.join(domain_names)})"
        )
    for name, weight in zip(domain_names, weights_D):
        if not math.isfinite(weight):
            raise DmaError(f"{where}: weight of domain {name!r} is {weight} (must be finite)")
        if weight < 0:
            raise DmaError(f"{where}: weight of domain {name!r} is {weight} (must be >= 0)")
    total = float(weights_D.sum())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise DmaError(
            f"{where}: weights sum to {total:.9g} (must be 1 within {WEIGHT_SUM_TOLERANCE:g})"
        )
    return weights_D


def largest_remainder_counts(weights_D: np.ndarray, total: int) -> np.ndarray:
    """Exact integer counts [D] summing to `total`, closest to `weights_D * total`.

    Hamilton's method: floor every quota, then hand the remaining units to the
    largest fractional parts; ties go to the lower domain index. A zero weight
    never receives a unit.
    """
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise DmaError(f"largest_remainder_counts: total is {total!r} (must be an int >= 0)")
    weights_D = np.asarray(weights_D, dtype=np.float64)
    if weights_D.ndim != 1:
        raise DmaError(
            f"largest_remainder_counts: weights have shape {weights_D.shape}, expected [D]"
        )
    names = [f"#{d}" for d in range(len(weights_D))]
    weights_D = validate_weights(weights_D, names, "largest_remainder_counts")
    quotas_D = weights_D / weights_D.sum() * int(total)
    counts_D = np.floor(quotas_D).astype(np.int64)
    remaining = int(np.clip(int(total) - counts_D.sum(), 0, len(counts_D)))
    order_D = np.argsort(-(quotas_D - counts_D), kind="stable")
    counts_D[order_D[:remaining]] += 1
    return counts_D


def _default_decode(record: Any) -> Mapping[str, Any]:
    """A dict of fields (must hold "tokens") or an array of token ids."""
    if isinstance(record, Mapping):
        return record
    if isinstance(record, (bytes, bytearray, memoryview)):
        raise DmaError(
            "mixer record: got raw bytes (e.g. from ArrayRecordDataSource); "
            "pass decode= to turn a record into token ids"
        )
    return {"tokens": record}


def _domain_seed(seed: int, domain: int) -> int:
    """A 32-bit Grain shuffle seed per domain, unrelated across domains."""
    return int(np.random.SeedSequence([seed, _DOMAIN_SEED_TAG, domain]).generate_state(1)[0])


class _ReadRecord:
    """Grain map: stream element (a source index) -> (index, decoded fields)."""

    def __init__(self, records: grain.MapDataset, decode: Decode):
        self._records = records
        self._decode = decode

    def __call__(self, index: int) -> tuple[int, Mapping[str, Any]]:
        return int(index), self._decode(self._records[int(index)])


class DomainMixer:
    """Infinite iterator of mixed batches whose domain counts follow `policy(step)`.

    Each batch is a dict of numpy arrays with leading axis B: every record field
    stacked (`tokens` as int32 [B, L]), plus `domain` int32 [B] and `record_id`
    int64 [B] (index within that domain's source; (domain, record_id) is stable).
    `decode` turns a raw record into a dict of fields; it runs on the reader
    threads when `num_threads > 0`, which give the same batches as 0.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        domain_names: Sequence[str],
        batch_size: int,
        policy: Policy,
        seed: int,
        num_threads: int = 0,
        decode: Decode = _default_decode,
    ):
        if len(sources) != len(domain_names):
            raise DmaError(
                f"DomainMixer: {len(sources)} sources but {len(domain_names)} domain_names"
            )
        if len(set(domain_names)) != len(domain_names) or not domain_names:
            raise DmaError(
                f"DomainMixer: domain_names {list(domain_names)} must be unique and non-empty"
            )
        if batch_size < 1:
            raise DmaError(f"DomainMixer: batch_size is {batch_size} (must be >= 1)")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DmaError(f"DomainMixer: seed is {seed!r} (must be an int >= 0)")
        if num_threads < 0:
            raise DmaError(f"DomainMixer: num_threads is {num_threads} (must be >= 0)")
        self.domain_names = [str(name) for name in domain_names]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._policy = policy
        self._streams = []
        self._sizes = []
        for d, (name, source) in enumerate(zip(self.domain_names, sources)):
            size = len(source)
            if size == 0:
                raise DmaError(f"DomainMixer: source of domain {name!r} is empty")
            records = grain.MapDataset.source(source)
            stream = (
                grain.MapDataset.range(size)
                .shuffle(seed=_domain_seed(self.seed, d))
                .repeat()
                .map(_ReadRecord(records, decode))
            )
            self._streams.append(stream)
            self._sizes.append(size)
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 0 else None
        )
        self._step = 0
        self._cursors = [0] * len(self._streams)
        self._carry = np.zeros(len(self._streams), np.float64)
        self._weight_history: list[list] = []

    @property
    def step(self) -> int:
        """Index of the next batch."""
        return self._step

    def __iter__(self) -> "DomainMixer":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step = self._step
        where = f"mixer policy at step {step}"
        weights_D = validate_weights(self._policy(step), self.domain_names, where)
        counts_D = self._counts(weights_D)
        jobs = []
        for d, count in enumerate(counts_D):
            start = self._cursors[d]
            jobs.extend((d, k) for k in range(start, start + int(count)))
        examples = self._read(jobs)
        batch = self._stack(examples, [d for d, _ in jobs])
        perm_B = np.random.default_rng([self.seed, _BATCH_SEED_TAG, step]).permutation(
            self.batch_size
        )
        batch = {key: value[perm_B] for key, value in batch.items()}
        for d, count in enumerate(counts_D):
            self._cursors[d] += int(count)
        if not self._weight_history or self._weight_history[-1][1] != weights_D.tolist():
            self._weight_history.append([step, weights_D.tolist()])
        self._step = step + 1
        return batch

    def _counts(self, weights_D: np.ndarray) -> np.ndarray:
        """This batch's counts: largest-remainder rounding of the quotas weight * B plus the carried
        fraction; the carry is what each domain is still owed (or was over-served), reset to 0 for a
        domain whose weight is 0."""
        active_D = weights_D > 0
        owed_D = np.where(active_D, weights_D * self.batch_size + self._carry, 0.0)
        quota_D = np.maximum(owed_D, 0.0)
        if quota_D.sum() <= 0:  # only if carries ever summed to -B; fall back to this step's weights
            quota_D = weights_D
        counts_D = largest_remainder_counts(quota_D / quota_D.sum(), self.batch_size)
        self._carry = np.where(active_D, owed_D - counts_D, 0.0)
        return counts_D

    def _read(self, jobs: list[tuple[int, int]]) -> list[tuple[int, Mapping[str, Any]]]:
        """Reads stream element k of domain d for each (d, k), in order."""
        read = lambda job: self._streams[job[0]][job[1]]  # noqa: E731
        if self._pool is None:
            return [read(job) for job in jobs]
        return list(self._pool.map(read, jobs))

    def _stack(self, examples: list, domains: list[int]) -> dict[str, np.ndarray]:
        """Stacks every record field over the batch; adds `domain` and `record_id`."""
        fields = examples[0][1].keys()
        for d, (index, fields_i) in zip(domains, examples):
            if fields_i.keys() != fields or "tokens" not in fields:
                raise DmaError(
                    f"mixer record {index} of domain {self.domain_names[d]!r}: fields "
                    f"{sorted(fields_i)} (every record needs the same fields, incl. 'tokens')"
                )
            if {"domain", "record_id"} & fields_i.keys():
                raise DmaError(
                    f"mixer record {index} of domain {self.domain_names[d]!r}: fields "
                    "'domain'/'record_id' are reserved for the mixer"
                )
        batch = {}
        for key in fields:
            values = [np.asarray(fields_i[key]) for _, fields_i in examples]
            shapes = {value.shape for value in values}
            if len(shapes) != 1:
                raise DmaError(
                    f"mixer batch at step {self._step}: field {key!r} has shapes "
                    f"{sorted(shapes)} across records (must be equal; pack records first)"
                )
            batch[key] = np.stack(values)
        if batch["tokens"].ndim != 2 or not np.issubdtype(batch["tokens"].dtype, np.integer):
            raise DmaError(
                f"mixer batch at step {self._step}: tokens are {batch['tokens'].dtype} "
                f"{batch['tokens'].shape[1:]} per record (must be 1-D integer token ids)"
            )
        batch["tokens"] = batch["tokens"].astype(np.int32)
        batch["domain"] = np.asarray(domains, dtype=np.int32)
        batch["record_id"] = np.asarray([index for index, _ in examples], dtype=np.int64)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; save it beside the model (e.g. Orbax JsonSave).

        `weight_history` lists [first_step, weights] each time the weights changed.
        """
        return {
            "step": self._step,
            "cursors": list(self._cursors),
            "carry": [float(c) for c in self._carry],
            "weight_history": [[step, list(w)] for step, w in self._weight_history],
            "seed": self.seed,
            "domain_names": list(self.domain_names),
            "domain_sizes": list(self._sizes),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores `get_state()` output exactly, in O(1); refuses a foreign state."""
        missing = {"step", "cursors", "weight_history", "seed", "domain_names", "domain_sizes"}
        missing -= set(state)
        if missing:
            raise DmaError(f"mixer state: missing keys {sorted(missing)}")
        names = [str(name) for name in state["domain_names"]]
        if names != self.domain_names:
            only_state = [name for name in names if name not in self.domain_names]
            only_mixer = [name for name in self.domain_names if name not in names]
            raise DmaError(
                f"mixer state: domain_names differ: only in state {only_state}, "
                f"only in mixer {only_mixer}"
                + ("" if only_state or only_mixer else f" (order {names} vs {self.domain_names})")
            )
        if int(state["seed"]) != self.seed:
            raise DmaError(f"mixer state: seed is {state['seed']}, mixer seed is {self.seed}")
        if list(state["domain_sizes"]) != self._sizes:
            raise DmaError(
                f"mixer state: domain_sizes {list(state['domain_sizes'])} differ from "
                f"the sources' sizes {self._sizes}"
            )
        cursors = [int(c) for c in state["cursors"]]
        if len(cursors) != len(self._sizes) or min(cursors) < 0 or int(state["step"]) < 0:
            raise DmaError(
                f"mixer state: step {state['step']} / cursors {state['cursors']} invalid "
                f"(need step >= 0 and {len(self._sizes)} cursors >= 0)"
            )
        carry = [float(c) for c in state.get("carry", [0.0] * len(cursors))]  # states before the carry: 0
        if len(carry) != len(cursors) or not all(math.isfinite(c) for c in carry):
            raise DmaError(f"mixer state: carry {state.get('carry')} invalid (need {len(cursors)} finite numbers)")
        self._step = int(state["step"])
        self._cursors = cursors
        self._carry = np.array(carry, np.float64)
        self._weight_history = [[int(step), [float(w) for w in weights]]
                                for step, weights in state["weight_history"]]

    def close(self) -> None:
        """Stops the reader threads (if any)."""
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> "DomainMixer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def measure_throughput(mixer: DomainMixer, n_batches: int) -> float:
    """Tokens per second over the next `n_batches` batches (consumes them)."""
    start = time.perf_counter()
    num_tokens = sum(next(mixer)["tokens"].size for _ in range(n_batches))
    return num_tokens / (time.perf_counter() - start)

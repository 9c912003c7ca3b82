"""Step-indexed batches of packed records from some fields of a domain space (for pre-training).

A training batch is a pure function of (seed, step): records are drawn uniformly
(so each domain in proportion to its size) from the train splits of the chosen
fields. Resuming at step k needs no iterator state and yields exactly the batches
an uninterrupted run would. Evaluation batches are fixed, evenly spaced held-out records.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError


class RecordStream:
    def __init__(self, space: DomainSpace, fields: Sequence[str], split: str = "train"):
        sub = space.subset(fields)
        self.sources = [sub.records(d, split) for d in range(sub.num_domains)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        if self.offsets[-1] == 0:
            raise DmaError(f"{space.dir}: fields {list(fields)} have no {split} records")
        self.record_len = space.record_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        recs = []
        for i in indices:
            d = bisect.bisect_right(self.offsets, int(i)) - 1
            recs.append(self.sources[d][int(i) - int(self.offsets[d])])
        return {
            "tokens": np.stack([r["tokens"] for r in recs]).astype(np.int32),
            "segment_ids": np.stack([r["segment_ids"] for r in recs]).astype(np.int32),
        }

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, step])
        return self._read(rng.integers(0, len(self), size=batch_size))

    def eval_batches(self, n_batches: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        n = n_batches * batch_size
        idx = np.linspace(0, len(self) - 1, n).round().astype(np.int64)
        return [self._read(idx[i * batch_size : (i + 1) * batch_size]) for i in range(n_batches)]

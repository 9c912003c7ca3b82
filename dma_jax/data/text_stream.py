"""A token stream for pre-training: text files or built-in corpora, byte-tokenised, random windows.

Batches are a pure function of (seed, step): resuming at step k needs no
iterator state and yields exactly the batches an uninterrupted run would.
The last `holdout_fraction` of each document's tokens is held out for evaluation.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import numpy as np

from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError


def _builtin_texts(name: str) -> list[str]:
    if name == "python_docs":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    raise DmaError(f"data.sources: unknown built-in corpus 'builtin:{name}' (known: builtin:python_docs)")


def resolve_texts(sources: Sequence[str]) -> list[str]:
    """Texts from `builtin:NAME` entries and file globs (UTF-8)."""
    texts: list[str] = []
    for src in sources:
        if src.startswith("builtin:"):
            texts.extend(_builtin_texts(src.removeprefix("builtin:")))
            continue
        paths = sorted(glob.glob(src, recursive=True)) if any(c in src for c in "*?[") else [src]
        if not paths:
            raise DmaError(f"data.sources: '{src}' matches no file")
        for p in paths:
            path = Path(p)
            if not path.is_file():
                raise DmaError(f"{p}: file not found")
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DmaError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not any(texts):
        raise DmaError(f"data.sources: {list(sources)} hold no text")
    return texts


class TokenStream:
    """Train/held-out token arrays with step-indexed random windows."""

    def __init__(self, texts: Sequence[str], holdout_fraction: float = 0.05):
        tok = ByteTokenizer()
        train, held = [], []
        for text in texts:
            ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int32)
            cut = int(round(len(ids) * (1.0 - holdout_fraction)))
            train.append(ids[:cut])
            held.append(ids[cut:])
        self.tokenizer = tok
        self.train_T = np.concatenate(train)
        self.heldout_T = np.concatenate(held)

    @classmethod
    def from_sources(cls, sources: Sequence[str], holdout_fraction: float) -> TokenStream:
        return cls(resolve_texts(sources), holdout_fraction)

    def _check(self, tokens_T: np.ndarray, seq_len: int, what: str) -> None:
        if len(tokens_T) < seq_len + 2:
            raise DmaError(f"data.sources: {what} split has {len(tokens_T)} tokens, need > seq_len+1={seq_len + 1}")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
        """Training windows [B, L+1] for `step`: a pure function of (seed, step)."""
        self._check(self.train_T, seq_len, "train")
        rng = np.random.default_rng([seed, step])
        starts_B = rng.integers(0, len(self.train_T) - seq_len - 1, size=batch_size)
        return np.stack([self.train_T[s : s + seq_len + 1] for s in starts_B])

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[np.ndarray]:
        """Fixed, evenly spaced held-out windows: the same every call."""
        self._check(self.heldout_T, seq_len, "held-out")
        n = n_batches * batch_size
        starts = np.linspace(0, len(self.heldout_T) - seq_len - 1, n).astype(np.int64)
        windows = np.stack([self.heldout_T[s : s + seq_len + 1] for s in starts])
        return [windows[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]

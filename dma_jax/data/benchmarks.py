"""Benchmark items on disk: the one definition of the JSONL format (`{"context", "choices", "gold", "domain"}` per
line) that `dma prepare` writes for every field and `DomainSpace.benchmarks` reads, and the check that every choice
fits the evaluation's `eval.max_len`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_text

KEYS = {"context": str, "choices": list, "gold": int, "domain": str}


def check_item(item, where: str) -> None:
    if not isinstance(item, dict):
        raise DmaError(f"{where}: a benchmark item must be a JSON object, got {type(item).__name__}")
    for key, typ in KEYS.items():
        if key not in item:
            raise DmaError(f"{where}: missing key '{key}'")
        if not isinstance(item[key], typ) or isinstance(item[key], bool):
            raise DmaError(f"{where}: '{key}' must be {typ.__name__}, got {type(item[key]).__name__}")
    choices, gold = item["choices"], item["gold"]
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DmaError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not 0 <= gold < len(choices):
        raise DmaError(f"{where}: 'gold' = {gold} is out of range for {len(choices)} choices")


def check_choices_fit(items: Sequence[dict], encode: Callable[[str], Sequence[int]], max_len: int,
                      where: str) -> None:
    """Every choice of every item is 1..max_len tokens (`encode`): the evaluation keeps a choice whole and
    left-truncates the context to fit [eos] + context + choice into max_len + 1 tokens. One-line DmaError
    naming `where`, the item's index and its domain otherwise."""
    for i, item in enumerate(items):
        for c in item["choices"]:
            n = len(encode(c))
            if not 1 <= n <= max_len:
                raise DmaError(f"{where}: item {i} (domain {item.get('domain', '?')}): choice {c[:40]!r} is {n} "
                               f"tokens; eval.max_len={max_len} allows 1..{max_len} (a choice is never truncated "
                               "and needs a token of context)")


def write_benchmarks_jsonl(items: Sequence[dict], path: str | Path) -> None:
    """Write benchmark items as JSON lines (validated first; atomic)."""
    for i, item in enumerate(items):
        check_item(item, f"{path}: item {i}")
    atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def read_benchmarks_jsonl(path: str | Path) -> list[dict]:
    """Read benchmark items from JSON lines; a malformed line raises DmaError naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DmaError(f"{path}: cannot read benchmark file ({e})") from e
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DmaError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        check_item(item, f"{path}:{lineno}")
        items.append(item)
    return items

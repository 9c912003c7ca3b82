"""Low-quality documents for the demo domain space (`demo_corpora`): one domain per field that a mixture should avoid.

The demo's clean domains are all of similar value, so a size-spread fixed mixture is already near-optimal;
these domains give a mixing policy something to leave out. Each holds about `SHARE` of its field's training
tokens, is built from that field's own material, deterministically from a `random.Random`:
- prose pages (`web_prose`): runs of consecutive lines of the field's training documents, each page read
  through its own random letter substitution (`substitute_letters`: as if decoded with a wrong code page;
  case, spacing, digits and punctuation kept). Within-word structure is what a byte-level model mostly
  learns, so pages with only their words shuffled cost a mixture almost nothing; substituted letters
  contradict the clean text's letter statistics;
- code pages (`paste_snippets`): the same runs of lines, the lines of each page in a new order;
- worked solutions (`forum_solutions`): generated problems whose worked steps have every number moved and
  then every digit replaced through the document's own digit permutation, and whose final answer is wrong
  (`wrong_solution`).
Their domain names and documents say nothing of their quality; docs/DEMO_SOURCES.md does.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

from dma_jax.data.math_gen import MathProblem
from dma_jax.errors import DmaError

SHARE = 0.125  # of the field's training tokens (the byte tokenizer: tokens ~ bytes)
# Page sizes: N pages of this size hold SHARE of the full field, and the first 40 of them SHARE of the tiny
# variant's field (`data.demo_max_docs_per_domain: 40`, which cuts every domain to 40 documents).
PAGE_BYTES = {"source": 7000, "code": 11000}
_NUMBER = re.compile(r"\d+")


def extra_bytes(clean_bytes: int) -> float:
    """Bytes of low-quality text that make SHARE of a field whose clean domains hold `clean_bytes`."""
    return SHARE / (1.0 - SHARE) * clean_bytes


def pages(texts: Sequence[str], page_bytes: int, n_pages: int, rng: random.Random) -> list[list[str]]:
    """`n_pages` runs of consecutive lines (each ends at the first line that brings it to `page_bytes` UTF-8
    bytes) read from the texts in an order shuffled by `rng`; a run may go on from one text into the next."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for i in order:
        for line in texts[i].split("\n"):
            cur.append(line)
            size += len(line.encode("utf-8")) + 1
            if size >= page_bytes:
                out.append(cur)
                cur, size = [], 0
                if len(out) == n_pages:
                    return out
    raise DmaError(f"low-quality pages: {len(texts)} texts give {len(out)} pages of {page_bytes} bytes, "
                   f"{n_pages} asked")


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"


def derangement(alphabet: str, rng: random.Random) -> str:
    """A permutation of `alphabet` that moves every symbol."""
    out = list(alphabet)
    while any(a == b for a, b in zip(out, alphabet)):
        rng.shuffle(out)
    return "".join(out)


def substitute_letters(text: str, rng: random.Random) -> str:
    """The text with every ASCII letter replaced through one random derangement of a-z (case kept)."""
    lower = derangement(_LOWER, rng)
    return text.translate(str.maketrans(_LOWER + _LOWER.upper(), lower + lower.upper()))


def web_prose(texts: Sequence[str], n_pages: int, page_bytes: int, rng: random.Random) -> list[str]:
    """Pages of the texts, each through its own letter substitution."""
    return [substitute_letters("\n".join(page), rng) for page in pages(texts, page_bytes, n_pages, rng)]


def paste_snippets(texts: Sequence[str], n_pages: int, page_bytes: int, rng: random.Random) -> list[str]:
    """Pages of the texts with their lines shuffled."""
    out = []
    for page in pages(texts, page_bytes, n_pages, rng):
        rng.shuffle(page)
        out.append("\n".join(page))
    return out


def _moved(rng: random.Random) -> Callable[[re.Match], str]:
    def move(m: re.Match) -> str:
        n = int(m.group())
        d = rng.randint(1, max(2, n // 4))
        return str(n - d if d <= n and rng.random() < 0.5 else n + d)
    return move


def wrong_solution(problem: MathProblem, rng: random.Random) -> str:
    """A training document of the problem ("question / steps / Answer: ...") in which every number of the
    steps is moved by a random nonzero amount (kept >= 0) and every number of the final answer is raised by
    one amount d in 1..9. Raising every number of an answer changes its value in every answer form of
    `math_gen`: an integer, "q remainder r", "x = a, y = b", n/d with n != d, a polynomial (its exponents
    rise), a factored form (its constant term grows in size), a prime factorization (its product grows).
    Then the digits of the steps go through one random derangement of 0-9."""
    d = rng.randint(1, 9)
    answer = _NUMBER.sub(lambda m: str(int(m.group()) + d), problem.answer)
    table = str.maketrans(_DIGITS, derangement(_DIGITS, rng))
    steps = [_NUMBER.sub(_moved(rng), s).translate(table) for s in problem.steps]
    return "\n".join((problem.question, *steps, f"Answer: {answer}"))


def forum_solutions(problems: Sequence[MathProblem], target_bytes: float, rng: random.Random) -> list[str]:
    """`wrong_solution` documents of the problems, in order, until they hold `target_bytes` UTF-8 bytes."""
    out: list[str] = []
    size = 0
    for p in problems:
        if size >= target_bytes:
            return out
        out.append(wrong_solution(p, rng))
        size += len(out[-1].encode("utf-8")) + 1
    if size < target_bytes:
        raise DmaError(f"low-quality math: {len(problems)} problems hold {size} bytes, {target_bytes:.0f} asked")
    return out

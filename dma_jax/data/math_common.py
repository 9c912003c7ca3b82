"""Step-formatting and wrong-answer helpers shared by the generated math corpus (`math_gen`, `math_gen_discrete`).

Numbers are written so that each step stays valid arithmetic (`operand`), polynomials and
sums of terms in a fixed canonical form (`poly`, `terms`), fractions as `n/d` (`frac`),
and each problem gets three distinct wrong answers drawn from likely slips first (`pick3`, `ints3`).
"""

from __future__ import annotations

import random
from fractions import Fraction

from dma_jax.errors import DmaError

PRIMES = tuple(p for p in range(2, 200) if all(p % d for d in range(2, int(p**0.5) + 1)))


def operand(v) -> str:
    """A number as an operand: negatives in parentheses so the step stays valid arithmetic."""
    s = str(v)
    return f"({s})" if v < 0 else s


def terms(pairs) -> str:
    """Format a sum of (coefficient, variable) terms: [(2, 'x^2'), (-5, 'x'), (-12, '')]."""
    parts = []
    for c, var in pairs:
        if c == 0:
            continue
        body = (str(abs(c)) if abs(c) != 1 or not var else "") + var
        parts.append(("-" if c < 0 else "") + body if not parts else ("- " if c < 0 else "+ ") + body)
    return " ".join(parts) or "0"


def poly(coeffs) -> str:
    """Polynomial in x, highest power first: [2, -5, -12] -> '2x^2 - 5x - 12'."""
    deg = len(coeffs) - 1
    return terms((c, "" if deg - i == 0 else "x" if deg - i == 1 else f"x^{deg - i}") for i, c in enumerate(coeffs))


def frac(q: Fraction) -> str:
    """A fraction as 'n' when whole, else 'n/d'."""
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def pick3(rng: random.Random, answer: str, likely, fallback) -> tuple[str, ...]:
    """Three distinct wrong answers: likely slips first, then generic near misses."""
    first = [c for c in dict.fromkeys(likely) if c != answer]
    rest = [c for c in dict.fromkeys(fallback) if c != answer and c not in first]
    rng.shuffle(first)
    rng.shuffle(rest)
    picked = (first + rest)[:3]
    if len(picked) < 3:
        raise DmaError(f"math_gen: fewer than 3 distractors for answer {answer!r}")
    return tuple(picked)


def ints3(rng: random.Random, ans: int, *likely: int) -> tuple[str, ...]:
    """Three wrong integer answers: the given slips, then near misses (kept non-negative when `ans` is)."""
    near = [ans + d for d in (1, -1, 2, -2, 10, -10, 3, -3)] + [2 * ans + 1]
    keep = (lambda v: v >= 0) if ans >= 0 else (lambda v: True)
    return pick3(rng, str(ans), [str(v) for v in likely if keep(v)], [str(v) for v in near if keep(v)])

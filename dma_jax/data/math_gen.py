"""Generated math corpus (the demo's target field): problems with worked, checkable solutions.

Four kinds, one demo domain each: arithmetic, algebra, number theory, word problems. A
problem is drawn from `random.Random` seeded by (seed, stream, kind), so a corpus is a pure
function of its arguments; training and benchmarks use different streams. Each arithmetic
step is written as a plain equation ("19 * 3 = 57", after a colon when it has a label) so a
reader, or a test, can check every step. Each problem also carries three wrong answers
(plausible slips of the same form) for the multiple-choice benchmark, whose context is the question
alone (`MathProblem.prompt`): the worked steps are training text, never part of a benchmark item.
Arithmetic and algebra live here, number theory and word problems in `math_gen_discrete`, the
step-formatting helpers both use in `math_common`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from fractions import Fraction
from typing import Callable

from dma_jax.data.math_common import frac, ints3, operand, pick3, poly, terms
from dma_jax.data.math_gen_discrete import NUMBER_THEORY, WORD_PROBLEMS
from dma_jax.errors import DmaError

KINDS = ("arithmetic", "algebra", "number_theory", "word_problems")
_TOKEN = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")  # words, digit runs, single symbols


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """One problem: question, worked steps, final answer and three wrong answers."""

    kind: str
    subkind: str
    question: str
    steps: tuple[str, ...]
    answer: str
    distractors: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """What a benchmark asks: the question and "Answer:", without the worked steps (they would give
        the answer away: a model could copy it from the last step)."""
        return f"{self.question}\nAnswer:"

    @property
    def document(self) -> str:
        """What the training corpus holds: question, worked steps, "Answer:" and the answer."""
        return "\n".join((self.question, *self.steps, f"Answer: {self.answer}"))

    @property
    def answer_in_prompt(self) -> bool:
        """Whether the answer's tokens (words, digit runs, symbols) occur as a run in the prompt's, e.g. "Find
        the greatest common divisor of 36 and 12." -> 12: such a problem is no benchmark item (a model could
        copy its answer), though it is a fine training document."""
        a, q = _TOKEN.findall(self.answer), _TOKEN.findall(self.prompt)
        return any(q[i: i + len(a)] == a for i in range(len(q) - len(a) + 1))


# ---------------------------------------------------------------- arithmetic
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_OPNAME = {"+": "Add", "-": "Subtract", "*": "Multiply", "/": "Divide"}


def _tree(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.25:
        return rng.randint(2, 25)
    op = rng.choice("++--**/")
    if op == "/":
        b = rng.randint(2, 12)
        return ("/", b * rng.randint(2, 15), b)
    return (op, _tree(rng, depth - 1), _tree(rng, depth - 1))


def _show(e) -> str:
    if not isinstance(e, tuple):
        return operand(e)
    op, a, b = e
    sa, sb = _show(a), _show(b)
    if isinstance(a, tuple) and _PREC[a[0]] < _PREC[op]:
        sa = f"({sa})"
    if isinstance(b, tuple) and _PREC[b[0]] <= _PREC[op]:
        sb = f"({sb})"
    return f"{sa} {op} {sb}"


def _reduce_once(e):
    """Evaluate the leftmost operation whose operands are both numbers."""
    op, a, b = e
    if isinstance(a, tuple):
        new_a, step = _reduce_once(a)
        return (op, new_a, b), step
    if isinstance(b, tuple):
        new_b, step = _reduce_once(b)
        return (op, a, new_b), step
    v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else Fraction(a, b)
    v = int(v) if isinstance(v, int) or v.denominator == 1 else v
    return v, (op, a, b, v)


def _arith_expression(rng):
    while True:
        e = _tree(rng, rng.choice((2, 2, 3)))
        if not isinstance(e, tuple):
            continue
        expr, steps, cur, ok = _show(e), [], e, True
        while isinstance(cur, tuple):
            cur, (op, a, b, v) = _reduce_once(cur)
            ok = ok and isinstance(v, int) and abs(v) <= 20000
            then = f", so the expression becomes {_show(cur)}." if isinstance(cur, tuple) else "."
            steps.append(f"Step {len(steps) + 1}. {_OPNAME[op]}: {operand(a)} {op} {operand(b)} = {v}{then}")
        if ok and len(steps) >= 2:
            return f"Compute {expr}.", steps, str(cur), ints3(rng, cur, -cur)


def _arith_fractions(rng):
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c, op = rng.randint(1, 2 * b), rng.randint(1, 2 * d), rng.choice("+-*")
    if op == "*":
        raw_n, raw_d = a * c, b * d
        steps = [f"Multiply the numerators and the denominators: {a} * {c} = {raw_n} and {b} * {d} = {raw_d}."]
        slip = Fraction(a * d, b * c)
    else:
        den = math.lcm(b, d)
        na, nc = a * den // b, c * den // d
        raw_n, raw_d = (na + nc if op == "+" else na - nc), den
        steps = [f"The common denominator is lcm({b}, {d}) = {den}.",
                 f"Rewrite: {a}/{b} = {na}/{den} and {c}/{d} = {nc}/{den}.",
                 f"Then: {na}/{den} {op} {nc}/{den} = {raw_n}/{den}."]
        slip = Fraction(a + c if op == "+" else a - c, b + d)
    g = math.gcd(raw_n, raw_d)
    ans = Fraction(raw_n, raw_d)
    if g > 1:
        steps.append(f"Simplify by dividing by gcd({abs(raw_n)}, {raw_d}) = {g}: {raw_n}/{raw_d} = {frac(ans)}.")
    else:
        steps.append(f"The fraction {raw_n}/{raw_d} is already in lowest terms.")
    likely = [frac(slip), frac(-ans), f"{raw_n}/{raw_d}" if g > 1 else frac(ans + 1)]
    near = [frac(ans + Fraction(k, ans.denominator)) for k in (1, -1, 2, -2)]
    return f"Compute {a}/{b} {op} {c}/{d}.", steps, frac(ans), pick3(rng, frac(ans), likely, near)


def _arith_percent(rng):
    pct = rng.randint(1, 99)
    base = 100 // math.gcd(pct, 100) * rng.randint(1, 60)
    ans = pct * base // 100
    steps = [f"{pct}% of {base} means {pct} * {base} / 100.",
             f"Multiply: {pct} * {base} = {pct * base}.", f"Divide: {pct * base} / 100 = {ans}."]
    return f"What is {pct}% of {base}?", steps, str(ans), ints3(rng, ans, base - ans, pct * base // 10)


def _arith_divmod(rng):
    d, n = rng.randint(3, 19), rng.randint(1000, 99999)
    q, r = divmod(n, d)
    steps, cur, started = [f"Long division of {n} by {d}, digit by digit."], 0, False
    for ch in str(n):
        cur = cur * 10 + int(ch)
        if cur < d and not started:
            continue
        started = True
        qd = cur // d
        steps.append(f"Bring down {ch} to get {cur}: {d} * {qd} = {d * qd} and {cur} - {d * qd} = {cur - d * qd}.")
        cur -= d * qd
    steps.append(f"Check: {d} * {q} + {r} = {n}.")
    ans = f"{q} remainder {r}"
    cands = [f"{q} remainder {(r + 1) % d}", f"{q + 1} remainder {r}", f"{q - 1} remainder {r}",
             f"{q} remainder {(r - 1) % d}", f"{q + 10} remainder {r}"]
    return f"Divide {n} by {d}. What are the quotient and the remainder?", steps, ans, \
        pick3(rng, ans, cands[:3], cands[3:])


def _arith_multiply(rng):
    a, b = rng.randint(100, 999), rng.randint(12, 99)
    ones, tens = b % 10, b - b % 10
    steps = [f"Split {b} = {tens} + {ones}.", f"Ones: {a} * {ones} = {a * ones}.", f"Tens: {a} * {tens} = {a * tens}.",
             f"Add the partial products: {a * ones} + {a * tens} = {a * b}."]
    return f"Compute {a} * {b}.", steps, str(a * b), ints3(rng, a * b, a * tens + ones, a * b + a, a * b - a * 10)


# ---------------------------------------------------------------- algebra
def _alg_linear(rng, two_sided: bool):
    a = rng.choice([v for v in range(-9, 13) if v not in (0, 1)])
    c = rng.choice([v for v in range(-9, 10) if v != a]) if two_sided else 0
    b = rng.choice([v for v in range(-30, 31) if v])
    x = Fraction(rng.randint(-15, 15)) if rng.random() < 0.75 else Fraction(rng.randint(-40, 40), a - c)
    d = int(a * x + b - c * x) if (a * x + b - c * x).denominator == 1 else None
    if d is None:
        return _alg_linear(rng, two_sided)
    steps = []
    if two_sided:
        steps.append(f"Move the x terms to the left: {a} - {operand(c)} = {a - c}, so {poly([a - c, b])} = {d}.")
    steps.append(f"Move the constant to the right: {d} - {operand(b)} = {d - b}, so {poly([a - c, 0])} = {d - b}.")
    steps.append(f"Divide both sides by {a - c}: {d - b} / {operand(a - c)} = {frac(x)}, so x = {frac(x)}.")
    lhs, rhs = poly([a, b]), (poly([c, d]) if two_sided else str(d))
    ans = f"x = {frac(x)}"
    slips = [Fraction(d + b, a - c), -x, Fraction(d - b, a + c) if a + c else x + 2]
    return f"Solve for x: {lhs} = {rhs}.", steps, ans, \
        pick3(rng, ans, [f"x = {frac(s)}" for s in slips], [f"x = {frac(x + k)}" for k in (1, -1, 2)])


def _alg_expand(rng):
    a, c = rng.randint(1, 6), rng.randint(1, 6)
    b, d = (rng.choice([v for v in range(-12, 13) if v]) for _ in range(2))
    steps = [f"First: {a} * {c} = {a * c}, so the x^2 term is {poly([a * c, 0, 0])}.",
             f"Outer: {a} * {operand(d)} = {a * d}.", f"Inner: {b} * {c} = {b * c}.",
             f"Last: {b} * {operand(d)} = {b * d}.",
             f"Combine the x terms: {a * d} + {operand(b * c)} = {a * d + b * c}."]
    ans = poly([a * c, a * d + b * c, b * d])
    likely = [poly([a * c, a * d + b * c, -b * d]), poly([a * c, -(a * d + b * c), b * d]),
              poly([a * c, a * d - b * c, b * d]), poly([a * c, b + d, b * d])]
    return f"Expand ({poly([a, b])})({poly([c, d])}).", steps, ans, \
        pick3(rng, ans, likely, [poly([a * c, a * d + b * c + k, b * d]) for k in (1, -1)])


def _alg_factor(rng):
    k = rng.choice((1, 1, 1, 1, 2, 3, 4, 5, 6))
    p, q = sorted(rng.choice([v for v in range(-15, 16) if v]) for _ in range(2))
    coeffs = [k, k * (p + q), k * p * q]
    steps = []
    if k > 1:
        steps.append(f"Take out the common factor {k}: {coeffs[1]} / {k} = {p + q} and {coeffs[2]} / {k} = {p * q}.")
    steps += [f"Find two numbers whose product is {p * q} and whose sum is {p + q}.",
              f"Try {p} and {q}: {p} * {operand(q)} = {p * q} and {p} + {operand(q)} = {p + q}."]
    pre = str(k) if k > 1 else ""

    def fac(u, v):
        u, v = sorted((u, v))
        return f"{pre}({poly([1, u])})({poly([1, v])})"

    ans = fac(p, q)
    likely = [fac(-p, -q), fac(p, -q), fac(-p, q), f"({poly([1, p])})({poly([1, q])})" if k > 1 else fac(p + 1, q)]
    return f"Factor {poly(coeffs)}.", steps, ans, pick3(rng, ans, likely, [fac(p, q + 1), fac(p - 1, q)])


def _alg_evaluate(rng):
    deg = rng.choice((2, 3))
    cs = [rng.choice([v for v in range(-9, 10) if v])] + [rng.randint(-9, 9) for _ in range(deg)]
    x = rng.choice([v for v in range(-5, 6) if v not in (0, 1)])
    steps, vals = [], []
    for i, c in enumerate(cs):
        pw = deg - i
        if c == 0:
            continue
        if pw >= 2:
            steps.append(f"x^{pw} term: {c} * {operand(x)}^{pw} = {c} * {operand(x ** pw)} = {c * x ** pw}.")
        elif pw == 1:
            steps.append(f"x term: {c} * {operand(x)} = {c * x}.")
        vals.append(c * x**pw)
    total = sum(vals)
    steps.append(f"Sum: {' + '.join(operand(v) if j else str(v) for j, v in enumerate(vals))} = {total}.")
    return f"Evaluate {poly(cs)} at x = {x}.", steps, str(total), ints3(rng, total, total - 2 * cs[-1], -total)


def _alg_system(rng):
    while True:
        a1, b1, a2, b2 = (rng.choice([v for v in range(-6, 7) if v]) for _ in range(4))
        if a1 * b2 - b1 * a2:
            break
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    det, dx, dy = a1 * b2 - b1 * a2, c1 * b2 - b1 * c2, a1 * c2 - c1 * a2
    steps = ["Use Cramer's rule.", f"Determinant: {a1} * {operand(b2)} - {operand(b1)} * {operand(a2)} = {det}.",
             f"For x: {c1} * {operand(b2)} - {operand(b1)} * {operand(c2)} = {dx} and {dx} / {operand(det)} = {x}.",
             f"For y: {a1} * {operand(c2)} - {operand(c1)} * {operand(a2)} = {dy} and {dy} / {operand(det)} = {y}."]
    eq1, eq2 = (f"{terms([(a, 'x'), (b, 'y')])} = {c}" for a, b, c in ((a1, b1, c1), (a2, b2, c2)))
    ans = f"x = {x}, y = {y}"
    likely = [f"x = {y}, y = {x}", f"x = {-x}, y = {y}", f"x = {x}, y = {-y}"]
    return f"Solve the system: {eq1} and {eq2}.", steps, ans, \
        pick3(rng, ans, likely, [f"x = {x + i}, y = {y + j}" for i, j in ((1, -1), (-1, 1), (1, 0), (0, 1))])


_GENERATORS: dict[str, tuple[tuple[str, Callable], ...]] = {
    "arithmetic": (("expression", _arith_expression), ("fractions", _arith_fractions), ("percent", _arith_percent),
                   ("divmod", _arith_divmod), ("multiply", _arith_multiply)),
    "algebra": (("linear", lambda r: _alg_linear(r, False)), ("linear_two_sided", lambda r: _alg_linear(r, True)),
                ("expand", _alg_expand), ("factor", _alg_factor), ("evaluate", _alg_evaluate), ("system", _alg_system)),
    "number_theory": NUMBER_THEORY,
    "word_problems": WORD_PROBLEMS,
}


def generate_problems(kind: str, n: int, seed: int = 0, stream: str = "train",
                      exclude: frozenset[str] = frozenset(),
                      keep: Callable[[MathProblem], bool] | None = None) -> list[MathProblem]:
    """`n` distinct problems of one kind; questions in `exclude` (e.g. the training set) and problems `keep`
    rejects are skipped.

    Deterministic in (kind, n, seed, stream), and prefix-stable: the first k of n problems
    are the problems for n = k, so a smaller corpus is a subset of a larger one.
    """
    if kind not in _GENERATORS:
        raise DmaError(f"math_gen: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if n < 0:
        raise DmaError(f"math_gen: problem count must be >= 0, got {n}")
    rng = random.Random(f"dma_jax.math_gen/{seed}/{stream}/{kind}")
    out: list[MathProblem] = []
    seen: set[str] = set()
    for _ in range(20 * n + 100):
        if len(out) == n:
            return out
        subkind, make = rng.choice(_GENERATORS[kind])
        question, steps, answer, distractors = make(rng)
        if question in seen or question in exclude:
            continue
        seen.add(question)
        problem = MathProblem(kind, subkind, question, tuple(steps), answer, distractors)
        if keep is None or keep(problem):
            out.append(problem)
    if len(out) < n:
        raise DmaError(f"math_gen: could only draw {len(out)} distinct {kind} problems of the {n} asked")
    return out


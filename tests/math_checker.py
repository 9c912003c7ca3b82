"""An independent checker of the generated math: re-solves each question from its text with its own parser and
Python's fractions/math, never with the generator's code (tests/test_math_gen.py, test_demo_corpora.py,
test_low_quality.py)."""

import ast
import math
import re
from fractions import Fraction

def _eval(expr: str) -> Fraction:
    """Exact value of an integer arithmetic expression ('^' is a power)."""
    def ev(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return Fraction(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: a / b, ast.Pow: lambda: a ** int(b)}
            return ops[type(n.op)]()
        raise AssertionError(f"unexpected syntax in {expr!r}")
    return ev(ast.parse(expr.strip().replace("^", "**"), mode="eval").body)


def _poly(s: str) -> dict[str, int]:
    """'2x^2 - 5x - 12' -> {'x^2': 2, 'x': -5, '': -12} (also 'x', 'y' terms)."""
    out: dict[str, int] = {}
    for term in re.findall(r"[+-]?[^+-]+", s.replace(" ", "")):
        m = re.fullmatch(r"([+-]?)(\d*)([a-z](?:\^\d+)?)?", term)
        assert m and (m.group(2) or m.group(3)), f"bad term {term!r} in {s!r}"
        c = int(m.group(2) or 1) * (-1 if m.group(1) == "-" else 1)
        out[m.group(3) or ""] = out.get(m.group(3) or "", 0) + c
    return {k: v for k, v in out.items() if v}


def _power(var: str) -> int:
    return 0 if var == "" else 1 if var == "x" else int(var.split("^")[1])


def _at(p: dict[str, int], x: Fraction) -> Fraction:
    return sum((c * x ** _power(v) for v, c in p.items()), Fraction(0))


def _mul(p: dict[str, int], q: dict[str, int]) -> dict[str, int]:
    out: dict[int, int] = {}
    for v, c in p.items():
        for w, d in q.items():
            out[_power(v) + _power(w)] = out.get(_power(v) + _power(w), 0) + c * d
    return {("" if k == 0 else "x" if k == 1 else f"x^{k}"): c for k, c in out.items() if c}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _is_correct(question: str, answer: str) -> bool:
    """Re-solve the question from its text; True when `answer` is the right final answer."""
    q, a = question, answer
    if m := re.fullmatch(r"Compute (\d+)\^(\d+) mod (\d+)\.", q):
        return a == str(pow(*map(int, m.groups())))
    if m := re.fullmatch(r"Compute (.+)\.", q):
        return a == str(_eval(m.group(1)))
    if m := re.fullmatch(r"What is (\d+)% of (\d+)\?", q):
        return a == str(Fraction(int(m.group(1)) * int(m.group(2)), 100))
    if m := re.fullmatch(r"Divide (\d+) by (\d+)\. What are the quotient and the remainder\?", q):
        return a == "%d remainder %d" % divmod(int(m.group(1)), int(m.group(2)))
    if m := re.fullmatch(r"Solve for x: (.+) = (.+)\.", q):
        x = Fraction(a.removeprefix("x = "))
        lhs, rhs = _poly(m.group(1)), _poly(m.group(2))
        assert lhs.get("x", 0) != rhs.get("x", 0), q
        return a.startswith("x = ") and _at(lhs, x) == _at(rhs, x)
    if m := re.fullmatch(r"Expand \((.+?)\)\((.+?)\)\.", q):
        return _poly(a) == _mul(_poly(m.group(1)), _poly(m.group(2)))
    if m := re.fullmatch(r"Factor (.+)\.", q):
        f = re.fullmatch(r"(\d*)\((x [+-] \d+)\)\((x [+-] \d+)\)", a)
        if not f:
            return False
        return _mul(_mul({"": int(f.group(1) or 1)}, _poly(f.group(2))), _poly(f.group(3))) == _poly(m.group(1))
    if m := re.fullmatch(r"Evaluate (.+) at x = (-?\d+)\.", q):
        return a == str(_at(_poly(m.group(1)), Fraction(int(m.group(2)))))
    if m := re.fullmatch(r"Solve the system: (.+) = (-?\d+) and (.+) = (-?\d+)\.", q):
        s = re.fullmatch(r"x = (-?\d+), y = (-?\d+)", a)
        x, y = map(int, s.groups())
        e1, e2 = _poly(m.group(1)), _poly(m.group(3))
        assert e1.get("x", 0) * e2.get("y", 0) != e1.get("y", 0) * e2.get("x", 0), q
        return all(e.get("x", 0) * x + e.get("y", 0) * y == int(c) for e, c in ((e1, m.group(2)), (e2, m.group(4))))
    if m := re.fullmatch(r"Find the greatest common divisor of (\d+) and (\d+)\.", q):
        return a == str(math.gcd(*map(int, m.groups())))
    if m := re.fullmatch(r"Find the least common multiple of (\d+) and (\d+)\.", q):
        return a == str(math.lcm(*map(int, m.groups())))
    if m := re.fullmatch(r"Find the prime factorization of (\d+)\.", q):
        fs = [(int(p), int(e or 1)) for p, e in re.findall(r"(\d+)(?:\^(\d+))?", a)]
        canonical = " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in fs)
        primes = [p for p, _ in fs]
        return (a == canonical and all(map(_is_prime, primes)) and primes == sorted(set(primes))
                and math.prod(p**e for p, e in fs) == int(m.group(1)))
    if m := re.fullmatch(r"What is the remainder when (\d+) is divided by (\d+)\?", q):
        return a == str(int(m.group(1)) % int(m.group(2)))
    if m := re.fullmatch(r"Find the smallest prime factor of (\d+)\.", q):
        n = int(m.group(1))
        return a == str(next(p for p in range(2, n + 1) if n % p == 0))
    return a == str(_word_problem(q))


def _word_problem(q: str) -> Fraction:
    def nums(pattern: str) -> list[int]:
        m = re.search(pattern, q)
        assert m, f"unrecognised question: {q!r}"
        return [int(v) for v in m.groups()]

    if "change" in q:
        n1, p1, n2, p2, bill = nums(
            r"buys (\d+) \w+ at \$(\d+) each and (\d+) \w+ at \$(\d+) each\. \w+ pays with a \$(\d+) bill")
        assert bill >= n1 * p1 + n2 * p2
        return bill - n1 * p1 - n2 * p2
    if "km per hour" in q:
        v1, t1, v2, t2 = nums(r"at (\d+) km per hour for (\d+) hours and then at (\d+) km per hour for (\d+) hours")
        return v1 * t1 + v2 * t2
    if "gives 1/" in q:
        total, k, more = nums(r"has (\d+) \w+\. \w+ gives 1/(\d+) of them to \w+ and then buys (\d+) more")
        return total - Fraction(total, k) + more
    if "add up to" in q:
        s, d = nums(r"add up to (\d+) and differ by (\d+)")
        return Fraction(s + d, 2)
    if "pages" in q:
        pages, read, per_day = nums(r"has (\d+) pages\. \w+ has already read (\d+) pages and reads (\d+) pages a day")
        return math.ceil(Fraction(pages - read, per_day))
    if "garden" in q:
        length, width, cost = nums(r"is (\d+) m long and (\d+) m wide\. Fencing costs \$(\d+) per metre")
        return 2 * (length + width) * cost
    if "average" in q:
        *scores, avg = nums(r"scored (\d+), (\d+), (\d+) and (\d+) on four tests\..*average exactly (\d+)\?")
        return 5 * avg - sum(scores)
    d, s = nums(r"is (\d+) years older than \w+\. Together they are (\d+) years old")
    return Fraction(s - d, 2)


_CLAUSES = re.compile(r",\s+(?=[a-z])|;\s+|\s+and\s+")
_ARITH = re.compile(r"[-\d\s+*/()^]+(?:=[-\d\s+*/()^]+)+")


def _checked_steps(steps) -> int:
    """Check every plain equation ('19 * 3 = 57', after an optional 'label:'); return how many."""
    n = 0
    for line in steps:
        for clause in _CLAUSES.split(line):
            eq = clause.rsplit(":", 1)[-1].strip().rstrip(".")
            if _ARITH.fullmatch(eq):
                values = [_eval(part) for part in eq.split("=")]
                assert len(set(values)) == 1, f"wrong step {eq!r} in {line!r}"
                n += 1
    return n

"""Demo domain space: shape, determinism, correct math, true benchmark answers, held-out split, JSONL.

Math answers are checked by re-solving each question from its text with this file's own
parser and Python's fractions/math, never with the generator's code.
"""

import ast
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from dma_jax.data import demo_corpora as dc
from dma_jax.data import math_gen
from dma_jax.errors import DmaError

SMALL_MATH = 150


# ---------------------------------------------------------------- independent math checker
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


def test_checker_rejects_wrong_math():
    assert _is_correct("Compute 2 + 3 * 4.", "14") and not _is_correct("Compute 2 + 3 * 4.", "20")
    assert _is_correct("Factor x^2 + 5x + 6.", "(x + 2)(x + 3)")
    assert not _is_correct("Factor x^2 + 5x + 6.", "(x - 2)(x - 3)")
    assert not _is_correct("Expand (2x + 3)(x - 4).", "2x^2 + 5x - 12")
    with pytest.raises(AssertionError):
        _checked_steps(["Multiply: 19 * 3 = 56."])


@pytest.mark.parametrize("kind", math_gen.KINDS)
def test_math_problems_are_correct(kind):
    problems = math_gen.generate_problems(kind, 400, seed=0) + math_gen.generate_problems(kind, 100, 5, "bench")
    assert len({p.subkind for p in problems}) >= 4
    for p in problems:
        assert _is_correct(p.question, p.answer), (p.question, p.answer)
        assert _checked_steps(p.steps) >= 1, p.steps
        assert len(p.distractors) == 3 and len({p.answer, *p.distractors}) == 4, p
        assert not any(_is_correct(p.question, d) for d in p.distractors), (p.question, p.distractors)
        # Training documents keep the worked solution; the benchmark prompt is the question alone.
        assert p.document == "\n".join((p.question, *p.steps, f"Answer: {p.answer}"))
        assert p.prompt == p.question + "\nAnswer:" and "\n" not in p.question


def test_math_determinism():
    a = math_gen.generate_problems("algebra", 60, seed=1)
    assert a == math_gen.generate_problems("algebra", 60, seed=1)
    assert a[:20] == math_gen.generate_problems("algebra", 20, seed=1)
    assert [p.question for p in a] != [p.question for p in math_gen.generate_problems("algebra", 60, seed=2)]
    assert len({p.question for p in a}) == 60
    with pytest.raises(DmaError, match="geometry"):
        math_gen.generate_problems("geometry", 3)


# ---------------------------------------------------------------- domain space
@pytest.fixture(scope="module")
def train():
    return dc.demo_domains(seed=0, math_docs_per_domain=SMALL_MATH)


@pytest.fixture(scope="module")
def held(train):
    """Domain name -> held-out documents (all documents minus the training ones)."""
    full = {d.name: d.documents for d in dc.demo_domains(0, SMALL_MATH, ("source", "code"), exclude_held_out=False)}
    out = {}
    for d in train:
        if d.field != "math":
            kept = set(d.documents)
            rest = [t for t in full[d.name] if t not in kept]
            assert len(rest) + len(d.documents) == len(full[d.name]) and rest, d.name
            out[d.name] = rest
    return out


@pytest.fixture(scope="module")
def bench():
    return dc.demo_benchmarks(seed=0, n_per_field=48, math_docs_per_domain=SMALL_MATH)


def test_domain_space_shape(train):
    names = [d.name for d in train]
    assert len(set(names)) == len(names)
    for field in dc.FIELDS:
        domains = [d for d in train if d.field == field]
        assert len(domains) >= 4, field
        assert all(d.name.startswith(field + "/") and d.documents for d in domains)
        assert all(isinstance(t, str) and t.strip() for d in domains for t in d.documents)
    size = {f: sum(len(t.encode()) for d in train if d.field == f for t in d.documents) for f in dc.FIELDS}
    assert size["source"] > 2e6 and size["code"] > 2e6, size
    assert sum(len(d.documents) for d in train if d.name.startswith("source/shakespeare")) > 500
    plays = "\n".join(t for d in train if d.name.startswith("source/shakespeare") for t in d.documents)
    assert "**" not in plays and "\\[" not in plays and "\n#" not in plays
    with pytest.raises(DmaError, match="sound"):
        dc.demo_domains(fields=("sound",))


def test_demo_domains_deterministic_per_seed(train):
    again = dc.demo_domains(seed=0, math_docs_per_domain=SMALL_MATH)
    assert again == train
    other = {d.name: d.documents for d in dc.demo_domains(seed=1, math_docs_per_domain=SMALL_MATH)}
    for d in train:
        if d.field == "math" or d.name in dc.LOW_QUALITY_DOMAINS:
            assert other[d.name] != d.documents, d.name
        else:
            assert other[d.name] == d.documents, d.name
        if d.field == "math" and d.name not in dc.LOW_QUALITY_DOMAINS:
            assert len(other[d.name]) == SMALL_MATH


def test_benchmarks_deterministic_across_processes(bench):
    """A fresh interpreter with another hash seed builds the same benchmarks (no set-order leaks)."""
    code = ("import hashlib, json; from dma_jax.data.demo_corpora import demo_benchmarks; "
            f"items = demo_benchmarks(0, 48, math_docs_per_domain={SMALL_MATH}); "
            "print(hashlib.sha256(json.dumps(items).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(json.dumps(bench).encode()).hexdigest()


def _norm(s: str) -> str:
    return " ".join(s.split())


def test_benchmark_items_well_formed(bench, train):
    for field in dc.FIELDS:
        items = bench[field]
        assert len(items) == 48
        assert {it["domain"] for it in items} == {d.name for d in train if d.field == field
                                                  and d.name not in dc.LOW_QUALITY_DOMAINS}
        for it in items:
            assert set(it) == {"context", "choices", "gold", "domain"}
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["gold"] < 4
    golds = [it["gold"] for f in dc.FIELDS for it in bench[f]]
    assert len(set(golds)) == 4  # the answer is not always in the same slot


def test_text_benchmark_gold_is_true_continuation(bench, held):
    for field in ("source", "code"):
        for it in bench[field]:
            ctx, choices, gold = it["context"], it["choices"], it["gold"]
            docs = held[it["domain"]]
            if it["domain"].startswith("source/python"):
                texts = [_norm(t) for t in docs]
                follows = lambda c: any(_norm(ctx + c) in t for t in texts)  # noqa: E731
            else:
                texts = ["\n" + t + "\n" for t in docs]
                follows = lambda c: any("\n" + ctx + c + "\n" in t for t in texts)  # noqa: E731
            assert follows(choices[gold]), it
            assert not any(follows(c) for i, c in enumerate(choices) if i != gold), it


def test_math_benchmark_gold_is_correct(bench):
    for it in bench["math"]:
        question, rest = it["context"].split("\n", 1)
        assert rest == "Answer:"
        verdicts = [_is_correct(question, c.removeprefix(" ")) for c in it["choices"]]
        assert verdicts == [i == it["gold"] for i in range(4)], it


def test_benchmarks_held_out_from_training(bench, train):
    for field in dc.FIELDS:
        corpus = "\0".join(_norm(t) for d in train if d.field == field for t in d.documents)
        for it in bench[field]:
            gold = it["choices"][it["gold"]]
            probe = it["context"].split("\n", 1)[0] + "\n" if field == "math" else it["context"] + gold
            assert _norm(probe) not in corpus, it
    big = dc.demo_domains(0, 1000, ("math",))
    questions = {t.split("\n", 1)[0] for d in big for t in d.documents}
    held_out = dc.demo_benchmarks(0, 40, ("math",), 1000)["math"]
    assert not questions & {it["context"].split("\n", 1)[0] for it in held_out}


def test_cloze_skips_passages_seen_in_training():
    doc = "\n".join(f"line number {i} of a held-out scene, long enough" for i in range(40))
    other = "\n".join(f"another line {i} from a second held-out scene" for i in range(40))
    fresh = dc._line_items("source/x", [doc, other], "", 10, random.Random(0), code=False)
    assert len(fresh) == 10
    seen = dc._line_items("source/x", [doc, other], _norm(doc) + "\0" + _norm(other), 10, random.Random(0), code=False)
    assert seen == []


# ---------------------------------------------------------------- JSONL
def test_jsonl_round_trip_and_errors(bench, tmp_path):
    items = bench["math"][:5] + bench["code"][:5]
    path = tmp_path / "b.jsonl"
    dc.write_benchmarks_jsonl(items, path)
    assert dc.read_benchmarks_jsonl(path) == items
    good = json.dumps(items[0])
    cases = {
        "{not json": r":3: invalid JSON",
        json.dumps({**items[0], "gold": 4}): r":3: 'gold' = 4 is out of range",
        json.dumps({k: v for k, v in items[0].items() if k != "domain"}): r":3: missing key 'domain'",
        json.dumps({**items[0], "choices": ["only one"]}): r":3: 'choices' must be a list of at least 2",
        json.dumps({**items[0], "gold": True}): r":3: 'gold' must be int",
    }
    for bad, message in cases.items():
        path.write_text(f"{good}\n\n{bad}\n{good}\n")
        with pytest.raises(DmaError, match=re.escape(str(path)) + message):
            dc.read_benchmarks_jsonl(path)
    with pytest.raises(DmaError, match="item 1"):
        dc.write_benchmarks_jsonl([items[0], {**items[0], "gold": -1}], tmp_path / "c.jsonl")

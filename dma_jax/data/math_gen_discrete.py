"""Number-theory and word problems of the generated math corpus (see `math_gen`).

`NUMBER_THEORY` and `WORD_PROBLEMS` list (subkind, generator) pairs; a generator takes a
`random.Random` and returns (question, steps, answer, three distractors).
"""

from __future__ import annotations

import math
from typing import Callable

from dma_jax.data.math_common import PRIMES, ints3, operand, pick3


# ---------------------------------------------------------------- number theory
def _euclid(a: int, b: int) -> tuple[list[str], int, int]:
    """Euclid's algorithm as steps; returns (steps, gcd, the remainder before it)."""
    steps, prev = [], a
    while b:
        q, r = divmod(a, b)
        steps.append(f"{a} = {q} * {b} + {r}.")
        prev, a, b = a, b, r
    return steps, a, prev


def _nt_gcd(rng):
    g, m, n = rng.randint(1, 30), rng.randint(2, 60), rng.randint(2, 60)
    a, b = g * max(m, n), g * min(m, n)
    if a == b:
        return _nt_gcd(rng)
    steps, gcd, prev = _euclid(a, b)
    steps = ["Use the Euclidean algorithm.", *steps, f"The last nonzero remainder is {gcd}."]
    return f"Find the greatest common divisor of {a} and {b}.", steps, str(gcd), ints3(rng, gcd, 2 * gcd, prev, b)


def _nt_lcm(rng):
    a, b = rng.sample(range(4, 151), 2)
    steps, g, _ = _euclid(max(a, b), min(a, b))
    lcm = a * b // g
    steps = ["First find the greatest common divisor with the Euclidean algorithm.", *steps,
             f"So the gcd is {g}.", f"Then lcm = a * b / gcd: {a} * {b} = {a * b} and {a * b} / {g} = {lcm}."]
    return f"Find the least common multiple of {a} and {b}.", steps, str(lcm), \
        ints3(rng, lcm, a * b, 2 * lcm, lcm + a)


def _nt_factorize(rng):
    while True:
        fs = sorted(rng.choice(PRIMES[:4]) if rng.random() < 0.7 else rng.choice(PRIMES[4:15])
                    for _ in range(rng.randint(2, 6)))
        n = math.prod(fs)
        if 12 <= n <= 200_000 and len(set(fs)) >= 2:
            break
    steps, m = ["Divide by the smallest prime factor until 1 is left."], n
    for p in fs:
        steps.append(f"{m} / {p} = {m // p}.")
        m //= p

    def show(exps):
        return " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in sorted(exps.items()) if e > 0)

    exps = {p: fs.count(p) for p in fs}
    ans = show(exps)
    likely = [show({**exps, p: exps[p] + s}) for p in exps for s in (1, -1)]
    big = max(exps)
    swap = {**{p: e for p, e in exps.items() if p != big}, PRIMES[PRIMES.index(big) + 1]: exps[big]}
    return f"Find the prime factorization of {n}.", steps, ans, pick3(rng, ans, likely, [show(swap)])


def _nt_modpow(rng):
    m, b, e = rng.randint(5, 50), rng.randint(2, 30), rng.randint(3, 9)
    if b % m == 0:
        return _nt_modpow(rng)
    r1 = b % m
    steps, r, prev = [f"{b} = {b // m} * {m} + {r1}, so {b} ≡ {r1} (mod {m})."], r1, r1
    for k in range(2, e + 1):
        prod = r * r1
        prev, r = r, prod % m
        steps.append(f"{prev} * {r1} = {prod} = {prod // m} * {m} + {r}, so {b}^{k} ≡ {r} (mod {m}).")
    near = [str((r + k) % m) for k in (1, -1, 2, -2)]
    return f"Compute {b}^{e} mod {m}.", steps, str(r), pick3(rng, str(r), [str(prev), str(b * e % m)], near)


def _nt_remainder(rng):
    d, n = rng.choice((3, 9, 4, 8, 11)), rng.randint(10_000, 9_999_999)
    if d in (3, 9):
        digits = str(n)
        s = sum(map(int, digits))
        steps = [f"A number and its digit sum leave the same remainder when divided by {d}.",
                 f"Digit sum: {' + '.join(digits)} = {s}.", f"{s} = {s // d} * {d} + {s % d}."]
    elif d in (4, 8):
        k = 2 if d == 4 else 3
        last = n % 10**k
        steps = [f"Only the last {k} digits matter, because 10^{k} is a multiple of {d}.",
                 f"The last {k} digits form {last}: {last} = {last // d} * {d} + {last % d}."]
    else:
        rev = [int(c) for c in reversed(str(n))]
        alt = sum(v if i % 2 == 0 else -v for i, v in enumerate(rev))
        expr = str(rev[0]) + "".join(f" {'+' if i % 2 == 0 else '-'} {v}" for i, v in enumerate(rev) if i)
        steps = ["A number leaves the same remainder mod 11 as its alternating digit sum from the units digit.",
                 f"Alternating sum: {expr} = {alt}.", f"{alt} = {operand(alt // 11)} * 11 + {alt % 11}."]
    ans = n % d
    return f"What is the remainder when {n} is divided by {d}?", steps, str(ans), \
        pick3(rng, str(ans), [str((ans + k) % d) for k in (1, 2, d - 1)], [str(ans + d), str(d)])


def _nt_smallest_prime_factor(rng):
    if rng.random() < 0.4:
        p, q = rng.sample(PRIMES[3:25], 2)
        n = p * q
    else:
        n = rng.randint(100, 20_000)
    steps = ["Try the primes in increasing order."]
    for p in PRIMES:
        if p * p > n:
            steps.append(f"The next prime is {p} and {p} * {p} = {p * p}, which is larger than {n}, so {n} is prime.")
            ans = n
            break
        q, rem = divmod(n, p)
        steps.append(f"{n} = {q} * {p} + {rem}.")
        if rem == 0:
            steps.append(f"The remainder is 0, so {p} divides {n}.")
            ans = p
            break
    i = PRIMES.index(ans) if ans in PRIMES else 0
    likely = [PRIMES[i + 1], PRIMES[max(i - 1, 0)], n // ans if ans != n else 2 * n + 1]
    return f"Find the smallest prime factor of {n}.", steps, str(ans), ints3(rng, ans, *likely)


# ---------------------------------------------------------------- word problems
_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Zoe")
_ITEMS = ("notebooks", "pens", "apples", "tickets", "books", "mugs", "sandwiches", "plants", "candles")
_THINGS = ("marbles", "stickers", "cards", "stamps", "coins", "shells", "beads")
_VEHICLES = ("train", "bus", "car", "boat", "truck")


def _wp_change(rng):
    name, (i1, i2) = rng.choice(_NAMES), rng.sample(_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 6), rng.randint(1, 12)
    c1, c2 = n1 * p1, n2 * p2
    bill = next(b for b in (20, 50, 100, 200, 500) if b > c1 + c2)
    ans = bill - c1 - c2
    q = (f"{name} buys {n1} {i1} at ${p1} each and {n2} {i2} at ${p2} each. {name} pays with a ${bill} bill. "
         f"How much change, in dollars, does {name} get?")
    steps = [f"Cost of the {i1}: {n1} * {p1} = {c1}.", f"Cost of the {i2}: {n2} * {p2} = {c2}.",
             f"Total cost: {c1} + {c2} = {c1 + c2}.", f"Change: {bill} - {c1 + c2} = {ans}."]
    return q, steps, str(ans), ints3(rng, ans, c1 + c2, bill - c1, bill - c2)


def _wp_distance(rng):
    v1, v2 = (rng.randrange(20, 125, 5) for _ in range(2))
    t1, t2 = rng.randint(1, 6), rng.randint(1, 6)
    d1, d2 = v1 * t1, v2 * t2
    q = (f"A {rng.choice(_VEHICLES)} travels at {v1} km per hour for {t1} hours and then at {v2} km per hour "
         f"for {t2} hours. How many kilometres does it travel in total?")
    steps = [f"First part: {v1} * {t1} = {d1}.", f"Second part: {v2} * {t2} = {d2}.",
             f"Total: {d1} + {d2} = {d1 + d2}."]
    return q, steps, str(d1 + d2), ints3(rng, d1 + d2, (v1 + v2) * (t1 + t2), d1, d2)


def _wp_sharing(rng):
    name, friend = rng.sample(_NAMES, 2)
    things, k, more = rng.choice(_THINGS), rng.randint(2, 6), rng.randint(1, 30)
    total = k * rng.randint(3, 25)
    g = total // k
    q = (f"{name} has {total} {things}. {name} gives 1/{k} of them to {friend} and then buys {more} more. "
         f"How many {things} does {name} have now?")
    steps = [f"Given away: {total} / {k} = {g}.", f"Left: {total} - {g} = {total - g}.",
             f"After buying more: {total - g} + {more} = {total - g + more}."]
    ans = total - g + more
    return q, steps, str(ans), ints3(rng, ans, total - g, total + more, g + more)


def _wp_sum_difference(rng):
    small, d = rng.randint(1, 200), rng.randint(1, 100)
    big = small + d
    s = big + small
    q = f"Two numbers add up to {s} and differ by {d}. What is the larger number?"
    steps = [f"Twice the larger number: {s} + {d} = {2 * big}.", f"Larger number: {2 * big} / 2 = {big}."]
    return q, steps, str(big), ints3(rng, big, small, s - d, s + d)


def _wp_reading(rng):
    name, per_day, pages = rng.choice(_NAMES), rng.randint(5, 40), rng.randint(100, 900)
    read = rng.randint(1, pages - 1)
    left = pages - read
    full, extra = divmod(left, per_day)
    ans = full + (extra > 0)
    q = (f"A book has {pages} pages. {name} has already read {read} pages and reads {per_day} pages a day. "
         f"How many more days does {name} need to finish the book?")
    steps = [f"Pages left: {pages} - {read} = {left}.", f"Full days: {left} = {full} * {per_day} + {extra}."]
    steps.append(f"The last {extra} pages need one more day: {full} + 1 = {ans}." if extra
                 else "No pages are left over after the full days.")
    return q, steps, str(ans), ints3(rng, ans, full if extra else ans + 1, pages // per_day)


def _wp_fence(rng):
    l, w, c = rng.randint(3, 60), rng.randint(3, 60), rng.randint(2, 15)
    per = 2 * (l + w)
    q = (f"A rectangular garden is {l} m long and {w} m wide. Fencing costs ${c} per metre. "
         f"How much does it cost, in dollars, to fence the whole garden?")
    steps = [f"Perimeter: 2 * ({l} + {w}) = {per}.", f"Cost: {per} * {c} = {per * c}."]
    return q, steps, str(per * c), ints3(rng, per * c, l * w * c, (l + w) * c, per)


def _wp_average(rng):
    name = rng.choice(_NAMES)
    while True:
        scores, avg = [rng.randint(55, 100) for _ in range(4)], rng.randint(60, 95)
        need = 5 * avg - sum(scores)
        if 0 <= need <= 100:
            break
    q = (f"{name} scored {scores[0]}, {scores[1]}, {scores[2]} and {scores[3]} on four tests. "
         f"What score does {name} need on the fifth test to average exactly {avg}?")
    steps = [f"Total needed: 5 * {avg} = {5 * avg}.", f"Scored so far: {' + '.join(map(str, scores))} = {sum(scores)}.",
             f"Needed: {5 * avg} - {sum(scores)} = {need}."]
    return q, steps, str(need), ints3(rng, need, avg, 4 * avg - sum(scores[:3]))


def _wp_ages(rng):
    older, younger = rng.sample(_NAMES, 2)
    age, d = rng.randint(5, 60), rng.randint(1, 40)
    s = 2 * age + d
    q = f"{older} is {d} years older than {younger}. Together they are {s} years old. How old is {younger}?"
    steps = [f"Twice {younger}'s age: {s} - {d} = {2 * age}.", f"{younger}'s age: {2 * age} / 2 = {age}."]
    return q, steps, str(age), ints3(rng, age, age + d, s - d, s // 2)


NUMBER_THEORY: tuple[tuple[str, Callable], ...] = (
    ("gcd", _nt_gcd), ("lcm", _nt_lcm), ("factorize", _nt_factorize), ("modpow", _nt_modpow),
    ("remainder", _nt_remainder), ("smallest_prime_factor", _nt_smallest_prime_factor))
WORD_PROBLEMS: tuple[tuple[str, Callable], ...] = (
    ("change", _wp_change), ("distance", _wp_distance), ("sharing", _wp_sharing),
    ("sum_difference", _wp_sum_difference), ("reading", _wp_reading), ("fence", _wp_fence),
    ("average", _wp_average), ("ages", _wp_ages))

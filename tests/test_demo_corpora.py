"""Demo domain space: shape, determinism, true benchmark answers, held-out split, JSONL.

Math answers are checked by re-solving each question from its text with tests/math_checker.py, never with the
generator's code (the generator's own correctness: test_math_gen.py).
"""

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest

from dma_jax.data import benchmarks
from dma_jax.data import demo_corpora as dc
from dma_jax.errors import DmaError
from tests.math_checker import _is_correct

SMALL_MATH = 150


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
    benchmarks.write_benchmarks_jsonl(items, path)
    assert benchmarks.read_benchmarks_jsonl(path) == items
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
            benchmarks.read_benchmarks_jsonl(path)
    with pytest.raises(DmaError, match="item 1"):
        benchmarks.write_benchmarks_jsonl([items[0], {**items[0], "gold": -1}], tmp_path / "c.jsonl")

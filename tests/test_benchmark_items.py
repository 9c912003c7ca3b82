"""Benchmark items one can trust: stratified fixed subsets, no item skipped, math items that test the skill,
every domain represented, and benchmarks that tell the fields apart."""

import collections
import dataclasses
import itertools
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax import evaluation as ev
from dma_jax.config import load_config
from dma_jax.data import demo_corpora as dc
from dma_jax.data.benchmarks import check_choices_fit
from dma_jax.data import math_gen
from dma_jax.data.demo_texts import text_domains
from dma_jax.data.domains import DomainSpace
from dma_jax.data.record_stream import RecordStream
from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError
from dma_jax.train import Trainer, TrainState, batch_from_tokens, load_base_params, token_losses
from tests.paths import DEMO

TOK = ByteTokenizer()
SMALL_MATH = 300


def _items(sizes: dict[str, int]) -> list[dict]:
    """Items written domain by domain (as the demo writes them); each names its domain and index."""
    return [{"context": f"{d} {i}", "choices": [" a", " b"], "gold": 0, "domain": d}
            for d, n in sizes.items() for i in range(n)]


def _round_robin_counts(sizes: list[int], n: int) -> list[int]:
    """Independent: per-domain counts of n items dealt like cards, one per domain per round, in order."""
    counts, left = [0] * len(sizes), n
    while left and any(c < s for c, s in zip(counts, sizes)):
        for d, s in enumerate(sizes):
            if left and counts[d] < s:
                counts[d] += 1
                left -= 1
    return counts


# ---------------------------------------------------------------- select_items
def test_select_items_known_case():
    items = _items({"a": 5, "b": 1, "c": 3})
    got = ev.select_items(items, 6, seed=0)
    assert collections.Counter(it["domain"] for it in got) == {"a": 3, "b": 1, "c": 2}
    assert [it["domain"] for it in got] == ["a", "b", "c", "a", "c", "a"]  # round-robin, first-appearance order


@pytest.mark.parametrize("trial", range(20))
def test_select_items_is_stratified_fixed_and_prefix_stable(trial):
    rng = random.Random(trial)
    sizes = {f"dom{k}": rng.randint(1, 12) for k in range(rng.randint(1, 7))}
    items = _items(sizes)
    rng.shuffle(items)  # domains interleaved in the input: order of first appearance decides
    order = list(dict.fromkeys(it["domain"] for it in items))
    n = rng.randint(1, len(items) + 3)
    got = ev.select_items(items, n, seed=7)
    counts = collections.Counter(it["domain"] for it in got)
    assert [counts[d] for d in order] == _round_robin_counts([sizes[d] for d in order], n)
    assert len({id(it) for it in got}) == len(got) and all(any(it is x for x in items) for it in got)
    if n >= len(order):
        assert set(counts) == set(sizes)  # every domain represented
    assert ev.select_items(items, n, seed=7) == got  # same seed, same subset (and order)
    assert ev.select_items(items, n + 5, seed=7)[:n] == got  # a smaller subset is a prefix of a larger one


def test_select_items_seed_changes_the_items_not_the_counts():
    items = _items({"a": 30, "b": 30})
    s0, s1 = ev.select_items(items, 10, 0), ev.select_items(items, 10, 1)
    assert s0 != s1
    assert collections.Counter(it["domain"] for it in s0) == collections.Counter(it["domain"] for it in s1)
    assert [it["context"] for it in ev.select_items(items[:30], 30, 0)] != [it["context"] for it in items[:30]]
    with pytest.raises(DmaError, match="n=0"):
        ev.select_items(items, 0, 0)


class _FakeSpace:
    """What `EvalSet.for_space` reads of a domain space."""

    fields = ["source", "math"]
    fields_of_domain = ["source", "math"]
    names = ["source/a", "math/a"]
    part_of = names
    manifest = {"domains": [{"name": n, "field": f} for n, f in zip(names, fields_of_domain)]}
    num_domains = 2

    def __init__(self, bench):
        self.bench = bench

    def tokenizer(self):
        return TOK

    def tokens(self, d, split):
        return np.arange(3, 3 + 300, dtype=np.int32) % 250 + 3

    def benchmarks(self, field):
        return self.bench[field]


def test_for_space_uses_the_stratified_subset_and_skips_nothing():
    ec = ev.EvalConfig(heldout_windows_per_domain=2, benchmark_items_per_field=6, max_len=16)
    long_ctx = "x" * 200  # far longer than max_len: left-truncated, not skipped
    bench = {"source": [{**it, "context": long_ctx + it["context"]} for it in _items({"s1": 4, "s2": 4, "s3": 1})],
             "math": [{**it, "choices": [" " + "9" * 15, " 1"]} for it in _items({"m1": 3, "m2": 3})]}
    es = ev.EvalSet.for_space(_FakeSpace(bench), ec)
    assert es.items_per_field_F.tolist() == [6, 6]
    subsets = {f: ev.select_items(bench[f], 6, ev.SUBSET_SEED) for f in bench}
    want = ev.build_eval_set([np.zeros((2, 17), np.int32)] * 2, subsets, TOK, ["source", "math"], 16,
                             domain_fields=["source", "math"])
    np.testing.assert_array_equal(es.tokens_IxCxL1, want.tokens_IxCxL1)
    np.testing.assert_array_equal(es.answer_mask_IxCxL, want.answer_mask_IxCxL)
    # A 16-token choice in a 16-token window: one token of context (the last), the choice whole.
    assert es.answer_mask_IxCxL[6:, 0].sum(-1).tolist() == [16] * 6
    for i in range(6, 12):
        assert TOK.decode(es.tokens_IxCxL1[i, 0, 1:].tolist()) == " " + "9" * 15
    bad = {**bench, "math": bench["math"] + [{"context": "q", "choices": [" " + "7" * 16, " 1"], "gold": 0,
                                               "domain": "m2"}]}
    with pytest.raises(DmaError, match=r"benchmarks of field 'math': item 6 \(domain m2\): choice .* is 17 tokens; "
                                       r"eval.max_len=16"):
        ev.EvalSet.for_space(_FakeSpace(bad), ec)


# ---------------------------------------------------------------- the demo's benchmark files
@pytest.fixture(scope="module")
def bench():
    """As `dma prepare` draws them for the tiny variant's eval.max_len=64: choices of at most 48 tokens."""
    return dc.demo_benchmarks(0, 50, math_docs_per_domain=SMALL_MATH, choice_fits=lambda c: len(TOK.encode(c)) <= 48)


def test_every_domain_gets_its_even_share_and_choices_fit(bench):
    for field in dc.FIELDS:
        domains = [d.name for d in dc.demo_domains(0, 1, (field,)) if d.name not in dc.LOW_QUALITY_DOMAINS]
        counts = collections.Counter(it["domain"] for it in bench[field])
        assert set(counts) == set(domains)  # none from the field's low-quality domain
        # 50 items over D domains: D - 50 % D domains get 50 // D, the first 50 % D one more.
        assert [counts[d] for d in domains] == [50 // len(domains) + (i < 50 % len(domains))
                                                for i in range(len(domains))], field
        assert max(len(TOK.encode(c)) for it in bench[field] for c in it["choices"]) <= 48
        check_choices_fit(bench[field], TOK.encode, 64, field)
        sub = ev.select_items(bench[field], 16, ev.SUBSET_SEED)
        sub_counts = collections.Counter(it["domain"] for it in sub)
        assert sorted(sub_counts.values()) == sorted(_round_robin_counts([counts[d] for d in domains], 16))


def test_long_sentences_become_sentence_endings(bench):
    """A python_docs sentence too long to be a choice is split: its head ends the context, its tail is the gold;
    context + gold is still the held-out text, context + a distractor is not."""
    texts = {name: [" ".join(t.split()) for t in dc._split(name, docs)[1]]
             for name, docs in text_domains("source").items() if name.startswith("source/python")}
    split = 0
    for it in bench["source"]:
        if it["domain"] not in texts:
            continue
        split += not re.search(r"[.!?]$", it["context"].rstrip())
        for i, c in enumerate(it["choices"]):
            follows = any(" ".join((it["context"] + c).split()) in t for t in texts[it["domain"]])
            assert follows == (i == it["gold"]), it
    assert split >= 3, "expected some split sentences at a 48-token choice limit"


def _char_class(ch: str) -> str:
    return "a" if ch.isascii() and ch.isalpha() else "d" if ch.isdigit() else "s" if ch.isspace() else "o" + ch


def _tokens(text: str) -> list[str]:
    """Words, digit runs and single symbols (written apart from the generator's regex)."""
    out = []
    for cls, group in itertools.groupby(text, _char_class):
        run = "".join(group)
        if cls == "s":
            continue
        out += [run] if cls in ("a", "d") else list(run)
    return out


def test_token_splitter():
    assert _tokens("Compute 2x^2 - 12, 8/33.\nAnswer:") == ["Compute", "2", "x", "^", "2", "-", "12", ",", "8", "/",
                                                           "33", ".", "Answer", ":"]


@pytest.mark.parametrize("kind", math_gen.KINDS)
def test_math_items_do_not_contain_their_answer(kind):
    items = dc._math_items(kind, 150, 0, SMALL_MATH)
    assert len(items) == 150
    for it in items:
        ctx, gold = it["context"], it["choices"][it["gold"]]
        assert ctx.endswith("\nAnswer:") and ctx.count("\n") == 1, ctx  # the question alone, no worked steps
        padded = f" {' '.join(_tokens(ctx))} "
        assert f" {' '.join(_tokens(gold))} " not in padded, (ctx, gold)
        # Distractors: plausible wrong answers of the gold's form (integers stay integers, "x = ..." stays so).
        for c in it["choices"]:
            assert c.startswith(" ") and c != " "
            assert {t for t in _tokens(c) if t.isalpha()} == {t for t in _tokens(gold) if t.isalpha()}, it
            if ctx.startswith("Find the prime factorization"):
                form = r" \d+(\^\d+)?( \* \d+(\^\d+)?)*"  # products of prime powers (a prime alone is one)
            else:
                form = r" -?\d+(/\d+)?"  # integers and fractions: one form (a fraction may be whole)
            assert bool(re.fullmatch(form, c)) == bool(re.fullmatch(form, gold)), it


def test_answer_in_prompt_flags_a_giveaway():
    p = math_gen.MathProblem("number_theory", "gcd", "Find the greatest common divisor of 36 and 12.", ("x",), "12",
                             ("6", "24", "3"))
    assert p.answer_in_prompt and p.prompt == "Find the greatest common divisor of 36 and 12.\nAnswer:"
    assert not dataclasses.replace(p, answer="4").answer_in_prompt
    q = math_gen.MathProblem("arithmetic", "fractions", "Compute 1/2 + 1/3.", ("...",), "5/6", ("2/5", "1", "7/6"))
    assert not q.answer_in_prompt


# ---------------------------------------------------------------- the benchmarks tell the fields apart
FIELD_STEPS = 300


def _gold_ll_per_item(lm, params, es: ev.EvalSet) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the gold choice's summed log-likelihood and its token count, by a direct forward pass over the
    gold rows ([eos] + left-truncated context + gold choice)."""
    items = np.arange(len(es.gold_of_item_I))
    rows, mask = es.tokens_IxCxL1[items, es.gold_of_item_I], es.answer_mask_IxCxL[items, es.gold_of_item_I]
    losses = jax.jit(lambda p, t: token_losses(lm, p, batch_from_tokens(t)))(params, jnp.asarray(rows))
    return -(np.asarray(losses, np.float64) * mask).sum(-1), mask.sum(-1)


def test_benchmarks_tell_the_fields_apart(prepared_world, tmp_path):
    """Continue the tiny base target on math only and on source only: on the in-loop eval set, the math-trained
    model's math gold log-likelihood per token beats the source-trained one's by more than two standard errors
    (over the items, paired), and the other way round for source."""
    cfg = load_config(DEMO, prepared_world.run_overrides(tmp_path, "mesh.data=1"), variant="tiny")
    space = DomainSpace.load(prepared_world.data_dir)
    es = ev.EvalSet.for_space(space, cfg.eval)
    fields = space.fields
    assert fields == ["source", "math"]
    base = load_base_params(cfg, "target", prepared_world.pretrain_dir("target") / "checkpoints")
    B, L = 16, space.record_len - 1
    trainer = Trainer(cfg.target, cfg.optim, cfg.mesh, FIELD_STEPS, B, L, jax.devices()[:1])
    evaluate = jax.jit(lambda p, e: ev.evaluate(trainer.lm, p, e, 16))
    per_item, raw = {}, {}
    for field in fields:
        stream = RecordStream(space, [field])
        params = jax.device_put(base, trainer.state_sharding.params)
        state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, trainer.tx.init(p)),
                        out_shardings=trainer.state_sharding)(params)
        for step in range(FIELD_STEPS):
            state, _ = trainer.step(state, trainer.put_batch(stream.batch(step, B, 0)))
        raw[field] = {k: np.asarray(v) for k, v in evaluate(state.params, es).items()}
        ll, n_tokens = _gold_ll_per_item(trainer.lm, state.params, es)
        per_item[field] = ll / n_tokens  # gold log-likelihood per token
        if "item_nll" in raw[field]:  # evaluate's own per-item values agree with the direct pass
            np.testing.assert_allclose(-raw[field]["item_nll"], ll, rtol=1e-4, atol=1e-4)
    report = {}
    for f, field in enumerate(fields):
        sel = es.field_of_item_I == f
        other = fields[1 - f]
        if "answer_ll" in raw[field]:  # the per-item values reproduce evaluate's answer_ll
            for trained in fields:
                np.testing.assert_allclose(per_item[trained][sel].mean(), raw[trained]["answer_ll"][f], rtol=1e-4)
        diff = per_item[field][sel] - per_item[other][sel]  # paired over the same items
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        report[field] = (per_item[field][sel].mean(), per_item[other][sel].mean(), diff.mean(), se)
        print(f"{field} items ({sel.sum()}): trained on {field} {report[field][0]:.3f}, on {other} "
              f"{report[field][1]:.3f} nats/token; difference {diff.mean():.3f} +- {se:.3f} (SE)")
    for field, (_, _, gain, se) in report.items():
        assert gain > 2 * se and gain > 0, (field, report)

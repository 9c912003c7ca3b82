"""The demo's low-quality domains (one per field) and `eval.unscored_domains`.

Checked against independent computations: token shares by counting bytes, letter substitutions and shuffles
against the clean training lines, math answers by re-solving each question with tests/math_checker.py's own solver, the field score
and its SE with unscored domains by a numpy reference (delta method in gradient form, np.cov)."""

import collections
import json
import math
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.config import EvalConfig, ModelConfig, load_config
from dma_jax.data import demo_corpora as dc
from dma_jax.data import low_quality, math_gen
from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError
from dma_jax.evaluation import EvalSet, build_eval_set, evaluate, normalise, summary
from dma_jax.models.lm import LMDef
from dma_jax.prepare import run_prepare
from tests.paths import DEMO
from tests.math_checker import _ARITH, _CLAUSES, _eval, _is_correct

TINY_DOCS = 40  # configs/demo.yaml, variant tiny: demo_max_docs_per_domain and demo_math_docs_per_domain
SMALL_MATH = 150
LQ = dict(zip(dc.FIELDS, dc.LOW_QUALITY_DOMAINS))


@pytest.fixture(scope="module")
def full():
    """The default demo space (demo_math_docs_per_domain 3500, no document cap)."""
    return dc.demo_domains(0)


def _shares(domains, cap=None) -> dict[str, float]:
    """Per field: the low-quality domain's share of the field's tokens (byte tokenizer: bytes + eos per
    document), with every domain cut to its first `cap` documents as `dma prepare` does."""
    tokens = collections.defaultdict(dict)
    for d in domains:
        tokens[d.field][d.name] = sum(len(t.encode("utf-8")) + 1 for t in d.documents[:cap])
    return {f: tokens[f][LQ[f]] / sum(tokens[f].values()) for f in dc.FIELDS}


def test_one_low_quality_domain_per_field_last_with_its_share(full):
    assert dc.LOW_QUALITY_DOMAINS == ("source/web_prose", "math/forum_solutions", "code/paste_snippets")
    for field in dc.FIELDS:
        names = [d.name for d in full if d.field == field]
        assert names[-1] == LQ[field] and sum(n in dc.LOW_QUALITY_DOMAINS for n in names) == 1
    assert len(full) == 19 and dc.domain_names() == [d.name for d in full]
    assert dc.domain_names(("math",)) == [d.name for d in full if d.field == "math"]
    default = _shares(full)
    tiny = _shares(dc.demo_domains(0, TINY_DOCS), TINY_DOCS)
    for shares in (default, tiny):
        for field, share in shares.items():
            assert 0.10 <= share <= 0.15, (field, shares)
    assert abs(default["math"] - low_quality.SHARE) < 0.005  # filled to the byte target


def test_low_quality_domains_are_deterministic_per_seed(full):
    again = {d.name: d.documents for d in dc.demo_domains(0, 60)}
    other = {d.name: d.documents for d in dc.demo_domains(1, 60)}
    mine = {d.name: d.documents for d in full}
    for name in dc.LOW_QUALITY_DOMAINS:
        assert other[name] != again[name]
    for name in ("source/web_prose", "code/paste_snippets"):  # independent of the math corpus size
        assert again[name] == mine[name]


def _clean_train(domains, field) -> list[str]:
    return [t for d in domains if d.field == field and d.name not in dc.LOW_QUALITY_DOMAINS for t in d.documents]


def _skeleton(line: str) -> str:
    """The line with every ASCII letter replaced by its case's placeholder (what a letter substitution keeps)."""
    return re.sub(r"[a-z]", "a", re.sub(r"[A-Z]", "A", line))


def test_web_prose_pages_are_clean_lines_through_one_letter_substitution_each(full):
    by_skeleton = collections.defaultdict(set)  # letter skeleton -> clean training lines with it
    for text in _clean_train(full, "source"):
        for line in text.split("\n"):
            by_skeleton[_skeleton(line)].add(line)
    docs = [d for d in dc.demo_domains(0, 1, ("source",), exclude_held_out=False) if d.name == LQ["source"]][0]
    letters = set("abcdefghijklmnopqrstuvwxyz")
    tables = []
    for text in docs.documents:
        table: dict[str, str] = {}  # junk letter -> clean letter, built from the lines that match one clean line
        for line in text.split("\n"):
            cands = by_skeleton.get(_skeleton(line))
            assert cands, line  # digits, spacing, punctuation and case pattern of a clean training line
            if len(cands) == 1 and len(set(line.lower()) & letters) > 8:
                (clean,) = cands
                for a, b in zip(line.lower(), clean.lower()):
                    if a in letters:
                        assert table.setdefault(a, b) == b, (line, clean)  # one substitution per page
        assert len(table) >= 15 and all(a != b for a, b in table.items()), table  # every letter moved
        assert len(set(table.values())) == len(table)  # a permutation
        tables.append(tuple(sorted(table.items())))
    assert len(set(tables)) > 0.9 * len(tables)  # each page its own substitution
    # The letters' statistics contradict the clean text's: the commonest clean letter is rare in the junk.
    junk = collections.Counter(c for t in docs.documents for c in t.lower() if c in letters)
    clean = collections.Counter(c for t in _clean_train(full, "source") for c in t.lower() if c in letters)
    assert max(abs(junk[c] / sum(junk.values()) - 1 / 26) for c in letters) < \
        0.5 * max(abs(clean[c] / sum(clean.values()) - 1 / 26) for c in letters)  # flattened by the mixing


def test_paste_snippets_shuffle_the_lines_of_training_files(full):
    lines, pairs = set(), set()
    for text in _clean_train(full, "code"):
        ls = text.split("\n")
        lines.update(ls)
        pairs.update(zip(ls, ls[1:]))
    docs = [d for d in full if d.name == LQ["code"]][0].documents
    adjacent = []
    for text in docs:
        ls = text.split("\n")
        assert set(ls) <= lines and len(ls) > 100
        adjacent.append(np.mean([p in pairs for p in zip(ls, ls[1:])]))
    assert np.mean(adjacent) < 0.2 and max(adjacent) < 0.4, adjacent  # a clean file: 1.0


def _holds(eq: str) -> bool:
    """Whether a plain equation ('19 * 3 = 57') is true; a division by zero makes it false."""
    eq = re.sub(r"\b0+(\d)", r"\1", eq)  # a deranged digit may lead with 0: the number's value
    try:
        return len({_eval(part) for part in eq.split("=")}) == 1
    except ZeroDivisionError:
        return False


def test_forum_solutions_have_wrong_answers_and_wrong_steps():
    domains = dc.demo_domains(0, SMALL_MATH, ("math",))
    docs = [d for d in domains if d.name == LQ["math"]][0].documents
    assert 0.10 * 4 * SMALL_MATH < len(docs) < 0.2 * 4 * SMALL_MATH
    right = wrong = 0
    questions = []
    for text in docs:
        question, *steps, last = text.split("\n")
        assert last.startswith("Answer: ") and steps
        assert not _is_correct(question, last.removeprefix("Answer: ")), text  # re-solved: the answer is wrong
        questions.append(question)
        for line in steps:
            for clause in _CLAUSES.split(line):
                eq = clause.rsplit(":", 1)[-1].strip().rstrip(".")
                if _ARITH.fullmatch(eq):
                    ok = _holds(eq)
                    right, wrong = right + ok, wrong + (not ok)
    assert wrong > 200 and right / (right + wrong) < 0.05, (right, wrong)
    assert {q.split()[0] for q in questions} >= {"Compute", "Solve", "Find"}  # all kinds
    # Their own stream: no question repeats, none is a clean training question or a benchmark question.
    clean = {t.split("\n", 1)[0] for d in domains if d.name != LQ["math"] for t in d.documents}
    bench = {it["context"].split("\n", 1)[0] for it in dc.demo_benchmarks(0, 200, ("math",), SMALL_MATH)["math"]}
    assert len(set(questions)) == len(questions) and not set(questions) & (clean | bench)


def test_wrong_solution_moves_every_number_then_deranges_the_digits_of_the_steps():
    problem = math_gen.MathProblem("arithmetic", "x", "Compute 12 * 3 / 4.", ("Multiply: 12 * 3 = 36.",
                                                                          "Divide: 36 / 4 = 9."), "9", ())
    for seed in range(20):
        q, *steps, ans = low_quality.wrong_solution(problem, random.Random(seed)).split("\n")
        assert q == problem.question
        for got, was in zip(steps, problem.steps):
            assert got != was and re.sub(r"\d+", "N", got) == re.sub(r"\d+", "N", was)  # the words kept, numbers replaced
        digits = "".join(re.findall(r"\d", "".join(steps)))
        rng = random.Random(seed)
        rng.randint(1, 9)  # the answer's d (wrong_solution draws it first)
        perm = low_quality.derangement("0123456789", rng)
        moved = [re.sub(r"\d+", low_quality._moved(rng), s) for s in problem.steps]
        assert digits == "".join(re.findall(r"\d", "".join(moved))).translate(str.maketrans("0123456789", perm))
        assert all(a != b for a, b in zip(perm, "0123456789"))
        for m, was in zip(moved, problem.steps):  # every number moved before the substitution
            new, old = re.findall(r"\d+", m), re.findall(r"\d+", was)
            assert len(new) == len(old) and all(a != b for a, b in zip(new, old)), (m, was)
        assert int(ans.removeprefix("Answer: ")) in range(10, 19)


def test_benchmarks_take_no_items_from_low_quality_domains():
    bench = dc.demo_benchmarks(0, 48, math_docs_per_domain=SMALL_MATH)
    for field in dc.FIELDS:
        got = {it["domain"] for it in bench[field]}
        want = {d.name for d in dc.demo_domains(0, 1, (field,)) if d.name not in dc.LOW_QUALITY_DOMAINS}
        assert got == want and len(bench[field]) == 48


_MARKERS = ("low", "quality", "noise", "noisy", "shuffl", "corrupt", "wrong", "junk", "spam", "garbage", "perturb",
            "scrambl", "synthetic", "unscored", "clean", "lq", "bad")


def test_names_and_manifest_carry_no_quality_marker(tmp_path):
    for name in dc.LOW_QUALITY_DOMAINS:
        assert not any(m in name.lower() for m in _MARKERS), name
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}", "data.demo_max_docs_per_domain=5",
                             "data.demo_math_docs_per_domain=8", "data.demo_benchmark_items=4"], variant="tiny")
    space = run_prepare(cfg, progress=False)
    for name in dc.LOW_QUALITY_DOMAINS:  # held-out documents exist for them as for every domain
        d = space.names.index(name)
        assert space.train_tokens[d] > 0 and space.heldout_tokens[d] > 0
        assert space.manifest["domains"][d]["heldout"]["documents"] >= 1
    text = re.sub(r"[0-9a-f]{64}", "", json.dumps(space.manifest).lower())  # digests may spell "bad"
    assert not [m for m in _MARKERS if m in text]
    for field in space.fields:
        for item in space.benchmarks(field):
            assert item["domain"] not in dc.LOW_QUALITY_DOMAINS


# ---------------------------------------------------------------- eval.unscored_domains
def _np_score_and_se(raw, base, scored_D, cfg):
    """Field scores and SEs with the held-out loss pooled over scored domains only (numpy, gradient form)."""
    raw = {k: np.asarray(v, np.float64) for k, v in raw.items()}
    out_s, out_se = [], []
    for f in range(len(raw["answer_bpb"])):
        on = raw["item_field"] == f
        y, x, a = raw["item_nll"][on], raw["item_bytes"][on], raw["item_correct_norm"][on]
        y0, ch = base["answer_bpb"][f] * math.log(2), raw["chance"][f]
        g = np.array([-cfg.bpb_weight / (y0 * x.mean()), cfg.bpb_weight * y.mean() / (y0 * x.mean() ** 2),
                      cfg.acc_weight / (1 - ch)])
        var = g @ np.cov(np.stack([y, x, a])) @ g / on.sum()
        doms = (raw["domain_field"] == f) & scored_D
        u, t = raw["window_nll"][doms].reshape(-1), raw["window_tokens"][doms].reshape(-1)
        z0 = base["field_loss"][f]
        g2 = np.array([-cfg.loss_weight / (z0 * t.mean()), cfg.loss_weight * u.mean() / (z0 * t.mean() ** 2)])
        var += g2 @ np.cov(np.stack([u, t])) @ g2 / len(u)
        c, c0 = (a.mean() - ch) / (1 - ch), (base["acc_norm"][f] - ch) / (1 - ch)
        out_s.append(1 + cfg.bpb_weight * (1 - y.sum() / x.sum() / math.log(2) / base["answer_bpb"][f])
                     + cfg.loss_weight * (1 - u.sum() / t.sum() / z0) + cfg.acc_weight * (c - c0))
        out_se.append(math.sqrt(var))
    return np.array(out_s), np.array(out_se)


def _raw(seed, scored_D, D=5, E=4, n_items=(6, 7)):
    """Raw metrics from known per-item / per-window values; fields of the domains [0, 0, 0, 1, 1]; the pooled
    field loss over the scored domains, as `evaluate` computes it."""
    rng = np.random.default_rng(seed)
    item_field = np.repeat(np.arange(2), n_items)
    item_bytes = rng.integers(2, 9, item_field.size).astype(np.float32)
    tokens = rng.integers(20, 33, (D, E)).astype(np.float32)
    nll = (tokens * rng.uniform(2.0, 4.0, (D, E)) * np.array([1, 1, 1.6, 1, 1])[:, None]).astype(np.float32)
    domain_field = np.array([0, 0, 0, 1, 1], np.int32)
    raw = {"item_nll": (item_bytes * rng.uniform(0.5, 3.0, item_field.size)).astype(np.float32),
           "item_bytes": item_bytes, "item_correct": (rng.uniform(size=item_field.size) < 0.5).astype(np.float32),
           "item_correct_norm": (rng.uniform(size=item_field.size) < 0.6).astype(np.float32),
           "item_field": item_field.astype(np.int32), "window_nll": nll, "window_tokens": tokens,
           "domain_field": domain_field, "domain_scored": scored_D.astype(np.float32), "chance": np.array([0.3, 0.25])}
    by_f = lambda x, seg: np.array([x[seg == f].sum() for f in range(2)])  # noqa: E731
    raw.update(domain_loss=nll.sum(1) / tokens.sum(1),
               field_loss=by_f(nll.sum(1) * scored_D, domain_field) / by_f(tokens.sum(1) * scored_D, domain_field),
               answer_bpb=by_f(raw["item_nll"], item_field) / by_f(item_bytes, item_field) / math.log(2),
               accuracy=by_f(raw["item_correct"], item_field) / np.array(n_items),
               acc_norm=by_f(raw["item_correct_norm"], item_field) / np.array(n_items))
    return raw


@pytest.mark.parametrize("cfg", [EvalConfig(), EvalConfig(bpb_weight=0.2, loss_weight=0.5, acc_weight=0.3)])
def test_unscored_domains_leave_the_field_loss_term_as_numpy_computes(cfg):
    scored = np.array([True, True, False, True, True])  # domain 2 (field 0, the highest loss) unscored
    results = {}
    for name, mask in (("all", np.ones(5, bool)), ("unscored", scored)):
        raw, base = _raw(1, mask), _raw(2, mask)
        norm = jax.jit(lambda r, b: normalise(r, b, cfg))(jax.tree.map(jnp.asarray, raw), summary(base))
        want_score, want_se = _np_score_and_se(raw, base, mask, cfg)
        np.testing.assert_allclose(norm["field_score"], want_score, rtol=1e-5)
        np.testing.assert_allclose(norm["field_score_se"], want_se, rtol=1e-4)
        np.testing.assert_allclose(norm["domain_loss"], raw["domain_loss"] / base["domain_loss"], rtol=1e-6)
        results[name] = np.asarray(norm["field_score"]), np.asarray(norm["field_score_se"])
    assert abs(results["all"][0][0] - results["unscored"][0][0]) > 1e-3  # field 0 moves
    assert abs(results["all"][1][0] - results["unscored"][1][0]) > 1e-4
    np.testing.assert_allclose(results["all"][0][1], results["unscored"][0][1], rtol=1e-6)  # field 1 does not


TOK = ByteTokenizer()
BENCH = {"s": [{"context": "ab", "choices": [" c", " dd"], "gold": 0},
               {"context": "x", "choices": ["y", "z"], "gold": 1}],
         "m": [{"context": "1+1=", "choices": ["2", "3"], "gold": 0}]}


def test_evaluate_pools_the_field_loss_over_scored_domains_only():
    lm = LMDef.build(ModelConfig(vocab_size=259, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
    rng = np.random.default_rng(0)
    windows = [rng.integers(3, 259, (3, 17)) for _ in range(4)]
    fields = ["s", "s", "m", "s"]
    fn = jax.jit(lambda p, e: evaluate(lm, p, e, 4))
    params = lm.init(0)
    both = [jax.tree.map(np.asarray, fn(params, build_eval_set(windows, BENCH, TOK, ["s", "m"], 16,
                                                                domain_fields=fields, domain_scored=scored)))
            for scored in (None, [True, False, True, True])]
    np.testing.assert_array_equal(both[0]["domain_scored"], [1, 1, 1, 1])
    np.testing.assert_array_equal(both[1]["domain_scored"], [1, 0, 1, 1])
    np.testing.assert_allclose(both[1]["domain_loss"], both[0]["domain_loss"], rtol=1e-6)  # still evaluated
    nll, tok = both[0]["window_nll"].sum(1), both[0]["window_tokens"].sum(1)
    want_all = [nll[[0, 1, 3]].sum() / tok[[0, 1, 3]].sum(), nll[2] / tok[2]]
    want_unscored = [nll[[0, 3]].sum() / tok[[0, 3]].sum(), nll[2] / tok[2]]
    np.testing.assert_allclose(both[0]["field_loss"], want_all, rtol=1e-6)
    np.testing.assert_allclose(both[1]["field_loss"], want_unscored, rtol=1e-6)
    assert abs(want_all[0] - want_unscored[0]) > 1e-4


class _Space:
    """What `EvalSet.for_space` reads: a subset (fields s, m) of prepared data with fields s, m, c."""

    manifest = {"domains": [{"name": n, "field": f} for n, f in
                            (("s/a", "s"), ("s/b", "s"), ("m/a", "m"), ("c/a", "c"))]}
    names = ["s/a", "s/b", "m/a"]
    part_of = names  # no split domains (`DomainSpace.split`)
    fields_of_domain = ["s", "s", "m"]
    fields = ["s", "m"]
    num_domains = 3

    def tokenizer(self):
        return TOK

    def tokens(self, d, split):
        return np.arange(200, dtype=np.int32) % 250 + 3

    def benchmarks(self, field):
        return BENCH[field]


def test_for_space_marks_unscored_domains_and_refuses_unknown_names():
    def build(*unscored):
        return EvalSet.for_space(_Space(), EvalConfig(heldout_windows_per_domain=2, max_len=16,
                                                      unscored_domains=unscored))
    np.testing.assert_array_equal(build().domain_scored_D, [1, 1, 1])
    np.testing.assert_array_equal(build("s/b").domain_scored_D, [1, 0, 1])
    # A domain of the prepared data outside this subset, or a demo domain this data lacks, is no error.
    np.testing.assert_array_equal(build("c/a", *dc.LOW_QUALITY_DOMAINS).domain_scored_D, [1, 1, 1])
    with pytest.raises(DmaError, match=r"eval.unscored_domains: \['s/typo', 'nofield'\] are domains neither of "
                                       r"the prepared data \(s/a, s/b, m/a, c/a\) nor of the demo space"):
        build("s/b", "s/typo", "nofield")
    with pytest.raises(DmaError, match=r"every domain of field\(s\) \['s'\] is unscored"):
        build("s/a", "s/b")
    with pytest.raises(DmaError, match=r"every domain of field\(s\) \['m'\]"):
        build_eval_set([np.zeros((2, 17), np.int32)] * 2, BENCH, TOK, ["s", "m"], 16, domain_fields=["s", "m"],
                       domain_scored=[True, False])
    with pytest.raises(DmaError, match="domain_scored has 1 entries for 2"):
        build_eval_set([np.zeros((2, 17), np.int32)] * 2, BENCH, TOK, ["s", "m"], 16, domain_fields=["s", "m"],
                       domain_scored=[True])


def test_the_demo_and_study_configs_leave_exactly_the_low_quality_domains_unscored():
    """One list in the configs, one in the corpus builder: they must agree (configs/demo.yaml, configs/study.yaml)."""
    for path in (DEMO, DEMO.parent / "study.yaml"):
        assert tuple(load_config(path).eval.unscored_domains) == dc.LOW_QUALITY_DOMAINS, path

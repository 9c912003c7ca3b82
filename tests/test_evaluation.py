import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.config import ModelConfig
from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError
from dma_jax.evaluation import (
    EvalConfig, balanced_score, build_eval_set, cut_windows, domain_loss_index, evaluate, feedback_names,
    feedback_vector, field_score_index, normalise, rewards,
)
from dma_jax.models.lm import LMDef
from tests.np_lm import forward as np_forward

MODEL = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64, init_std=0.3)
TOK = ByteTokenizer()
MAX_LEN = 24
BENCH = {
    "source": [
        {"context": "To be, or not to be, that is the question:", "choices": [" Whether", " No", " Yes sir"],
         "gold": 0},
        {"context": "Hi", "choices": [" there", " you"], "gold": 1},
        {"context": "The quick brown fox jumps over the lazy dog again and again", "choices": [" x", " yz"],
         "gold": 0},
    ],
    "math": [
        {"context": "Q: 2+2=", "choices": [" 4", " 5", " 22", " 3"], "gold": 0},
        {"context": "Q: 7*6=", "choices": [" 42", " 13"], "gold": 1},
    ],
    "code": [{"context": "unused", "choices": ["a", "b"], "gold": 0}],  # not in field_names: ignored
}
FIELDS = ("source", "math")


def _windows(D=3, E=2, L=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, (E, L + 1)) for _ in range(D)]


def _records(E=2, L=16, seed=5):
    """Packed records: two documents then padding (segment 0) in each window."""
    tokens = np.random.default_rng(seed).integers(3, 259, (E, L + 1))
    seg = np.array([[1] * 6 + [2] * 7 + [0] * (L + 1 - 13), [1] * 3 + [2] * (L + 1 - 3)])
    tokens[seg == 0] = 0
    return {"tokens": tokens, "segment_ids": seg}


def _logp(lm, params, ids):
    """log p(ids[j+1] | ids[:j+1]) of one unpadded sequence, by the independent numpy LM (float64)."""
    np_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    logits = np_forward(np_params, lm.cfg, np.asarray(ids)[None, :-1])[0]
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), np.asarray(ids)[1:]]


def _ref_window_nll(lm, params, tokens, seg):
    """Summed NLL and count of scored targets of one window, each document run on its own."""
    L = len(tokens) - 1
    total, count, a = 0.0, 0, 0
    while a < L:
        b = a
        while b < L and seg[b] == seg[a]:
            b += 1
        run = tokens[a: b + 1]  # inputs a..b-1 and the target after the last one
        logp = _logp(lm, params, run)
        for j in range(b - a):
            if seg[a + j + 1] != 0:
                total, count = total - logp[j], count + 1
        a = b
    return total, count


def _ref_bench(lm, params, fields=FIELDS, max_len=MAX_LEN):
    acc, ll = [], []
    for field in fields:
        correct, gold_ll = [], []
        for item in BENCH[field]:
            lls, lens = [], []
            for choice in item["choices"]:
                ans = [b + 3 for b in choice.encode()]
                full = [TOK.eos_id] + [b + 3 for b in item["context"].encode()] + ans
                lls.append(_logp(lm, params, full[-(max_len + 1):])[-len(ans):].sum())
                lens.append(len(ans))
            correct.append(int(np.argmax(lls)) == item["gold"])
            gold_ll.append(lls[item["gold"]] / lens[item["gold"]])
        acc.append(np.mean(correct))
        ll.append(np.mean(gold_ll))
    return np.array(acc), np.array(ll)


@pytest.fixture(scope="module")
def setup():
    lm = LMDef.build(MODEL)
    windows = _windows() + [_records()]
    es = build_eval_set(windows, BENCH, TOK, FIELDS, MAX_LEN)
    fn = jax.jit(lambda p, e: evaluate(lm, p, e, 4))
    return lm, windows, es, fn


def test_evaluate_matches_rowwise_numpy(setup):
    lm, windows, es, fn = setup
    params = lm.init(0)
    raw = jax.tree.map(np.asarray, fn(params, es))
    want_loss = []
    for w in windows:
        tok, seg = (w["tokens"], w["segment_ids"]) if isinstance(w, dict) else (w, np.ones_like(w))
        sums = [_ref_window_nll(lm, params, t, s) for t, s in zip(tok, seg)]
        want_loss.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
    np.testing.assert_allclose(raw["domain_loss"], want_loss, rtol=1e-5)
    want_acc, want_ll = _ref_bench(lm, params)
    np.testing.assert_allclose(raw["accuracy"], want_acc, rtol=1e-6)
    np.testing.assert_allclose(raw["answer_ll"], want_ll, rtol=1e-5)


def test_accuracy_forced_by_prefix_choices_and_empty_slots_never_win():
    # A choice that is a strict prefix of another always has the higher summed log-likelihood.
    bench = {
        "f": [{"context": "abc", "choices": ["x", "xyz"], "gold": 0},
              {"context": "hello", "choices": ["pq", "p"], "gold": 1},
              {"context": "k", "choices": ["xyz", "x"], "gold": 0},  # wrong by construction
              {"context": "zz", "choices": ["m", "mm", "mmm"], "gold": 0}],
        "g": [{"context": "qq", "choices": ["q", "qq", "qqq", "qqqq"], "gold": 3}],
    }
    lm = LMDef.build(MODEL)
    es = build_eval_set(_windows(D=1), bench, TOK, ["f", "g"], 16)
    assert es.tokens_IxCxL1.shape[1] == 4  # two-choice items carry two empty slots (log-likelihood 0)
    for seed in (0, 1):
        raw = evaluate(lm, lm.init(seed), es, 3)
        np.testing.assert_array_equal(np.asarray(raw["accuracy"]), [0.75, 0.0])


def test_left_truncation_keeps_the_whole_choice():
    ctx = "0123456789abcdef"
    bench = {"s": [{"context": ctx, "choices": ["XYZ", "12345678", "no"], "gold": 0},
                   {"context": "ab", "choices": ["c", "d"], "gold": 1}]}
    es = build_eval_set(_windows(D=1), bench, TOK, ["s"], 8)
    enc = lambda s: [b + 3 for b in s.encode()]  # noqa: E731
    np.testing.assert_array_equal(es.tokens_IxCxL1[0, 0], enc("abcdef" + "XYZ"))
    np.testing.assert_array_equal(es.answer_mask_IxCxL[0, 0], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(es.tokens_IxCxL1[0, 1], enc("f12345678"))  # choice of max_len tokens
    np.testing.assert_array_equal(es.answer_mask_IxCxL[0, 1], [1] * 8)
    # Short rows keep the leading separator and are right-padded; empty slots are all padding.
    np.testing.assert_array_equal(es.tokens_IxCxL1[1, 1], [TOK.eos_id, *enc("abd"), 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(es.answer_mask_IxCxL[1, 1], [0, 0, 1, 0, 0, 0, 0, 0])
    assert not es.tokens_IxCxL1[1, 2].any() and not es.answer_mask_IxCxL[1, 2].any()
    np.testing.assert_array_equal(es.n_choices_I, [3, 2])
    with pytest.raises(DmaError, match="choice '123456789' is 9 tokens"):
        build_eval_set(_windows(D=1), {"s": [{"context": "a", "choices": ["123456789", "b"], "gold": 0}]},
                       TOK, ["s"], 8)


def test_vmap_over_proxies_equals_separate_calls(setup):
    lm, _, es, fn = setup
    ps = [lm.init(s) for s in (0, 1, 2)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *ps)
    batched = jax.jit(jax.vmap(lambda p, e: evaluate(lm, p, e, 4), in_axes=(0, None)))(stacked, es)
    assert batched["domain_loss"].shape == (3, 4) and batched["accuracy"].shape == (3, 2)
    for i, p in enumerate(ps):
        one = fn(p, es)
        for k in one:
            np.testing.assert_allclose(np.asarray(batched[k][i]), np.asarray(one[k]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched["domain_loss"][0], batched["domain_loss"][1])


def test_normalise_is_one_for_the_base_model_and_feedback_layout(setup):
    lm, _, es, fn = setup
    base = fn(lm.init(0), es)
    norm = normalise(base, base)
    assert np.all(np.asarray(norm["domain_loss"]) == 1.0) and np.all(np.asarray(norm["field_score"]) == 1.0)
    assert not np.asarray(norm["accuracy_delta"]).any() and not np.asarray(norm["answer_ll_delta"]).any()
    # Hand values: 1 + 0.5 * (0.6 - 0.4) + 0.5 * tanh(-1.0 - -1.5) ; loss 3 / 2.
    raw = {"domain_loss": jnp.array([3.0, 1.0]), "accuracy": jnp.array([0.6]), "answer_ll": jnp.array([-1.0])}
    ref = {"domain_loss": jnp.array([2.0, 4.0]), "accuracy": jnp.array([0.4]), "answer_ll": jnp.array([-1.5])}
    n = normalise(raw, ref, EvalConfig(acc_weight=0.5, ll_scale=1.0))
    np.testing.assert_allclose(n["field_score"], [1.1 + 0.5 * math.tanh(0.5)], rtol=1e-6)
    np.testing.assert_allclose(n["domain_loss"], [1.5, 0.25], rtol=1e-6)
    names = feedback_names(["s/a", "m/b"], ["source", "math"])
    assert names == ["loss/s/a", "loss/m/b", "score/source", "score/math", "acc_delta/source",
                     "acc_delta/math", "ll_delta/source", "ll_delta/math"]
    raw2 = dict(raw, accuracy=jnp.array([0.6, 0.2]), answer_ll=jnp.array([-1.0, -3.0]))
    ref2 = dict(ref, accuracy=jnp.array([0.4, 0.5]), answer_ll=jnp.array([-1.5, -2.0]))
    n2 = normalise(raw2, ref2)
    vec = np.asarray(feedback_vector(n2))
    assert vec.shape == (8,)
    np.testing.assert_allclose(vec[domain_loss_index(["s/a", "m/b"], ["source", "math"])], [1.5, 0.25])
    np.testing.assert_allclose(vec[field_score_index(["s/a", "m/b"], ["source", "math"])],
                               [1.1 + 0.5 * math.tanh(0.5), 1 - 0.15 + 0.5 * math.tanh(-1.0)], rtol=1e-6)
    np.testing.assert_allclose(vec[4:], [0.2, -0.3, 0.5, -1.0], rtol=1e-6)


def test_balanced_score_and_rewards_telescope():
    s = jnp.array([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(balanced_score(s, "mean"), [3.5 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(balanced_score(s, "min"), [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(balanced_score(s, "harmonic"), [3 / 3.5, 1.0], rtol=1e-6)
    assert np.isfinite(float(balanced_score(jnp.array([0.0, 1.0]), "harmonic")))
    with pytest.raises(DmaError, match="how='max'"):
        balanced_score(s, "max")
    b = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    r = np.asarray(rewards(b))
    assert r.shape == (4, 5)
    np.testing.assert_allclose(r[:, 2], b[:, 3] - b[:, 2], rtol=1e-6)
    np.testing.assert_allclose(r.sum(axis=1), b[:, -1] - b[:, 0], rtol=1e-5, atol=1e-6)


def test_cut_windows_and_bad_inputs():
    w = cut_windows(np.arange(100), 3, 9)
    np.testing.assert_array_equal(w[:, 0], [0, 45, 90])
    np.testing.assert_array_equal(w[2], np.arange(90, 100))
    with pytest.raises(DmaError, match="shorter than one window"):
        cut_windows(np.arange(5), 2, 9)
    ok = _windows(D=2)
    with pytest.raises(DmaError, match="field 'math' has no items"):
        build_eval_set(ok, {"source": BENCH["source"]}, TOK, FIELDS, MAX_LEN)
    bad = {"source": [{"context": "a", "choices": ["b", "c"], "gold": 2}], "math": BENCH["math"]}
    with pytest.raises(DmaError, match=r"benchmarks\['source'\] item 0: 'gold' = 2"):
        build_eval_set(ok, bad, TOK, FIELDS, MAX_LEN)
    with pytest.raises(DmaError, match="domain 1: token ids must lie in"):
        build_eval_set([ok[0], ok[1] + 300], BENCH, TOK, FIELDS, MAX_LEN)
    with pytest.raises(DmaError, match="domain 1: shape"):
        build_eval_set([ok[0], ok[1][:1]], BENCH, TOK, FIELDS, MAX_LEN)

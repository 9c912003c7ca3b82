import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.config import ModelConfig
from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError
from dma_jax.evaluation import (
    EvalConfig, build_eval_set, cut_windows, evaluate,
    normalise, summary,
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
DOMAIN_FIELDS = ["source", "source", "math", "math"]  # of setup's held-out domains: 3 x _windows + _records


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
    """Per field: acc, acc_norm (argmax of ll / characters), bits per byte of the gold strings, chance."""
    acc, acc_norm, bpb, chance = [], [], [], []
    for field in fields:
        correct, correct_norm, nll, nbytes = [], [], 0.0, 0
        for item in BENCH[field]:
            lls = []
            for choice in item["choices"]:
                ans = [b + 3 for b in choice.encode()]
                full = [TOK.eos_id] + [b + 3 for b in item["context"].encode()] + ans
                lls.append(_logp(lm, params, full[-(max_len + 1):])[-len(ans):].sum())
            correct.append(int(np.argmax(lls)) == item["gold"])
            correct_norm.append(int(np.argmax([x / len(c) for x, c in zip(lls, item["choices"])])) == item["gold"])
            nll -= lls[item["gold"]]
            nbytes += len(item["choices"][item["gold"]].encode())
        acc.append(np.mean(correct))
        acc_norm.append(np.mean(correct_norm))
        bpb.append(nll / nbytes / math.log(2))
        chance.append(np.mean([1 / len(it["choices"]) for it in BENCH[field]]))
    return np.array(acc), np.array(acc_norm), np.array(bpb), np.array(chance)


@pytest.fixture(scope="module")
def setup():
    lm = LMDef.build(MODEL)
    windows = _windows() + [_records()]
    es = build_eval_set(windows, BENCH, TOK, FIELDS, MAX_LEN, domain_fields=DOMAIN_FIELDS)
    fn = jax.jit(lambda p, e: evaluate(lm, p, e, 4))
    return lm, windows, es, fn


def test_evaluate_matches_rowwise_numpy(setup):
    lm, windows, es, fn = setup
    params = lm.init(0)
    raw = jax.tree.map(np.asarray, fn(params, es))
    want_loss, sums_D = [], []
    for w in windows:
        tok, seg = (w["tokens"], w["segment_ids"]) if isinstance(w, dict) else (w, np.ones_like(w))
        sums = [_ref_window_nll(lm, params, t, s) for t, s in zip(tok, seg)]
        want_loss.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
        sums_D.append(np.array(sums))
    np.testing.assert_allclose(raw["domain_loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(raw["window_nll"], [s[:, 0] for s in sums_D], rtol=1e-5)
    np.testing.assert_array_equal(raw["window_tokens"], [s[:, 1] for s in sums_D])
    field_loss = [sum(s[:, 0].sum() for s, f in zip(sums_D, DOMAIN_FIELDS) if f == g)
                  / sum(s[:, 1].sum() for s, f in zip(sums_D, DOMAIN_FIELDS) if f == g) for g in FIELDS]
    np.testing.assert_allclose(raw["field_loss"], field_loss, rtol=1e-5)
    want_acc, want_acc_norm, want_bpb, want_chance = _ref_bench(lm, params)
    np.testing.assert_allclose(raw["accuracy"], want_acc, rtol=1e-6)
    np.testing.assert_allclose(raw["acc_norm"], want_acc_norm, rtol=1e-6)
    np.testing.assert_allclose(raw["answer_bpb"], want_bpb, rtol=1e-5)
    np.testing.assert_allclose(raw["chance"], want_chance, rtol=1e-6)
    np.testing.assert_array_equal(raw["item_bytes"], [len(it["choices"][it["gold"]].encode())
                                                      for f in FIELDS for it in BENCH[f]])
    np.testing.assert_array_equal(raw["item_field"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(raw["domain_field"], [0, 0, 1, 1])
    np.testing.assert_array_equal(raw["domain_scored"], [1, 1, 1, 1])  # by default every domain is scored


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
    es = build_eval_set(_windows(D=2), bench, TOK, ["f", "g"], 16, domain_fields=["f", "g"])
    assert es.tokens_IxCxL1.shape[1] == 4  # two-choice items carry two empty slots (log-likelihood 0)
    for seed in (0, 1):
        raw = evaluate(lm, lm.init(seed), es, 3)
        np.testing.assert_array_equal(np.asarray(raw["accuracy"]), [0.75, 0.0])


def test_left_truncation_keeps_the_whole_choice():
    ctx = "0123456789abcdef"
    bench = {"s": [{"context": ctx, "choices": ["XYZ", "12345678", "no"], "gold": 0},
                   {"context": "ab", "choices": ["c", "d"], "gold": 1}]}
    es = build_eval_set(_windows(D=1), bench, TOK, ["s"], 8, domain_fields=["s"])
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
                       TOK, ["s"], 8, domain_fields=["s"])


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


def _np_score_and_se(raw, base, cfg):
    """Independent numpy reference of the field score and its SE: the delta method in gradient form (np.cov of
    (numerator, denominator[, accuracy]) per field and the gradient of the score), not per-unit influences."""
    raw = {k: np.asarray(v, np.float64) for k, v in raw.items()}
    base = {k: np.asarray(v, np.float64) for k, v in base.items()}
    acc_key, item_acc = ("accuracy", "item_correct") if cfg.acc_metric == "acc" else ("acc_norm", "item_correct_norm")
    scores, ses = [], []
    for f in range(len(raw["answer_bpb"])):
        on = raw["item_field"] == f
        y, x, a = raw["item_nll"][on], raw["item_bytes"][on], raw[item_acc][on]
        n, ch = on.sum(), raw["chance"][f]
        y0 = base["answer_bpb"][f] * math.log(2)
        yb, xb = y.mean(), x.mean()
        # s = 1 + wb (1 - (yb / xb) / y0) + wa ((ab - ch) / (1 - ch) - c0) + wl (...): gradient in (yb, xb, ab)
        grad = np.array([-cfg.bpb_weight / (y0 * xb), cfg.bpb_weight * yb / (y0 * xb ** 2), cfg.acc_weight / (1 - ch)])
        var_items = grad @ np.cov(np.stack([y, x, a])) @ grad / n if n > 1 else 0.0
        won = np.repeat(raw["domain_field"] == f, raw["window_nll"].shape[1])
        u, t = raw["window_nll"].reshape(-1)[won], raw["window_tokens"].reshape(-1)[won]
        z0 = base["field_loss"][f]
        g2 = np.array([-cfg.loss_weight / (z0 * t.mean()), cfg.loss_weight * u.mean() / (z0 * t.mean() ** 2)])
        var_win = g2 @ np.cov(np.stack([u, t])) @ g2 / len(u) if len(u) > 1 else 0.0
        bpb, loss = y.sum() / x.sum() / math.log(2), u.sum() / t.sum()
        c, c0 = (raw[acc_key][f] - ch) / (1 - ch), (base[acc_key][f] - ch) / (1 - ch)
        scores.append(1 + cfg.bpb_weight * (1 - bpb / base["answer_bpb"][f])
                      + cfg.loss_weight * (1 - loss / base["field_loss"][f]) + cfg.acc_weight * (c - c0))
        ses.append(math.sqrt(var_items + var_win))
    return np.array(scores), np.array(ses)


def _known_raw(seed, n_items=(7, 5), D=3, E=4):
    """Raw metrics from known per-item / per-window values (consistent summaries), fields 0 and 1."""
    rng = np.random.default_rng(seed)
    item_field = np.repeat(np.arange(2), n_items)
    item_bytes = rng.integers(2, 9, item_field.size).astype(np.float32)
    item_nll = (item_bytes * rng.uniform(0.5, 3.0, item_field.size)).astype(np.float32)
    correct = (rng.uniform(size=item_field.size) < 0.5).astype(np.float32)
    correct_norm = (rng.uniform(size=item_field.size) < 0.6).astype(np.float32)
    domain_field = np.array([0, 0, 1])[:D]
    tokens = rng.integers(20, 33, (D, E)).astype(np.float32)
    nll = (tokens * rng.uniform(2.0, 4.0, (D, E))).astype(np.float32)
    by_f = lambda x, seg: np.array([x[seg == f].sum() for f in range(2)])  # noqa: E731
    return {
        "domain_loss": nll.sum(1) / tokens.sum(1),
        "field_loss": by_f(nll.sum(1), domain_field) / by_f(tokens.sum(1), domain_field),
        "answer_bpb": by_f(item_nll, item_field) / by_f(item_bytes, item_field) / math.log(2),
        "accuracy": by_f(correct, item_field) / np.array(n_items), "acc_norm": by_f(correct_norm, item_field) / np.array(n_items),
        "chance": np.array([0.3, 0.25]),
        "item_nll": item_nll, "item_bytes": item_bytes, "item_correct": correct, "item_correct_norm": correct_norm,
        "item_field": item_field.astype(np.int32), "window_nll": nll, "window_tokens": tokens,
        "domain_field": domain_field.astype(np.int32), "domain_scored": np.ones(D, np.float32),
    }


@pytest.mark.parametrize("cfg", [EvalConfig(), EvalConfig(bpb_weight=0.2, loss_weight=0.3, acc_weight=0.5),
                                 EvalConfig(bpb_weight=0.0, loss_weight=0.4, acc_weight=0.6, acc_metric="acc")])
def test_normalise_score_and_se_match_numpy_reference(cfg):
    raw, base = _known_raw(1), _known_raw(2)
    base = {k: np.float32(v) if np.ndim(v) == 0 else v.astype(np.float32 if v.dtype.kind == "f" else v.dtype)
            for k, v in base.items()}
    norm = jax.jit(lambda r, b: normalise(r, b, cfg))(jax.tree.map(jnp.asarray, raw), summary(base))
    want_score, want_se = _np_score_and_se(raw, base, cfg)
    np.testing.assert_allclose(norm["field_score"], want_score, rtol=1e-5)
    np.testing.assert_allclose(norm["field_score_se"], want_se, rtol=1e-4)
    assert (want_se > 0.01).all()
    np.testing.assert_allclose(norm["bpb_ratio"], raw["answer_bpb"] / base["answer_bpb"], rtol=1e-6)
    np.testing.assert_allclose(norm["field_loss_ratio"], raw["field_loss"] / base["field_loss"], rtol=1e-6)
    np.testing.assert_allclose(norm["accuracy_delta"], raw["accuracy"] - base["accuracy"], atol=1e-7)
    # Cross-check of the SE's meaning: a fixed-seed bootstrap over items and windows (both resampled within
    # each field, the base fixed) gives the same spread to ~10%.
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(2000):
        r = dict(raw)
        ii = np.concatenate([rng.choice(np.flatnonzero(raw["item_field"] == f), (raw["item_field"] == f).sum())
                             for f in range(2)])
        for k in ("item_nll", "item_bytes", "item_correct", "item_correct_norm", "item_field"):
            r[k] = raw[k][ii]
        nll, tok = raw["window_nll"].copy(), raw["window_tokens"].copy()
        for f in range(2):
            ds = np.flatnonzero(raw["domain_field"] == f)
            flat = rng.choice(len(ds) * nll.shape[1], len(ds) * nll.shape[1])
            nll[ds], tok[ds] = (raw["window_nll"][ds].reshape(-1)[flat].reshape(len(ds), -1),
                                raw["window_tokens"][ds].reshape(-1)[flat].reshape(len(ds), -1))
        r["window_nll"], r["window_tokens"] = nll, tok
        by_f = lambda x, seg: np.array([x[seg == f].sum() for f in range(2)])  # noqa: E731
        r["answer_bpb"] = by_f(r["item_nll"], r["item_field"]) / by_f(r["item_bytes"], r["item_field"]) / math.log(2)
        r["field_loss"] = by_f(nll.sum(1), r["domain_field"]) / by_f(tok.sum(1), r["domain_field"])
        n_f = np.bincount(r["item_field"], minlength=2)
        r["accuracy"] = by_f(r["item_correct"], r["item_field"]) / n_f
        r["acc_norm"] = by_f(r["item_correct_norm"], r["item_field"]) / n_f
        boot.append(_np_score_and_se(r, base, cfg)[0])
    np.testing.assert_allclose(np.std(boot, axis=0, ddof=1), want_se, rtol=0.15)


def test_base_model_scores_one_with_a_computed_se(setup):
    lm, _, es, fn = setup
    base = fn(lm.init(0), es)
    norm = normalise(base, summary(base))
    assert np.all(np.asarray(norm["domain_loss"]) == 1.0) and np.all(np.asarray(norm["field_score"]) == 1.0)
    for key in ("bpb_ratio", "field_loss_ratio"):
        assert np.all(np.asarray(norm[key]) == 1.0)
    assert not np.asarray(norm["accuracy_delta"]).any() and not np.asarray(norm["acc_norm_delta"]).any()
    se = np.asarray(norm["field_score_se"])
    _, want_se = _np_score_and_se(jax.tree.map(np.asarray, base), jax.tree.map(np.asarray, base), EvalConfig())
    assert (se > 0).all() and np.isfinite(se).all()
    np.testing.assert_allclose(se, want_se, rtol=1e-4)
    # Another model: the score is the reference's, and moves in the right direction.
    other = fn(lm.init(1), es)
    got = normalise(other, summary(base))
    want_score, _ = _np_score_and_se(jax.tree.map(np.asarray, other), jax.tree.map(np.asarray, base), EvalConfig())
    np.testing.assert_allclose(got["field_score"], want_score, rtol=1e-5)


def test_cut_windows_and_bad_inputs():
    w = cut_windows(np.arange(100), 3, 9)
    np.testing.assert_array_equal(w[:, 0], [0, 45, 90])
    np.testing.assert_array_equal(w[2], np.arange(90, 100))
    with pytest.raises(DmaError, match="shorter than one window"):
        cut_windows(np.arange(5), 2, 9)
    ok, df = _windows(D=2), ["source", "math"]
    with pytest.raises(DmaError, match="field 'math' has no items"):
        build_eval_set(ok, {"source": BENCH["source"]}, TOK, FIELDS, MAX_LEN, domain_fields=df)
    bad = {"source": [{"context": "a", "choices": ["b", "c"], "gold": 2}], "math": BENCH["math"]}
    with pytest.raises(DmaError, match=r"benchmarks\['source'\] item 0: 'gold' = 2"):
        build_eval_set(ok, bad, TOK, FIELDS, MAX_LEN, domain_fields=df)
    with pytest.raises(DmaError, match="domain 1: token ids must lie in"):
        build_eval_set([ok[0], ok[1] + 300], BENCH, TOK, FIELDS, MAX_LEN, domain_fields=df)
    with pytest.raises(DmaError, match="domain 1: shape"):
        build_eval_set([ok[0], ok[1][:1]], BENCH, TOK, FIELDS, MAX_LEN, domain_fields=df)
    with pytest.raises(DmaError, match=r"field\(s\) \['math'\] have no held-out domain"):
        build_eval_set(ok, BENCH, TOK, FIELDS, MAX_LEN, domain_fields=["source", "source"])
    with pytest.raises(DmaError, match="domain_fields has 1 entries for 2"):
        build_eval_set(ok, BENCH, TOK, FIELDS, MAX_LEN, domain_fields=["source"])

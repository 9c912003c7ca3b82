"""Shared-context scoring of benchmark items (`eval_set.pack_items`, `evaluation._packed_item_ll`): the choices of an
item share one copy of its context in a packed row, and every choice's log-likelihood equals the dense row's.
The references: the independent numpy LM (tests/np_lm.py, float64) on each [eos] + context + choice row, cut from
the left to max_len + 1 tokens, and the dense scorer (`evaluation._dense_item_ll`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax import evaluation as ev
from dma_jax.config import ModelConfig, load_config
from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError
from dma_jax.models import attention
from dma_jax.models.lm import LMDef, segment_positions
from dma_jax.data.domains import DomainSpace
from tests.np_lm import forward as np_forward
from tests.paths import DEMO

MODEL = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                    init_std=0.3, attention="xla")
TOK = ByteTokenizer()
MAX_LEN = 16
LONG = "The quick brown fox jumps over the lazy dog"  # with [eos], 44 tokens: cut from the left
ITEMS = [
    {"context": "Q: 2+2=", "choices": [" 4", " 5", " 22", " four"], "gold": 0},  # one shared context
    {"context": LONG, "choices": [" abc", " xyz", " hello", "!"], "gold": 2},  # cut: a context per choice
    {"context": "Hi", "choices": [" there", " you"], "gold": 1},  # two empty slots
    {"context": "ab", "choices": [" 123456", " 654321", " 999999"], "gold": 0},  # 7+7+7 > max_len: two copies
    {"context": LONG, "choices": ["0123456789abcdef", "x"], "gold": 1},  # a choice of max_len: context "g"
    {"context": LONG, "choices": [" pq", " rs"], "gold": 0},  # cut, same length: same context, 2 copies
]


def _ref_ll(params, item_choices):
    """[I, C] sum of log p(choice tokens | [eos] + context + earlier choice tokens) by the numpy LM, per choice."""
    np_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    C = max(len(choices) for _, choices in item_choices)
    out = np.zeros((len(item_choices), C))
    for i, (context, choices) in enumerate(item_choices):
        for c, choice in enumerate(choices):
            ans = TOK.encode(choice)
            row = ([TOK.eos_id] + TOK.encode(context) + ans)[-(MAX_LEN + 1):]
            logits = np_forward(np_params, MODEL, np.asarray(row)[None, :-1])[0]
            m = logits.max(-1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
            out[i, c] = logp[np.arange(len(row) - 1), row[1:]][-len(ans):].sum()
    return out


def _eval_set(items, max_len=MAX_LEN):
    windows = [np.random.default_rng(0).integers(3, 259, (2, 9))]
    return ev.build_eval_set(windows, {"f": items}, TOK, ["f"], max_len, domain_fields=["f"])


def test_packed_items_equal_the_dense_per_choice_scores():
    lm = LMDef.build(MODEL)
    es = _eval_set(ITEMS)
    want = _ref_ll(lm.init(0), [(it["context"], it["choices"]) for it in ITEMS])
    for seed in (0, 1):
        params = lm.init(seed)
        packed = np.asarray(jax.jit(lambda p, e: ev._packed_item_ll(lm, p, e, 2))(params, es))
        dense = np.asarray(jax.jit(lambda p, e: ev._dense_item_ll(lm, p, e, 3))(params, es))
        if seed == 0:
            np.testing.assert_allclose(packed, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(packed, dense, rtol=1e-5, atol=1e-5)
        assert (packed[2, 2:] == 0).all() and (packed[4, 2:] == 0).all()  # empty slots
    # Context copies: 1 + 4 + 1 + 2 + 2 + 2 (a cut context and its choice fill a row); packing saves rows.
    ctx_spans = [(r, s) for r in range(es.pack_span_RxW.shape[0]) for s in set(es.pack_span_RxW[r].tolist()) - {0}
                 if (es.pack_parent_RxW[r][es.pack_span_RxW[r] == s] == s).all()]
    assert len(ctx_spans) == 12
    assert es.pack_weight_RxT.sum() == es.answer_mask_IxCxL.sum()
    assert es.pack_tokens_RxW.shape[0] < int(es.n_choices_I.sum())


def test_packed_rows_keep_the_dense_positions_and_share_the_context():
    es = _eval_set(ITEMS[:1])  # [eos] "Q: 2+2=" then " 4", " 5", " 22", " four" without their last tokens
    enc = TOK.encode
    n = 1 + len(enc("Q: 2+2="))
    row = [TOK.eos_id, *enc("Q: 2+2="), *enc(" "), *enc(" "), *enc(" 2"), *enc(" fou")]
    assert es.pack_tokens_RxW.shape == (1, MAX_LEN)
    np.testing.assert_array_equal(es.pack_tokens_RxW[0, : len(row)], row)
    np.testing.assert_array_equal(es.pack_positions_RxW[0, : len(row)],
                                  [*range(n), n, n, n, n + 1, n, n + 1, n + 2, n + 3][: len(row)])
    # every first choice token is predicted by the context's last output; the others by the previous token
    first = [k for k, s in enumerate(es.pack_slot_RxT[0]) if k == 0 or s != es.pack_slot_RxT[0, k - 1]]
    assert (es.pack_from_RxT[0, first] == n - 1).all()
    assert TOK.decode(es.pack_target_RxT[0, : int(es.pack_weight_RxT.sum())].tolist()) == " 4 5 22 four"


def test_explicit_positions_and_mask_equal_the_segment_ones():
    lm = LMDef.build(MODEL)
    params = lm.init(3)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 259, (2, 12)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    want = lm.apply(params, tokens, seg)
    got = lm.apply(params, tokens, positions_BxL=segment_positions(seg), mask_BxLxL=attention.causal_mask(seg, 2, 12))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # positions shifted by a constant: RoPE sees only differences (equal up to rounding)
    shifted = lm.apply(params, tokens, positions_BxL=segment_positions(seg) + 7,
                       mask_BxLxL=attention.causal_mask(seg, 2, 12))
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(want), rtol=1e-4, atol=1e-4)
    for impl in ("cudnn", "splash"):
        other = LMDef.build(MODEL.model_copy(update={"attention": impl}))
        with pytest.raises(DmaError, match=f"attention={impl}.*explicit attention mask needs attention=xla"):
            other.apply(params, tokens, mask_BxLxL=attention.causal_mask(seg, 2, 12))


def test_evaluate_on_the_demo_eval_set_equals_the_dense_scorer(prepared_world, tmp_path):
    """The demo's eval settings (max_len 96, 16 items per field) on the prepared tiny demo data, a random proxy:
    `evaluate` (packed rows, `xla` attention) returns every metric of the dense scorer (`cudnn` attention takes
    no mask: dense rows; on CPU it is XLA's dot-product attention)."""
    demo_eval = ("eval.max_len=96", "eval.benchmark_items_per_field=16", "proxy.max_seq_len=128",
                 "target.max_seq_len=128")
    cfg = load_config(DEMO, prepared_world.run_overrides(tmp_path, *demo_eval), variant="tiny")
    es = ev.EvalSet.for_space(DomainSpace.for_sweep(cfg), cfg.eval)
    model = cfg.proxy.model_copy(update={"attention": "xla"})
    lm, lm_dense = LMDef.build(model), LMDef.build(model.model_copy(update={"attention": "cudnn"}))
    params = lm.init(5)
    packed = jax.jit(lambda p, e: ev.evaluate(lm, p, e, 16))(params, es)
    dense = jax.jit(lambda p, e: ev.evaluate(lm_dense, p, e, 16))(params, es)
    assert set(packed) == set(dense) == set(ev.SUMMARY_KEYS + ev.UNIT_KEYS)
    for k in packed:
        np.testing.assert_allclose(np.asarray(packed[k]), np.asarray(dense[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    ll_packed = np.asarray(jax.jit(lambda p, e: ev._packed_item_ll(lm, p, e, 16))(params, es))
    ll_dense = np.asarray(jax.jit(lambda p, e: ev._dense_item_ll(lm, p, e, 16))(params, es))
    np.testing.assert_allclose(ll_packed, ll_dense, rtol=1e-5, atol=1e-5)
    assert es.pack_tokens_RxW.shape[0] < es.tokens_IxCxL1.shape[0] * es.tokens_IxCxL1.shape[1]

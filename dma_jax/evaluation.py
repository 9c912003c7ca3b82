"""The evaluation environment: what a model (a proxy in the sweep, the target in CPT) scores, with its error.
The set it scores (held-out windows, benchmark items) is built in `dma_jax.eval_set`.

Raw metrics (`evaluate`, pure JAX, jittable, vmappable over a leading proxy axis of params):
- per field [F]: `answer_bpb`, the gold continuations' bits per byte, pooled over the field's items
  (sum of -log p(gold tokens) / sum of the gold strings' UTF-8 bytes / ln 2, lm-eval `bits_per_byte` style);
  `field_loss`, the held-out loss (nats per token) pooled over the windows of the field's scored domains (all
  but `eval.unscored_domains`, whose loss stays in `domain_loss`);
  `accuracy` (lm-eval `acc`: argmax of the summed choice log-likelihood), `acc_norm` (lm-eval `acc_norm`:
  argmax of log-likelihood / characters of the choice), `chance` (mean of 1 / number of choices);
- per domain [D]: `domain_loss`, the held-out loss of each domain;
- per unit (what the standard errors are computed from): `item_nll`, `item_bytes`, `item_correct`,
  `item_correct_norm`, `item_field` [I]; `window_nll`, `window_tokens` [D, E]; `domain_field`, `domain_scored` [D].

Normalised against the base model (`normalise`, 1.0 = base). The field score the agent optimises is
    s_f = 1 + w_bpb * (1 - bpb_f / bpb0_f) + w_loss * (1 - loss_f / loss0_f) + w_acc * (c_f - c0_f),
w = `eval.bpb_weight`, `eval.loss_weight`, `eval.acc_weight` (sum 1; defaults 0.5, 0.5, 0),
c = centred accuracy (acc - chance) / (1 - chance) of `eval.acc_metric`. Each continuous term is a relative
change, so its scale is the field's own base value: 1% less bits per byte on the source benchmark counts
as much as 1% less on the math one (no constant shared by the fields).

Standard error of s_f (`field_score_se`), the delta method with the base values held fixed (the base is the
reference every model is compared to): items and held-out windows are the sampled units, independent of
each other. For the items i of field f (n of them), with nll_i, bytes_i, a_i (0/1 correct) and the pooled
Y = sum nll / sum bytes (nats per byte; Y0 the base's), the influence of an item is
    phi_i = -w_bpb * (nll_i - Y * bytes_i) / (mean bytes * Y0) + w_acc * (a_i - mean a) / (1 - chance),
and for the windows w of the field's scored domains (W of them) with nll_w, tokens_w, Z = sum nll / sum tokens,
    psi_w = -w_loss * (nll_w - Z * tokens_w) / (mean tokens * Z0);
then se_f^2 = sum phi^2 / (n (n - 1)) + sum psi^2 / (W (W - 1)) (0 for a term with a single unit).
The units are treated as one sample per field, though the evaluation set draws a fixed number of windows per
domain and items round-robin per domain (a stratified sample): differences in level between a field's domains
count as sampling variance, so se_f is an upper bound (a simulation with domain losses 1.6x apart: 2.4x the
true SD; 1.15x apart: +23%; right when the domains are alike). It is an input feature of the agent (`score_se/`),
so making it exact changes every sweep and agent: left for a versioned change of the offline format.
Two models scored on the same items are positively correlated, so sqrt(se_a^2 + se_b^2) is a conservative
standard error of their difference. `balanced_se` carries the SEs through B (delta method).

The feedback vector of the offline format is `feedback_vector(norm)`, named by `feedback_names`;
the balanced score B aggregates field scores (mean, min or harmonic mean) and the reward of
re-weighting step t is B(o_t) - B(o_{t-1}), so the return telescopes to B(o_T) - B(o_0).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.config import BALANCED_HOW, EvalConfig
from dma_jax.errors import DmaError
from dma_jax.eval_set import (SUBSET_SEED, EvalSet, _row, build_eval_set, cut_windows,  # noqa: F401
                              in_loop_items, select_items)  # re-exported: callers read them as `ev.X`
from dma_jax.models import attention
from dma_jax.models.lm import LMDef, Params
from dma_jax.train import batch_from_tokens, token_losses

BALANCED = BALANCED_HOW
_HARMONIC_EPS = 1e-6
LN2 = float(np.log(2.0))


# ---------------------------------------------------------------------------- evaluating (device)


def _target_ll(lm: LMDef, params: Params, tokens_RxL1: jax.Array, segments_RxL1: jax.Array | None,
               weights_RxL: jax.Array, batch_size: int) -> jax.Array:
    """Sum over targets of weight * log p(target) per row [R], in chunks of `batch_size` rows (lax.map)."""
    R, L1 = tokens_RxL1.shape
    B = min(batch_size, R)
    n_batches = -(-R // B)
    pad = ((0, n_batches * B - R), (0, 0))  # extra rows: token 0, weight 0

    def chunk(x):
        return None if x is None else jnp.pad(x, pad).reshape(n_batches, B, x.shape[1])

    def score(batch):
        tokens_BxL1, segments_BxL1, weights_BxL = batch
        inputs = batch_from_tokens(tokens_BxL1)
        if segments_BxL1 is not None:
            inputs["segment_ids"] = segments_BxL1[:, :-1]
        return -(token_losses(lm, params, inputs) * weights_BxL).sum(axis=-1)

    ll_NxB = jax.lax.map(score, (chunk(tokens_RxL1), chunk(segments_RxL1), chunk(weights_RxL)))
    return ll_NxB.reshape(n_batches * B)[:R]


def _packed_item_ll(lm: LMDef, params: Params, es: EvalSet, batch_size: int) -> jax.Array:
    """log p(choice | context) [I, C] from the packed rows (`EvalSet` pack_*), `batch_size` rows at a time: each
    row's log-softmax is taken once per position, so the outputs a group's choices share (the context's last
    one predicts every first choice token) are normalised once. Empty slots: 0. Needs the `xla` attention."""
    I, C = es.choice_bytes_IxC.shape
    R = es.pack_tokens_RxW.shape[0]
    n_batches = -(-R // batch_size)
    B = -(-R // n_batches)  # equal chunks of at most batch_size rows: the least padding
    arrays = (es.pack_tokens_RxW, es.pack_positions_RxW, es.pack_span_RxW, es.pack_parent_RxW,
              es.pack_target_RxT, es.pack_from_RxT, es.pack_weight_RxT)  # extra rows: padding, weight 0
    chunks = [jnp.pad(x, ((0, n_batches * B - R), (0, 0))).reshape(n_batches, B, x.shape[1]) for x in arrays]

    def score(batch):
        tokens_BxW, positions_BxW, span_BxW, parent_BxW, target_BxT, from_BxT, weight_BxT = batch
        W = tokens_BxW.shape[1]
        # query i attends key j <= i of its own span (context or choice) or of its choice's context
        key_BxWxW = span_BxW[:, None, :]
        mask_BxWxW = ((key_BxWxW == span_BxW[:, :, None]) | (key_BxWxW == parent_BxW[:, :, None])) & jnp.tril(
            jnp.ones((W, W), bool))[None]
        logits_BxWxV = lm.apply(params, tokens_BxW, positions_BxL=positions_BxW, mask_BxLxL=mask_BxWxW)
        lse_BxW = jax.nn.logsumexp(logits_BxWxV, axis=-1)
        rows_Bx1 = jnp.arange(tokens_BxW.shape[0])[:, None]
        return (logits_BxWxV[rows_Bx1, from_BxT, target_BxT] - lse_BxW[rows_Bx1, from_BxT]) * weight_BxT

    ll_RxT = jax.lax.map(score, chunks).reshape(n_batches * B, -1)[:R]
    ll_S = jax.ops.segment_sum(ll_RxT.reshape(-1), es.pack_slot_RxT.reshape(-1), num_segments=I * C)
    return ll_S.reshape(I, C)


def _dense_item_ll(lm: LMDef, params: Params, es: EvalSet, batch_size: int) -> jax.Array:
    """log p(choice | context) [I, C] from one dense row per choice (the kernels that take no explicit mask)."""
    I, C, Lb1 = es.tokens_IxCxL1.shape
    answer_RxL = es.answer_mask_IxCxL.reshape(I * C, Lb1 - 1)
    return _target_ll(lm, params, es.tokens_IxCxL1.reshape(I * C, Lb1), None, answer_RxL, batch_size).reshape(I, C)


SUMMARY_KEYS = ("domain_loss", "field_loss", "answer_bpb", "accuracy", "acc_norm", "chance")  # [D] or [F]
UNIT_KEYS = ("item_nll", "item_bytes", "item_correct", "item_correct_norm", "item_field",
             "window_nll", "window_tokens", "domain_field", "domain_scored")  # per item / window: what the SEs use


def evaluate(lm: LMDef, params: Params, eval_set: EvalSet, batch_size: int) -> dict[str, jax.Array]:
    """Raw metrics of one model: `SUMMARY_KEYS` per field / domain and `UNIT_KEYS` per item / window (module doc).

    Pure: jit it with `eval_set` as an argument (not a closed-over constant) and vmap it over a
    leading proxy axis of `params` (`in_axes=(0, None)`); memory is bounded by `batch_size` rows.
    Items are scored on the packed rows (choices share their context) with the `xla` attention, on dense rows
    (one per choice) with the others; the log-likelihoods are the same.
    """
    if batch_size < 1:
        raise DmaError(f"evaluate: batch_size={batch_size} must be >= 1")
    es = jax.tree.map(jnp.asarray, eval_set)
    D, E, L1 = es.heldout_tokens_DxExL1.shape
    I, C, Lb1 = es.tokens_IxCxL1.shape
    if max(L1, Lb1) - 1 > lm.cfg.max_seq_len:
        raise DmaError(f"evaluate: sequences of {max(L1, Lb1) - 1} tokens exceed model.max_seq_len="
                       f"{lm.cfg.max_seq_len}")
    F = es.items_per_field_F.shape[0]

    segments_RxL1 = es.heldout_segments_DxExL1.reshape(D * E, L1)
    scored_RxL = (segments_RxL1[:, 1:] != 0).astype(jnp.float32)
    ll_R = _target_ll(lm, params, es.heldout_tokens_DxExL1.reshape(D * E, L1), segments_RxL1, scored_RxL, batch_size)
    window_nll_DxE = -ll_R.reshape(D, E)
    window_tokens_DxE = scored_RxL.sum(axis=1).reshape(D, E)
    domain_loss_D = window_nll_DxE.sum(axis=1) / window_tokens_DxE.sum(axis=1)
    scored_D = es.domain_scored_D
    field_nll_F = jax.ops.segment_sum(window_nll_DxE.sum(axis=1) * scored_D, es.field_of_domain_D, num_segments=F)
    field_tokens_F = jax.ops.segment_sum(window_tokens_DxE.sum(axis=1) * scored_D, es.field_of_domain_D,
                                         num_segments=F)

    item_ll = _packed_item_ll if attention.resolve(lm.cfg) == "xla" else _dense_item_ll
    ll_IxC = item_ll(lm, params, es, batch_size)
    valid_IxC = jnp.arange(C)[None, :] < es.n_choices_I[:, None]
    correct_I = jnp.argmax(jnp.where(valid_IxC, ll_IxC, -jnp.inf), axis=1) == es.gold_of_item_I
    per_char_IxC = ll_IxC / jnp.maximum(es.choice_chars_IxC, 1.0)
    correct_norm_I = jnp.argmax(jnp.where(valid_IxC, per_char_IxC, -jnp.inf), axis=1) == es.gold_of_item_I
    gold = es.gold_of_item_I[:, None]
    nll_I = -jnp.take_along_axis(ll_IxC, gold, axis=1)[:, 0]
    bytes_I = jnp.take_along_axis(es.choice_bytes_IxC, gold, axis=1)[:, 0]
    n_items_F = es.items_per_field_F.astype(jnp.float32)

    def field_sum(x_I):
        return jax.ops.segment_sum(x_I, es.field_of_item_I, num_segments=F)

    return {
        "domain_loss": domain_loss_D,
        "field_loss": field_nll_F / field_tokens_F,
        "answer_bpb": field_sum(nll_I) / field_sum(bytes_I) / LN2,
        "accuracy": field_sum(correct_I.astype(jnp.float32)) / n_items_F,
        "acc_norm": field_sum(correct_norm_I.astype(jnp.float32)) / n_items_F,
        "chance": field_sum(1.0 / es.n_choices_I.astype(jnp.float32)) / n_items_F,
        "item_nll": nll_I, "item_bytes": bytes_I, "item_correct": correct_I.astype(jnp.float32),
        "item_correct_norm": correct_norm_I.astype(jnp.float32), "item_field": es.field_of_item_I,
        "window_nll": window_nll_DxE, "window_tokens": window_tokens_DxE, "domain_field": es.field_of_domain_D,
        "domain_scored": scored_D,
    }


def summary(raw: Mapping) -> dict:
    """The per-field / per-domain entries of a raw metrics dict (`SUMMARY_KEYS`): what a base reference needs."""
    return {k: raw[k] for k in SUMMARY_KEYS}


def centred(acc, chance):
    """Centred accuracy (acc - chance) / (1 - chance): 0 = guessing, 1 = all correct."""
    return (acc - chance) / (1.0 - chance)


# ---------------------------------------------------------------------------- feedback and reward


def _ratio_influence(num_U: jax.Array, den_U: jax.Array, seg_U: jax.Array, n_seg: int, in_U: jax.Array | None = None):
    """Pooled ratios R_g = sum num / sum den per segment g [G] over the units with in_U = 1 (default: all), each
    unit's influence (num - R_g den) / mean den [U] (sums to 0 per segment; 0 for units left out), and the
    counts of units in [G]."""
    in_U = jnp.ones_like(num_U) if in_U is None else in_U
    n_G = jax.ops.segment_sum(in_U, seg_U, num_segments=n_seg)
    num_G = jax.ops.segment_sum(num_U * in_U, seg_U, num_segments=n_seg)
    den_G = jax.ops.segment_sum(den_U * in_U, seg_U, num_segments=n_seg)
    ratio_G = num_G / den_G
    return ratio_G, in_U * (num_U - ratio_G[seg_U] * den_U) / (den_G / n_G)[seg_U], n_G


def _var_of_mean(infl_U: jax.Array, seg_U: jax.Array, n_G: jax.Array, n_seg: int) -> jax.Array:
    """sum over a segment's units of influence^2 / (n (n - 1)): the squared SE of its mean (0 with one unit)."""
    return jax.ops.segment_sum(infl_U * infl_U, seg_U, num_segments=n_seg) / (n_G * jnp.maximum(n_G - 1.0, 1.0))


def normalise(raw: Mapping[str, jax.Array], base_raw: Mapping[str, jax.Array],
              cfg: EvalConfig = EvalConfig()) -> dict[str, jax.Array]:
    """Raw metrics relative to the base model's (module doc): 1.0 (losses, ratios, scores) or 0.0 (deltas) = base.

    `raw` is `evaluate`'s full output (its per-unit arrays give `field_score_se`); of `base_raw` only the
    `SUMMARY_KEYS` are read. Per model; vmap it (`in_axes=(0, None)`) for a proxy axis.
    """
    base_raw = {k: jnp.asarray(base_raw[k]) for k in SUMMARY_KEYS}  # host arrays: indexed by traced ids below
    F = raw["answer_bpb"].shape[-1]
    acc_key = "accuracy" if cfg.acc_metric == "acc" else "acc_norm"
    item_field = raw["item_field"].astype(jnp.int32)
    domain_field = raw["domain_field"].astype(jnp.int32)
    chance_F = raw["chance"]

    # items: the pooled nats per byte and the accuracy's per-item influences
    _, y_infl_I, n_items_F = _ratio_influence(raw["item_nll"], raw["item_bytes"], item_field, F)
    y0_F = base_raw["answer_bpb"] * LN2
    a_I = raw["item_correct" if cfg.acc_metric == "acc" else "item_correct_norm"]
    a_infl_I = a_I - raw[acc_key][item_field]
    phi_I = (-cfg.bpb_weight * y_infl_I / y0_F[item_field]
             + cfg.acc_weight * a_infl_I / (1.0 - chance_F[item_field]))
    # windows: the pooled held-out loss of each field's scored domains
    W = raw["window_nll"].shape[-1]
    win_field = jnp.repeat(domain_field, W)
    _, z_infl_W, n_windows_F = _ratio_influence(raw["window_nll"].reshape(-1), raw["window_tokens"].reshape(-1),
                                                win_field, F, jnp.repeat(raw["domain_scored"], W))
    psi_W = -cfg.loss_weight * z_infl_W / base_raw["field_loss"][win_field]
    var_F = _var_of_mean(phi_I, item_field, n_items_F, F) + _var_of_mean(psi_W, win_field, n_windows_F, F)

    bpb_ratio_F = raw["answer_bpb"] / base_raw["answer_bpb"]
    loss_ratio_F = raw["field_loss"] / base_raw["field_loss"]
    centred_delta_F = centred(raw[acc_key], chance_F) - centred(base_raw[acc_key], base_raw["chance"])
    score_F = (1.0 + cfg.bpb_weight * (1.0 - bpb_ratio_F) + cfg.loss_weight * (1.0 - loss_ratio_F)
               + cfg.acc_weight * centred_delta_F)
    return {
        "domain_loss": raw["domain_loss"] / base_raw["domain_loss"],
        "field_score": score_F,
        "field_score_se": jnp.sqrt(var_F),
        "bpb_ratio": bpb_ratio_F,
        "field_loss_ratio": loss_ratio_F,
        "accuracy_delta": raw["accuracy"] - base_raw["accuracy"],
        "acc_norm_delta": raw["acc_norm"] - base_raw["acc_norm"],
    }


_FEEDBACK_PARTS = (("domain_loss", "loss"), ("field_score", "score"), ("field_score_se", "score_se"),
                   ("bpb_ratio", "bpb_ratio"), ("field_loss_ratio", "loss_ratio"), ("accuracy_delta", "acc_delta"),
                   ("acc_norm_delta", "acc_norm_delta"))


def feedback_vector(norm: Mapping[str, jax.Array]) -> jax.Array:
    """Normalised metrics -> the flat feedback [..., M], M = D + 6F, in `feedback_names` order."""
    return jnp.concatenate([jnp.asarray(norm[key], jnp.float32) for key, _ in _FEEDBACK_PARTS], axis=-1)


def feedback_names(domain_names: Sequence[str], field_names: Sequence[str]) -> list[str]:
    """[M] names: loss/<domain> (D); score/, score_se/, bpb_ratio/, loss_ratio/, acc_delta/, acc_norm_delta/<field>
    (F each)."""
    return [f"{prefix}/{name}" for key, prefix in _FEEDBACK_PARTS
            for name in (domain_names if key == "domain_loss" else field_names)]


def domain_loss_index(domain_names: Sequence[str], field_names: Sequence[str]) -> list[int]:
    """Indices into the feedback vector of each domain's normalised held-out loss."""
    names = feedback_names(domain_names, field_names)
    return [names.index(f"loss/{d}") for d in domain_names]


def field_score_index(domain_names: Sequence[str], field_names: Sequence[str]) -> list[int]:
    """Indices into the feedback vector of each field's normalised score."""
    names = feedback_names(domain_names, field_names)
    return [names.index(f"score/{f}") for f in field_names]


def field_score_se_index(domain_names: Sequence[str], field_names: Sequence[str]) -> list[int]:
    """Indices into the feedback vector of each field score's standard error."""
    names = feedback_names(domain_names, field_names)
    return [names.index(f"score_se/{f}") for f in field_names]


def balanced_score(field_scores_F: jax.Array, how: str) -> jax.Array:
    """B over the last axis: mean, min, or harmonic mean (scores clipped at 1e-6 so it stays finite)."""
    scores = jnp.asarray(field_scores_F, jnp.float32)
    if how == "mean":
        return scores.mean(axis=-1)
    if how == "min":
        return scores.min(axis=-1)
    if how == "harmonic":
        return scores.shape[-1] / (1.0 / jnp.maximum(scores, _HARMONIC_EPS)).sum(axis=-1)
    raise DmaError(f"balanced score: how={how!r} is not one of {', '.join(BALANCED)}")


def balanced_se(field_scores_F: jax.Array, field_se_F: jax.Array, how: str) -> jax.Array:
    """Standard error of B over the last axis, by the delta method with fields independent (separate items and
    windows): mean sqrt(sum se^2) / F; harmonic, dB/ds_f = B^2 / (F s_f^2); min, the SE of the lowest field."""
    scores = jnp.asarray(field_scores_F, jnp.float32)
    se = jnp.asarray(field_se_F, jnp.float32)
    F = scores.shape[-1]
    if how == "mean":
        return jnp.sqrt((se * se).sum(axis=-1)) / F
    if how == "min":
        return jnp.take_along_axis(se, scores.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    if how == "harmonic":
        b = balanced_score(scores, how)
        grad = b[..., None] ** 2 / (F * jnp.maximum(scores, _HARMONIC_EPS) ** 2)
        return jnp.sqrt(((grad * se) ** 2).sum(axis=-1))
    raise DmaError(f"balanced score: how={how!r} is not one of {', '.join(BALANCED)}")


def rewards(balanced_T1: jax.Array) -> jax.Array:
    """Rewards [..., T] = B(o_t) - B(o_{t-1}) from balanced scores [..., T+1] (index 0: the base model)."""
    balanced_T1 = jnp.asarray(balanced_T1, jnp.float32)
    return balanced_T1[..., 1:] - balanced_T1[..., :-1]


@functools.lru_cache(maxsize=8)
def shared_evaluate(trainer, batch_size: int):
    """`evaluate` jitted once per `train.Trainer` (and batch size), shared by every CPT run and re-scoring of a
    process: (params, eval set) -> raw metrics."""
    lm = trainer.lm
    return jax.jit(lambda p, es: evaluate(lm, p, es, batch_size))

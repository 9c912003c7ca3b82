"""The evaluation environment: what a model (a proxy in the sweep, the target in CPT) scores.

Raw metrics (`evaluate`, pure JAX, jittable, vmappable over a leading proxy axis of params):
- `domain_loss` [D]: mean per-token cross-entropy over each domain's held-out windows;
- `accuracy` [F]: lm-eval-harness `acc` per field, argmax over choices of the summed
  log-likelihood of the choice's tokens given the context, compared with the gold index;
- `answer_ll` [F]: mean over a field's items of the gold choice's log-likelihood per token.

Normalised against the base model (`normalise`, 1.0 = base):
- domain loss ratio  loss / base_loss;
- field score  1 + a * (acc - base_acc) + (1 - a) * tanh((ll - base_ll) / s), a = `acc_weight`,
  s = `ll_scale` (nats per token). Differences rather than ratios: a small proxy's base accuracy
  may be near zero and a ratio of it would explode. Each term lies in [-1, 1], so the score lies
  in [0, 2] and is exactly 1.0 for the base model; it is smooth in the log-likelihood, which moves
  long before accuracy does on a small proxy.
The feedback vector of the offline format is `feedback_vector(norm)`, named by `feedback_names`;
the balanced score B aggregates field scores (mean, min or harmonic mean) and the reward of
re-weighting step t is B(o_t) - B(o_{t-1}), so the return telescopes to B(o_T) - B(o_0).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.config import BALANCED_HOW, EvalConfig
from dma_jax.data.domains import DomainSpace
from dma_jax.data.tokenizer import Tokenizer
from dma_jax.errors import DmaError
from dma_jax.models.lm import LMDef, Params
from dma_jax.train import batch_from_tokens, token_losses

BALANCED = BALANCED_HOW
_HARMONIC_EPS = 1e-6


class EvalSet(NamedTuple):
    """Held-out windows and tokenized benchmarks, dense and padded; a pytree of arrays.

    Held-out: D domains x E windows of L+1 tokens; segment id 0 marks padding (its targets are
    not scored), other ids mark documents (a token attends only within its own, as in training).
    Benchmarks: I items x C choice slots; a row is [eos] + context + choice, left-truncated to
    Lb+1 tokens and right-padded. `answer_mask` marks the targets (row[1:]) that are choice tokens;
    slots at or beyond an item's `n_choices` are empty rows.
    """

    heldout_tokens_DxExL1: np.ndarray  # int32
    heldout_segments_DxExL1: np.ndarray  # int32
    tokens_IxCxL1: np.ndarray  # int32 [I, C, Lb+1]
    answer_mask_IxCxL: np.ndarray  # float32 [I, C, Lb]
    n_choices_I: np.ndarray  # int32
    gold_of_item_I: np.ndarray  # int32
    field_of_item_I: np.ndarray  # int32, index into field_names
    items_per_field_F: np.ndarray  # int32

    @classmethod
    def for_space(cls, space: DomainSpace, ec: EvalConfig) -> EvalSet:
        """The eval set of a domain space, the one way the sweep, CPT and the re-scoring build it:
        `ec.heldout_windows_per_domain` evenly spaced held-out windows per domain, and per field the first
        `ec.benchmark_items_per_field` benchmark items whose longest choice leaves >= 8 tokens of context
        (the others are skipped, with a warning once per process)."""
        tok = space.tokenizer()
        windows = [cut_windows(space.tokens(d, "heldout"), ec.heldout_windows_per_domain, ec.max_len)
                   for d in range(space.num_domains)]
        benches = {}
        for f in space.fields:
            items = space.benchmarks(f)
            fits = [it for it in items if max(len(tok.encode(c)) for c in it["choices"]) <= ec.max_len - 8]
            if len(fits) < len(items):  # the default warnings filter shows each distinct message once
                warnings.warn(f"field {f}: {len(items) - len(fits)} of {len(items)} benchmark items have a choice "
                              f"too long for eval.max_len={ec.max_len}: skipped", stacklevel=2)
            benches[f] = fits[: ec.benchmark_items_per_field]
        return build_eval_set(windows, benches, tok, space.fields, ec.max_len)


# ---------------------------------------------------------------------------- building (host)


def cut_windows(tokens_N: np.ndarray, n_windows: int, seq_len: int) -> np.ndarray:
    """`n_windows` evenly spaced windows [E, seq_len+1] of a 1-D held-out token stream (deterministic)."""
    tokens_N = np.asarray(tokens_N)
    span = seq_len + 1
    if tokens_N.ndim != 1 or tokens_N.shape[0] < span:
        raise DmaError(f"held-out stream of shape {tokens_N.shape} is shorter than one window of {span} tokens")
    starts_E = np.linspace(0, tokens_N.shape[0] - span, n_windows).round().astype(np.int64)
    return np.stack([tokens_N[s: s + span] for s in starts_E]).astype(np.int32)


def _heldout_arrays(windows: Sequence, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain windows (int arrays [E, L+1] or packed records {"tokens", "segment_ids"}) -> [D, E, L+1] x 2."""
    if len(windows) == 0:
        raise DmaError("held-out windows: no domains given")
    tokens, segments = [], []
    for d, w in enumerate(windows):
        tok = np.asarray(w["tokens"] if isinstance(w, Mapping) else w)
        seg = np.asarray(w["segment_ids"]) if isinstance(w, Mapping) else np.ones_like(tok)
        if tok.ndim != 2 or tok.shape[0] < 1 or tok.shape[1] < 2 or seg.shape != tok.shape:
            raise DmaError(f"held-out windows of domain {d}: tokens {tok.shape} / segment_ids {seg.shape} "
                           "must both be [E >= 1, L+1 >= 2]")
        if not np.issubdtype(tok.dtype, np.integer) or not np.issubdtype(seg.dtype, np.integer):
            raise DmaError(f"held-out windows of domain {d}: tokens and segment_ids must be integers, "
                           f"got {tok.dtype} / {seg.dtype}")
        if tok.min() < 0 or tok.max() >= vocab_size:
            raise DmaError(f"held-out windows of domain {d}: token ids must lie in [0, {vocab_size}), "
                           f"got [{tok.min()}, {tok.max()}]")
        if tokens and tok.shape != tokens[0].shape:
            raise DmaError(f"held-out windows of domain {d}: shape {tok.shape} differs from domain 0's "
                           f"{tokens[0].shape}; every domain needs the same [E, L+1]")
        if not (seg[:, 1:] != 0).any(axis=1).all():
            raise DmaError(f"held-out windows of domain {d}: a window has no scored target (all padding)")
        tokens.append(tok.astype(np.int32))
        segments.append(seg.astype(np.int32))
    return np.stack(tokens), np.stack(segments)


def _check_item(item, where: str) -> None:
    if not isinstance(item, Mapping) or not {"context", "choices", "gold"} <= set(item):
        raise DmaError(f"{where}: a benchmark item needs keys 'context', 'choices', 'gold'")
    choices, gold = item["choices"], item["gold"]
    if not isinstance(item["context"], str):
        raise DmaError(f"{where}: 'context' must be a string, got {type(item['context']).__name__}")
    if not isinstance(choices, Sequence) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DmaError(f"{where}: 'choices' must be a list of at least 2 strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DmaError(f"{where}: 'gold' = {gold!r} is not an index into its {len(choices)} choices")


def _row(tokenizer: Tokenizer, context: str, choice: str, max_len: int, where: str) -> tuple[list[int], int]:
    """[eos] + context + choice, cut from the left to at most max_len + 1 tokens; and the choice's length."""
    choice_ids = tokenizer.encode(choice)
    if not 1 <= len(choice_ids) <= max_len:
        raise DmaError(f"{where}: choice {choice[:40]!r} is {len(choice_ids)} tokens; it must be 1..max_len="
                       f"{max_len} (a choice is never truncated and needs one token of context)")
    prefix = [tokenizer.eos_id, *tokenizer.encode(context)]
    keep = max_len + 1 - len(choice_ids)
    return prefix[-keep:] + choice_ids, len(choice_ids)


def build_eval_set(heldout_windows_per_domain: Sequence, benchmarks: Mapping[str, Sequence[Mapping]],
                   tokenizer: Tokenizer, field_names: Sequence[str], max_len: int) -> EvalSet:
    """Tokenize and pad once on the host.

    `heldout_windows_per_domain`: D entries, each an int array [E, L+1] (contiguous text) or a dict
    of packed records {"tokens", "segment_ids"} [E, L+1]; E and L equal across domains.
    `benchmarks`: field -> items {"context", "choices", "gold", ...}; only `field_names` are used,
    in that order, and each needs at least one item. Contexts are truncated from the left so that
    [eos] + context + choice fits max_len + 1 tokens; a choice longer than max_len is an error.
    """
    if max_len < 1:
        raise DmaError(f"build_eval_set: max_len={max_len} must be >= 1")
    if len(field_names) == 0 or len(set(field_names)) != len(field_names):
        raise DmaError(f"build_eval_set: field_names {list(field_names)} must be non-empty and distinct")
    heldout_tokens, heldout_segments = _heldout_arrays(heldout_windows_per_domain, tokenizer.vocab_size)
    rows, fields, golds = [], [], []
    for f, field in enumerate(field_names):
        items = benchmarks.get(field, ())
        if len(items) == 0:
            raise DmaError(f"benchmarks: field {field!r} has no items")
        for i, item in enumerate(items):
            where = f"benchmarks[{field!r}] item {i}"
            _check_item(item, where)
            rows.append([_row(tokenizer, item["context"], c, max_len, where) for c in item["choices"]])
            fields.append(f)
            golds.append(item["gold"])
    n_items, n_slots = len(rows), max(len(r) for r in rows)
    tokens_IxCxL1 = np.full((n_items, n_slots, max_len + 1), tokenizer.pad_id, np.int32)
    answer_IxCxL = np.zeros((n_items, n_slots, max_len), np.float32)
    for i, item_rows in enumerate(rows):
        for c, (ids, n_answer) in enumerate(item_rows):
            tokens_IxCxL1[i, c, : len(ids)] = ids
            answer_IxCxL[i, c, len(ids) - 1 - n_answer: len(ids) - 1] = 1.0
    return EvalSet(
        heldout_tokens, heldout_segments, tokens_IxCxL1, answer_IxCxL,
        np.array([len(r) for r in rows], np.int32), np.array(golds, np.int32), np.array(fields, np.int32),
        np.bincount(fields, minlength=len(field_names)).astype(np.int32),
    )


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


def evaluate(lm: LMDef, params: Params, eval_set: EvalSet, batch_size: int) -> dict[str, jax.Array]:
    """Raw metrics {"domain_loss" [D], "accuracy" [F], "answer_ll" [F]} of one model.

    Pure: jit it with `eval_set` as an argument (not a closed-over constant) and vmap it over a
    leading proxy axis of `params` (`in_axes=(0, None)`); memory is bounded by `batch_size` rows.
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
    domain_loss_D = -ll_R.reshape(D, E).sum(axis=1) / scored_RxL.reshape(D, E * (L1 - 1)).sum(axis=1)

    answer_RxL = es.answer_mask_IxCxL.reshape(I * C, Lb1 - 1)
    ll_IxC = _target_ll(lm, params, es.tokens_IxCxL1.reshape(I * C, Lb1), None, answer_RxL, batch_size).reshape(I, C)
    valid_IxC = jnp.arange(C)[None, :] < es.n_choices_I[:, None]
    correct_I = jnp.argmax(jnp.where(valid_IxC, ll_IxC, -jnp.inf), axis=1) == es.gold_of_item_I
    gold_ll_I = jnp.take_along_axis(ll_IxC, es.gold_of_item_I[:, None], axis=1)[:, 0]
    gold_len_I = jnp.take_along_axis(answer_RxL.reshape(I, C, Lb1 - 1).sum(-1), es.gold_of_item_I[:, None], axis=1)
    n_items_F = es.items_per_field_F.astype(jnp.float32)

    def field_mean(x_I):
        return jax.ops.segment_sum(x_I, es.field_of_item_I, num_segments=F) / n_items_F

    return {
        "domain_loss": domain_loss_D,
        "accuracy": field_mean(correct_I.astype(jnp.float32)),
        "answer_ll": field_mean(gold_ll_I / gold_len_I[:, 0]),
    }


# ---------------------------------------------------------------------------- feedback and reward


def normalise(raw: Mapping[str, jax.Array], base_raw: Mapping[str, jax.Array],
              cfg: EvalConfig = EvalConfig()) -> dict[str, jax.Array]:
    """Raw metrics relative to the base model's (module doc): 1.0 (losses, scores) or 0.0 (deltas) = base.

    Per model; vmap it (`in_axes=(0, None)`) for a proxy axis.
    """
    acc_delta_F = raw["accuracy"] - base_raw["accuracy"]
    ll_delta_F = raw["answer_ll"] - base_raw["answer_ll"]
    a = cfg.acc_weight
    return {
        "domain_loss": raw["domain_loss"] / base_raw["domain_loss"],
        "field_score": 1.0 + a * acc_delta_F + (1.0 - a) * jnp.tanh(ll_delta_F / cfg.ll_scale),
        "accuracy_delta": acc_delta_F,
        "answer_ll_delta": ll_delta_F,
    }


_FEEDBACK_PARTS = (("domain_loss", "loss"), ("field_score", "score"), ("accuracy_delta", "acc_delta"),
                   ("answer_ll_delta", "ll_delta"))


def feedback_vector(norm: Mapping[str, jax.Array]) -> jax.Array:
    """Normalised metrics -> the flat feedback [..., M], M = D + 3F, in `feedback_names` order."""
    return jnp.concatenate([jnp.asarray(norm[key], jnp.float32) for key, _ in _FEEDBACK_PARTS], axis=-1)


def feedback_names(domain_names: Sequence[str], field_names: Sequence[str]) -> list[str]:
    """[M] names: loss/<domain> (D), score/<field>, acc_delta/<field>, ll_delta/<field> (F each)."""
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

"""The evaluation set: held-out windows and benchmark items, tokenized and padded on the host (`EvalSet`).

`EvalSet.for_space` is the one way the sweep, CPT and the re-scoring build it: per field a fixed subset
stratified over the field's domains (`select_items`), contexts left-truncated lm-eval-harness style, and the
domains of `eval.unscored_domains` marked (`scored_domains`): still evaluated, left out of their field's
held-out-loss term. What a model scores on it is `dma_jax.evaluation`.
"""

from __future__ import annotations
import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple
import numpy as np
from dma_jax.config import EvalConfig
from dma_jax.data.benchmarks import check_choices_fit
from dma_jax.data.demo_corpora import domain_names
from dma_jax.data.domains import DomainSpace
from dma_jax.data.tokenizer import Tokenizer
from dma_jax.errors import DmaError


class EvalSet(NamedTuple):
    """Held-out windows and tokenized benchmarks, dense and padded; a pytree of arrays.

    Held-out: D domains x E windows of L+1 tokens; segment id 0 marks padding (its targets are
    not scored), other ids mark documents (a token attends only within its own, as in training).
    Benchmarks: I items x C choice slots; a row is [eos] + context + choice, left-truncated to
    Lb+1 tokens and right-padded. `answer_mask` marks the targets (row[1:]) that are choice tokens;
    slots at or beyond an item's `n_choices` are empty rows. `choice_bytes` / `choice_chars`: the UTF-8 bytes /
    characters of each choice string (0 for empty slots); `field_of_domain`: each held-out domain's field;
    `domain_scored`: 1 where a domain's held-out loss counts in its field's score, 0 for `eval.unscored_domains`.

    The same items packed (`pack_items`), which `dma_jax.evaluation` scores: R rows of W = Lb inputs, each holding
    one or more groups [eos] + context, then every choice that shares that (left-truncated) context, less its
    last token. `pack_span` ids a context or choice (0: padding), `pack_parent` the context a choice token also
    attends to, `pack_positions` each token's position in its dense row. Targets: token `pack_target` is
    predicted by the output at index `pack_from` of its row; it is choice `pack_slot` (= item * C + slot).
    The demo's 32 items (max_len 96): 89 rows of 96 (8,275 real inputs) instead of 128 dense rows; the 17 items
    whose context is cut share nothing (`pack_items`).
    """

    heldout_tokens_DxExL1: np.ndarray  # int32
    heldout_segments_DxExL1: np.ndarray  # int32
    tokens_IxCxL1: np.ndarray  # int32 [I, C, Lb+1]
    answer_mask_IxCxL: np.ndarray  # float32 [I, C, Lb]
    n_choices_I: np.ndarray  # int32
    gold_of_item_I: np.ndarray  # int32
    field_of_item_I: np.ndarray  # int32, index into field_names
    items_per_field_F: np.ndarray  # int32
    choice_bytes_IxC: np.ndarray  # float32
    choice_chars_IxC: np.ndarray  # float32
    field_of_domain_D: np.ndarray  # int32, index into field_names
    domain_scored_D: np.ndarray  # float32, 1 = in its field's held-out loss term
    pack_tokens_RxW: np.ndarray  # int32
    pack_positions_RxW: np.ndarray  # int32
    pack_span_RxW: np.ndarray  # int32
    pack_parent_RxW: np.ndarray  # int32
    pack_target_RxT: np.ndarray  # int32 token ids
    pack_from_RxT: np.ndarray  # int32 index into the row
    pack_slot_RxT: np.ndarray  # int32 item * C + choice slot
    pack_weight_RxT: np.ndarray  # float32, 1 = a target, 0 = padding

    @classmethod
    def for_space(cls, space: DomainSpace, ec: EvalConfig) -> EvalSet:
        """The eval set of a domain space, the one way the sweep, CPT and the re-scoring build it:
        `ec.heldout_windows_per_domain` evenly spaced held-out windows per domain, and per field
        `select_items(items, ec.benchmark_items_per_field, SUBSET_SEED)`: a fixed subset stratified over the
        field's domains. No item is skipped: contexts are left-truncated to fit `ec.max_len`; a choice longer
        than `ec.max_len` tokens (which `dma prepare` refuses) is an error naming the field, item and domain.
        `ec.unscored_domains` are marked as `scored_domains` says."""
        scored = scored_domains(space, ec.unscored_domains)
        tok = space.tokenizer()
        windows = []
        for d, name in enumerate(space.names):
            try:
                windows.append(cut_windows(space.tokens(d, "heldout"), ec.heldout_windows_per_domain, ec.max_len))
            except DmaError as e:
                raise DmaError(f"{space.dir}: domain {name!r}: {e} (eval.max_len={ec.max_len})") from None
        benches = {}
        for f in space.fields:
            items = space.benchmarks(f)
            check_choices_fit(items, tok.encode, ec.max_len, f"benchmarks of field {f!r}")
            benches[f] = select_items(items, ec.benchmark_items_per_field, SUBSET_SEED)
        return build_eval_set(windows, benches, tok, space.fields, ec.max_len, domain_fields=space.fields_of_domain,
                              domain_scored=scored)


def scored_domains(space: DomainSpace, unscored: Sequence[str]) -> list[bool]:
    """Per domain of `space`: whether its held-out loss counts in its field's score (not in `unscored`).

    A name of `unscored` must be a domain of the prepared data (`space.manifest`: a domain outside a subset
    space, e.g. a code domain in a math sweep, is fine) or of the demo space (`demo_corpora.domain_names()`: a
    config built on configs/demo.yaml keeps its list when `data.demo_fields` or `data.domains` leave those
    domains out); any other name is a DmaError. The parts of a split domain (`DomainSpace.split`) follow it."""
    prepared = [d["name"] for d in space.manifest["domains"]]
    unknown = [n for n in unscored if n not in prepared and n not in domain_names()]
    if unknown:
        raise DmaError(f"eval.unscored_domains: {unknown} are domains neither of the prepared data "
                       f"({', '.join(prepared)}) nor of the demo space")
    return [n not in unscored for n in space.part_of]  # a split domain's parts: as the prepared domain


SUBSET_SEED = 0  # a constant, not run.seed: every run and seed of a study scores the same items


def in_loop_items(space: DomainSpace, ec: EvalConfig) -> dict[str, dict[str, int]]:
    """{field: {domain: items}} of the subset `EvalSet.for_space` scores (the same `select_items` call)."""
    out = {}
    for f in space.fields:
        chosen = select_items(space.benchmarks(f), ec.benchmark_items_per_field, SUBSET_SEED)
        counts: dict[str, int] = {}
        for item in chosen:
            counts[str(item.get("domain", ""))] = counts.get(str(item.get("domain", "")), 0) + 1
        out[f] = counts
    return out


def select_items(items: Sequence[Mapping], n: int, seed: int) -> list[Mapping]:
    """The first `n` items of a fixed order that takes them round-robin over their `domain` (domains in order
    of first appearance; items without one share the domain ""), each domain's items in a fixed shuffle
    (`random.Random(f"{seed}/{domain}")`). So any n covers min(n, #domains) domains, each domain gives
    n // #domains or one more item while it has some, a smaller subset is a prefix of a larger one, and the
    same (items, n, seed) always give the same subset."""
    if n < 1:
        raise DmaError(f"select_items: n={n} must be >= 1")
    by_domain: dict[str, list[Mapping]] = {}
    for item in items:
        by_domain.setdefault(str(item.get("domain", "")), []).append(item)
    queues = []
    for domain, its in by_domain.items():
        its = list(its)
        random.Random(f"{seed}/{domain}").shuffle(its)
        queues.append(its)
    out: list[Mapping] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        out += [q[rank] for q in queues if rank < len(q)]
    return out[:n]


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
                   tokenizer: Tokenizer, field_names: Sequence[str], max_len: int, *,
                   domain_fields: Sequence[str], domain_scored: Sequence[bool] | None = None) -> EvalSet:
    """Tokenize and pad once on the host.

    `heldout_windows_per_domain`: D entries, each an int array [E, L+1] (contiguous text) or a dict
    of packed records {"tokens", "segment_ids"} [E, L+1]; E and L equal across domains.
    `benchmarks`: field -> items {"context", "choices", "gold", ...}; only `field_names` are used,
    in that order, and each needs at least one item. Contexts are truncated from the left so that
    [eos] + context + choice fits max_len + 1 tokens; a choice longer than max_len is an error.
    `domain_fields`: the field of each held-out domain (D entries, each in `field_names`); every field needs
    at least one held-out domain (its held-out loss is part of its score).
    `domain_scored`: per held-out domain, whether its loss is in its field's loss term (default: all); every
    field needs at least one scored domain.
    """
    if max_len < 1:
        raise DmaError(f"build_eval_set: max_len={max_len} must be >= 1")
    if len(field_names) == 0 or len(set(field_names)) != len(field_names):
        raise DmaError(f"build_eval_set: field_names {list(field_names)} must be non-empty and distinct")
    heldout_tokens, heldout_segments = _heldout_arrays(heldout_windows_per_domain, tokenizer.vocab_size)
    domain_fields = list(domain_fields)
    if len(domain_fields) != heldout_tokens.shape[0]:
        raise DmaError(f"build_eval_set: domain_fields has {len(domain_fields)} entries for "
                       f"{heldout_tokens.shape[0]} held-out domains")
    unknown = sorted(set(domain_fields) - set(field_names))
    if unknown:
        raise DmaError(f"build_eval_set: domain_fields name field(s) {unknown} not in field_names {list(field_names)}")
    no_domain = [f for f in field_names if f not in domain_fields]
    if no_domain:
        raise DmaError(f"build_eval_set: field(s) {no_domain} have no held-out domain (their score needs one)")
    scored = [True] * len(domain_fields) if domain_scored is None else [bool(x) for x in domain_scored]
    if len(scored) != len(domain_fields):
        raise DmaError(f"build_eval_set: domain_scored has {len(scored)} entries for {len(domain_fields)} "
                       "held-out domains")
    all_unscored = [f for f in field_names if not any(s for s, g in zip(scored, domain_fields) if g == f)]
    if all_unscored:
        raise DmaError(f"build_eval_set: every domain of field(s) {all_unscored} is unscored "
                       "(eval.unscored_domains); a field's score needs one scored domain")
    rows, fields, golds, sizes = [], [], [], []
    for f, field in enumerate(field_names):
        items = benchmarks.get(field, ())
        if len(items) == 0:
            raise DmaError(f"benchmarks: field {field!r} has no items")
        for i, item in enumerate(items):
            where = f"benchmarks[{field!r}] item {i}"
            _check_item(item, where)
            rows.append([_row(tokenizer, item["context"], c, max_len, where) for c in item["choices"]])
            sizes.append([(len(c.encode("utf-8")), len(c)) for c in item["choices"]])
            fields.append(f)
            golds.append(item["gold"])
    n_items, n_slots = len(rows), max(len(r) for r in rows)
    tokens_IxCxL1 = np.full((n_items, n_slots, max_len + 1), tokenizer.pad_id, np.int32)
    answer_IxCxL = np.zeros((n_items, n_slots, max_len), np.float32)
    sizes_IxCx2 = np.zeros((n_items, n_slots, 2), np.float32)
    for i, item_rows in enumerate(rows):
        sizes_IxCx2[i, : len(item_rows)] = sizes[i]
        for c, (ids, n_answer) in enumerate(item_rows):
            tokens_IxCxL1[i, c, : len(ids)] = ids
            answer_IxCxL[i, c, len(ids) - 1 - n_answer: len(ids) - 1] = 1.0
    packed = pack_items(rows, n_slots, max_len, tokenizer.pad_id)
    return EvalSet(
        heldout_tokens, heldout_segments, tokens_IxCxL1, answer_IxCxL,
        np.array([len(r) for r in rows], np.int32), np.array(golds, np.int32), np.array(fields, np.int32),
        np.bincount(fields, minlength=len(field_names)).astype(np.int32),
        sizes_IxCx2[..., 0], sizes_IxCx2[..., 1],
        np.array([list(field_names).index(f) for f in domain_fields], np.int32),
        np.array(scored, np.float32), *packed,
    )


def pack_items(rows: Sequence[Sequence[tuple[Sequence[int], int]]], n_slots: int, width: int,
               pad_id: int) -> tuple[np.ndarray, ...]:
    """`EvalSet`'s pack_* arrays from each item's dense rows (`_row`: [eos] + context + choice, choice length).

    Choices of an item whose rows hold the same context share one copy of it, in a group [context, each choice
    less its last token] of at most `width` = max_len inputs (a new copy starts when the next choice does not
    fit). A context cut from the left fills its dense row with its choice, so it is never shared: every output
    of it depends on where the cut falls, which differs with the choice's length. Groups are placed in rows
    first-fit by decreasing length. Each choice keeps its dense row's tokens, positions and attention exactly,
    so its log-likelihood is the dense one."""
    groups: list[tuple[int, list[int], list[tuple[int, list[int]]]]] = []  # (item, context, [(slot, choice)])
    for i, item_rows in enumerate(rows):
        open_group: dict[tuple[int, ...], int] = {}  # context -> its group still being filled
        for c, (ids, n) in enumerate(item_rows):
            context, choice = list(ids[:-n]), list(ids[-n:])
            g = open_group.get(tuple(context))
            if g is None or _group_len(groups[g]) + n - 1 > width:
                g = open_group[tuple(context)] = len(groups)
                groups.append((i, context, []))
            groups[g][2].append((c, choice))
    lengths = [_group_len(g) for g in groups]
    row_groups: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: -lengths[g]):  # stable: ties keep item order
        r = next((r for r, free in enumerate(room) if free >= lengths[g]), len(room))
        if r == len(room):
            row_groups.append([])
            room.append(width)
        row_groups[r].append(g)
        room[r] -= lengths[g]
    R = len(row_groups)
    tokens, positions, span, parent = (np.zeros((R, width), np.int32) for _ in range(4))
    tokens[:] = pad_id
    targets: list[list[tuple[int, int, int]]] = [[] for _ in range(R)]  # (token, from, slot) per row
    for r, gs in enumerate(row_groups):
        at, n_spans = 0, 0
        for g in gs:
            i, context, choices = groups[g]
            k, ctx_span = len(context), n_spans + 1
            n_spans += 1
            tokens[r, at: at + k], positions[r, at: at + k] = context, np.arange(k)
            span[r, at: at + k] = parent[r, at: at + k] = ctx_span
            last_ctx, at = at + k - 1, at + k
            for c, choice in choices:
                n_spans += 1
                m = len(choice) - 1  # inputs of this choice: all but its last token
                tokens[r, at: at + m], positions[r, at: at + m] = choice[:-1], k + np.arange(m)
                span[r, at: at + m], parent[r, at: at + m] = n_spans, ctx_span
                targets[r] += [(t, last_ctx if j == 0 else at + j - 1, i * n_slots + c) for j, t in enumerate(choice)]
                at += m
    T = max(len(t) for t in targets)
    target_RxTx3 = np.zeros((R, T, 3), np.int32)
    weight_RxT = np.zeros((R, T), np.float32)
    for r, ts in enumerate(targets):
        target_RxTx3[r, : len(ts)] = ts
        weight_RxT[r, : len(ts)] = 1.0
    return (tokens, positions, span, parent, target_RxTx3[..., 0], target_RxTx3[..., 1], target_RxTx3[..., 2],
            weight_RxT)


def _group_len(group) -> int:
    """Inputs of a group: its context, then each choice but its last token (no output reads it)."""
    return len(group[1]) + sum(len(choice) - 1 for _, choice in group[2])

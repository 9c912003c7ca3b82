"""What the agent sees: a history of mixtures and feedback turned into per-domain and global features.

Token t (t = 0 … number of steps taken) describes the state before choosing a_t:
- per domain: D * a_{t-1,d} (0 at t = 0; the factor D makes uniform = 1 for any D),
  whether the domain belongs to the target field, its normalised held-out loss in
  o_t and that loss's change since o_{t-1} (0 at t = 0);
- global: the target field's normalised score, the mean score of the other
  (source) fields, both scores' changes, and progress t / T.
Nothing depends on the number of domains or fields, so one agent runs on any
domain space; the price is that two domains of one field look alike until their
losses move apart. Features are standardised per channel with statistics of the
training data (`FeatureStats`), saved with the agent.

Ablation (`agent.model.use_feedback: false`): the feedback channels (`FEEDBACK_*`:
losses, scores and their changes) are zeroed after standardisation, by
`FeatureStats.apply` in training and in the loop alike, so the agent sees only its
mixture history, the target-field flags and progress.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from dma_jax.errors import DmaError

FEATURE_VERSION = 3  # 2: the mixture before step 0 is the pre-training mixture, not zeros; 3: field scores are
# relative bits-per-byte / held-out-loss changes (evaluation.normalise, feedback M = D + 6F), not tanh of log-lik
DOMAIN_FEATURES = ("weight_times_D", "is_target_field", "norm_loss", "norm_loss_change")
GLOBAL_FEATURES = ("target_score", "source_score", "target_score_change", "source_score_change", "progress")
FEEDBACK_DOMAIN_FEATURES = ("norm_loss", "norm_loss_change")  # zeroed when the feedback is masked
FEEDBACK_GLOBAL_FEATURES = ("target_score", "source_score", "target_score_change", "source_score_change")


@dataclasses.dataclass(frozen=True)
class FeedbackLayout:
    """Where each domain's loss and each field's score sit in a feedback vector, and which field is the target."""

    domain_loss_index: tuple[int, ...]  # [D]
    domain_is_target: tuple[bool, ...]  # [D]
    target_score_index: tuple[int, ...]
    source_score_index: tuple[int, ...]
    initial_weights: tuple[float, ...] = ()  # [D] the mixture before step 0 (the pre-training one); () = zeros

    @classmethod
    def from_meta(cls, meta: dict) -> FeedbackLayout:
        """From offline-dataset metadata (or anything with the same keys, e.g. a CPT evaluation)."""
        fields, target = list(meta["fields"]), meta["target_field"]
        scores = list(meta["field_score_index"])
        return cls(
            domain_loss_index=tuple(int(i) for i in meta["domain_loss_index"]),
            domain_is_target=tuple(f == target for f in meta["domain_fields"]),
            target_score_index=tuple(int(i) for f, i in zip(fields, scores) if f == target),
            source_score_index=tuple(int(i) for f, i in zip(fields, scores) if f != target),
            initial_weights=tuple(float(w) for w in meta.get("initial_weights", ())),
        )

    @property
    def n_domains(self) -> int:
        return len(self.domain_loss_index)


def history_features(actions_NxtxD: np.ndarray, feedback_Nxt1xM: np.ndarray, layout: FeedbackLayout,
                     horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw features of tokens 0..t: (domain [N, t+1, D, Fd], global [N, t+1, Fg]), float32."""
    a_NxtxD = np.asarray(actions_NxtxD, np.float32)
    fb_Nxt1xM = np.asarray(feedback_Nxt1xM, np.float32)
    n, t, d = a_NxtxD.shape
    if fb_Nxt1xM.shape[:2] != (n, t + 1) or d != layout.n_domains:
        raise DmaError(f"history: {t} mixtures over {d} domains need feedback [N, {t + 1}, M] and a layout of "
                       f"{d} domains, got feedback {fb_Nxt1xM.shape} and {layout.n_domains} domains")
    if layout.initial_weights and len(layout.initial_weights) != d:
        raise DmaError(f"history: initial_weights has {len(layout.initial_weights)} entries for {d} domains")
    # Before step 0 the model was trained on the pre-training mixture: it tells domains of one field apart
    # at t = 0 (their losses and flags are still equal), as the sweep's starting mixtures do.
    w0_D = np.asarray(layout.initial_weights or np.zeros(d), np.float32)
    prev_w_Nxt1xD = np.concatenate([np.broadcast_to(w0_D, (n, 1, d)), a_NxtxD], axis=1)
    loss_Nxt1xD = fb_Nxt1xM[..., list(layout.domain_loss_index)]
    is_target_Nxt1xD = np.broadcast_to(np.asarray(layout.domain_is_target, np.float32), loss_Nxt1xD.shape)
    dom_Nxt1xDxF = np.stack([d * prev_w_Nxt1xD, is_target_Nxt1xD, loss_Nxt1xD, _change(loss_Nxt1xD)], axis=-1)
    target_Nxt1 = fb_Nxt1xM[..., list(layout.target_score_index)].mean(-1)
    source_Nxt1 = fb_Nxt1xM[..., list(layout.source_score_index)].mean(-1)
    progress_Nxt1 = np.broadcast_to(np.arange(t + 1, dtype=np.float32) / horizon, (n, t + 1))
    glob_Nxt1xG = np.stack([target_Nxt1, source_Nxt1, _change(target_Nxt1), _change(source_Nxt1), progress_Nxt1], -1)
    return dom_Nxt1xDxF.astype(np.float32), glob_Nxt1xG.astype(np.float32)


def _change(x_Nxt1x: np.ndarray) -> np.ndarray:
    """x_t - x_{t-1} along axis 1, 0 at t = 0."""
    return np.concatenate([np.zeros_like(x_Nxt1x[:, :1]), np.diff(x_Nxt1x, axis=1)], axis=1)


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-channel mean and std of the training features (a channel that never varies gets std 1).

    `feedback_masked`: `apply` zeroes the feedback channels (the mixture-history-only ablation).
    """

    domain_mean: tuple[float, ...]
    domain_std: tuple[float, ...]
    global_mean: tuple[float, ...]
    global_std: tuple[float, ...]
    feedback_masked: bool = False

    @classmethod
    def fit(cls, dom_xF: np.ndarray, glob_xG: np.ndarray, feedback_masked: bool = False) -> FeatureStats:
        dom = dom_xF.reshape(-1, dom_xF.shape[-1]).astype(np.float64)
        glob = glob_xG.reshape(-1, glob_xG.shape[-1]).astype(np.float64)

        def std(x):
            s = x.std(0)
            return tuple(float(v) for v in np.where(s > 1e-6, s, 1.0))

        return cls(tuple(float(v) for v in dom.mean(0)), std(dom), tuple(float(v) for v in glob.mean(0)), std(glob),
                   bool(feedback_masked))

    def apply(self, dom_xF: np.ndarray, glob_xG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dom = (dom_xF - np.asarray(self.domain_mean, np.float32)) / np.asarray(self.domain_std, np.float32)
        glob = (glob_xG - np.asarray(self.global_mean, np.float32)) / np.asarray(self.global_std, np.float32)
        if self.feedback_masked:
            dom = np.where([f in FEEDBACK_DOMAIN_FEATURES for f in DOMAIN_FEATURES], np.float32(0), dom)
            glob = np.where([f in FEEDBACK_GLOBAL_FEATURES for f in GLOBAL_FEATURES], np.float32(0), glob)
        return dom.astype(np.float32), glob.astype(np.float32)

    def to_json(self) -> dict:
        out = {k: list(v) for k, v in dataclasses.asdict(self).items() if k != "feedback_masked"}
        return dict(out, feedback_masked=True) if self.feedback_masked else out

    @classmethod
    def from_json(cls, obj: dict, where: str = "feature_stats") -> FeatureStats:
        sizes = {"domain_mean": len(DOMAIN_FEATURES), "domain_std": len(DOMAIN_FEATURES),
                 "global_mean": len(GLOBAL_FEATURES), "global_std": len(GLOBAL_FEATURES)}
        for key, size in sizes.items():
            if not isinstance(obj.get(key), list) or len(obj[key]) != size:
                raise DmaError(f"{where}: feature_stats.{key} must be a list of {size} numbers")
        masked = obj.get("feedback_masked", False)
        if not isinstance(masked, bool):
            raise DmaError(f"{where}: feature_stats.feedback_masked must be true or false, got {masked!r}")
        for key in sizes:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in obj[key]):
                raise DmaError(f"{where}: feature_stats.{key} must hold finite numbers only")
        return cls(**{k: tuple(float(v) for v in obj[k]) for k in sizes}, feedback_masked=masked)


class Trajectories(NamedTuple):
    """Whole trajectories as the agent trains on them (a pytree; lives on device during training)."""

    dom_NxT1xDxF: np.ndarray  # standardised per-domain features of tokens 0..T
    glob_NxT1xG: np.ndarray  # standardised global features of tokens 0..T
    actions_NxTxD: np.ndarray
    rewards_NxT: np.ndarray


def trajectories(actions_NxTxD: np.ndarray, feedback_NxT1xM: np.ndarray, rewards_NxT: np.ndarray,
                 layout: FeedbackLayout, stats: FeatureStats) -> Trajectories:
    dom, glob = history_features(actions_NxTxD, feedback_NxT1xM, layout, actions_NxTxD.shape[1])
    dom, glob = stats.apply(dom, glob)
    return Trajectories(dom, glob, np.asarray(actions_NxTxD, np.float32), np.asarray(rewards_NxT, np.float32))


@dataclasses.dataclass(frozen=True)
class History:
    """One episode so far, as a policy sees it: t mixtures, t + 1 observations, the episode's horizon T."""

    actions_txD: np.ndarray
    feedback_t1xM: np.ndarray
    layout: FeedbackLayout
    horizon: int

    def __post_init__(self):
        t = np.shape(self.actions_txD)[0]
        if not 0 <= t < self.horizon:
            raise DmaError(f"history: {t} steps taken, but a decision needs 0 <= steps < horizon={self.horizon}")

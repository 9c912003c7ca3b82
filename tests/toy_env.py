"""`ToyEnv`: an analytic stand-in for the sweep (known best schedule, exact returns), for tests only.

It produces `dma_jax.offline_data.OfflineDataset`s in the current offline format (`offline_data.FORMAT`) without proxies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dma_jax.evaluation import balanced_score
from dma_jax.offline_data import FORMAT, OfflineDataset


class ToyEnv:
    """An analytic domain space with a known best schedule `best_TxD`.

    A domain's normalised held-out loss falls with the weight it has received:
    loss_d = exp(-loss_rate * sum_{s<t} a_{s,d}). A field's normalised score is
    exp(-penalty * sum_{s<t} sum_{d in field} (a_{s,d} - best_{s,d})^2), so every
    field is best served by `best_TxD` and the balanced score (mean, min or
    harmonic) has its maximum, B = 1, there. Rewards are B's increments.
    """

    def __init__(self, domain_fields: Sequence[str], target_field: str, best_TxD: np.ndarray,
                 penalty: float = 1.0, loss_rate: float = 0.3, balanced_how: str = "mean"):
        self.domain_fields = list(domain_fields)
        self.fields = list(dict.fromkeys(self.domain_fields))
        self.target_field = target_field
        self.best_TxD = np.asarray(best_TxD, np.float64)
        self.penalty, self.loss_rate, self.balanced_how = penalty, loss_rate, balanced_how
        self.in_field_FxD = np.array([[f == g for f in self.domain_fields] for g in self.fields], np.float64)

    @property
    def horizon(self) -> int:
        return int(self.best_TxD.shape[0])

    def meta(self) -> dict:
        d = len(self.domain_fields)
        names = [f"{f}_{i}" for i, f in enumerate(self.domain_fields)]
        return {
            "format": FORMAT, "domain_names": names, "domain_fields": self.domain_fields, "fields": self.fields,
            "target_field": self.target_field,
            "feedback_names": [f"loss/{n}" for n in names] + [f"score/{f}" for f in self.fields],
            "domain_loss_index": list(range(d)), "field_score_index": list(range(d, d + len(self.fields))),
            "balanced": self.balanced_how, "config": {"toy": True}, "config_hash": "toy",
        }

    def feedback(self, actions_NxtxD: np.ndarray) -> np.ndarray:
        """Observations [N, t+1, M] after each of the first t steps (row 0: before any step)."""
        a_NxtxD = np.asarray(actions_NxtxD, np.float64)
        n, t, d = a_NxtxD.shape
        zeros_Nx1xD = np.zeros((n, 1, d))
        exposure_Nxt1xD = np.concatenate([zeros_Nx1xD, np.cumsum(a_NxtxD, axis=1)], axis=1)
        sq_err_NxtxD = (a_NxtxD - self.best_TxD[None, :t]) ** 2
        penalty_Nxt1xD = np.concatenate([zeros_Nx1xD, np.cumsum(sq_err_NxtxD, axis=1)], axis=1)
        scores_Nxt1xF = np.exp(-self.penalty * np.einsum("ntd,fd->ntf", penalty_Nxt1xD, self.in_field_FxD))
        return np.concatenate([np.exp(-self.loss_rate * exposure_Nxt1xD), scores_Nxt1xF], axis=-1).astype(np.float32)

    def _balanced(self, feedback_NxT1xM: np.ndarray) -> np.ndarray:
        """B [N, T+1] of the field scores in the feedback, by the package's own balanced score."""
        return np.asarray(balanced_score(feedback_NxT1xM[..., len(self.domain_fields):], self.balanced_how), np.float64)

    def returns(self, actions_NxTxD: np.ndarray) -> np.ndarray:
        b_NxT1 = self._balanced(self.feedback(actions_NxTxD))
        return b_NxT1[:, -1] - b_NxT1[:, 0]

    def dataset(self, actions_NxTxD: np.ndarray) -> OfflineDataset:
        fb_NxT1xM = self.feedback(actions_NxTxD)
        b_NxT1 = self._balanced(fb_NxT1xM)
        rewards_NxT = np.diff(b_NxT1, axis=1)
        return OfflineDataset(
            actions=np.asarray(actions_NxTxD, np.float32), feedback=fb_NxT1xM,
            rewards=rewards_NxT.astype(np.float32), returns=rewards_NxT.sum(1).astype(np.float32), meta=self.meta(),
        )

"""The offline dataset: what the sweep produces and the agent learns from (format `dma-offline-v1`).

Arrays (N trajectories, T re-weighting steps, D domains, M feedback values):
- `actions`  float32 [N, T, D]: the mixture used during step t (rows on the simplex);
- `feedback` float32 [N, T+1, M]: the observation after step t; row 0 is the base model;
- `rewards`  float32 [N, T]: B(o_{t+1}) - B(o_t), B the balanced score;
- `returns`  float32 [N]: the sum of rewards, B(o_T) - B(o_0).
`meta` (JSON) names the domains, their fields and where each domain's normalised
held-out loss and each field's normalised score sit in the feedback vector.

On disk: `<dir>/data.npz` (np.savez, read with allow_pickle=False) then
`<dir>/meta.json`, both written atomically, meta last; meta carries the sha256 of
data.npz, so a half-written or swapped data.npz is detected on load.

`ToyEnv` is an analytic stand-in for the sweep (known best schedule, exact
returns) for tests and for demos that run without proxies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_json, read_json_file, upath

FORMAT = "dma-offline-v1"
BALANCED = ("mean", "min", "harmonic")
SIMPLEX_TOL = 1e-4
_ARRAYS = ("actions", "feedback", "rewards", "returns")
_LIST_KEYS = ("domain_names", "domain_fields", "fields", "feedback_names", "domain_loss_index", "field_score_index")


@dataclasses.dataclass(frozen=True)
class OfflineDataset:
    actions: np.ndarray  # float32 [N, T, D]
    feedback: np.ndarray  # float32 [N, T+1, M]
    rewards: np.ndarray  # float32 [N, T]
    returns: np.ndarray  # float32 [N]
    meta: dict

    @property
    def n(self) -> int:
        return int(self.actions.shape[0])

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[1])

    @property
    def n_domains(self) -> int:
        return int(self.actions.shape[2])


def _check_meta(meta: dict, where: str) -> None:
    if not isinstance(meta, dict):
        raise DmaError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("format", *_LIST_KEYS, "target_field", "balanced", "config", "config_hash") if k not in meta]
    if missing:
        raise DmaError(f"{where}: meta is missing key(s) {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise DmaError(f"{where}: format is {meta['format']!r}, this version reads {FORMAT!r}")
    for key in _LIST_KEYS:
        if not isinstance(meta[key], list):
            raise DmaError(f"{where}: meta.{key} must be a list, got {type(meta[key]).__name__}")
    for key in ("domain_names", "domain_fields", "fields", "feedback_names"):
        if not all(isinstance(x, str) for x in meta[key]):
            raise DmaError(f"{where}: meta.{key} must hold strings only")
    fields = meta["fields"]
    if meta["target_field"] not in fields:
        raise DmaError(f"{where}: meta.target_field={meta['target_field']!r} is not in meta.fields={fields}")
    if len(fields) < 2:
        raise DmaError(f"{where}: meta.fields={fields} needs the target field and at least one source field")
    unknown = sorted(set(meta["domain_fields"]) - set(fields))
    if unknown:
        raise DmaError(f"{where}: meta.domain_fields names field(s) {unknown} that are not in meta.fields={fields}")
    if meta["balanced"] not in BALANCED:
        raise DmaError(f"{where}: meta.balanced={meta['balanced']!r} must be one of {list(BALANCED)}")
    if not isinstance(meta["config"], dict) or not isinstance(meta["config_hash"], str):
        raise DmaError(f"{where}: meta.config must be an object and meta.config_hash a string")
    n_feedback = len(meta["feedback_names"])
    for key in ("domain_loss_index", "field_score_index"):
        bad = [i for i in meta[key] if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_feedback]
        if bad:
            raise DmaError(f"{where}: meta.{key} has index(es) {bad[:5]} outside [0, {n_feedback}) feedback values")


def validate(ds: OfflineDataset, where: str = "<offline dataset>") -> None:
    """Raise a one-line DmaError if `ds` breaks the format (shapes, dtypes, finiteness, simplex, meta)."""
    _check_meta(ds.meta, where)
    for name in _ARRAYS:
        arr = getattr(ds, name)
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            raise DmaError(f"{where}: {name} must be a float32 array, got {getattr(arr, 'dtype', type(arr).__name__)}")
        if not np.isfinite(arr).all():
            raise DmaError(f"{where}: {name} holds NaN or Inf values")
    if ds.actions.ndim != 3 or min(ds.actions.shape) < 1:
        raise DmaError(f"{where}: actions must be [N, T, D] with N, T, D >= 1, got shape {ds.actions.shape}")
    n, t, d = ds.actions.shape
    m = len(ds.meta["feedback_names"])
    expected = {"feedback": (n, t + 1, m), "rewards": (n, t), "returns": (n,)}
    for name, shape in expected.items():
        if getattr(ds, name).shape != shape:
            got = getattr(ds, name).shape
            raise DmaError(f"{where}: {name} has shape {got}, expected {shape} from actions and meta")
    for key in ("domain_names", "domain_fields", "domain_loss_index"):
        if len(ds.meta[key]) != d:
            raise DmaError(f"{where}: meta.{key} has {len(ds.meta[key])} entries but actions have D={d} domains")
    if len(ds.meta["field_score_index"]) != len(ds.meta["fields"]):
        raise DmaError(f"{where}: meta.field_score_index has {len(ds.meta['field_score_index'])} entries "
                       f"but meta.fields has {len(ds.meta['fields'])}")
    if (ds.actions < -SIMPLEX_TOL).any() or np.abs(ds.actions.sum(-1) - 1.0).max() > SIMPLEX_TOL:
        worst = np.unravel_index(np.argmax(np.abs(ds.actions.sum(-1) - 1.0)), (n, t))
        raise DmaError(f"{where}: actions are off the simplex (e.g. trajectory {worst[0]} step {worst[1]} sums to "
                       f"{ds.actions[worst].sum():.6f}; tolerance {SIMPLEX_TOL})")
    gap = np.abs(ds.returns - ds.rewards.sum(-1))
    if (gap > SIMPLEX_TOL * (1.0 + np.abs(ds.returns))).any():
        raise DmaError(f"{where}: returns differ from the sum of rewards (trajectory {int(np.argmax(gap))})")


def _npz_bytes(ds: OfflineDataset) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: getattr(ds, name) for name in _ARRAYS})
    return buf.getvalue()


def save(ds: OfflineDataset, directory: str | Path) -> None:
    """Validate, then write data.npz and (last) meta.json with data.npz's sha256."""
    directory = upath(directory)
    validate(ds, str(directory))
    data = _npz_bytes(ds)
    atomic_write_bytes(directory / "data.npz", data)
    atomic_write_json(directory / "meta.json", dict(ds.meta, data_sha256=hashlib.sha256(data).hexdigest()))


def load(directory: str | Path) -> OfflineDataset:
    """Read and validate a dataset directory; any problem is a one-line DmaError naming the file."""
    directory = upath(directory)
    meta_path, data_path = directory / "meta.json", directory / "data.npz"
    meta = read_json_file(meta_path, "missing (no dataset here, or it was not completely written)")
    if not data_path.is_file():
        raise DmaError(f"{data_path}: missing")
    if not isinstance(meta, dict):
        raise DmaError(f"{meta_path}: expected a JSON object")
    data = data_path.read_bytes()
    if meta.get("data_sha256") != hashlib.sha256(data).hexdigest():
        raise DmaError(f"{data_path}: sha256 does not match meta.json (half-written or replaced file)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [k for k in _ARRAYS if k not in npz.files]
            if missing:
                raise DmaError(f"{data_path}: missing array(s) {', '.join(missing)}")
            arrays = {k: npz[k] for k in _ARRAYS}
    except (ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DmaError(f"{data_path}: cannot read arrays ({first})") from None
    ds = OfflineDataset(meta=meta, **arrays)
    validate(ds, str(directory))
    return ds


def balanced(scores_xF: np.ndarray, how: str) -> np.ndarray:
    """Balanced score over the last (field) axis: mean, min or harmonic mean."""
    if how == "mean":
        return scores_xF.mean(-1)
    if how == "min":
        return scores_xF.min(-1)
    if how == "harmonic":
        return scores_xF.shape[-1] / (1.0 / scores_xF).sum(-1)
    raise DmaError(f"balanced={how!r} must be one of {list(BALANCED)}")


class ToyEnv:
    """An analytic domain space with a known best schedule `best_TxD`.

    A domain's normalised held-out loss falls with the weight it has received:
    loss_d = exp(-loss_rate * sum_{s<t} a_{s,d}). A field's normalised score is
    1 - penalty * sum_{s<t} sum_{d in field} (a_{s,d} - best_{s,d})^2, so every
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

    def returns(self, actions_NxTxD: np.ndarray) -> np.ndarray:
        fb_NxT1xM = self.feedback(actions_NxTxD).astype(np.float64)
        b_NxT1 = balanced(fb_NxT1xM[..., len(self.domain_fields):], self.balanced_how)
        return b_NxT1[:, -1] - b_NxT1[:, 0]

    def dataset(self, actions_NxTxD: np.ndarray) -> OfflineDataset:
        fb_NxT1xM = self.feedback(actions_NxTxD)
        b_NxT1 = balanced(fb_NxT1xM[..., len(self.domain_fields):].astype(np.float64), self.balanced_how)
        rewards_NxT = np.diff(b_NxT1, axis=1)
        return OfflineDataset(
            actions=np.asarray(actions_NxTxD, np.float32), feedback=fb_NxT1xM,
            rewards=rewards_NxT.astype(np.float32), returns=rewards_NxT.sum(1).astype(np.float32), meta=self.meta(),
        )

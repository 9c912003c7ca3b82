"""The offline dataset: what the sweep produces and the agent learns from (format `dma-offline-v2`).

Arrays (N trajectories, T re-weighting steps, D domains, M feedback values):
- `actions`  float32 [N, T, D]: the mixture used during step t (rows on the simplex);
- `feedback` float32 [N, T+1, M]: the observation after step t; row 0 is the base model;
- `rewards`  float32 [N, T]: B(o_{t+1}) - B(o_t), B the balanced score;
- `returns`  float32 [N]: the sum of rewards, B(o_T) - B(o_0);
- `field_score_se` float32 [N, T+1, F]: the standard error of each field score (`evaluation.normalise`),
  fields in `meta.fields` order (v2; an environment whose scores are exact, like the tests' analytic one,
  may leave it out: zeros).
`meta` (JSON) names the domains, their fields and where each domain's normalised
held-out loss and each field's normalised score sit in the feedback vector.
v1 files (no standard errors, field scores from the old tanh-of-log-likelihood formula) are refused.

On disk: `<dir>/data.npz` (np.savez, read with allow_pickle=False) then
`<dir>/meta.json`, both written atomically, meta last; meta carries the sha256 of
data.npz, so a half-written or swapped data.npz is detected on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np

from dma_jax.config import BALANCED_HOW
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_json, read_json_file, upath

FORMAT = "dma-offline-v2"
SIMPLEX_TOL = 1e-4
ARRAYS = ("actions", "feedback", "rewards", "returns", "field_score_se")
_LIST_KEYS = ("domain_names", "domain_fields", "fields", "feedback_names", "domain_loss_index", "field_score_index")


@dataclasses.dataclass(frozen=True)
class OfflineDataset:
    actions: np.ndarray  # float32 [N, T, D]
    feedback: np.ndarray  # float32 [N, T+1, M]
    rewards: np.ndarray  # float32 [N, T]
    returns: np.ndarray  # float32 [N]
    meta: dict
    field_score_se: np.ndarray | None = None  # float32 [N, T+1, F]; None: zeros (exact scores)

    def __post_init__(self):
        if self.field_score_se is None and isinstance(self.meta, dict) and isinstance(self.meta.get("fields"), list):
            n_t = tuple(np.shape(self.feedback)[:2])
            object.__setattr__(self, "field_score_se", np.zeros((*n_t, len(self.meta["fields"])), np.float32))

    @property
    def n(self) -> int:
        return int(self.actions.shape[0])

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[1])

    @property
    def n_domains(self) -> int:
        return int(self.actions.shape[2])


def _check_format(meta: dict, where: str) -> None:
    if meta.get("format") != FORMAT:
        raise DmaError(f"{where}: format is {meta.get('format')!r}, this version reads {FORMAT!r} (field scores "
                       "with standard errors): delete the sweep folder and re-run `dma sweep`")


def _check_meta(meta: dict, where: str) -> None:
    if not isinstance(meta, dict):
        raise DmaError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("format", *_LIST_KEYS, "target_field", "balanced", "config", "config_hash") if k not in meta]
    if missing:
        raise DmaError(f"{where}: meta is missing key(s) {', '.join(missing)}")
    _check_format(meta, where)
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
    if meta["balanced"] not in BALANCED_HOW:
        raise DmaError(f"{where}: meta.balanced={meta['balanced']!r} must be one of {list(BALANCED_HOW)}")
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
    for name in ARRAYS:
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
    se_shape = (n, t + 1, len(ds.meta["fields"]))
    if ds.field_score_se.shape != se_shape:
        raise DmaError(f"{where}: field_score_se has shape {ds.field_score_se.shape}, expected {se_shape} "
                       "from actions and meta.fields")
    if (ds.field_score_se < 0).any():
        raise DmaError(f"{where}: field_score_se holds negative standard errors")
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
    np.savez(buf, **{name: getattr(ds, name) for name in ARRAYS})
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
    _check_format(meta, str(directory))
    data = data_path.read_bytes()
    if meta.get("data_sha256") != hashlib.sha256(data).hexdigest():
        raise DmaError(f"{data_path}: sha256 does not match meta.json (half-written or replaced file)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [k for k in ARRAYS if k not in npz.files]
            if missing:
                raise DmaError(f"{data_path}: missing array(s) {', '.join(missing)}")
            arrays = {k: npz[k] for k in ARRAYS}
    except (ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DmaError(f"{data_path}: cannot read arrays ({first})") from None
    ds = OfflineDataset(meta=meta, **arrays)
    validate(ds, str(directory))
    return ds



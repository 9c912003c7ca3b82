"""The CPT history format (`dma-cpt-history-v2`): one `history.json` per CPT run, written by `dma cpt`, read
by `dma report`, `dma study` and the re-scoring. This module is its only reader and writer.

`<cpt dir>/<policy>/seed<k>/history.json`: T re-weighting steps, D domains, F fields; per-step lists
have T+1 rows, row 0 the base model.
- `weights` [T, D]: the mixture used during re-weighting step t (rows on the simplex);
- `field_scores` [T+1, F]: normalised field scores, base model = 1.0, higher is better (`evaluation.normalise`);
- `field_score_se` [T+1, F]: their standard errors (>= 0; the balanced score's follows, `evaluation.balanced_se`);
- `balanced` [T+1]: B of each row of field_scores (`balanced_how`: mean, min or harmonic;
  `evaluation.balanced_score`);
- `accuracy` [T+1, F]: raw benchmark accuracy in [0, 1];
- `domain_loss` [T+1, D]: raw held-out loss in nats;
- optional raw metrics: `acc_norm` [T+1, F] (length-normalised accuracy), `answer_bpb` [T+1, F] (gold
  continuations' bits per byte), `field_loss` [T+1, F] (held-out loss of the field's domains), `chance` [F];
- `timings` (wall clock), `rejected_policy_outputs`, `config` (the `cpt` section that made it).
Runs with `complete: false` are still training. v1 histories (no standard errors, the old field score)
are refused with an error naming the version.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from dma_jax import evaluation as ev
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_json, upath

FORMAT = "dma-cpt-history-v2"
FILE = "history.json"
_TOL = 1e-4  # on simplex sums, the base row (= 1.0) and the recorded balanced score
_KEYS = ("format", "policy", "seed", "domain_names", "domain_fields", "fields", "target_field",
         "steps_per_stage", "weights", "feedback_names", "field_scores", "balanced", "balanced_how",
         "accuracy", "domain_loss", "complete", "field_score_se")
_OPTIONAL_T1xF = ("acc_norm", "answer_bpb", "field_loss")


def make(*, policy: str, seed: int, domain_names, domain_fields, fields, target_field: str, steps_per_stage: int,
         weights_TxD, feedback_names, field_scores_T1xF: np.ndarray, balanced_how: str, accuracy_T1xF,
         domain_loss_T1xD, timings: dict, rejected: int, cpt_config: dict, field_score_se_T1xF,
         acc_norm_T1xF=None, answer_bpb_T1xF=None, field_loss_T1xF=None, chance_F=None,
         eval_items: dict | None = None) -> dict:
    """The JSON document of a finished run (the balanced score computed here, the one way)."""
    balanced = np.asarray(ev.balanced_score(field_scores_T1xF, balanced_how))
    extra = {key: [np.asarray(x).tolist() for x in value] for key, value in
             (("acc_norm", acc_norm_T1xF), ("answer_bpb", answer_bpb_T1xF), ("field_loss", field_loss_T1xF))
             if value is not None}
    if chance_F is not None:
        extra["chance"] = np.asarray(chance_F).tolist()
    if eval_items is not None:  # {field: {domain: items}} of the in-loop subset (evaluation.in_loop_items)
        extra["eval_items"] = eval_items
    return extra | {
        "format": FORMAT, "policy": policy, "seed": seed,
        "domain_names": list(domain_names), "domain_fields": list(domain_fields), "fields": list(fields),
        "target_field": target_field, "steps_per_stage": steps_per_stage,
        "weights": [np.asarray(w).tolist() for w in weights_TxD], "feedback_names": list(feedback_names),
        "field_scores": np.asarray(field_scores_T1xF).tolist(), "balanced": balanced.tolist(),
        "balanced_how": balanced_how, "accuracy": [np.asarray(a).tolist() for a in accuracy_T1xF],
        "domain_loss": [np.asarray(x).tolist() for x in domain_loss_T1xD],
        "field_score_se": [np.asarray(x).tolist() for x in field_score_se_T1xF],
        "timings": timings, "rejected_policy_outputs": rejected, "complete": True, "config": cpt_config,
    }


def write(run_dir: str | Path, doc: dict) -> None:
    atomic_write_json(upath(run_dir) / FILE, doc)


def is_finished(run_dir: str | Path, cpt_config: dict) -> bool:
    """True when `run_dir` holds a complete history written with this `cpt` config section."""
    path = upath(run_dir) / FILE
    if not path.is_file():
        return False
    h = load(path)
    return h.complete and h.config == cpt_config


@dataclasses.dataclass(frozen=True)
class RunHistory:
    """One CPT run as read from its history.json (validated)."""

    path: Path | None
    policy: str
    seed: int
    domain_names: tuple[str, ...]
    domain_fields: tuple[str, ...]
    fields: tuple[str, ...]
    target_field: str
    steps_per_stage: int
    feedback_names: tuple[str, ...]
    balanced_how: str
    complete: bool
    weights_TxD: np.ndarray
    field_scores_T1xF: np.ndarray
    balanced_T1: np.ndarray
    accuracy_T1xF: np.ndarray
    domain_loss_T1xD: np.ndarray
    config: dict | None = None  # the `cpt` config section that made the run
    field_score_se_T1xF: np.ndarray | None = None  # always set by `from_doc`
    balanced_se_T1: np.ndarray | None = None  # `evaluation.balanced_se` of the field scores and their SEs
    acc_norm_T1xF: np.ndarray | None = None  # optional raw metrics (None when the history has none)
    answer_bpb_T1xF: np.ndarray | None = None
    field_loss_T1xF: np.ndarray | None = None
    chance_F: np.ndarray | None = None
    eval_items: dict | None = None  # {field: {domain: items}} scored in the loop (optional)

    @property
    def n_steps(self) -> int:
        return int(self.weights_TxD.shape[0])


def _strings(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise DmaError(f"{where}: {key} must be a list of strings, got {value!r:.80}")
    return tuple(value)


def _array(obj: dict, key: str, shape: tuple, meaning: str, where: str) -> np.ndarray:
    """obj[key] as float64 of `shape` (None = any length), finite; `meaning` names the axes."""
    try:
        arr = np.asarray(obj[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise DmaError(f"{where}: {key} must be a {meaning} list of numbers (ragged or not numeric)") from None
    if arr.size == 0 and len(shape) == 2 and shape[0] in (None, 0):
        arr = arr.reshape(0, shape[1])
    want = tuple(arr.shape[i] if n is None and i < arr.ndim else n for i, n in enumerate(shape))
    if arr.shape != want:
        raise DmaError(f"{where}: {key} has shape {list(arr.shape)}, expected {['T' if n is None else n for n in want]} ({meaning})")
    if not np.isfinite(arr).all():
        at = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise DmaError(f"{where}: {key} holds a NaN or infinite value at index {at}")
    return arr


def _check_header(obj: dict, where: str) -> None:
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise DmaError(f"{where}: missing key(s) {', '.join(missing)}")
    if obj["format"] != FORMAT:
        raise DmaError(f"{where}: format is {obj['format']!r}, this version reads {FORMAT!r} (field scores with "
                       "standard errors): delete this run's folder and re-run `dma cpt`")
    if not isinstance(obj["policy"], str) or not obj["policy"]:
        raise DmaError(f"{where}: policy must be a non-empty string, got {obj['policy']!r}")
    for key in ("seed", "steps_per_stage"):
        low = 0 if key == "seed" else 1
        if not isinstance(obj[key], int) or isinstance(obj[key], bool) or obj[key] < low:
            raise DmaError(f"{where}: {key} must be an integer >= {low}, got {obj[key]!r}")
    if obj["balanced_how"] not in ev.BALANCED:
        raise DmaError(f"{where}: balanced_how={obj['balanced_how']!r} is not one of {', '.join(ev.BALANCED)}")
    if not isinstance(obj["complete"], bool):
        raise DmaError(f"{where}: complete must be true or false, got {obj['complete']!r}")


def load(path: str | Path) -> RunHistory:
    """Reads and validates one history.json; every problem is a one-line DmaError naming the file."""
    path = upath(path)
    where = str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DmaError(f"{where}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DmaError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    return from_doc(obj, where, path)


def from_doc(obj, where: str, path: Path | None = None) -> RunHistory:
    """Validates a history document (as `make` returns it or as read from JSON)."""
    if not isinstance(obj, dict):
        raise DmaError(f"{where}: must hold a JSON object, got {type(obj).__name__}")
    if obj.get("format", FORMAT) != FORMAT:  # before the keys: an old file lacks the new ones
        raise DmaError(f"{where}: format is {obj['format']!r}, this version reads {FORMAT!r} (field scores with "
                       "standard errors): delete this run's folder and re-run `dma cpt`")
    _check_header(obj, where)
    names, doms, fields = (_strings(obj, k, where) for k in ("domain_names", "domain_fields", "fields"))
    feedback_names = _strings(obj, "feedback_names", where)
    if not names or len(set(names)) != len(names):
        raise DmaError(f"{where}: domain_names must be non-empty and unique, got {list(names)}")
    if len(doms) != len(names):
        raise DmaError(f"{where}: domain_fields has {len(doms)} entries for {len(names)} domain_names")
    if not fields or len(set(fields)) != len(fields):
        raise DmaError(f"{where}: fields must be non-empty and unique, got {list(fields)}")
    unknown = sorted(set(doms) - set(fields))
    if unknown:
        raise DmaError(f"{where}: domain_fields name field(s) {unknown} that are not in fields={list(fields)}")
    if obj["target_field"] not in fields:
        raise DmaError(f"{where}: target_field={obj['target_field']!r} is not in fields={list(fields)}")
    d, f = len(names), len(fields)
    weights = _array(obj, "weights", (None, d), "T x D: steps x domains", where)
    t1 = weights.shape[0] + 1
    if obj["complete"] and t1 < 2:
        raise DmaError(f"{where}: complete is true but weights has no re-weighting step")
    off_T = (weights < 0).any(axis=1) | (np.abs(weights.sum(axis=1) - 1.0) > _TOL)
    if off_T.any():
        t = int(np.flatnonzero(off_T)[0])
        raise DmaError(f"{where}: weights[{t}] is not on the simplex "
                       f"(sum {weights[t].sum():.6f}, min {weights[t].min():.6f})")
    scores = _array(obj, "field_scores", (t1, f), "T+1 x F: evaluations x fields", where)
    balanced = _array(obj, "balanced", (t1,), "T+1: one per evaluation", where)
    accuracy = _array(obj, "accuracy", (t1, f), "T+1 x F: evaluations x fields", where)
    loss = _array(obj, "domain_loss", (t1, d), "T+1 x D: evaluations x domains", where)
    se = _array(obj, "field_score_se", (t1, f), "T+1 x F: evaluations x fields", where)
    if (se < 0).any():
        raise DmaError(f"{where}: field_score_se must be non-negative, got minimum {se.min():.4g}")
    extra = {key: _array(obj, key, (t1, f), "T+1 x F: evaluations x fields", where) if key in obj else None
             for key in _OPTIONAL_T1xF}
    chance = _array(obj, "chance", (f,), "F: one per field", where) if "chance" in obj else None
    if np.abs(scores[0] - 1.0).max() > _TOL:
        raise DmaError(f"{where}: field_scores[0] (the base model) must be 1.0 in every field, got {scores[0].tolist()}")
    expect = np.asarray(ev.balanced_score(scores, obj["balanced_how"]), np.float64)
    off_T1 = np.abs(balanced - expect) > _TOL * np.maximum(1.0, np.abs(expect))
    if off_T1.any():
        i = int(np.flatnonzero(off_T1)[0])
        raise DmaError(f"{where}: balanced[{i}]={balanced[i]:.6f} but the {obj['balanced_how']} "
                       f"of field_scores[{i}] is {expect[i]:.6f}")
    if (accuracy < 0).any() or (accuracy > 1).any():
        raise DmaError(f"{where}: accuracy must lie in [0, 1], got {accuracy.min():.4f} to {accuracy.max():.4f}")
    if (loss < 0).any():
        raise DmaError(f"{where}: domain_loss must be non-negative (nats), got minimum {loss.min():.4f}")
    return RunHistory(path, obj["policy"], obj["seed"], names, doms, fields, obj["target_field"],
                      obj["steps_per_stage"], feedback_names, obj["balanced_how"], obj["complete"],
                      weights, scores, balanced, accuracy, loss, obj.get("config"), se,
                      np.asarray(ev.balanced_se(scores, se, obj["balanced_how"]), np.float64),
                      extra["acc_norm"], extra["answer_bpb"], extra["field_loss"], chance,
                      obj.get("eval_items") if isinstance(obj.get("eval_items"), dict) else None)


def collect(cpt_dir: str | Path) -> list[RunHistory]:
    """Every `<cpt_dir>/<policy>/seed<k>/history.json`, sorted by (policy, seed); complete or not."""
    cpt_dir = upath(cpt_dir)
    if not cpt_dir.is_dir():
        raise DmaError(f"{cpt_dir}: CPT directory does not exist")
    runs, seen = [], {}
    for path in sorted(cpt_dir.glob(f"*/seed*/{FILE}")):
        run = load(path)
        key = (run.policy, run.seed)
        if key in seen:
            raise DmaError(f"{path}: policy {run.policy!r} seed {run.seed} is also in {seen[key]}")
        seen[key] = path
        runs.append(run)
    return sorted(runs, key=lambda r: (r.policy, r.seed))

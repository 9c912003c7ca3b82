"""The report of the continual pre-training (CPT) runs: a markdown table and two plots.

Reads `<cpt_dir>/<policy>/seed<k>/history.json` (format `dma-cpt-history-v1`, one per run):
T re-weighting steps, D domains, F fields; per-step lists have T+1 rows, row 0 the base model.
- `weights` [T, D]: the mixture used during re-weighting step t (rows on the simplex);
- `field_scores` [T+1, F]: normalised field scores, base model = 1.0, higher is better;
- `balanced` [T+1]: B of each row of field_scores (`balanced_how`: mean, min or harmonic);
- `accuracy` [T+1, F]: raw benchmark accuracy in [0, 1];
- `domain_loss` [T+1, D]: raw held-out loss in nats.
Runs with `complete: false` are still training: the report lists them, the table leaves them out.

`write_report` writes `report.md`, `mixtures.png` (the domain weights each policy chose) and
`scores.png` (balanced and field scores over training, mean ± std over seeds), all atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_text, upath

FORMAT = "dma-cpt-history-v1"
BALANCED = ("mean", "min", "harmonic")
FIELD_CMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")  # by position in `fields`
_TOL = 1e-4  # on simplex sums, the base row (= 1.0) and the recorded balanced score
_HARMONIC_EPS = 1e-6  # as in evaluation.balanced_score
_KEYS = ("format", "policy", "seed", "domain_names", "domain_fields", "fields", "target_field",
         "steps_per_stage", "weights", "feedback_names", "field_scores", "balanced", "balanced_how",
         "accuracy", "domain_loss", "complete")


@dataclasses.dataclass(frozen=True)
class RunHistory:
    """One CPT run as read from its history.json (validated)."""

    path: Path
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

    @property
    def n_steps(self) -> int:
        return int(self.weights_TxD.shape[0])


def _balanced(scores_xF: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return scores_xF.mean(axis=-1)
    if how == "min":
        return scores_xF.min(axis=-1)
    return scores_xF.shape[-1] / (1.0 / np.maximum(scores_xF, _HARMONIC_EPS)).sum(axis=-1)


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
        raise DmaError(f"{where}: format is {obj['format']!r}, this version reads {FORMAT!r}")
    if not isinstance(obj["policy"], str) or not obj["policy"]:
        raise DmaError(f"{where}: policy must be a non-empty string, got {obj['policy']!r}")
    for key in ("seed", "steps_per_stage"):
        low = 0 if key == "seed" else 1
        if not isinstance(obj[key], int) or isinstance(obj[key], bool) or obj[key] < low:
            raise DmaError(f"{where}: {key} must be an integer >= {low}, got {obj[key]!r}")
    if obj["balanced_how"] not in BALANCED:
        raise DmaError(f"{where}: balanced_how={obj['balanced_how']!r} is not one of {', '.join(BALANCED)}")
    if not isinstance(obj["complete"], bool):
        raise DmaError(f"{where}: complete must be true or false, got {obj['complete']!r}")


def load_history(path: str | Path) -> RunHistory:
    """Reads and validates one history.json; every problem is a one-line DmaError naming the file."""
    path = upath(path)
    where = str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DmaError(f"{where}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DmaError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise DmaError(f"{where}: must hold a JSON object, got {type(obj).__name__}")
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
    if np.abs(scores[0] - 1.0).max() > _TOL:
        raise DmaError(f"{where}: field_scores[0] (the base model) must be 1.0 in every field, got {scores[0].tolist()}")
    expect = _balanced(scores, obj["balanced_how"])
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
                      weights, scores, balanced, accuracy, loss)


def collect(cpt_dir: str | Path) -> list[RunHistory]:
    """Every `<cpt_dir>/<policy>/seed<k>/history.json`, sorted by (policy, seed); complete or not."""
    cpt_dir = upath(cpt_dir)
    if not cpt_dir.is_dir():
        raise DmaError(f"{cpt_dir}: CPT directory does not exist")
    runs, seen = [], {}
    for path in sorted(cpt_dir.glob("*/seed*/history.json")):
        run = load_history(path)
        key = (run.policy, run.seed)
        if key in seen:
            raise DmaError(f"{path}: policy {run.policy!r} seed {run.seed} is also in {seen[key]}")
        seen[key] = path
        runs.append(run)
    return sorted(runs, key=lambda r: (r.policy, r.seed))


def _by_policy(runs: Sequence[RunHistory]) -> dict[str, list[RunHistory]]:
    """Complete runs grouped by policy; checks they are comparable (fields, B, steps per policy)."""
    done = [r for r in runs if r.complete]
    groups: dict[str, list[RunHistory]] = {}
    for r in done:
        first = done[0]
        if (r.fields, r.balanced_how) != (first.fields, first.balanced_how):
            raise DmaError(f"{r.path}: fields={list(r.fields)}, balanced_how={r.balanced_how!r} differ from "
                           f"{first.path} ({list(first.fields)}, {first.balanced_how!r}); runs are not comparable")
        group = groups.setdefault(r.policy, [])
        if group and (r.n_steps, r.steps_per_stage) != (group[0].n_steps, group[0].steps_per_stage):
            raise DmaError(f"{r.path}: {r.n_steps} steps of {r.steps_per_stage} differ from {group[0].path} "
                           f"({group[0].n_steps} of {group[0].steps_per_stage}); seeds of one policy must match")
        group.append(r)
    return groups


def _mean_std(x_N: np.ndarray) -> tuple[float, float]:
    return float(x_N.mean()), float(x_N.std(ddof=1)) if len(x_N) > 1 else 0.0


def summary_table(runs: Sequence[RunHistory]) -> list[dict]:
    """One row per policy over its complete runs, best balanced mean first.

    Row: policy, n, seeds, mean / std (dicts keyed by field and "balanced", final scores;
    std with ddof=1, 0.0 for a single seed), rank (1 = best).
    """
    rows = []
    for policy, group in _by_policy(runs).items():
        final_NxF = np.stack([r.field_scores_T1xF[-1] for r in group])
        stats = {f: _mean_std(final_NxF[:, i]) for i, f in enumerate(group[0].fields)}
        stats["balanced"] = _mean_std(np.array([r.balanced_T1[-1] for r in group]))
        rows.append({"policy": policy, "n": len(group), "seeds": [r.seed for r in group],
                     "mean": {k: m for k, (m, _) in stats.items()}, "std": {k: s for k, (_, s) in stats.items()}})
    rows.sort(key=lambda row: (-row["mean"]["balanced"], row["policy"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def paired_comparison(runs: Sequence[RunHistory], policy: str = "agent-cql") -> dict | None:
    """Final balanced score of `policy` minus that of the best other policy, paired by seed.

    None when `policy` or another policy has no complete run, or they share no seed.
    """
    table = summary_table(runs)
    others = [row for row in table if row["policy"] != policy]
    if not others or policy not in {row["policy"] for row in table}:
        return None
    best = others[0]["policy"]
    final = {(r.policy, r.seed): float(r.balanced_T1[-1]) for r in runs if r.complete}
    seeds = sorted({s for p, s in final if p == policy} & {s for p, s in final if p == best})
    if not seeds:
        return None
    diff_N = np.array([final[(policy, s)] - final[(best, s)] for s in seeds])
    mean, std = _mean_std(diff_N)
    return {"policy": policy, "other": best, "seeds": seeds, "mean_diff": mean, "std_diff": std,
            "wins": int((diff_N > 0).sum())}


def _field_colours(fields: Sequence[str], domain_fields: Sequence[str]) -> list:
    """A colour per domain: the field's colormap family, shades spread over its domains."""
    colours = []
    for d, field in enumerate(domain_fields):
        mine = [i for i, f in enumerate(domain_fields) if f == field]
        shades = np.linspace(0.4, 0.85, len(mine)) if len(mine) > 1 else [0.65]
        cmap = matplotlib.colormaps[FIELD_CMAPS[fields.index(field) % len(FIELD_CMAPS)]]
        colours.append(cmap(shades[mine.index(d)]))
    return colours


def _grid(n: int, ncols: int, title: str) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n]


def _save_png(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def plot_mixtures(groups: dict[str, list[RunHistory]], path: Path) -> None:
    """One panel per policy (its lowest seed): the domain weights over training, stacked."""
    fig, axes = _grid(len(groups), 3, "Domain mixture over continual pre-training")
    fields = list(next(iter(groups.values()))[0].fields)
    for ax, (policy, group) in zip(axes, groups.items()):
        run = group[0]
        order = sorted(range(len(run.domain_names)), key=lambda d: fields.index(run.domain_fields[d]))
        colours = _field_colours(fields, run.domain_fields)
        steps = np.arange(run.n_steps + 1) * run.steps_per_stage
        weights_T1xD = np.concatenate([run.weights_TxD, run.weights_TxD[-1:]])  # held to the last step
        ax.stackplot(steps, weights_T1xD[:, order].T, colors=[colours[d] for d in order], step="post",
                     edgecolor="white", linewidth=0.3 if len(order) <= 12 else 0.0)
        ax.set(title=f"{policy} (seed {run.seed})", xlabel="optimizer step", ylabel="domain weight",
               xlim=(0, steps[-1]), ylim=(0, 1))
    legend = [Patch(color=matplotlib.colormaps[FIELD_CMAPS[i % len(FIELD_CMAPS)]](0.65), label=f)
              for i, f in enumerate(fields)]
    fig.legend(handles=legend, loc="outside lower center", ncols=len(fields), title="field")
    _save_png(fig, path)


def plot_scores(groups: dict[str, list[RunHistory]], path: Path) -> None:
    """Balanced score and each field score over training: mean over seeds, shaded ± std."""
    first = next(iter(groups.values()))[0]
    panels = [f"balanced ({first.balanced_how})", *first.fields]
    fig, axes = _grid(len(panels), 3, "Scores over continual pre-training (base model = 1.0)")
    colours = matplotlib.colormaps["tab10"]
    for p, (policy, group) in enumerate(groups.items()):
        steps = np.arange(group[0].n_steps + 1) * group[0].steps_per_stage
        curves_NxT1xK = np.stack([np.column_stack([r.balanced_T1, r.field_scores_T1xF]) for r in group])
        mean_T1xK = curves_NxT1xK.mean(axis=0)
        std_T1xK = curves_NxT1xK.std(axis=0, ddof=1) if len(group) > 1 else np.zeros_like(mean_T1xK)
        for k, ax in enumerate(axes):
            ax.plot(steps, mean_T1xK[:, k], color=colours(p % 10), label=f"{policy} (n={len(group)})")
            ax.fill_between(steps, mean_T1xK[:, k] - std_T1xK[:, k], mean_T1xK[:, k] + std_T1xK[:, k],
                            color=colours(p % 10), alpha=0.2, linewidth=0)
    for ax, name in zip(axes, panels):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=name, xlabel="optimizer step", ylabel="score")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(groups)))
    _save_png(fig, path)


def _table_markdown(table: list[dict], columns: list[str]) -> list[str]:
    best = {c: max(round(row["mean"][c], 4) for row in table) for c in columns}
    lines = ["| policy | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for row in table:
        cells = []
        for c in columns:
            std = f"{row['std'][c]:.4f}" if row["n"] > 1 else "–"
            cell = f"{row['mean'][c]:.4f} ± {std}"
            cells.append(f"**{cell}**" if round(row["mean"][c], 4) == best[c] else cell)
        lines.append(f"| {row['policy']} | {row['n']} | " + " | ".join(cells) + " |")
    return lines


def write_report(cpt_dir: str | Path, out_dir: str | Path, title: str = "Continual pre-training report",
                 focus: str = "agent-cql") -> Path:
    """Writes report.md, mixtures.png and scores.png into out_dir; returns the path of report.md."""
    runs = collect(cpt_dir)
    groups = dict(sorted(_by_policy(runs).items()))
    if not groups:
        raise DmaError(f"{cpt_dir}: no complete CPT run (no <policy>/seed<k>/history.json with complete: true)")
    out_dir = upath(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_mixtures(groups, out_dir / "mixtures.png")
    plot_scores(groups, out_dir / "scores.png")
    table = summary_table(runs)
    first = runs[[r.complete for r in runs].index(True)]
    steps = sorted({(g[0].n_steps, g[0].steps_per_stage) for g in groups.values()})
    lines = [f"# {title}", "",
             f"{sum(len(g) for g in groups.values())} complete runs of {len(groups)} policies from `{cpt_dir}`; "
             + ", ".join(f"{t} re-weighting steps of {s} optimizer steps" for t, s in steps)
             + f"; target field: {first.target_field}.", "",
             "## Final scores", "", *_table_markdown(table, [*first.fields, "balanced"]), "",
             "Ranked by the balanced mean; **bold** marks the best mean in each column.", "",
             "## How to read this", "",
             "Each cell is the mean ± sample standard deviation (ddof=1; – for a single seed) over seeds of the "
             "score after the last re-weighting step. Field scores are normalised so that the base model, before "
             "continual pre-training, scores 1.000 in every field: above 1 is better than the base model, below 1 "
             f"is worse (forgetting, for the source field). The balanced score is the {first.balanced_how} of the "
             "field scores (`balanced_how` in the histories): it rewards gaining the target field without losing "
             "the source field.", ""]
    paired = paired_comparison(runs, focus)
    if paired:
        lines += ["## Paired comparison", "",
                  f"{paired['policy']} − {paired['other']} (the best other policy), final balanced score paired "
                  f"by seed over seeds {paired['seeds']}: {paired['mean_diff']:+.4f} ± "
                  + (f"{paired['std_diff']:.4f}" if len(paired["seeds"]) > 1 else "–")
                  + f"; {paired['policy']} is ahead on {paired['wins']} of {len(paired['seeds'])} seeds.", ""]
    lines += ["## Plots", "", "Domain weights chosen by each policy (lowest seed), coloured by field:", "",
              "![Domain mixtures](mixtures.png)", "",
              "Balanced and field scores over training, mean over seeds with ± std shaded:", "",
              "![Scores](scores.png)", ""]
    running = [r for r in runs if not r.complete]
    if running:
        lines += ["## Note: runs in progress", "", "Not in the table or the plots (complete: false):", "",
                  *[f"- {r.policy} seed {r.seed}: {r.n_steps} re-weighting steps so far" for r in running], ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

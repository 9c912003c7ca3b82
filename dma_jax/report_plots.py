"""The plots of `dma report` (`report.write_report`): the domain weights each policy chose (`plot_mixtures`), its
scores over continual pre-training (`plot_scores`, mean ± std over seeds) and the sweep's response surface
(`plot_response_surface`), each written atomically as a PNG."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dma_jax import evaluation as ev
from dma_jax import offline_data
from dma_jax.history import RunHistory
from dma_jax.io_utils import atomic_write_bytes

FIELD_CMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")  # by position in `fields`


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


def plot_response_surface(ds: offline_data.OfflineDataset, path: Path) -> None:
    """The sweep's response surface: balanced score after step t vs the target share of step t (colour: t),
    and each trajectory's return vs its mean target share."""
    meta = ds.meta
    share_NxT = ds.actions[:, :, np.array(meta["domain_fields"]) == meta["target_field"]].sum(axis=2)
    balanced_NxT1 = np.asarray(ev.balanced_score(ds.feedback[..., meta["field_score_index"]], meta["balanced"]))
    fig, (ax_s, ax_r) = _grid(2, 2, f"Sweep response surface ({ds.n} trajectories, {ds.horizon} steps)")
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, ds.horizon))
    for t in range(ds.horizon):
        ax_s.scatter(share_NxT[:, t], balanced_NxT1[:, t + 1], s=9, color=colours[t], alpha=0.7, label=f"step {t}")
    ax_s.set(xlabel=f"{meta['target_field']} share during the step", ylabel=f"balanced ({meta['balanced']}) after it",
             title="score after each re-weighting step")
    ax_s.legend(fontsize="x-small", ncols=1 + ds.horizon // 8)
    ax_r.scatter(share_NxT.mean(axis=1), ds.returns, s=9, color="tab:blue", alpha=0.7)
    ax_r.set(xlabel=f"mean {meta['target_field']} share over the trajectory", ylabel="return (final - base balanced)",
             title="return of each trajectory")
    _save_png(fig, path)

"""The sweep's mixture trajectories [N, T, D]: the sampler, the `trajectories.npz` format, plots and coverage.

The sweep trains one proxy per trajectory, so these trajectories are the behaviour data the agent learns
from; what they never visit the agent never sees. Biases (`config.SamplerConfig`):
- start anywhere in a range of target-field shares (split over each field's domains by size);
- move smoothly: the next mixture is drawn from a Dirichlet centred on the current one;
- drift at a per-trajectory signed rate: toward the target distribution (rise) or the source one (fall);
- some trajectories turn (the drift flips sign once), some down-weight a few domains inside their fields
  (emphasis), some take much wider steps (exploration).
Every domain outside `target_field` counts as source. Deterministic per seed.

`write_coverage` summarises what a sweep covers: per re-weighting step, the 5-95 % envelope of each
field's share and of each domain's weight (a PNG and a markdown table, `dma sample`).
"""

import io
import zipfile
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from dma_jax.config import SamplerConfig
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_text, upath

_FIELD_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
ENVELOPE = (5.0, 50.0, 95.0)  # percentiles of the coverage envelope: low, median, high


def _field_distributions(field_of_domain, domain_sizes, target_field, params):
    """Source and target distributions [D] (each field's domains by size), both on the simplex."""
    sizes_D = np.asarray(domain_sizes, dtype=np.float64)
    if sizes_D.shape != (len(field_of_domain),):
        raise DmaError(
            f"trajectories: domain_sizes has {sizes_D.size} entries but "
            f"field_of_domain has {len(field_of_domain)}"
        )
    if not (np.all(np.isfinite(sizes_D)) and np.all(sizes_D > 0)):
        raise DmaError(f"trajectories: domain_sizes must be finite and > 0, got {sizes_D.tolist()}")
    is_target_D = np.array([f == target_field for f in field_of_domain])
    if not is_target_D.any():
        raise DmaError(f"trajectories: target_field={target_field!r} has no domain in {sorted(set(field_of_domain))}")
    if is_target_D.all():
        raise DmaError(f"trajectories: every domain is in target_field={target_field!r}; no source domain")
    if params.min_weight * sizes_D.size >= 1.0:
        raise DmaError(
            f"sweep.sampler.min_weight={params.min_weight} times {sizes_D.size} domains must be < 1"
        )
    source_D = np.where(is_target_D, 0.0, sizes_D)
    target_D = np.where(is_target_D, sizes_D, 0.0)
    return source_D / source_D.sum(), target_D / target_D.sum()


def _dirichlet(rng, alpha_NxD, min_weight):
    """One Dirichlet draw per row (via normalised gammas), floored and renormalised."""
    gamma_NxD = rng.standard_gamma(alpha_NxD)
    total_Nx1 = gamma_NxD.sum(axis=1, keepdims=True)
    w_NxD = gamma_NxD / np.maximum(total_Nx1, np.finfo(np.float64).tiny)
    w_NxD = np.maximum(w_NxD, min_weight)
    return w_NxD / w_NxD.sum(axis=1, keepdims=True)


def _chosen(rng, n: int, share: float) -> np.ndarray:
    """[N] bool: exactly round(share * n) trajectories, chosen at random."""
    mask_N = np.zeros(n, dtype=bool)
    mask_N[rng.permutation(n)[: int(round(share * n))]] = True
    return mask_N


def _emphasis(rng, is_emph_N, field_of_domain) -> np.ndarray:
    """[N, D] bool: the domains each emphasis trajectory down-weights.

    Each domain with probability 1/2, but never every domain of a field (then the one with the largest draw
    is put back) and at least one domain (else the smallest draw among the fields with two or more domains).
    Fields of a single domain are left alone; with no field of two or more domains nothing is picked.
    """
    u_NxD = rng.uniform(size=(is_emph_N.size, len(field_of_domain)))
    fields = np.array(field_of_domain)
    eligible_D = np.array([np.sum(fields == f) > 1 for f in fields])
    picked_NxD = (u_NxD < 0.5) & eligible_D & is_emph_N[:, None]
    for f in dict.fromkeys(field_of_domain):
        members = np.flatnonzero(fields == f)
        full_N = picked_NxD[:, members].all(axis=1)
        picked_NxD[full_N, members[np.argmax(u_NxD[full_N][:, members], axis=1)]] = False
    none_N = is_emph_N & ~picked_NxD.any(axis=1) & eligible_D.any()
    u_eligible_NxD = np.where(eligible_D, u_NxD, np.inf)
    picked_NxD[none_N, np.argmin(u_eligible_NxD[none_N], axis=1)] = True
    return picked_NxD


def _emphasised(dist_D, picked_NxD, factor, field_of_domain) -> np.ndarray:
    """[N, D]: `dist_D` with each row's picked domains times `factor`, every field's share kept."""
    fields = np.array(field_of_domain)
    out_NxD = np.where(picked_NxD, factor, 1.0) * dist_D
    for f in dict.fromkeys(field_of_domain):
        in_f = fields == f
        kept_N = out_NxD[:, in_f].sum(axis=1)
        out_NxD[:, in_f] *= (dist_D[in_f].sum() / np.where(kept_N > 0, kept_N, 1.0))[:, None]
    return out_NxD


def sample_trajectories(
    n: int,
    t: int,
    field_of_domain: Sequence[str],
    domain_sizes: Sequence[float],
    target_field: str,
    params: SamplerConfig,
    seed: int,
) -> np.ndarray:
    """Draw n trajectories of t mixtures over D domains: float32 [N, T, D] on the simplex.

    Per trajectory: a start target share s ~ U(init_target_share_range), the start mean
    (1 - s) * source + s * target; a signed rate r ~ U(drift_rate_range), each step's mean
    (1 - |r|) * current + |r| * (target if r > 0 else source); `turn_share` of them use -r from a random
    step in [1, T-1] on; `emphasis_share` of them multiply some domains by `emphasis_factor` inside their
    field in the source and target distributions (so in the start mean and in every pull; field shares
    kept, the down-weighting does not compound); `wide_share` of them step with `wide_concentration`.
    """
    if n < 1 or t < 1:
        raise DmaError(f"trajectories: n={n} and t={t} must both be >= 1")
    source_D, target_D = _field_distributions(field_of_domain, domain_sizes, target_field, params)
    rng = np.random.default_rng(seed)
    start_share_Nx1 = rng.uniform(*params.init_target_share_range, size=(n, 1))
    rate_Nx1 = rng.uniform(*params.drift_rate_range, size=(n, 1))
    is_wide_N = _chosen(rng, n, params.wide_share)
    is_turn_N = _chosen(rng, n, params.turn_share)
    turn_at_N = rng.integers(1, t, size=n) if t > 1 else np.full(n, t)
    picked_NxD = _emphasis(rng, _chosen(rng, n, params.emphasis_share), field_of_domain)
    source_NxD = _emphasised(source_D, picked_NxD, params.emphasis_factor, field_of_domain)
    target_NxD = _emphasised(target_D, picked_NxD, params.emphasis_factor, field_of_domain)
    conc_Nx1 = np.where(is_wide_N, params.wide_concentration, params.step_concentration)[:, None]

    traj_NxTxD = np.empty((n, t, source_D.size), dtype=np.float64)
    start_NxD = (1.0 - start_share_Nx1) * source_NxD + start_share_Nx1 * target_NxD
    traj_NxTxD[:, 0] = _dirichlet(rng, params.init_concentration * start_NxD, params.min_weight)
    for step in range(1, t):
        r_Nx1 = np.where((is_turn_N & (step >= turn_at_N))[:, None], -rate_Nx1, rate_Nx1)
        toward_NxD = np.where(r_Nx1 > 0, target_NxD, source_NxD)
        mean_NxD = (1.0 - np.abs(r_Nx1)) * traj_NxTxD[:, step - 1] + np.abs(r_Nx1) * toward_NxD
        traj_NxTxD[:, step] = _dirichlet(rng, conc_Nx1 * mean_NxD, params.min_weight)
    return traj_NxTxD.astype(np.float32)


# ------------------------------------------------------------------------------ the file


def save(path, weights_NxTxD: np.ndarray, domain_names: Sequence[str], domain_fields: Sequence[str],
         target_field: str) -> None:
    """`trajectories.npz`: weights_NxTxD float32, domain_names, domain_fields, target_field (atomic)."""
    buf = io.BytesIO()
    np.savez(buf, weights_NxTxD=np.asarray(weights_NxTxD, np.float32), domain_names=np.array(domain_names),
             domain_fields=np.array(domain_fields), target_field=np.array(target_field))
    atomic_write_bytes(path, buf.getvalue())


def load(path) -> tuple[np.ndarray, list[str], list[str], str | None]:
    """(weights_NxTxD, domain_names, domain_fields, target_field or None for older files); bad file: DmaError."""
    try:
        with np.load(io.BytesIO(upath(path).read_bytes()), allow_pickle=False) as z:
            w = np.asarray(z["weights_NxTxD"], np.float32)
            names, fields = [str(x) for x in z["domain_names"]], [str(x) for x in z["domain_fields"]]
            target = str(z["target_field"]) if "target_field" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # empty, truncated, garbled
        raise DmaError(f"{path}: not a trajectories file ({(str(e) or type(e).__name__).splitlines()[0]})") from None
    if w.ndim != 3 or w.shape[2] != len(names) or len(fields) != len(names):
        raise DmaError(f"{path}: weights_NxTxD has shape {w.shape} for {len(names)} domain names and "
                       f"{len(fields)} domain fields")
    if not np.all(np.isfinite(w)) or (w < 0).any() or np.abs(w.sum(-1) - 1).max() > 1e-4:
        raise DmaError(f"{path}: mixtures must be finite, >= 0 and sum to 1")
    return w, names, fields, target


# ------------------------------------------------------------------------------ plots and coverage


def plot_trajectories(
    traj_NxTxD: np.ndarray,
    domain_names: Sequence[str],
    field_of_domain: Sequence[str],
    path: str,
    n_show: int = 6,
) -> None:
    """Write a PNG grid of stacked-area plots of up to `n_show` trajectories.

    Domains are grouped and coloured by field (one colour family per field) so
    the drift between fields is visible. Written to a temporary file, then
    renamed, so a reader never sees a half-written PNG.
    """
    traj_NxTxD = np.asarray(traj_NxTxD)
    if traj_NxTxD.ndim != 3:
        raise DmaError(f"plot_trajectories: trajectories must be [N, T, D], got shape {traj_NxTxD.shape}")
    n, t, d = traj_NxTxD.shape
    if len(domain_names) != d or len(field_of_domain) != d:
        raise DmaError(
            f"plot_trajectories: {d} domains in trajectories but {len(domain_names)} names "
            f"and {len(field_of_domain)} fields"
        )
    if n_show < 1:
        raise DmaError(f"plot_trajectories: n_show={n_show} must be >= 1")

    fields = list(dict.fromkeys(field_of_domain))
    order = [i for f in fields for i in range(d) if field_of_domain[i] == f]
    colors = [None] * d
    handles = []
    for k, field in enumerate(fields):
        members = [i for i in range(d) if field_of_domain[i] == field]
        shades = matplotlib.colormaps[_FIELD_COLORMAPS[k % len(_FIELD_COLORMAPS)]](
            np.linspace(0.35, 0.9, len(members))
        )
        for i, shade in zip(members, shades):
            colors[i] = shade
        handles.append(Patch(color=shades[len(members) // 2], label=field))

    shown = np.unique(np.linspace(0, n - 1, min(n_show, n)).round().astype(int))
    ncols = min(3, shown.size)
    nrows = -(-shown.size // ncols)
    fig = Figure(figsize=(4.0 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    steps_T = np.arange(t)
    for ax, idx in zip(axes.flat, shown):
        ax.stackplot(steps_T, traj_NxTxD[idx][:, order].T, colors=[colors[i] for i in order], linewidth=0)
        ax.set(title=f"trajectory {idx}", xlim=(0, max(t - 1, 1)), ylim=(0, 1),
               xlabel="re-weighting step", ylabel="weight")
    for ax in axes.flat[shown.size:]:
        ax.set_axis_off()
    fig.legend(handles=handles, loc="outside right upper", title="field")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def field_shares(weights_NxTxD: np.ndarray, domain_fields: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(fields in first-seen order, shares [N, T, F]): each field's total weight at each step."""
    fields = list(dict.fromkeys(domain_fields))
    onehot_DxF = np.array([[f == g for g in fields] for f in domain_fields], np.float64)
    return fields, np.asarray(weights_NxTxD, np.float64) @ onehot_DxF


def percentile_rank(values_N: np.ndarray, x: float) -> float:
    """Where x sits among the values, in percent: the share of values below x plus half the share equal to it."""
    values_N = np.asarray(values_N, np.float64)
    return float(100.0 * (np.mean(values_N < x) + 0.5 * np.mean(values_N == x)))


def _checked(weights_NxTxD, domain_names, domain_fields, who: str) -> np.ndarray:
    w = np.asarray(weights_NxTxD, np.float64)
    if w.ndim != 3 or 0 in w.shape:
        raise DmaError(f"{who}: trajectories must be a non-empty [N, T, D], got shape {w.shape}")
    if len(domain_names) != w.shape[2] or len(domain_fields) != w.shape[2]:
        raise DmaError(f"{who}: {w.shape[2]} domains in trajectories but {len(domain_names)} names "
                       f"and {len(domain_fields)} fields")
    return w


def coverage_markdown(weights_NxTxD: np.ndarray, domain_names: Sequence[str], domain_fields: Sequence[str]) -> str:
    """Per step, each field share's 5th / 50th / 95th percentile over trajectories (`np.percentile`, linear);
    per domain, the lowest 5th and the highest 95th percentile of its weight over the steps."""
    w_NxTxD = _checked(weights_NxTxD, domain_names, domain_fields, "coverage")
    n, t, d = w_NxTxD.shape
    fields, share_NxTxF = field_shares(w_NxTxD, domain_fields)
    lo_F, mid_F, hi_F = (np.percentile(share_NxTxF, q, axis=0) for q in ENVELOPE)  # each [T, F]
    lines = ["# Coverage of the sweep's trajectories", "",
             f"{n} trajectories, {t} re-weighting steps, {d} domains. The agent learns only from mixtures like "
             "these: a policy far outside this envelope acts where the offline data has no example.", "",
             "## Field shares (5th / 50th / 95th percentile over trajectories)", "",
             "| step | " + " | ".join(fields) + " |", "|---:|" + "---|" * len(fields)]
    lines += [f"| {s} | " + " | ".join(f"{lo_F[s, k]:.4f} / {mid_F[s, k]:.4f} / {hi_F[s, k]:.4f}"
                                      for k in range(len(fields))) + " |" for s in range(t)]
    lo_TxD, hi_TxD = (np.percentile(w_NxTxD, q, axis=0) for q in (ENVELOPE[0], ENVELOPE[2]))
    lines += ["", "## Domain weights (lowest 5th and highest 95th percentile over the steps)", "",
              "| domain | field | min over steps of p5 | max over steps of p95 |", "|---|---|---:|---:|"]
    lines += [f"| {domain_names[i]} | {domain_fields[i]} | {lo_TxD[:, i].min():.4f} | {hi_TxD[:, i].max():.4f} |"
              for i in range(d)]
    return "\n".join(lines) + "\n"


def plot_coverage(weights_NxTxD: np.ndarray, domain_names: Sequence[str], domain_fields: Sequence[str],
                  path) -> None:
    """PNG, one column per field: its share's 5-95 % envelope and median over trajectories (top), and each
    of its domains' weight envelope and median (bottom), per re-weighting step. Written atomically."""
    w_NxTxD = _checked(weights_NxTxD, domain_names, domain_fields, "plot_coverage")
    fields, share_NxTxF = field_shares(w_NxTxD, domain_fields)
    steps_T = np.arange(w_NxTxD.shape[1])
    fig = Figure(figsize=(4.4 * len(fields), 6.4), layout="constrained")
    axes = fig.subplots(2, len(fields), squeeze=False)
    for k, field in enumerate(fields):
        cmap = matplotlib.colormaps[_FIELD_COLORMAPS[k % len(_FIELD_COLORMAPS)]]
        lo_T, mid_T, hi_T = np.percentile(share_NxTxF[:, :, k], ENVELOPE, axis=0)
        axes[0, k].fill_between(steps_T, lo_T, hi_T, color=cmap(0.5), alpha=0.35, linewidth=0, label="5-95 %")
        axes[0, k].plot(steps_T, mid_T, color=cmap(0.85), label="median")
        axes[0, k].set(title=f"{field} share", ylim=(0, 1), xlabel="re-weighting step", ylabel="share")
        axes[0, k].legend(loc="best", fontsize="small")
        members = [i for i, f in enumerate(domain_fields) if f == field]
        for i, shade in zip(members, np.linspace(0.35, 0.9, len(members))):
            lo_T, mid_T, hi_T = np.percentile(w_NxTxD[:, :, i], ENVELOPE, axis=0)
            axes[1, k].fill_between(steps_T, lo_T, hi_T, color=cmap(shade), alpha=0.2, linewidth=0)
            axes[1, k].plot(steps_T, mid_T, color=cmap(shade), label=domain_names[i])
        axes[1, k].set(title=f"{field} domains", ylim=(0, None), xlabel="re-weighting step", ylabel="weight")
        if len(members) <= 10:
            axes[1, k].legend(loc="best", fontsize="x-small")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Coverage of {w_NxTxD.shape[0]} trajectories: 5-95 % envelope and median")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def write_coverage(weights_NxTxD: np.ndarray, domain_names: Sequence[str], domain_fields: Sequence[str],
                   plot_path, table_path) -> None:
    """`plot_coverage` to plot_path and `coverage_markdown` to table_path, both atomically."""
    plot_coverage(weights_NxTxD, domain_names, domain_fields, plot_path)
    atomic_write_text(table_path, coverage_markdown(weights_NxTxD, domain_names, domain_fields))


def share_percentiles(weights_NxTxD: np.ndarray, domain_fields: Sequence[str], field: str,
                      share_T: np.ndarray) -> np.ndarray | None:
    """[T]: the `percentile_rank` of share_T[t] (a run's share of `field` over its own T steps) among the
    trajectories' shares at the step covering the same fraction of training, floor(t * T_sweep / T); None when
    no trajectory domain is in `field`."""
    fields, share_NxTxF = field_shares(weights_NxTxD, domain_fields)
    if field not in fields:
        return None
    sweep_NxT = share_NxTxF[:, :, fields.index(field)]
    step_T = np.arange(len(share_T)) * sweep_NxT.shape[1] // len(share_T)
    return np.array([percentile_rank(sweep_NxT[:, s], x) for s, x in zip(step_T, share_T)])

"""Trajectory sampler: N mixture trajectories [N, T, D] with inductive biases.

The sweep trains one proxy per trajectory, so these trajectories are the
behaviour data the agent learns from. Biases (DESIGN.md step 3):
- start near the source distribution (source domains by size, a small target share);
- move smoothly: the next mixture is drawn from a Dirichlet centred on the current one;
- drift toward the target field at a per-trajectory random rate;
- keep exploring: a share of trajectories take much wider steps.
Every domain outside `target_field` counts as source. Deterministic per seed.
"""

import io
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dma_jax.config import SamplerConfig
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes

_FIELD_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


def _field_distributions(field_of_domain, domain_sizes, target_field, params):
    """Start mean and target distribution [D], both on the simplex."""
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
    source_D /= source_D.sum()
    target_D /= target_D.sum()
    start_D = (1.0 - params.init_target_share) * source_D + params.init_target_share * target_D
    return start_D, target_D


def _dirichlet(rng, alpha_NxD, min_weight):
    """One Dirichlet draw per row (via normalised gammas), floored and renormalised."""
    gamma_NxD = rng.standard_gamma(alpha_NxD)
    total_Nx1 = gamma_NxD.sum(axis=1, keepdims=True)
    w_NxD = gamma_NxD / np.maximum(total_Nx1, np.finfo(np.float64).tiny)
    w_NxD = np.maximum(w_NxD, min_weight)
    return w_NxD / w_NxD.sum(axis=1, keepdims=True)


def sample_trajectories(
    n: int,
    t: int,
    field_of_domain: Sequence[str],
    domain_sizes: Sequence[float],
    target_field: str,
    params: SamplerConfig,
    seed: int,
) -> np.ndarray:
    """Draw n trajectories of t mixtures over D domains: float32 [N, T, D] on the simplex."""
    if n < 1 or t < 1:
        raise DmaError(f"trajectories: n={n} and t={t} must both be >= 1")
    start_D, target_D = _field_distributions(field_of_domain, domain_sizes, target_field, params)
    rng = np.random.default_rng(seed)
    lo, hi = params.drift_rate_range
    rate_Nx1 = rng.uniform(lo, hi, size=(n, 1))
    is_wide_N = np.zeros(n, dtype=bool)
    is_wide_N[rng.permutation(n)[: int(round(params.wide_share * n))]] = True
    conc_Nx1 = np.where(is_wide_N, params.wide_concentration, params.step_concentration)[:, None]

    traj_NxTxD = np.empty((n, t, start_D.size), dtype=np.float64)
    alpha_NxD = np.broadcast_to(params.init_concentration * start_D[None, :], (n, start_D.size))
    traj_NxTxD[:, 0] = _dirichlet(rng, alpha_NxD, params.min_weight)
    for step in range(1, t):
        mean_NxD = (1.0 - rate_Nx1) * traj_NxTxD[:, step - 1] + rate_Nx1 * target_D[None, :]
        traj_NxTxD[:, step] = _dirichlet(rng, conc_Nx1 * mean_NxD, params.min_weight)
    return traj_NxTxD.astype(np.float32)


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

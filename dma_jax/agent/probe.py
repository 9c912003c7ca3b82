"""What the trained critic believes about the target share (issue 18's "2b question").

`q_vs_share`: at every state of the offline data (trajectory n, re-weighting step t), the critic's Q of the
mixture with target share p (spread uniformly over the domains of each side), for a grid of p; averaged over the
trajectories it gives one curve per step. A critic that learned the response surface peaks inside (0, 1); one
that only learned where the data are peaks where the data's shares are. `plot_q_vs_share` draws the curves of
several agents (e.g. agent seeds) side by side, with the data's mean share per step marked.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from dma_jax import offline_data
from dma_jax.agent.features import FeatureStats, FeedbackLayout, trajectories
from dma_jax.agent.runner import load_trained_critic
from dma_jax.io_utils import AnyPath, atomic_write_bytes

SHARES = tuple(float(x) for x in np.round(np.linspace(0.0, 1.0, 21), 2))


def share_actions(domain_fields: Sequence[str], target_field: str, shares: Sequence[float]) -> np.ndarray:
    """[P, D]: target share p over the target field's domains, 1 - p over the others, uniform within each side."""
    is_t = np.array([f == target_field for f in domain_fields])
    side = np.where(is_t, 1.0 / is_t.sum(), 1.0 / (~is_t).sum())
    return np.stack([np.where(is_t, p, 1.0 - p) * side for p in shares]).astype(np.float32)


def q_vs_share(agent_out: AnyPath, dataset_dir: AnyPath, shares: Sequence[float] = SHARES,
               reduce: str = "min") -> dict:
    """{"shares" [P], "q_TxP" (mean over trajectories of the twin critics' min, or mean with reduce="mean"),
    "data_share_T" (the data's mean target share per step), "q_data_T" (Q of the data's own actions)}."""
    agent, critic, spec = load_trained_critic(agent_out)
    ds = offline_data.load(dataset_dir)
    stats = FeatureStats.from_json(spec["feature_stats"], f"{agent_out}: feature_stats")
    data = trajectories(ds.actions, ds.feedback, ds.rewards, FeedbackLayout.from_meta(ds.meta), stats)
    fields, tf = ds.meta["domain_fields"], ds.meta["target_field"]
    a_PxD = share_actions(fields, tf, shares)
    N, T, D = ds.actions.shape

    @jax.jit
    def q(critic, dom, glob, actions_AxNxTxD):
        ctx, emb = agent.encode(critic, dom, glob)
        q_2xAxNxT = agent.q(critic, ctx[:, :-1], emb[:, :-1], actions_AxNxTxD)
        q_AxNxT = q_2xAxNxT.min(0) if reduce == "min" else q_2xAxNxT.mean(0)
        return q_AxNxT.mean(1)  # [A, T]

    grid = jnp.broadcast_to(jnp.asarray(a_PxD)[:, None, None], (len(shares), N, T, D))
    q_PxT = np.asarray(q(critic, data.dom_NxT1xDxF, data.glob_NxT1xG, grid))
    q_data_T = np.asarray(q(critic, data.dom_NxT1xDxF, data.glob_NxT1xG, jnp.asarray(data.actions_NxTxD)[None]))[0]
    is_t = np.array([f == tf for f in fields])
    return {"shares": list(shares), "q_TxP": q_PxT.T.tolist(), "q_data_T": q_data_T.tolist(),
            "data_share_T": ds.actions[..., is_t].sum(-1).mean(0).tolist()}


def plot_q_vs_share(curves: Mapping[str, dict], path: AnyPath) -> None:
    """One panel per agent: Q against the target share, one line per re-weighting step (dark: early), the data's
    mean share per step as a tick on its line."""
    fig = Figure(figsize=(4.2 * len(curves), 3.4), layout="constrained")
    for ax, (name, c) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items()):
        q_TxP, shares = np.asarray(c["q_TxP"]), np.asarray(c["shares"])
        cmap = colormaps["viridis"]
        for t, row in enumerate(q_TxP):
            color = cmap(t / max(len(q_TxP) - 1, 1))
            ax.plot(shares, row, color=color, lw=1.2, label=f"t={t}" if t in (0, len(q_TxP) - 1) else None)
            s = c["data_share_T"][t]
            ax.plot([s], [np.interp(s, shares, row)], "|", color=color, ms=10)
        ax.set(title=name, xlabel="target share", ylabel="Q (mean over the offline states)")
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())

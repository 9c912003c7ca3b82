"""SFT warm-up: behaviour cloning of the actor on the top-q % of trajectories by return.

The loss is the Dirichlet negative log-likelihood of the logged mixtures,
-mean_{b,t} log pi(a_{b,t} | h_{b,t}), so both the policy's mean and its spread
are fitted. Trajectories live on the device; batches are drawn inside jit and
`n_updates` steps run under one `lax.scan` per dispatch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dma_jax import numerics
from dma_jax.agent import distributions as dist
from dma_jax.agent.features import Trajectories
from dma_jax.agent.model import AgentDef, Params
from dma_jax.agent.optim import flat_init, flat_step, sample_batch


class SftState(NamedTuple):
    step: jax.Array  # int32 scalar
    actor: Params
    opt_state: Any
    key: jax.Array  # uint32[2]


def top_trajectories(returns_N: np.ndarray, top_percent: float) -> np.ndarray:
    """Indices of the ceil(N * q / 100) highest-return trajectories (at least one), best first."""
    k = max(1, math.ceil(len(returns_N) * top_percent / 100.0 - 1e-9))
    return np.argsort(-np.asarray(returns_N), kind="stable")[:k]


def bc_loss(actor: Params, agent: AgentDef, batch: Trajectories) -> tuple[jax.Array, dict]:
    """Dirichlet NLL of the logged mixtures at the T decision steps (tokens 0..T-1)."""
    alpha_BxTxD = agent.concentrations(actor, batch.dom_NxT1xDxF, batch.glob_NxT1xG)[:, :-1]
    nll = -dist.log_prob(alpha_BxTxD, batch.actions_NxTxD).mean()
    l1 = jnp.abs(dist.mean(alpha_BxTxD) - batch.actions_NxTxD).sum(-1).mean()
    return nll, {"bc_nll": nll, "entropy": dist.entropy(alpha_BxTxD).mean(), "mean_l1_to_data": l1}


def init_state(actor: Params, tx: optax.GradientTransformation, seed: int) -> SftState:
    return SftState(jnp.zeros((), jnp.int32), actor, flat_init(tx, actor), jax.random.PRNGKey(seed))


def make_sft_step(agent: AgentDef, tx: optax.GradientTransformation, batch_size: int, n_updates: int,
                  skip_bad: bool = False):
    """A jitted `(state, data[, max_loss]) -> (state, metrics)` running `n_updates` BC steps; metrics are their mean.

    `skip_bad` (agent.on_nonfinite=skip): an update with NaN/Inf metrics or bc_nll > max_loss is skipped.
    """

    def one_update(state: SftState, data: Trajectories) -> tuple[SftState, dict]:
        key, k_batch = jax.random.split(state.key)
        batch = sample_batch(k_batch, data, batch_size)
        (_, metrics), grads = jax.value_and_grad(bc_loss, has_aux=True)(state.actor, agent, batch)
        actor, opt_state = flat_step(tx, grads, state.opt_state, state.actor)
        return SftState(state.step + 1, actor, opt_state, key), dict(metrics, grad_norm=optax.global_norm(grads))

    def dispatch(state: SftState, data: Trajectories, max_loss=float("inf")) -> tuple[SftState, dict]:
        return numerics.guarded_scan(lambda s: one_update(s, data), state, n_updates, "bc_nll",
                                     max_loss if skip_bad else None)

    return jax.jit(dispatch, donate_argnums=0)

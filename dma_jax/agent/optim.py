"""Optimizer and batch helpers shared by SFT and CQL: Adam with clipping on raveled parameters, whole-
trajectory batches drawn inside jit."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dma_jax.agent.features import Trajectories
from dma_jax.agent.model import Params


def adam(lr: float, grad_clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(lr))


# Optimizers run on the parameters raveled into one vector: the same arithmetic as per leaf,
# but one fused update instead of one per leaf (a quarter of the compile time on CPU).
def flat_init(tx: optax.GradientTransformation, params: Params) -> Any:
    return tx.init(ravel_pytree(params)[0])


def flat_step(tx: optax.GradientTransformation, grads: Params, opt_state: Any, params: Params) -> tuple[Params, Any]:
    """One optimizer step on raveled parameters; returns (new params, new optimizer state)."""
    params_P, unravel = ravel_pytree(params)
    updates_P, opt_state = tx.update(ravel_pytree(grads)[0], opt_state, params_P)
    return unravel(params_P + updates_P), opt_state


def sample_batch(key: jax.Array, data: Trajectories, batch_size: int) -> Trajectories:
    """`batch_size` whole trajectories drawn uniformly with replacement (inside jit)."""
    idx_B = jax.random.randint(key, (batch_size,), 0, data.actions_NxTxD.shape[0])
    return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), data)

"""Conservative Q-learning (CQL(H)) with a SAC-style actor and twin critics, on whole trajectories.

A batch holds B trajectories; one encoder pass over tokens 0..T gives the state
h_t at every step, so s = tokens 0..T-1 and s' = tokens 1..T. Per critic i:

  y          = scale * r_t + discount * (1 - done_t) * [min_j Qbar_j(s', a') - [backup] a_ent log pi(a'|s')],
               a' ~ pi(.|s'), Qbar the Polyak-averaged target critics;
  bellman_i  = mean_{b,t} (Q_i(s, a_data) - y)^2;
  penalty_i  = mean_{b,t} [ tau * (logsumexp_k(Q_i(s, a_k) / tau - log(mu_k(a_k) / u)) - log A) - Q_i(s, a_data) ],
               with A = 3n proposals a_k: n uniform on the simplex (density u = (D-1)!), n from pi(.|s), n
               from pi(.|s'), each importance-weighted by u / its own density mu_k: the first term estimates
               tau * log E_{a ~ uniform}[exp(Q(s, a) / tau)], a soft maximum of Q over the simplex, so the
               penalty ("cql_gap") reads in units of Q: 0 when Q is flat, > 0 when some action beats the data;
  critic loss = sum_i bellman_i + alpha_cql * sum_i penalty_i.

Actor: mean_{b,t} [a_ent log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s) reparameterised, plus
bc_weight * (-log pi(a_data|s)). a_ent is tuned so the policy entropy tracks a target;
with `lagrange`, alpha_cql is tuned to hold the penalty at `target_gap`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dma_jax import numerics
from dma_jax.agent import distributions as dist
from dma_jax.config import CqlConfig
from dma_jax.agent.features import Trajectories
from dma_jax.agent.model import AgentDef, Params
from dma_jax.agent.optim import adam, flat_init, flat_step, sample_batch

_LOG_ALPHA_CQL_MAX = math.log(1e6)


class CqlState(NamedTuple):
    step: jax.Array  # int32 scalar
    actor: Params
    critic: Params
    target_critic: Params
    actor_opt: Any
    critic_opt: Any
    log_alphas: dict  # {"entropy": scalar, "cql": scalar}
    alphas_opt: Any
    key: jax.Array  # uint32[2]


class CqlSamples(NamedTuple):
    """Everything the critic loss needs besides the critic: no gradient flows into it."""

    target_BxT: jax.Array
    next_actions_BxTxD: jax.Array  # a' ~ pi(.|s') used in the target
    next_logp_BxT: jax.Array
    ood_actions_AxBxTxD: jax.Array  # A = 3n: uniform, pi(.|s), pi(.|s')
    ood_logp_AxBxT: jax.Array  # log density of each action under its own proposal


@dataclasses.dataclass(frozen=True)
class CqlSetup:
    """The static part of a CQL run: networks, hyper-parameters, and two dataset-derived numbers."""

    agent: AgentDef
    cfg: CqlConfig
    grad_clip: float
    target_entropy: float
    reward_scale: float

    @property
    def tx_actor(self) -> optax.GradientTransformation:
        return adam(self.cfg.actor_lr, self.grad_clip)

    @property
    def tx_critic(self) -> optax.GradientTransformation:
        return adam(self.cfg.critic_lr, self.grad_clip)

    @property
    def tx_alphas(self) -> optax.GradientTransformation:
        return optax.adam(self.cfg.alpha_lr)


def alpha_values(log_alphas: dict, cfg: CqlConfig) -> tuple[jax.Array, jax.Array]:
    """(entropy temperature, CQL weight); the weight is `cfg.alpha` unless Lagrange-tuned (then capped at 1e6)."""
    weight = jnp.exp(jnp.minimum(log_alphas["cql"], _LOG_ALPHA_CQL_MAX)) if cfg.lagrange else jnp.float32(cfg.alpha)
    return jnp.exp(log_alphas["entropy"]), weight


def init_state(setup: CqlSetup, actor: Params, critic: Params, seed: int) -> CqlState:
    cfg = setup.cfg
    log_alphas = {"entropy": jnp.log(jnp.float32(cfg.entropy_alpha)),
                  "cql": jnp.log(jnp.float32(max(cfg.alpha, 1e-30)))}
    return CqlState(
        jnp.zeros((), jnp.int32), actor, critic, jax.tree.map(jnp.copy, critic),
        flat_init(setup.tx_actor, actor), flat_init(setup.tx_critic, critic), log_alphas,
        setup.tx_alphas.init(log_alphas),
        jax.random.PRNGKey(seed),
    )


def cql_samples(key: jax.Array, alpha_BxT1xD: jax.Array, target_critic: Params, batch: Trajectories,
                setup: CqlSetup, alpha_entropy: jax.Array) -> CqlSamples:
    """Draws and Bellman targets, given the policy's concentrations at tokens 0..T."""
    cfg, agent, n = setup.cfg, setup.agent, setup.cfg.n_actions
    alpha_BxT1xD = jax.lax.stop_gradient(alpha_BxT1xD)
    B, T1, D = alpha_BxT1xD.shape
    T = T1 - 1
    cur_alpha_BxTxD, next_alpha_BxTxD = alpha_BxT1xD[:, :-1], alpha_BxT1xD[:, 1:]
    # One sampler call for every draw: a' for the target, then n uniform, n from pi(.|s), n from pi(.|s').
    ones_nxBxTxD = jnp.ones((n, B, T, D), jnp.float32)
    alphas_SxBxTxD = jnp.concatenate([next_alpha_BxTxD[None], ones_nxBxTxD, ones_nxBxTxD * cur_alpha_BxTxD[None],
                                      ones_nxBxTxD * next_alpha_BxTxD[None]])
    draws_SxBxTxD = dist.sample_each(key, alphas_SxBxTxD)
    logp_SxBxT = dist.log_prob(alphas_SxBxTxD, draws_SxBxTxD)

    next_1xBxTxD = draws_SxBxTxD[:1]
    ctx_BxT1xH, emb_BxT1xDxH = agent.encode(target_critic, batch.dom_NxT1xDxF, batch.glob_NxT1xG)
    v_next_BxT = agent.q(target_critic, ctx_BxT1xH[:, 1:], emb_BxT1xDxH[:, 1:], next_1xBxTxD).min(0)[0]
    if cfg.backup_entropy:
        v_next_BxT = v_next_BxT - alpha_entropy * logp_SxBxT[0]
    not_done_1xT = (jnp.arange(T) < T - 1).astype(jnp.float32)[None]
    target_BxT = setup.reward_scale * batch.rewards_NxT + cfg.discount * not_done_1xT * v_next_BxT
    samples = CqlSamples(target_BxT, draws_SxBxTxD[0], logp_SxBxT[0], draws_SxBxTxD[1:], logp_SxBxT[1:])
    return jax.tree.map(jax.lax.stop_gradient, samples)


def critic_loss(critic: Params, agent: AgentDef, batch: Trajectories, samples: CqlSamples, cql_weight: jax.Array,
                temperature: float) -> tuple[jax.Array, dict]:
    ctx_BxT1xH, emb_BxT1xDxH = agent.encode(critic, batch.dom_NxT1xDxF, batch.glob_NxT1xG)
    actions_AxBxTxD = jnp.concatenate([batch.actions_NxTxD[None], samples.ood_actions_AxBxTxD])
    q_2xAxBxT = agent.q(critic, ctx_BxT1xH[:, :-1], emb_BxT1xDxH[:, :-1], actions_AxBxTxD)
    q_data_2xBxT, q_ood_2xAxBxT = q_2xAxBxT[:, 0], q_2xAxBxT[:, 1:]
    bellman_2 = ((q_data_2xBxT - samples.target_BxT[None]) ** 2).mean(axis=(1, 2))
    n_ood, D = q_ood_2xAxBxT.shape[1], samples.ood_actions_AxBxTxD.shape[-1]
    log_ratio_AxBxT = samples.ood_logp_AxBxT - dist.uniform_log_prob(D)  # proposal density / uniform density
    weighted_2xAxBxT = q_ood_2xAxBxT / temperature - log_ratio_AxBxT[None]
    soft_max_2xBxT = temperature * (jax.nn.logsumexp(weighted_2xAxBxT, axis=1) - math.log(n_ood))
    penalty_2 = (soft_max_2xBxT - q_data_2xBxT).mean(axis=(1, 2))
    loss = bellman_2.sum() + cql_weight * penalty_2.sum()
    n = n_ood // 3
    metrics = {
        "critic_loss": loss, "bellman": bellman_2.mean(), "cql_gap": penalty_2.mean(),
        "q_data": q_data_2xBxT.mean(), "q_random": q_ood_2xAxBxT[:, :n].mean(),
        "q_policy": q_ood_2xAxBxT[:, n:2 * n].mean(),
    }
    return loss, metrics


def actor_loss(alpha_BxTxD: jax.Array, critic: Params, agent: AgentDef, batch: Trajectories, key: jax.Array,
               alpha_entropy: jax.Array, bc_weight: float) -> tuple[jax.Array, dict]:
    """The actor loss as a function of the policy's concentrations at the T decision steps."""
    a_1xBxTxD = dist.sample(key, alpha_BxTxD, 1)
    logp_BxT = dist.log_prob(alpha_BxTxD, a_1xBxTxD[0])
    critic = jax.lax.stop_gradient(critic)
    ctx_BxT1xH, emb_BxT1xDxH = agent.encode(critic, batch.dom_NxT1xDxF, batch.glob_NxT1xG)
    q_BxT = agent.q(critic, ctx_BxT1xH[:, :-1], emb_BxT1xDxH[:, :-1], a_1xBxTxD).min(0)[0]
    bc_nll = -dist.log_prob(alpha_BxTxD, batch.actions_NxTxD).mean()
    loss = (alpha_entropy * logp_BxT - q_BxT).mean() + bc_weight * bc_nll
    entropy = dist.entropy(alpha_BxTxD).mean()
    return loss, {"actor_loss": loss, "bc_nll": bc_nll, "entropy": entropy}


def update(state: CqlState, data: Trajectories, setup: CqlSetup, batch_size: int) -> tuple[CqlState, dict]:
    """One CQL step: critic, then actor (against the new critic), then temperatures, then targets."""
    cfg = setup.cfg
    key, k_batch, k_samples, k_actor = jax.random.split(state.key, 4)
    batch = sample_batch(k_batch, data, batch_size)
    alpha_entropy, alpha_cql = alpha_values(state.log_alphas, cfg)

    # One actor pass serves the samples and the actor loss; the loss's gradient is pulled back through it.
    alpha_BxT1xD, actor_vjp = jax.vjp(
        lambda actor: setup.agent.concentrations(actor, batch.dom_NxT1xDxF, batch.glob_NxT1xG), state.actor)

    samples = cql_samples(k_samples, alpha_BxT1xD, state.target_critic, batch, setup, alpha_entropy)
    (_, c_metrics), c_grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic, setup.agent, batch, samples, alpha_cql, cfg.temperature)
    critic, critic_opt = flat_step(setup.tx_critic, c_grads, state.critic_opt, state.critic)

    (_, a_metrics), d_alpha_BxTxD = jax.value_and_grad(actor_loss, has_aux=True)(
        alpha_BxT1xD[:, :-1], critic, setup.agent, batch, k_actor, alpha_entropy, cfg.bc_weight)
    (a_grads,) = actor_vjp(jnp.concatenate([d_alpha_BxTxD, jnp.zeros_like(alpha_BxT1xD[:, -1:])], axis=1))
    actor, actor_opt = flat_step(setup.tx_actor, a_grads, state.actor_opt, state.actor)

    def temperature_loss(log_alphas: dict) -> jax.Array:
        _, weight = alpha_values(log_alphas, cfg)
        loss = -weight * (c_metrics["cql_gap"] - cfg.target_gap) if cfg.lagrange else jnp.float32(0.0)
        if cfg.auto_entropy:
            loss = loss + log_alphas["entropy"] * (a_metrics["entropy"] - setup.target_entropy)
        return loss

    alpha_grads = jax.grad(temperature_loss)(state.log_alphas)
    alpha_updates, alphas_opt = setup.tx_alphas.update(alpha_grads, state.alphas_opt, state.log_alphas)
    log_alphas = optax.apply_updates(state.log_alphas, alpha_updates)
    target_critic = optax.incremental_update(critic, state.target_critic, cfg.polyak)

    metrics = dict(c_metrics, **a_metrics, alpha_entropy=alpha_entropy, alpha_cql=alpha_cql)
    return CqlState(state.step + 1, actor, critic, target_critic, actor_opt, critic_opt, log_alphas, alphas_opt,
                    key), metrics


def make_cql_step(setup: CqlSetup, batch_size: int, n_updates: int, skip_bad: bool = False):
    """A jitted `(state, data[, max_loss]) -> (state, metrics)` running `n_updates` CQL steps under `lax.scan`.

    `skip_bad` (agent.on_nonfinite=skip): an update with NaN/Inf metrics or critic_loss > max_loss is skipped.
    """

    def dispatch(state: CqlState, data: Trajectories, max_loss=float("inf")) -> tuple[CqlState, dict]:
        return numerics.guarded_scan(lambda s: update(s, data, setup, batch_size), state, n_updates, "critic_loss",
                                     max_loss if skip_bad else None)

    return jax.jit(dispatch, donate_argnums=0)

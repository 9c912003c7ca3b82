"""CQL: the critic loss and its gradient against numpy, the SAC limit, and conservatism on a toy problem."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from dma_jax.agent import cql, distributions as dist
from dma_jax.config import AgentModelConfig, CqlConfig
from dma_jax.agent.features import (DOMAIN_FEATURES, GLOBAL_FEATURES, FeatureStats, FeedbackLayout, Trajectories,
                                    history_features, trajectories)
from dma_jax.agent.model import AgentDef
from tests.toy_env import ToyEnv

MODEL = AgentModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, concentration_range=(2.0, 50.0))
B, T, D = 3, 3, 4


@pytest.fixture(scope="module")
def fixed():
    """A fixed batch, fixed actor / critic / target parameters, and jitted views of the networks."""
    agent = AgentDef.build(MODEL)
    actor, critic = agent.init(0)
    target = agent.init(1)[1]
    rng = np.random.default_rng(0)
    batch = Trajectories(
        rng.normal(size=(B, T + 1, D, len(DOMAIN_FEATURES))).astype(np.float32),
        rng.normal(size=(B, T + 1, len(GLOBAL_FEATURES))).astype(np.float32),
        rng.dirichlet(np.ones(D), size=(B, T)).astype(np.float32),
        rng.normal(size=(B, T)).astype(np.float32),
    )
    conc = jax.jit(agent.concentrations)

    @functools.partial(jax.jit, static_argnums=3)
    def q_at(critic, batch, actions_AxBxLxD, shift):
        """Q of actions at states s (shift 0: tokens 0..T-1) or s' (shift 1: tokens 1..T)."""
        ctx, emb = agent.encode(critic, batch.dom_NxT1xDxF, batch.glob_NxT1xG)
        return agent.q(critic, ctx[:, shift:shift + T], emb[:, shift:shift + T], actions_AxBxLxD)

    @jax.jit
    def loss_and_grad(critic, samples, weight, tau):
        return jax.value_and_grad(cql.critic_loss, has_aux=True)(critic, agent, batch, samples, weight, tau)

    return agent, actor, critic, target, batch, conc, q_at, loss_and_grad


def _logpdf(x_D, alpha_D):
    x_D = np.asarray(x_D, np.float64)
    return scipy.stats.dirichlet.logpdf(x_D / x_D.sum(), alpha_D)  # scipy wants the sum exact in float64


def _samples(fixed, cfg, alpha_entropy=0.3, scale=2.0):
    agent, actor, critic, target, batch = fixed[:5]
    setup = cql.CqlSetup(agent, cfg, 1.0, -1.0, scale)
    alpha = agent.concentrations(actor, batch.dom_NxT1xDxF, batch.glob_NxT1xG)
    fn = jax.jit(lambda key: cql.cql_samples(key, alpha, target, batch, setup, jnp.float32(alpha_entropy)))
    return jax.tree.map(np.asarray, fn(jax.random.PRNGKey(7)))


def _numpy_target(fixed, cfg, samples, alpha_entropy=0.3, scale=2.0):
    """y = scale * r + discount * (t < T-1) * (min_i Qbar_i(s', a') - [backup] a_ent * log pi(a'|s')), in numpy."""
    _, actor, _, target, batch, conc, q_at, _ = fixed
    alpha_next = np.asarray(conc(actor, batch.dom_NxT1xDxF, batch.glob_NxT1xG), np.float64)[:, 1:]
    logp = np.array([[_logpdf(samples.next_actions_BxTxD[b, t], alpha_next[b, t]) for t in range(T)]
                     for b in range(B)])
    q_next = np.asarray(q_at(target, batch, samples.next_actions_BxTxD[None], 1), np.float64).min(0)[0]
    v = q_next - (alpha_entropy * logp if cfg.backup_entropy else 0.0)
    not_done = (np.arange(T) < T - 1).astype(np.float64)
    return scale * batch.rewards_NxT + cfg.discount * not_done[None] * v, logp


def test_samples_targets_and_proposal_densities(fixed):
    _, actor, _, _, batch, conc, _, _ = fixed
    cfg = CqlConfig(n_actions=4, discount=0.9, backup_entropy=True)
    s = _samples(fixed, cfg)
    y, logp_next = _numpy_target(fixed, cfg, s)
    np.testing.assert_allclose(s.target_BxT, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.next_logp_BxT, logp_next, rtol=1e-4, atol=1e-3)
    n = cfg.n_actions
    assert s.ood_actions_AxBxTxD.shape == (3 * n, B, T, D)
    np.testing.assert_allclose(s.ood_actions_AxBxTxD.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(s.ood_logp_AxBxT[:n], math.log(math.factorial(D - 1)), rtol=1e-5)
    alpha = np.asarray(conc(actor, batch.dom_NxT1xDxF, batch.glob_NxT1xG), np.float64)
    for k in range(n, 3 * n):
        a_k = alpha[:, :-1] if k < 2 * n else alpha[:, 1:]  # pi(.|s), then pi(.|s')
        ref = [[_logpdf(s.ood_actions_AxBxTxD[k, b, t], a_k[b, t]) for t in range(T)] for b in range(B)]
        np.testing.assert_allclose(s.ood_logp_AxBxT[k], ref, rtol=1e-4, atol=1e-3)


def _numpy_critic_loss(q_2xAxBxT, y_BxT, ood_logp_KxBxT, weight, tau):
    """Loss and dLoss/dQ of  sum_i mean (Q_i(a_data) - y)^2
    + weight * sum_i mean[tau (lse_k(Q_ik / tau - log(mu_k / u)) - log K) - Q_i(a_data)],  u = (D-1)!.
    """
    q = q_2xAxBxT.astype(np.float64)
    q_data, q_ood = q[:, 0], q[:, 1:]
    K, n_cells = q_ood.shape[1], y_BxT.size
    z = q_ood / tau - (ood_logp_KxBxT[None] - math.log(math.factorial(D - 1)))
    lse = tau * (scipy.special.logsumexp(z, axis=1) - math.log(K))
    loss = ((q_data - y_BxT[None]) ** 2).mean(axis=(1, 2)).sum() + weight * (lse - q_data).mean(axis=(1, 2)).sum()
    d_q = np.zeros_like(q)
    d_q[:, 0] = (2 * (q_data - y_BxT[None]) - weight) / n_cells
    d_q[:, 1:] = weight * scipy.special.softmax(z, axis=1) / n_cells
    return loss, d_q


@pytest.mark.parametrize("weight, tau", [(0.8, 0.7), (2.5, 3.0), (0.0, 1.0)])
def test_critic_loss_and_gradient_match_numpy(fixed, weight, tau):
    """(a) the CQL(H) critic loss and its parameter gradient; weight 0 is (b) the plain SAC critic loss."""
    _, _, critic, _, batch, _, q_at, loss_and_grad = fixed
    cfg = CqlConfig(n_actions=4, discount=0.9, backup_entropy=True)  # as in SAC (weight 0)
    s = _samples(fixed, cfg)
    (loss, metrics), grads = loss_and_grad(critic, s, jnp.float32(weight), jnp.float32(tau))

    actions = np.concatenate([batch.actions_NxTxD[None], s.ood_actions_AxBxTxD])
    q = np.asarray(q_at(critic, batch, actions, 0))
    y, _ = _numpy_target(fixed, cfg, s)
    ref_loss, d_q = _numpy_critic_loss(q, y, s.ood_logp_AxBxT, weight, tau)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-4, abs=1e-4)
    if weight == 0.0:
        sac = ((q[:, 0] - y[None]) ** 2).mean(axis=(1, 2)).sum()
        assert float(loss) == pytest.approx(sac, rel=1e-5)
    # Parameter gradient = (numpy dLoss/dQ) pulled back through the critic network.
    _, vjp = jax.vjp(lambda c: q_at(c, batch, actions, 0), critic)
    (ref_grads,) = vjp(jnp.asarray(d_q, jnp.float32))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-3, atol=2e-5)
    assert float(metrics["q_data"]) == pytest.approx(q[:, 0].mean(), rel=1e-4, abs=1e-5)
    assert float(metrics["q_random"]) == pytest.approx(q[:, 1:5].mean(), rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------ (c) conservatism on narrow behaviour data

T_TOY, A_DATA, A_OOD = 3, np.array([0.1, 0.1, 0.8]), np.array([0.45, 0.45, 0.1], np.float32)


def _narrow_toy():
    env = ToyEnv(["source", "source", "math"], "math", np.tile(A_DATA, (T_TOY, 1)))
    actions = np.random.default_rng(0).dirichlet(400 * A_DATA, size=(256, T_TOY)).astype(np.float32)
    ds = env.dataset(actions)
    layout = FeedbackLayout.from_meta(ds.meta)
    stats = FeatureStats.fit(*history_features(ds.actions, ds.feedback, layout, T_TOY))
    return env, ds, jax.device_put(trajectories(ds.actions, ds.feedback, ds.rewards, layout, stats))


def _train(agent, data, cfg, steps, scale):
    setup = cql.CqlSetup(agent, cfg, 1.0, dist.symmetric_entropy(1.0 + cfg.target_concentration, 3), scale)
    state = cql.init_state(setup, *agent.init(0), 0)
    step_fn = cql.make_cql_step(setup, cfg.batch_size, steps)
    return step_fn(state, data)[0]


def _probe(agent, state, b):
    """Mean min-Q of the data actions and of A_OOD at t = 0, and the policy's mean mixture at every step."""

    @jax.jit
    def run(critic, actor):
        ctx, emb = agent.encode(critic, b.dom_NxT1xDxF, b.glob_NxT1xG)
        q_data = agent.q(critic, ctx[:, :1], emb[:, :1], b.actions_NxTxD[None, :, :1]).min(0)
        ood = jnp.broadcast_to(jnp.asarray(A_OOD), (1, b.actions_NxTxD.shape[0], 1, 3))
        q_ood = agent.q(critic, ctx[:, :1], emb[:, :1], ood).min(0)
        return q_data.mean(), q_ood.mean(), dist.mean(agent.concentrations(actor, b.dom_NxT1xDxF, b.glob_NxT1xG))

    q_data, q_ood, policy = run(state.critic, state.actor)
    return float(q_data), float(q_ood), np.asarray(policy)[:, :-1]


@pytest.mark.slow
def test_cql_is_conservative_where_q_learning_overestimates():
    """(c) Narrow data around a_data: Q-learning (alpha 0) overestimates a far action; CQL ranks it below the data."""
    env, ds, data = _narrow_toy()
    agent = AgentDef.build(MODEL)
    scale = 10.0
    # Upper bound on the true Q of A_OOD at t = 0: play it, then the best possible continuation.
    q_true_ood = scale * env.returns(np.stack([A_OOD, A_DATA, A_DATA])[None])[0]
    results = {}
    for name, alpha in (("sac", 0.0), ("cql", 1.0)):
        cfg = CqlConfig(alpha=alpha, actor_lr=3e-4, batch_size=16, n_actions=5)
        state = _train(agent, data, cfg, 500, scale)
        results[name] = _probe(agent, state, jax.tree.map(lambda x: x[:64], data))
    print({k: v[:2] for k, v in results.items()}, "true Q(ood) <=", q_true_ood)
    sac_data, sac_ood, _ = results["sac"]
    cql_data, cql_ood, cql_policy = results["cql"]
    assert sac_ood > q_true_ood + 1.0  # overestimates the unseen action
    assert cql_ood < cql_data - 1.0  # ranks it below the data actions
    assert cql_ood < q_true_ood  # and is conservative there
    lo, hi = ds.actions.min(axis=(0, 1)), ds.actions.max(axis=(0, 1))
    assert ((cql_policy >= lo) & (cql_policy <= hi)).all(), (cql_policy.min((0, 1)), cql_policy.max((0, 1)), lo, hi)

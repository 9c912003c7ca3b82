import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dma_jax.agent import distributions as dist
from dma_jax.config import AgentConfig, AgentModelConfig
from dma_jax.agent.features import (DOMAIN_FEATURES, GLOBAL_FEATURES, FeatureStats, FeedbackLayout,
                                    history_features)
from dma_jax.agent.model import AgentDef
from dma_jax.errors import DmaError

MODEL = AgentModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, concentration_range=(2.0, 50.0))


# ------------------------------------------------------------------------------------------ distributions


def test_log_prob_and_entropy_match_scipy():
    rng = np.random.default_rng(0)
    for d in (2, 3, 7):
        alpha_NxD = rng.uniform(0.3, 20.0, size=(6, d))
        x_NxD = rng.dirichlet(np.ones(d), size=6)
        ours = np.asarray(dist.log_prob(jnp.asarray(alpha_NxD, jnp.float32), jnp.asarray(x_NxD, jnp.float32)))
        ref = [scipy.stats.dirichlet.logpdf(x, a) for a, x in zip(alpha_NxD, x_NxD)]
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-3)
        ent = np.asarray(dist.entropy(jnp.asarray(alpha_NxD, jnp.float32)))
        np.testing.assert_allclose(ent, [scipy.stats.dirichlet.entropy(a) for a in alpha_NxD], rtol=2e-4, atol=2e-3)


def test_uniform_log_density_is_log_factorial():
    for d in range(2, 60):
        assert dist.uniform_log_prob(d) == pytest.approx(math.log(math.factorial(d - 1)), rel=1e-6)


@pytest.mark.parametrize("d", [3, 12])
def test_uniform_on_the_simplex(d):
    x_NxD = np.asarray(_sample_each(jax.random.key(d), jnp.ones((4000, d))), np.float64)
    np.testing.assert_allclose(x_NxD.sum(-1), 1.0, atol=1e-5)
    assert x_NxD.min() >= dist.EPS * 0.99
    # The marginal of a uniform point on the simplex is Beta(1, d - 1).
    assert scipy.stats.kstest(x_NxD[:, 0], scipy.stats.beta(1, d - 1).cdf).pvalue > 1e-3


_sample_each = jax.jit(dist.sample_each)


def test_samples_have_dirichlet_moments_and_reparameterised_gradients():
    alpha_D = jnp.array([2.0, 3.0, 5.0])
    a0 = 10.0
    x_NxD = np.asarray(_sample_each(jax.random.key(0), jnp.broadcast_to(alpha_D, (50_000, 3))), np.float64)
    np.testing.assert_allclose(x_NxD.mean(0), np.asarray(alpha_D) / a0, atol=2e-3)
    var_D = np.asarray(alpha_D) * (a0 - np.asarray(alpha_D)) / (a0**2 * (a0 + 1))
    np.testing.assert_allclose(x_NxD.var(0), var_D, rtol=0.05)
    # d E[x_0] / d alpha_j = (delta_0j * a0 - alpha_0) / a0^2, estimated through the samples.
    grad_D = jax.jit(jax.grad(lambda a: dist.sample(jax.random.key(1), a, 50_000)[:, 0].mean()))(alpha_D)
    expected_D = (np.eye(3)[0] * a0 - 2.0) / a0**2
    np.testing.assert_allclose(np.asarray(grad_D), expected_D, atol=3e-3)


def test_symmetric_entropy_is_the_entropy_of_the_symmetric_dirichlet():
    assert dist.symmetric_entropy(4.0, 6) == pytest.approx(scipy.stats.dirichlet.entropy(np.full(6, 4.0)), rel=1e-4)


# ------------------------------------------------------------------------------------------ features

META = {"fields": ["source", "math"], "target_field": "math", "domain_fields": ["source", "math", "source"],
        "domain_loss_index": [4, 0, 2], "field_score_index": [3, 1]}


def test_history_features_by_hand():
    layout = FeedbackLayout.from_meta(META)
    assert layout.domain_is_target == (False, True, False)
    assert layout.target_score_index == (1,) and layout.source_score_index == (3,)
    a_1x2x3 = np.array([[[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]]])
    fb_1x3x5 = np.array([[[1.0, 1.0, 1.0, 1.0, 1.0],
                          [0.9, 1.1, 0.8, 0.95, 0.7],
                          [0.85, 1.3, 0.75, 0.9, 0.72]]])
    dom, glob = history_features(a_1x2x3, fb_1x3x5, layout, horizon=4)
    assert dom.shape == (1, 3, 3, len(DOMAIN_FEATURES)) and glob.shape == (1, 3, len(GLOBAL_FEATURES))
    # token 2, domain 0 (source): weight 3 * 0.1, not target, loss fb[4] = 0.72, change 0.72 - 0.7
    np.testing.assert_allclose(dom[0, 2, 0], [0.3, 0.0, 0.72, 0.02], atol=1e-6)
    # token 1, domain 1 (math): weight 3 * 0.2, target, loss fb[0] = 0.9, change -0.1
    np.testing.assert_allclose(dom[0, 1, 1], [0.6, 1.0, 0.9, -0.1], atol=1e-6)
    np.testing.assert_allclose(dom[0, 0, :, 0], 0.0)  # no mixture before the first step
    np.testing.assert_allclose(dom[0, 0, :, 3], 0.0)
    # global: target score fb[1], source score fb[3], their changes, progress t / 4
    np.testing.assert_allclose(glob[0, 2], [1.3, 0.9, 0.2, -0.05, 0.5], atol=1e-6)
    np.testing.assert_allclose(glob[0, 0], [1.0, 1.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_the_mixture_before_step_0_is_the_pretraining_one():
    """With `initial_weights` in the metadata, token 0 sees D * w0 (source domains apart by their share),
    so two domains of one field are told apart before their losses move."""
    layout = FeedbackLayout.from_meta(dict(META, initial_weights=[0.75, 0.0, 0.25]))
    dom, _ = history_features(np.array([[[0.5, 0.2, 0.3]]]), np.ones((1, 2, 5)), layout, horizon=4)
    np.testing.assert_allclose(dom[0, 0, :, 0], [2.25, 0.0, 0.75], atol=1e-6)
    np.testing.assert_allclose(dom[0, 1, :, 0], [1.5, 0.6, 0.9], atol=1e-6)
    with pytest.raises(DmaError, match="initial_weights has 2 entries for 3 domains"):
        history_features(np.zeros((1, 1, 3)), np.ones((1, 2, 5)),
                         FeedbackLayout.from_meta(dict(META, initial_weights=[0.5, 0.5])), horizon=4)


def test_feature_stats_standardise_and_roundtrip():
    rng = np.random.default_rng(0)
    dom = rng.normal(3.0, 2.0, size=(50, 5, 4, len(DOMAIN_FEATURES))).astype(np.float32)
    dom[..., 1] = 1.0  # a channel that never varies keeps std 1
    glob = rng.normal(-1.0, 0.5, size=(50, 5, len(GLOBAL_FEATURES))).astype(np.float32)
    stats = FeatureStats.fit(dom, glob)
    zd, zg = stats.apply(dom, glob)
    flat = zd.reshape(-1, zd.shape[-1])
    np.testing.assert_allclose(flat[:, [0, 2, 3]].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat[:, [0, 2, 3]].std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(flat[:, 1], 0.0)
    np.testing.assert_allclose(zg.reshape(-1, zg.shape[-1]).std(0), 1.0, atol=1e-4)
    assert FeatureStats.from_json(stats.to_json()) == stats
    with pytest.raises(DmaError, match="domain_std"):
        FeatureStats.from_json(dict(stats.to_json(), domain_std=[1.0]))


# ------------------------------------------------------------------------------------------ networks


class _Jitted:
    """The networks as jitted functions of (params, inputs): tests run compiled code, not op by op."""

    def __init__(self, agent: AgentDef):
        self.concentrations = jax.jit(agent.concentrations)
        self._q = jax.jit(lambda critic, dom, glob, actions: agent.q(critic, *agent.encode(critic, dom, glob), actions))

    def q(self, critic, dom, glob, actions):
        return self._q(critic, dom, glob, actions)


@pytest.fixture(scope="module")
def agent_and_params():
    agent = AgentDef.build(MODEL)
    return _Jitted(agent), *agent.init(0)


def _inputs(key, b, length, d):
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (b, length, d, len(DOMAIN_FEATURES))),
            jax.random.normal(k2, (b, length, len(GLOBAL_FEATURES))))


def test_decoder_is_causal_over_steps(agent_and_params):
    agent, actor, critic = agent_and_params
    dom, glob = _inputs(jax.random.key(0), 3, 4, 5)
    dom2 = dom.at[:, 2:].set(7.0)
    glob2 = glob.at[:, 2:].set(-3.0)
    alpha, alpha2 = agent.concentrations(actor, dom, glob), agent.concentrations(actor, dom2, glob2)
    np.testing.assert_allclose(np.asarray(alpha[:, :2]), np.asarray(alpha2[:, :2]), rtol=1e-5)
    assert np.abs(np.asarray(alpha[:, 2:] - alpha2[:, 2:])).max() > 1e-3
    actions = jax.random.dirichlet(jax.random.key(1), jnp.ones(5), (1, 3, 4))
    q, q2 = agent.q(critic, dom, glob, actions), agent.q(critic, dom2, glob2, actions)
    assert q.shape == (2, 1, 3, 4)
    np.testing.assert_allclose(np.asarray(q[..., :2]), np.asarray(q2[..., :2]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(q[..., 2:] - q2[..., 2:])).max() > 1e-4
    assert np.abs(np.asarray(q[0] - q[1])).max() > 1e-4  # the twins are independent


def test_permuting_domains_permutes_the_policy_and_leaves_q_unchanged(agent_and_params):
    agent, actor, critic = agent_and_params
    dom, glob = _inputs(jax.random.key(2), 3, 4, 8)
    perm = np.array([3, 0, 5, 1, 7, 4, 2, 6])
    alpha = agent.concentrations(actor, dom, glob)
    alpha_p = agent.concentrations(actor, dom[:, :, perm], glob)
    np.testing.assert_allclose(np.asarray(alpha_p), np.asarray(alpha[..., perm]), rtol=1e-5)
    actions = jax.random.dirichlet(jax.random.key(3), jnp.ones(8), (1, 3, 4))
    q, q_p = agent.q(critic, dom, glob, actions), agent.q(critic, dom[:, :, perm], glob, actions[..., perm])
    np.testing.assert_allclose(np.asarray(q_p), np.asarray(q), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d", [5, 8, 12])
def test_one_set_of_parameters_runs_on_any_number_of_domains(agent_and_params, d):
    agent, actor, critic = agent_and_params
    dom, glob = _inputs(jax.random.key(d), 3, 4, d)
    alpha = np.asarray(agent.concentrations(actor, dom, glob), np.float64)
    assert alpha.shape == (3, 4, d) and np.isfinite(alpha).all() and (alpha > 1.0).all()
    kappa = (alpha.sum(-1) - d) / d  # alpha = 1 + kappa * D * mean
    lo, hi = MODEL.concentration_range
    assert (kappa >= lo * (1 - 1e-4)).all() and (kappa <= hi * (1 + 1e-4)).all()
    mean = np.asarray(dist.mean(jnp.asarray(alpha)))
    np.testing.assert_allclose(mean.sum(-1), 1.0, atol=1e-5)
    q = agent.q(critic, dom, glob, jnp.full((1, 3, 4, d), 1.0 / d))
    assert q.shape == (2, 1, 3, 4) and np.isfinite(np.asarray(q)).all()


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        AgentModelConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="low < high"):
        AgentModelConfig(concentration_range=(5.0, 5.0))
    with pytest.raises(ValueError, match="multiple of updates_per_dispatch"):
        AgentConfig(updates_per_dispatch=30)
    with pytest.raises(ValueError, match="lagrange"):
        AgentConfig(cql={"lagrange": True, "alpha": 0.0})

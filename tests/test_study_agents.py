"""The study's agent-side pieces (issue 10): the feedback-masked agent of the no-feedback ablation and `replay-K`,
the policy the fidelity sub-run replays sweep trajectories with."""

import numpy as np
import pytest

from dma_jax import offline_data as od
from dma_jax.agent.features import FeatureStats, FeedbackLayout, History, history_features
from dma_jax.agent.model import AgentDef
from dma_jax.agent.runner import LoadedAgent
from dma_jax.config import AgentModelConfig
from dma_jax.errors import DmaError
from dma_jax.policies import SpaceInfo, make_policy
from tests.toy_env import ToyEnv


# ---------------------------------------------------------------------------------- the no-feedback ablation
def _agent_and_histories():
    T, D = 4, 3
    env = ToyEnv(["source", "source", "math"], "math", np.full((T, D), 1 / D))
    rng = np.random.default_rng(0)
    ds = env.dataset(rng.dirichlet(np.ones(D) * 5, size=(16, T)).astype(np.float32))
    layout = FeedbackLayout.from_meta(ds.meta)
    feats = history_features(ds.actions, ds.feedback, layout, T)
    agent = AgentDef.build(AgentModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32))
    actor = agent.init(0)[0]
    acts = ds.actions[0, :2]
    fb_a = ds.feedback[0, :3]
    fb_b = fb_a + rng.normal(0, 0.3, size=fb_a.shape).astype(np.float32)  # other losses and scores
    return agent, actor, feats, [History(acts, fb, layout, T) for fb in (fb_a, fb_b)]


def test_masked_feedback_makes_the_agent_blind_to_feedback():
    agent, actor, feats, (h_a, h_b) = _agent_and_histories()
    seeing = LoadedAgent(agent, actor, FeatureStats.fit(*feats), {})
    blind_stats = FeatureStats.fit(*feats, feedback_masked=True)
    blind = LoadedAgent(agent, actor, blind_stats, {})
    assert not np.allclose(seeing.act(h_a), seeing.act(h_b), atol=1e-6)  # the feedback matters normally...
    np.testing.assert_array_equal(blind.act(h_a), blind.act(h_b))  # ...and not at all when masked
    assert FeatureStats.from_json(blind_stats.to_json()) == blind_stats  # the mask travels with an export
    assert "feedback_masked" not in FeatureStats.fit(*feats).to_json()  # unmasked exports are unchanged
    with pytest.raises(DmaError, match="feedback_masked"):
        FeatureStats.from_json(dict(blind_stats.to_json(), feedback_masked="yes"))


def test_replay_k_replays_that_sweep_trajectory(tmp_path):
    T, D = 3, 3
    env = ToyEnv(["source", "source", "math"], "math", np.full((T, D), 1 / D))
    actions = np.random.default_rng(2).dirichlet(np.ones(D) * 5, size=(4, T)).astype(np.float32)
    ds = env.dataset(actions)
    od.save(ds, tmp_path / "offline")
    info = SpaceInfo(tuple(ds.meta["domain_names"]), tuple(ds.meta["domain_fields"]), "math", (1.0, 1.0, 1.0))
    from dma_jax.policies import PolicyInput as PH

    policy = make_policy("replay-2", info, sweep_dir=tmp_path / "offline")
    for t in range(T):
        np.testing.assert_array_equal(policy(PH([np.zeros(D)] * t, [], T)), actions[2, t])
    with pytest.raises(DmaError, match="0..3 only"):
        make_policy("replay-4", info, sweep_dir=tmp_path / "offline")

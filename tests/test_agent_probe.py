"""The critic probe (`agent.probe.q_vs_share`): the Q of a share's mixture at every offline state, checked
against the critic loss's own `q_data` metric (a second code path) with the data's actions replaced."""

from __future__ import annotations

import numpy as np
import pytest

from dma_jax import offline_data as od
from dma_jax.agent import AgentConfig, cql, run_train_agent
from dma_jax.agent.features import FeatureStats, FeedbackLayout, trajectories
from dma_jax.agent.probe import plot_q_vs_share, q_vs_share, share_actions
from dma_jax.agent.runner import load_trained_critic
from dma_jax.errors import DmaError
from tests.tiny_agent import HORIZON, N_SOURCE, N_TARGET, TINY, toy_env


def test_share_actions_put_the_share_on_the_target_field():
    a = share_actions(["source", "math", "source", "math", "source"], "math", [0.0, 0.25, 1.0])
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-7)
    np.testing.assert_allclose(a[1], [0.75 / 3, 0.125, 0.75 / 3, 0.125, 0.75 / 3], atol=1e-7)
    np.testing.assert_allclose(a[0, [1, 3]], 0.0) and np.testing.assert_allclose(a[2, [0, 2, 4]], 0.0)


def test_q_vs_share_matches_the_critic_loss_q_data(tmp_path):
    d = N_SOURCE + N_TARGET
    actions = np.random.default_rng(1).dirichlet(np.full(d, 3.0), size=(12, HORIZON)).astype(np.float32)
    od.save(toy_env().dataset(actions), tmp_path / "offline")
    with pytest.raises(DmaError, match="no CQL checkpoint"):
        q_vs_share(tmp_path / "agent", tmp_path / "offline")
    cfg = AgentConfig.model_validate(TINY | {"cql": {"steps": 10, "batch_size": 8}})
    for stage in ("sft", "cql"):
        run_train_agent(cfg, tmp_path / "offline", tmp_path / "agent", stage, seed=0, progress=False)
    shares = [0.0, 0.3, 0.9]
    got = q_vs_share(tmp_path / "agent", tmp_path / "offline", shares, reduce="mean")
    q_TxP = np.asarray(got["q_TxP"])
    assert q_TxP.shape == (HORIZON, 3) and np.isfinite(q_TxP).all()
    # second path: cql.critic_loss's q_data (mean over both critics and all states) on the data with its actions
    # replaced by the share's mixture; q_vs_share averages over trajectories per step, so average over steps here
    agent, critic, spec = load_trained_critic(tmp_path / "agent")
    ds = od.load(tmp_path / "offline")
    data = trajectories(ds.actions, ds.feedback, ds.rewards, FeedbackLayout.from_meta(ds.meta),
                        FeatureStats.from_json(spec["feature_stats"]))
    N, T, D = ds.actions.shape
    ood = np.zeros((3, N, T, D), np.float32) + 1.0 / D
    dummy = cql.CqlSamples(np.zeros((N, T), np.float32), ood[0], np.zeros((N, T), np.float32), ood,
                           np.zeros((3, N, T), np.float32))
    for j, a_D in enumerate(share_actions(ds.meta["domain_fields"], "math", shares)):
        batch = data._replace(actions_NxTxD=np.broadcast_to(a_D, (N, T, D)).astype(np.float32))
        _, metrics = cql.critic_loss(critic, agent, batch, dummy, 0.0, 1.0)
        assert q_TxP[:, j].mean() == pytest.approx(float(metrics["q_data"]), rel=1e-5, abs=1e-6)
    _, metrics = cql.critic_loss(critic, agent, data, dummy, 0.0, 1.0)
    assert np.mean(got["q_data_T"]) == pytest.approx(float(metrics["q_data"]), rel=1e-5, abs=1e-6)
    is_t = np.array([f == "math" for f in ds.meta["domain_fields"]])
    np.testing.assert_allclose(got["data_share_T"], ds.actions[..., is_t].sum(-1).mean(0), atol=1e-6)
    # the min over the twin critics is at most their mean
    assert (np.asarray(q_vs_share(tmp_path / "agent", tmp_path / "offline", shares)["q_TxP"]) <= q_TxP + 1e-6).all()
    plot_q_vs_share({"agent seed 0": got, "again": got}, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

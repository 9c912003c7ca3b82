"""`run_train_agent` (SFT then CQL), resume, export / load, other domain spaces, and (d) a toy with a known optimum."""

import json
import math

import jax
import numpy as np
import pytest

from dma_jax import offline_data as od
from dma_jax.agent import (AgentConfig, FeedbackLayout, History, export_agent, load_exported_agent,
                           run_train_agent)
from dma_jax.agent import distributions as dist
from dma_jax.agent.features import history_features
from dma_jax.checkpoint import Checkpointer
from dma_jax.errors import DmaError
from dma_jax.io_utils import read_jsonl
from tests.toy_env import ToyEnv

TINY = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
        "sft": {"steps": 20, "batch_size": 8},
        "cql": {"steps": 20, "batch_size": 8, "n_actions": 3, "lagrange": True, "alpha": 1.0, "target_gap": 50.0,
                "target_concentration": 0.1, "alpha_lr": 0.05},
        "updates_per_dispatch": 10, "checkpoint_every": 10}


def _cfg(**over) -> AgentConfig:
    raw = json.loads(json.dumps(TINY))
    for section, values in over.items():
        raw[section] = dict(raw[section], **values) if isinstance(values, dict) else values
    return AgentConfig.model_validate(raw)


def _env(n_source: int, n_target: int, horizon: int = 3) -> ToyEnv:
    share_T1 = np.linspace(0.2, 0.7, horizon)[:, None]
    best_TxD = np.concatenate([np.repeat((1 - share_T1) / n_source, n_source, 1),
                               np.repeat(share_T1 / n_target, n_target, 1)], axis=1)
    return ToyEnv(["source"] * n_source + ["math"] * n_target, "math", best_TxD)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    actions = np.random.default_rng(0).dirichlet(np.full(8, 3.0), size=(48, 3)).astype(np.float32)
    path = tmp_path_factory.mktemp("offline")
    od.save(_env(5, 3).dataset(actions), path)
    return path


@pytest.fixture(scope="module")
def trained(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("agent")
    cfg = _cfg()
    sft = run_train_agent(cfg, dataset_dir, out, "sft", seed=0, progress=False)
    cql = run_train_agent(cfg, dataset_dir, out, "cql", seed=0, progress=False)
    return out, sft, cql


def test_sft_then_cql_log_and_checkpoint(trained, dataset_dir):
    out, sft, cql = trained
    assert sft.info["n_trajectories"] == math.ceil(48 * 0.25) and sft.steps == 20
    returns = od.load(dataset_dir).returns
    assert sft.info["min_return_kept"] == pytest.approx(np.sort(returns)[-12])
    assert cql.info["reward_scale"] == pytest.approx(1.0 / returns.std(), rel=1e-4)
    assert Checkpointer(out / "sft" / "checkpoints").all_steps() == [10, 20]
    assert Checkpointer(out / "cql" / "checkpoints").all_steps() == [10, 20]
    sft_log = read_jsonl(out / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_log] == [10, 20]
    assert {"bc_nll", "entropy", "mean_l1_to_data"} <= set(sft_log[0])
    cql_log = read_jsonl(out / "cql" / "metrics.jsonl")
    assert [r["step"] for r in cql_log] == [10, 20]
    for key in ("q_data", "q_random", "q_policy", "cql_gap", "bc_nll", "entropy", "alpha_cql", "alpha_entropy",
                "bellman", "critic_loss", "actor_loss"):
        assert all(np.isfinite(r[key]) for r in cql_log), key
    # Lagrange: the penalty sits far below target_gap = 50, so its weight must fall from 1.
    assert cql_log[-1]["alpha_cql"] < cql_log[0]["alpha_cql"] < 1.0
    # Entropy tuning: the target (a near-uniform Dirichlet) exceeds the policy's entropy, so the temperature rises.
    assert cql_log[-1]["alpha_entropy"] > cql_log[0]["alpha_entropy"] > 0.01


def _rollout(policy, env: ToyEnv) -> np.ndarray:
    """Let the policy choose every mixture of one episode of `env`; returns the mixtures [T, D]."""
    layout = FeedbackLayout.from_meta(env.meta())
    d = len(env.domain_fields)
    a_txD = np.zeros((0, d))
    for _ in range(env.horizon):
        w_D = policy.act(History(a_txD, env.feedback(a_txD[None])[0], layout, env.horizon))
        a_txD = np.concatenate([a_txD, w_D[None]])
    return a_txD


@pytest.mark.parametrize("n_source, n_target", [(3, 2), (5, 3), (7, 5)])
def test_export_runs_on_domain_spaces_of_5_8_and_12_domains(trained, tmp_path, n_source, n_target):
    out, _, _ = trained
    spec = export_agent(out, tmp_path / "export")
    assert spec["stage"] == "cql" and spec["step"] == 20 and spec["trained_on"]["n_domains"] == 8
    policy = load_exported_agent(tmp_path / "export")
    env = _env(n_source, n_target, horizon=4)
    a_TxD = _rollout(policy, env)
    d = n_source + n_target
    assert a_TxD.shape == (4, d) and np.isfinite(a_TxD).all() and (a_TxD > 0).all()
    np.testing.assert_allclose(a_TxD.sum(-1), 1.0, atol=1e-5)
    # act() pads the history to the horizon; the mean at step t must equal the unpadded computation.
    layout = FeedbackLayout.from_meta(env.meta())
    dom, glob = policy.stats.apply(*history_features(a_TxD[None, :2], env.feedback(a_TxD[None, :2]), layout, 4))
    alpha = jax.jit(policy.agent.concentrations)(policy.actor, dom, glob)
    np.testing.assert_allclose(a_TxD[2], np.asarray(dist.mean(alpha))[0, 2], rtol=1e-5, atol=1e-6)


def test_export_of_sft_only_and_spec_checks(trained, tmp_path):
    out, _, _ = trained
    spec = export_agent(out / "sft", tmp_path / "sft_export")
    assert spec["stage"] == "sft" and spec["format"] == "dma-agent-v1"
    load_exported_agent(tmp_path / "sft_export")
    spec_path = tmp_path / "sft_export" / "agent_spec.json"
    for key, value in (("feature_version", 99), ("format", "dma-agent-v0"),
                       ("domain_features", list(reversed(spec["domain_features"])))):
        spec_path.write_text(json.dumps(dict(spec, **{key: value})))
        with pytest.raises(DmaError) as e:
            load_exported_agent(tmp_path / "sft_export")
        assert key in str(e.value) and "\n" not in str(e.value)
    # an agent exported before the feature layout changed (version 2: the tanh field score) names both versions
    spec_path.write_text(json.dumps(dict(spec, feature_version=2)))
    with pytest.raises(DmaError, match=r"feature_version is 2, this version understands 3$"):
        load_exported_agent(tmp_path / "sft_export")
    spec_path.unlink()
    with pytest.raises(DmaError, match="missing"):
        load_exported_agent(tmp_path / "sft_export")
    with pytest.raises(DmaError, match="no agent checkpoint"):
        export_agent(tmp_path / "nothing_here", tmp_path / "x")


def test_resume_ends_where_an_uninterrupted_run_ends(dataset_dir, tmp_path):
    run_train_agent(_cfg(), dataset_dir, tmp_path / "straight", "sft", progress=False)
    first = run_train_agent(_cfg(sft={"steps": 10}), dataset_dir, tmp_path / "resumed", "sft", progress=False)
    second = run_train_agent(_cfg(), dataset_dir, tmp_path / "resumed", "sft", progress=False)
    assert first.resumed_from == 0 and second.resumed_from == 10
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "sft" / "metrics.jsonl")] == [10, 20]
    a = _exported_actor(tmp_path / "straight", tmp_path / "e1")
    b = _exported_actor(tmp_path / "resumed", tmp_path / "e2")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(DmaError, match="another stage config"):
        run_train_agent(_cfg(sft={"lr": 0.5}), dataset_dir, tmp_path / "resumed", "sft", progress=False)


def test_a_resumed_agent_checks_spikes_against_the_same_running_mean(dataset_dir, tmp_path):
    # agent.max_loss_spike with skip: the running mean of the good losses is in the checkpoint, so a run stopped at
    # step 10 and resumed skips the same updates as a straight one and ends with the same actor
    from dma_jax.checkpoint import Checkpointer

    spike = {"max_loss_spike": 1.0001, "on_nonfinite": "skip"}
    run_train_agent(_cfg(**spike), dataset_dir, tmp_path / "straight", "sft", progress=False)
    run_train_agent(_cfg(sft={"steps": 10}, **spike), dataset_dir, tmp_path / "resumed", "sft", progress=False)
    run_train_agent(_cfg(**spike), dataset_dir, tmp_path / "resumed", "sft", progress=False)
    guards = []
    for run in ("straight", "resumed"):
        with Checkpointer(tmp_path / run / "sft" / "checkpoints", create=False) as ck:
            guards.append(ck.read_meta()["loss_guard"])
    assert guards[0] == guards[1] and guards[0]["mean"] is not None
    a = _exported_actor(tmp_path / "straight", tmp_path / "e1")
    b = _exported_actor(tmp_path / "resumed", tmp_path / "e2")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _exported_actor(out, export_dir):
    export_agent(out, export_dir)
    return load_exported_agent(export_dir).actor


def test_cql_needs_a_finished_sft(dataset_dir, tmp_path):
    with pytest.raises(DmaError, match="stage sft"):
        run_train_agent(_cfg(), dataset_dir, tmp_path, "cql", progress=False)
    with pytest.raises(DmaError, match="stage="):
        run_train_agent(_cfg(), dataset_dir, tmp_path, "bc", progress=False)


# ------------------------------------------------------------------ (d) a toy with a known best schedule

BEST_TxD = np.array([[0.45, 0.45, 0.1], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [0.15, 0.15, 0.7]])


def _noisy_random_trajectories(n: int, rng: np.random.Generator) -> np.ndarray:
    """Behaviour: a random walk of the target share, each mixture drawn around it (concentration 30)."""
    share_NxT = np.clip(rng.uniform(0.05, 0.8, (n, 1)) + np.cumsum(rng.normal(0, 0.15, (n, 4)), 1), 0.02, 0.95)
    mean_NxTxD = np.stack([(1 - share_NxT) / 2, (1 - share_NxT) / 2, share_NxT], -1)
    a_NxTxD = np.stack([rng.dirichlet(30 * m) for m in mean_NxTxD.reshape(-1, 3)]).reshape(n, 4, 3)
    a_NxTxD = np.maximum(a_NxTxD, 1e-4)
    return (a_NxTxD / a_NxTxD.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.slow
def test_cql_beats_behaviour_and_sft_on_a_toy_with_a_known_best_schedule(tmp_path):
    """(d) The best schedule zig-zags; behaviour is smooth and noisy, so only per-step credit assignment finds it."""
    env = ToyEnv(["source", "source", "math"], "math", BEST_TxD)
    ds = env.dataset(_noisy_random_trajectories(512, np.random.default_rng(0)))
    od.save(ds, tmp_path / "data")
    cfg = AgentConfig.model_validate({
        "model": {"d_model": 32, "n_layers": 1}, "sft": {"steps": 500, "top_percent": 10},
        "cql": {"steps": 1000, "batch_size": 16, "n_actions": 5}, "updates_per_dispatch": 100,
        "checkpoint_every": 500})
    returns = {}
    for stage in ("sft", "cql"):
        run_train_agent(cfg, tmp_path / "data", tmp_path / "agent", stage, progress=False)
        export_agent(tmp_path / "agent" / stage, tmp_path / f"export_{stage}")
        a_TxD = _rollout(load_exported_agent(tmp_path / f"export_{stage}"), env)
        returns[stage] = float(env.returns(a_TxD[None])[0])
    behaviour = float(ds.returns.mean())
    print(f"(d) returns: behaviour mean {behaviour:.3f}, best in data {ds.returns.max():.3f}, "
          f"SFT {returns['sft']:.3f}, CQL {returns['cql']:.3f}, optimum 0")
    assert returns["sft"] > behaviour
    assert returns["cql"] > returns["sft"] + 0.02

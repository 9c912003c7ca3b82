"""Numerical health in every training stage: a NaN/Inf loss or a loss spike stops the stage (one line naming
the stage, step and value; the last good checkpoint stays the latest) or, with on_nonfinite=skip, skips the step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax import numerics
from dma_jax import offline_data as od
from dma_jax import sweep as sweep_mod
from dma_jax import train as train_mod
from dma_jax.agent import AgentConfig, run_train_agent
from dma_jax.agent import sft as sft_mod
from dma_jax.checkpoint import Checkpointer
from dma_jax.cli import main
from dma_jax.config import load_config
from dma_jax.errors import DmaError
from dma_jax.io_utils import read_jsonl
from dma_jax.data.domains import DomainSpace
from tests.base_world import World
from tests.paths import DEMO
from tests.toy_env import ToyEnv

OVER = ["data.demo_fields=[source, math]", "mesh.data=1", "sweep.devices=1", "sweep.num_trajectories=4",
        "sweep.chunk_size=4", "sweep.num_stages=2", "sweep.steps_per_stage=2", "cpt.num_stages=2",
        "cpt.steps_per_stage=2"]
LINKED = ("pretrain.steps=2",)  # the world's linked base models were pretrained 2 steps (tests/base_world.py)


def _argv(world: World, out: Path, cmd: list[str], *extra: str) -> list[str]:
    """A CLI run on the prepared world's data (tests/conftest.py); pretrain.steps is the tiny variant's 6."""
    return ["--no-progress", *cmd, "--config", str(DEMO), "--variant", "tiny", f"run.out_dir={out}",
            f"data.dir={world.data_dir}", *OVER, *extra]


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def _poison_steps(monkeypatch, at: set[int], value: float = math.nan) -> None:
    """The `at`-th calls of Trainer.step (1-based) get a batch whose loss mask is all `value`."""
    real = train_mod.Trainer.step
    calls = {"n": 0}

    def step(self, state, batch, max_loss=math.inf):
        calls["n"] += 1
        if calls["n"] in at:
            mask = batch["mask"]
            batch = dict(batch, mask=jax.device_put(np.full(mask.shape, value, np.float32), mask.sharding))
        return real(self, state, batch, max_loss)

    monkeypatch.setattr(train_mod.Trainer, "step", step)


def _loss_scaled_by_mask(monkeypatch) -> None:
    """The LM loss times max(mask): a mask of 50s makes that step's loss 50x (a spike), 1s change nothing."""
    real = train_mod.loss_fn

    def loss_fn(params, lm, batch):
        loss, aux = real(params, lm, batch)
        loss = loss * batch["mask"].max()
        return loss, dict(aux, loss=loss)

    monkeypatch.setattr(train_mod, "loss_fn", loss_fn)


def _restored(ckpt_dir: Path, abstract):
    ck = Checkpointer(ckpt_dir)
    state, _, _ = ck.restore(abstract)
    ck.close()
    return jax.tree.map(np.asarray, state)


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dma: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ host-side guard


def test_loss_guard_running_mean_threshold_and_messages():
    g = numerics.LossGuard("pretrain proxy", "stop", 2.0)
    assert g.max_loss() == math.inf  # nothing known yet
    for step, loss in enumerate([4.0, 3.0, 2.0], 1):
        assert g.check(step, loss, "step 0 in X")
    mean = 0.9 * (0.9 * 4.0 + 0.1 * 3.0) + 0.1 * 2.0  # EMA by hand
    assert g.max_loss() == pytest.approx(2.0 * mean)
    with pytest.raises(DmaError, match=r"pretrain proxy: loss spike: 9 is above .*, the running mean .* at step 4; "
                                       r"stopped, last good checkpoint: step 3 in X"):
        g.check(4, 9.0, "step 3 in X")
    # a negative mean (an agent's log-likelihood loss): the threshold lies as far above it, not ratio x mean
    # (which would be below the mean and call every improving loss a spike)
    n = numerics.LossGuard("agent sft", "skip", 1.5, setting="agent")
    assert n.check(1, -4.0, "-") and n.max_loss() == pytest.approx(-2.0)
    assert n.check(2, -5.0, "-")  # better than the mean: good (ratio x mean = -6 would have called it a spike)
    assert not n.check(3, -0.5, "-", max_loss=n.max_loss()) and n.skipped == 1  # far above: a spike
    with pytest.raises(DmaError, match=r"pretrain proxy: loss is nan at step 5"):
        g.check(5, math.nan, "step 3 in X")
    s = numerics.LossGuard("sweep", "skip", None)
    assert not s.check(1, math.inf, "-") and s.skipped == 1 and s.mean is None
    assert s.check(2, 1e6, "-") and s.max_loss() == math.inf  # spikes off: any finite loss is good
    with pytest.raises(DmaError, match="must be 'stop' or 'skip'"):
        numerics.LossGuard("x", "ignore", None)


def test_checkpointer_never_saves_a_nan_state(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, {"w": jnp.ones(3)})
    with pytest.raises(DmaError, match="refusing to save step 2: the state has NaN/Inf"):
        ck.save(2, {"w": jnp.array([1.0, jnp.nan, 1.0])})
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    ck.close()


# ------------------------------------------------------------------------------------------ pretrain


def _abstract_state(model_cfg, optim_cfg):
    """Shapes of an LM TrainState on one device (the optimizer state's layout does not depend on the step count)."""
    lm, tx = train_mod.LMDef.build(model_cfg), train_mod.make_optimizer(optim_cfg, 10)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                        jax.eval_shape(lambda: train_mod.init_state(lm, tx, 0)))


def test_pretrain_nan_stops_and_keeps_the_last_good_checkpoint(prepared_world, tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {5})  # tiny: 6 steps, checkpoints at 3 and 6
    rc, err = _run(_argv(prepared_world, tmp_path, ["pretrain"]), capsys)
    line = _one_line(err)
    assert rc == 2
    ckpt_dir = tmp_path / "pretrain-proxy" / "checkpoints"
    assert f"pretrain proxy: loss is nan at step 5; stopped, last good checkpoint: step 3 in {ckpt_dir}" in line
    assert Checkpointer(ckpt_dir).all_steps() == [3]


def test_pretrain_loss_spike_stops(prepared_world, tmp_path, monkeypatch, capsys):
    _loss_scaled_by_mask(monkeypatch)
    _poison_steps(monkeypatch, {5}, value=50.0)
    rc, err = _run(_argv(prepared_world, tmp_path, ["pretrain"], "optim.max_loss_spike=3"), capsys)
    line = _one_line(err)
    assert rc == 2 and "pretrain proxy: loss spike:" in line and "at step 5" in line
    assert "optim.max_loss_spike=3" in line and "last good checkpoint: step 3" in line
    assert Checkpointer(tmp_path / "pretrain-proxy" / "checkpoints").all_steps() == [3]


def test_pretrain_skip_keeps_the_previous_state_for_a_bad_step(prepared_world, tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {2})
    extra = ["optim.on_nonfinite=skip"]
    assert main(_argv(prepared_world, tmp_path, ["pretrain"], *extra)) == 0
    capsys.readouterr()
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}", f"data.dir={prepared_world.data_dir}", *OVER, *extra],
                      variant="tiny")
    state = _restored(tmp_path / "pretrain-proxy" / "checkpoints", _abstract_state(cfg.proxy, cfg.optim))
    assert int(state.step) == 5  # 6 steps ran, one was skipped: the state's own counter did not move
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    logged = [r["step"] for r in read_jsonl(tmp_path / "pretrain-proxy" / "metrics.jsonl") if "loss" in r]
    assert logged == [1, 3, 4, 5, 6]  # the skipped step is not logged as a loss


# ------------------------------------------------------------------------------------------ sweep


def test_sweep_nan_stops_and_keeps_the_last_good_checkpoint(prepared_world, tmp_path, monkeypatch, capsys):
    prepared_world.link_base(tmp_path, ("proxy",))
    real = sweep_mod.Sweep.stage

    def stage(self, state, w, ids, t, max_loss_n=None):
        if t == 1:  # the second re-weighting step starts from NaN parameters
            state = state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return real(self, state, w, ids, t, max_loss_n)

    monkeypatch.setattr(sweep_mod.Sweep, "stage", stage)
    rc, err = _run(_argv(prepared_world, tmp_path, ["sweep"], *LINKED), capsys)
    line = _one_line(err)
    ckpt_dir = tmp_path / "sweep" / "checkpoints"
    assert rc == 2 and f"sweep proxy 0: loss is nan at step 3; stopped, last good checkpoint: step 1 in {ckpt_dir}" \
        in line
    assert Checkpointer(ckpt_dir).all_steps() == [1]
    assert not (tmp_path / "sweep" / "offline").exists()


def test_sweep_skip_is_per_proxy(prepared_world, tmp_path):
    from dma_jax.runs import RunDir
    from dma_jax.train import load_base_params

    prepared_world.link_base(tmp_path, ("proxy",))
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}", f"data.dir={prepared_world.data_dir}", *OVER, *LINKED,
                             "optim.on_nonfinite=skip"], variant="tiny")
    sw = sweep_mod.Sweep(cfg, DomainSpace.for_sweep(cfg), jax.devices()[:1])
    params = load_base_params(cfg, "proxy", RunDir(cfg).pretrain_checkpoints("proxy"))
    D = sw.space.num_domains
    w_nxD, ids = np.full((4, D), 1.0 / D, np.float32), np.arange(4)
    free, _ = sw.stage(sw.init_chunk(params), w_nxD, ids, 0)  # no threshold: every step counts
    mixed, losses = sw.stage(sw.init_chunk(params), w_nxD, ids, 0, np.array([np.inf, -1, np.inf, -1], np.float32))
    assert np.isfinite(np.asarray(losses)).all()
    for f, m, p in zip(jax.tree.leaves(free.params), jax.tree.leaves(mixed.params), jax.tree.leaves(params)):
        f, m, p = np.asarray(f), np.asarray(m), np.asarray(p)
        for i in (0, 2):  # threshold inf: trained exactly as without a guard
            np.testing.assert_array_equal(m[i], f[i])
        for i in (1, 3):  # every loss > -1: every step skipped, the base parameters are kept
            np.testing.assert_array_equal(m[i], p)
    np.testing.assert_array_equal(np.asarray(mixed.step), [2, 0, 2, 0])


# ------------------------------------------------------------------------------------------ cpt


def test_cpt_nan_stops_and_keeps_the_last_good_checkpoint(prepared_world, tmp_path, monkeypatch, capsys):
    prepared_world.link_base(tmp_path, ("target",))
    _poison_steps(monkeypatch, {3})  # the first step of the second re-weighting step
    rc, err = _run(_argv(prepared_world, tmp_path, ["cpt", "--policy", "fixed-0.3", "--seed", "0"], *LINKED), capsys)
    line = _one_line(err)
    run = tmp_path / "cpt" / "fixed-0.3" / "seed0"
    assert rc == 2 and (f"cpt fixed-0.3 seed 0: loss is nan at step 3; stopped, last good checkpoint: step 1 in "
                        f"{run / 'checkpoints'}") in line
    assert Checkpointer(run / "checkpoints").all_steps() == [1]
    assert not (run / "history.json").exists()


def test_cpt_skip_finishes_with_finite_parameters(prepared_world, tmp_path, monkeypatch, capsys):
    prepared_world.link_base(tmp_path, ("target",))
    _poison_steps(monkeypatch, {3})
    extra = ["optim.on_nonfinite=skip"]
    assert main(_argv(prepared_world, tmp_path, ["cpt", "--policy", "fixed-0.3", "--seed", "0"], *LINKED, *extra)) == 0
    capsys.readouterr()
    run = tmp_path / "cpt" / "fixed-0.3" / "seed0"
    assert json.loads((run / "history.json").read_text())["complete"]
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}", f"data.dir={prepared_world.data_dir}", *OVER, *LINKED, *extra],
                      variant="tiny")
    state = _restored(run / "checkpoints", _abstract_state(cfg.target, cfg.optim))
    assert int(state.step) == 3  # 4 steps, one skipped
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


# ------------------------------------------------------------------------------------------ agent (SFT, CQL)


AGENT = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}, "sft": {"steps": 20, "batch_size": 8},
         "cql": {"steps": 20, "batch_size": 8, "n_actions": 3}, "updates_per_dispatch": 5, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    best_TxD = np.tile(np.array([0.4, 0.3, 0.2, 0.1]), (3, 1))
    env = ToyEnv(["source", "source", "math", "math"], "math", best_TxD)
    path = tmp_path_factory.mktemp("toy")
    od.save(env.dataset(np.random.default_rng(0).dirichlet(np.ones(4), size=(16, 3)).astype(np.float32)), path)
    return path


def _agent_cfg(**top) -> AgentConfig:
    return AgentConfig.model_validate(dict(AGENT, **top))


_nan_floats = jax.jit(lambda tree: jax.tree.map(  # one program, not one eager op per leaf shape
    lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, tree))


def _wrap_dispatch(monkeypatch, module, name: str, at: int, poison: str, seen: list):
    """The `at`-th dispatch (1-based) of the stage's step gets NaN parameters ('state') or NaN features ('data')."""
    real_make = getattr(module, name)

    def make(*args, **kwargs):
        real = real_make(*args, **kwargs)
        calls = {"n": 0}

        def step(state, data, max_loss=math.inf):
            calls["n"] += 1
            if calls["n"] == at and poison == "state":
                state = _nan_floats(state)
            if calls["n"] == at and poison == "data":
                data = data._replace(dom_NxT1xDxF=data.dom_NxT1xDxF * jnp.nan)
            out = real(state, data, max_loss)
            seen.append(jax.tree.map(lambda x: np.array(x, copy=True), out[0]))
            return out

        return step

    monkeypatch.setattr(module, name, make)


def test_agent_sft_nan_stops_and_keeps_the_last_good_checkpoint(toy_dataset, tmp_path, monkeypatch):
    _wrap_dispatch(monkeypatch, sft_mod, "make_sft_step", 3, "state", [])
    with pytest.raises(DmaError) as e:
        run_train_agent(_agent_cfg(), toy_dataset, tmp_path, "sft", progress=False)
    ckpt_dir = tmp_path / "sft" / "checkpoints"
    assert "agent sft: " in str(e.value) and "bc_nll=nan" in str(e.value)
    assert f"at step 15; stopped, last good checkpoint: step 10 in {ckpt_dir}" in str(e.value)
    assert Checkpointer(ckpt_dir).all_steps() == [10]


def test_agent_sft_skip_keeps_the_previous_state(toy_dataset, tmp_path, monkeypatch):
    seen: list = []
    _wrap_dispatch(monkeypatch, sft_mod, "make_sft_step", 3, "data", seen)
    run_train_agent(_agent_cfg(on_nonfinite="skip"), toy_dataset, tmp_path, "sft", progress=False)
    recs = {r["step"]: r for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl")}
    assert recs[15]["skipped"] == 5 and recs[10]["skipped"] == 0 and recs[20]["skipped"] == 0
    after2, after3 = seen[1], seen[2]
    for a, b in zip(jax.tree.leaves(after2.actor), jax.tree.leaves(after3.actor)):
        np.testing.assert_array_equal(a, b)  # all 5 updates of dispatch 3 skipped: the actor did not move
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(seen[-1].actor))
    assert not np.array_equal(np.asarray(after3.key), np.asarray(after2.key))  # the batch key still advances


@pytest.mark.slow
def test_agent_cql_nan_stops_and_keeps_the_last_good_checkpoint(toy_dataset, tmp_path, monkeypatch):
    from dma_jax.agent import cql as cql_mod

    cfg = _agent_cfg()
    run_train_agent(cfg, toy_dataset, tmp_path, "sft", progress=False)
    _wrap_dispatch(monkeypatch, cql_mod, "make_cql_step", 3, "state", [])
    with pytest.raises(DmaError) as e:
        run_train_agent(cfg, toy_dataset, tmp_path, "cql", progress=False)
    ckpt_dir = tmp_path / "cql" / "checkpoints"
    assert "agent cql: " in str(e.value) and "critic_loss=nan" in str(e.value)
    assert f"at step 15; stopped, last good checkpoint: step 10 in {ckpt_dir}" in str(e.value)
    assert Checkpointer(ckpt_dir).all_steps() == [10]


def test_loss_guard_state_round_trips_through_json():
    # what a checkpoint keeps: a restored guard sets the same threshold and judges the next losses as the
    # original does (a fresh one would accept anything until its first good loss)
    g = numerics.LossGuard("cpt", "skip", 1.1)
    for loss in (3.0, 2.8, 2.9, 4.0, 2.7):
        g.check(1, loss, "step 0")
    back = numerics.LossGuard("cpt", "skip", 1.1).restore(json.loads(json.dumps(g.state())))
    assert back.state() == g.state() and back.max_loss() == g.max_loss() and g.skipped == 1
    assert [back.check(2, v, "") for v in (3.3, 2.9)] == [g.check(2, v, "") for v in (3.3, 2.9)] == [False, True]
    assert numerics.LossGuard("cpt", "skip", 1.1).restore(None).max_loss() == float("inf")  # a checkpoint from before


def test_a_log_cut_by_a_kill_drops_its_last_line_but_a_damaged_one_is_refused(tmp_path):
    from dma_jax.errors import DmaError

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')  # the last line cut by a kill: dropped
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage in the middle: refused, not silently cut
    with pytest.raises(DmaError, match=r"metrics.jsonl: line 2 is not JSON but later lines are"):
        read_jsonl(log)

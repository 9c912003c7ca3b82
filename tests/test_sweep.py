"""The sweep: sampling, vmapped+sharded training equals the plain loop, device/chunk invariance, resume."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax import offline_data
from dma_jax.checkpoint import Checkpointer
from dma_jax import sample as sample_mod
from dma_jax import sweep as sweep_mod
from dma_jax.config import load_config
from dma_jax.data import device_sampler as ds
from dma_jax.evaluation import balanced_score
from dma_jax.runs import RunDir
from dma_jax.train import load_base_params
from dma_jax.train import TrainState, train_step
from dma_jax.data.domains import DomainSpace
from tests.crash import crash_on_call
from tests.paths import DEMO

SWEEP = ["sweep.num_trajectories=8", "sweep.num_stages=2", "sweep.steps_per_stage=3"]


def _cfg(world, out, *extra):
    """A run in `out` on the prepared world (tests/conftest.py) with this module's sweep settings."""
    return load_config(DEMO, world.run_overrides(out, *SWEEP, *extra), variant="tiny")


def _link_pretrain(world, out):
    world.link_base(out, ("proxy",))


def test_sample_writes_simplex_trajectories_and_a_picture(prepared_world, tmp_path):
    _link_pretrain(prepared_world, tmp_path)
    cfg = _cfg(prepared_world, tmp_path)
    path = sample_mod.run_sample(cfg)
    with np.load(path, allow_pickle=False) as z:
        w = z["weights_NxTxD"]
        names = list(z["domain_names"])
    space = DomainSpace.for_sweep(cfg)
    assert names == space.names and w.shape == (8, 2, space.num_domains)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert (path.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = sample_mod.run_sample(cfg)
    with np.load(again, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["weights_NxTxD"], w)


def test_vmapped_sharded_sweep_equals_the_plain_loop(prepared_world, tmp_path):
    """Proxy 2 of a vmapped sweep sharded over 4 devices == the same proxy trained alone on the batches that
    `device_sampler.draw_stage` draws for it (so the sweep trains on the sampler's batches, masks included)."""
    cfg = _cfg(prepared_world, tmp_path, "sweep.chunk_size=4", "sweep.num_trajectories=4")
    _link_pretrain(prepared_world, tmp_path)
    space = DomainSpace.for_sweep(cfg)
    sw = sweep_mod.Sweep(cfg, space)
    assert sw.mesh.shape["traj"] == 4
    rng = np.random.default_rng(0)
    w_NxTxD = rng.dirichlet(np.ones(space.num_domains), size=(4, 2)).astype(np.float32)
    p0 = load_base_params(cfg, "proxy", RunDir(cfg).pretrain_checkpoints("proxy"))
    state = sw.init_chunk(p0)
    ids = np.arange(4)
    for t in range(2):
        state, _ = sw.stage(state, w_NxTxD[:, t], ids, t)
    assert len(state.params["embed_VxD"].addressable_shards) == 4  # really sharded over `traj`

    sc = cfg.sweep
    step = jax.jit(lambda st, b: train_step(st, b, lm=sw.lm, tx=sw.tx))
    plain = TrainState(jnp.zeros((), jnp.int32), p0, sw.tx.init(p0))
    pools = jax.device_put(sw.pools, p0["embed_VxD"].sharding)  # the plain loop runs on one device
    key = sweep_mod.proxy_keys(cfg.run.seed, jnp.array([2]))[0]
    for t in range(2):
        rows = ds.draw_stage(pools, jnp.asarray(w_NxTxD[2, t]), key, t, sc.steps_per_stage, sc.batch_size)
        np.testing.assert_array_equal(  # exact counts: within one row of w * S * B per domain
            np.abs(np.bincount(np.asarray(rows["domain"]).ravel(), minlength=space.num_domains)
                   - w_NxTxD[2, t] * sc.steps_per_stage * sc.batch_size) < 1 + 1e-4, True)
        for s in range(sc.steps_per_stage):
            plain, _ = step(plain, ds.train_batch(jax.tree.map(lambda a, s=s: a[s], rows)))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b)[2], atol=1e-5)


@pytest.fixture(scope="module")
def reference(prepared_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _link_pretrain(prepared_world, out)
    cfg = _cfg(prepared_world, out, "sweep.chunk_size=8")
    s = sweep_mod.run_sweep(cfg, devices=jax.devices()[:1], progress=False)
    return offline_data.load(s.out_dir)


def test_offline_dataset_is_consistent(reference):
    ds = reference
    meta = ds.meta
    assert ds.actions.shape == (8, 2, len(meta["domain_names"]))
    assert ds.feedback.shape == (8, 3, len(meta["feedback_names"]))
    np.testing.assert_allclose(ds.feedback[:, 0, meta["field_score_index"]], 1.0, atol=1e-6)  # base = 1
    np.testing.assert_allclose(ds.feedback[:, 0, meta["domain_loss_index"]], 1.0, atol=1e-6)
    b = np.asarray(balanced_score(jnp.asarray(ds.feedback[..., meta["field_score_index"]]), "mean"))
    np.testing.assert_allclose(ds.rewards, np.diff(b, axis=1), atol=1e-6)
    np.testing.assert_allclose(ds.returns, b[:, -1] - b[:, 0], atol=1e-5)
    assert not np.allclose(ds.feedback[:, 1:], 1.0)  # training moved the proxies


def test_eight_devices_and_chunks_give_the_same_numbers(prepared_world, reference, tmp_path):
    _link_pretrain(prepared_world, tmp_path)
    cfg = _cfg(prepared_world, tmp_path, "sweep.chunk_size=4")
    s = sweep_mod.run_sweep(cfg, progress=False)  # 4 devices per chunk, 2 chunks
    ds = offline_data.load(s.out_dir)
    np.testing.assert_allclose(ds.feedback, reference.feedback, atol=1e-5)
    np.testing.assert_array_equal(ds.actions, reference.actions)


def test_a_crashed_sweep_resumes_and_ends_equal(prepared_world, reference, tmp_path, monkeypatch):
    _link_pretrain(prepared_world, tmp_path)
    cfg = _cfg(prepared_world, tmp_path, "sweep.chunk_size=8")
    crash_on_call(monkeypatch, sweep_mod.Sweep, "stage", 2)  # in re-weighting step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep_mod.run_sweep(cfg, devices=jax.devices()[:1], progress=False)
    monkeypatch.undo()
    assert not (Path(tmp_path) / "sweep" / "offline" / "meta.json").exists()
    s = sweep_mod.run_sweep(cfg, devices=jax.devices()[:1], progress=False)
    ds = offline_data.load(s.out_dir)
    np.testing.assert_array_equal(ds.feedback, reference.feedback)


def test_a_resumed_sweep_checks_spikes_against_each_proxys_running_mean(prepared_world, tmp_path, monkeypatch):
    # optim.max_loss_spike with skip: each proxy skips a step whose loss is above 1.0001 x the running mean of its
    # good losses. The means are kept in the checkpoint per trajectory, so a crashed-and-resumed sweep skips the
    # same steps and ends with the same feedback (a fresh mean would accept every loss until its first good one).
    spike = ("sweep.chunk_size=8", "optim.max_loss_spike=1.0001", "optim.on_nonfinite=skip", "optim.lr=0.1",
             "optim.warmup_steps=1", "sweep.num_stages=4")  # a high flat rate: losses that jump
    outs = []
    for name, crash in (("a", False), ("b", True)):
        out = tmp_path / name
        out.mkdir()
        _link_pretrain(prepared_world, out)
        cfg = _cfg(prepared_world, out, *spike)
        if crash:
            crash_on_call(monkeypatch, sweep_mod.Sweep, "stage", 2)  # in re-weighting step 2
            with pytest.raises(RuntimeError, match="simulated crash"):
                sweep_mod.run_sweep(cfg, devices=jax.devices()[:1], progress=False)
            monkeypatch.undo()
        s = sweep_mod.run_sweep(cfg, devices=jax.devices()[:1], progress=False)
        with Checkpointer(out / "sweep" / "checkpoints", create=False) as ck:
            outs.append((offline_data.load(s.out_dir).feedback, ck.read_meta()["loss_guards"]))
    (fb_a, guards_a), (fb_b, guards_b) = outs
    assert sum(g["skipped"] for g in guards_a) >= 1  # the setting bites
    assert guards_b == guards_a
    np.testing.assert_array_equal(fb_b, fb_a)


def test_config_hash_ignores_where_the_run_lives_but_not_what_it_computes():
    cfg = lambda *over: load_config(DEMO, list(over), variant="tiny")  # noqa: E731
    a = sweep_mod.config_hash(cfg("run.out_dir=/tmp/a"))
    assert a == sweep_mod.config_hash(cfg("run.out_dir=/elsewhere/b"))
    assert a != sweep_mod.config_hash(cfg("run.out_dir=/tmp/a", "sweep.steps_per_stage=3"))
    assert a != sweep_mod.config_hash(cfg("run.out_dir=/tmp/a", "run.seed=1"))

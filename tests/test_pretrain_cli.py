import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dma_jax import train as train_mod
from dma_jax.checkpoint import Checkpointer
from dma_jax.cli import main
from dma_jax.faults import Preempted
from dma_jax.config import load_config
from dma_jax.pretrain import run_pretrain
from tests.paths import DEMO



def _cfg(out, *extra):
    return load_config(DEMO, [f"run.out_dir={out}", f"data.dir={_DATA['dir']}", "pretrain.steps=8",
                              "pretrain.checkpoint_every=4", "pretrain.eval_every=4", "mesh.data=1", *extra],
                       variant="tiny")


_DATA = {}


@pytest.fixture(scope="module", autouse=True)
def prepared(prepared_world):
    """The data of the session's prepared world (tests/conftest.py); the proxy trains on its source field."""
    _DATA["dir"] = str(prepared_world.data_dir)


def _final_params(cfg):
    tr = train_mod.Trainer(cfg.proxy, cfg.optim, cfg.mesh, cfg.pretrain.steps, cfg.pretrain.batch_size,
                           cfg.data.record_len - 1, devices=jax.devices()[:1])
    ck = Checkpointer(Path(cfg.run.out_dir) / "pretrain-proxy" / "checkpoints")
    state, _, _ = ck.restore(tr.abstract_state)
    return ck.latest_step(), jax.tree.map(np.asarray, state)


def _losses(out):
    recs = [json.loads(x) for x in (Path(out) / "pretrain-proxy" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared):
    out = tmp_path_factory.mktemp("full")
    cfg = _cfg(out)
    summary = run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    return cfg, summary


def test_pretrain_writes_checkpoints_metrics_and_learns(uninterrupted):
    cfg, summary = uninterrupted
    out = Path(cfg.run.out_dir) / "pretrain-proxy"
    assert summary.steps == 8
    assert (out / "config.yaml").exists()
    losses = _losses(cfg.run.out_dir)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1]
    assert summary.final_eval_loss < np.log(259)  # better than uniform over the byte vocabulary
    assert Checkpointer(out / "checkpoints").all_steps() == [4, 8]


def _crash_at(monkeypatch, n_calls, exc):
    real_step = train_mod.Trainer.step
    calls = {"n": 0}

    def step(self, state, batch, *rest):
        calls["n"] += 1
        if calls["n"] == n_calls:
            exc()
        return real_step(self, state, batch, *rest)

    monkeypatch.setattr(train_mod.Trainer, "step", step)


def test_crash_then_rerun_ends_where_an_uninterrupted_run_does(uninterrupted, tmp_path, monkeypatch):
    cfg_full, _ = uninterrupted
    cfg = _cfg(tmp_path)

    def boom():
        raise RuntimeError("simulated crash")

    _crash_at(monkeypatch, 6, boom)  # after the step-4 checkpoint
    with pytest.raises(RuntimeError):
        run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    monkeypatch.undo()
    run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    s_full, p_full = _final_params(cfg_full)
    s_res, p_res = _final_params(cfg)
    assert s_full == s_res == 8
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
        np.testing.assert_array_equal(a, b)
    assert _losses(cfg.run.out_dir) == _losses(cfg_full.run.out_dir)  # no duplicated or lost metric lines


def test_sigterm_saves_and_exits_cleanly_then_resumes(uninterrupted, tmp_path, monkeypatch):
    cfg_full, _ = uninterrupted
    cfg = _cfg(tmp_path)
    _crash_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted, match=r"pretrain proxy: stopped by SIGTERM at step 3 \(checkpoint in "):
        run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    monkeypatch.undo()
    assert Checkpointer(Path(cfg.run.out_dir) / "pretrain-proxy" / "checkpoints").latest_step() == 3
    run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    _, p_full = _final_params(cfg_full)
    _, p_res = _final_params(cfg)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_model_is_refused(uninterrupted, capsys):
    cfg_full, _ = uninterrupted
    rc = main(["pretrain", "--config", str(DEMO), "--variant", "tiny", f"run.out_dir={cfg_full.run.out_dir}",
               f"data.dir={_DATA['dir']}", "pretrain.steps=8", "proxy.d_ff=80", "mesh.data=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "differs in proxy.d_ff" in err and len(err.strip().splitlines()) == 1


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "dma_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("pretrain", "demo"):
        assert cmd in out.stdout


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy:\n  d_model: -1\n")
    out = subprocess.run([sys.executable, "-m", "dma_jax.cli", "pretrain", "--config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"dma: error: {bad}: proxy.d_model: Input should be greater than 0 (got -1)"


def test_a_non_primary_process_trains_the_same_and_writes_no_files(uninterrupted, tmp_path, monkeypatch):
    """Multi-host: processes other than 0 train in lockstep (Orbax saves are collective) but write no logs."""
    from dma_jax import sharding

    monkeypatch.setattr(sharding, "is_primary", lambda: False)
    cfg = _cfg(tmp_path)
    summary = run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    out = Path(cfg.run.out_dir) / "pretrain-proxy"
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    assert summary.final_eval_loss is None and summary.steps == uninterrupted[1].steps
    step, params = _final_params(cfg)
    ref_step, ref_params = _final_params(uninterrupted[0])
    assert step == ref_step
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(a, b)

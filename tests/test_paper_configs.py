"""Paper-scale configs: the setting they claim, the memory plan per device on v5e-8 / v4-8 (abstract shapes
only), and the plan's exact parts against XLA's compiled memory analysis of the same programs (the tiny
variants, compiled on 8 fake CPU devices with the production mesh shape; the paper-scale programs are too
large to compile on a 2-core CI machine and are checked through `jax.eval_shape` only)."""

import math
from pathlib import Path

import jax
import pytest

from dma_jax.cli import main
from dma_jax.config import ModelConfig, load_config
from dma_jax.perf import memory as plan_mod
from dma_jax.perf.measure import POOL_DOMAINS
from dma_jax.perf.proxies import ProxyBench
from dma_jax.train import Trainer

PAPER = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("paper-*.yaml"))


def _n_params(m: ModelConfig) -> int:
    """LLaMA-style decoder, counted by hand: embedding (tied), per block q/k/v/o + SwiGLU + 2 norms, final norm."""
    kv = (m.n_kv_heads or m.n_heads) * (m.d_model // m.n_heads)
    block = 2 * m.d_model * m.d_model + 2 * m.d_model * kv + 3 * m.d_model * m.d_ff + 2 * m.d_model
    return m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.n_layers * block + m.d_model


def test_there_are_paper_configs():
    assert [p.name for p in PAPER] == ["paper-code.yaml", "paper-math.yaml"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_is_the_paper_setting(path):
    cfg = load_config(path)
    target = cfg.sweep.target_field
    fields = [d.field for d in cfg.data.domains]
    assert not cfg.data.demo and len(fields) == 52
    assert fields.count("source") == 26 and fields.count(target) == 26 and cfg.cpt.target_field == target
    assert all(p.startswith("gs://") for d in cfg.data.domains for p in d.paths) and cfg.data.benchmarks
    assert cfg.sweep.num_stages == cfg.cpt.num_stages == 80
    proxy = plan_mod.sweep_plan(cfg, 8, 16 * 2**30)["n_params"]  # from jax.eval_shape of the model
    tgt = plan_mod.target_plan(cfg, 8, 16 * 2**30)["n_params"]
    assert proxy == _n_params(cfg.proxy) and 40e6 <= proxy <= 60e6
    assert tgt == _n_params(cfg.target) and 0.9e9 <= tgt <= 1.3e9
    assert cfg.target.kv_heads < cfg.target.n_heads  # grouped-query attention


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_plan_of_the_paper_config(path, capsys):
    cfg = load_config(path)
    result = plan_mod.memory_plan(cfg)
    for name, r in result.items():
        t, s = r["target"], r["sweep"]
        m = t["mesh"]["model"]
        assert m == cfg.mesh.model and t["mesh"]["data"] * m == r["chips"]
        # every matrix splits over `model` (heads, kv heads, d_ff and vocab divide it); the norms are replicated
        norms = (2 * cfg.target.n_layers + 1) * cfg.target.d_model
        assert t["params"] == 4 * ((t["n_params"] - norms) // m + norms)
        assert t["adam"] == 2 * t["params"] + 8  # mu, nu like the parameters; the step counts of Adam and the lr schedule
        assert s["proxies_per_device"] * s["traj_devices"] == s["chunk"]
        assert s["grads"] == s["proxies_per_device"] * 4 * s["n_params"]
        assert s["pools"] == 52 * cfg.sweep.pool_tokens_per_domain * 8  # int32 tokens + int32 segment ids
        print(f"{path.name} {name}: target {t['total'] / 2**30:.2f} GiB/device (fits: {t['fits']}), "
              f"sweep {s['total'] / 2**30:.2f} GiB/device (fits: {s['fits']}, max {s['max_proxies_per_device']} "
              f"proxies/device)")
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    v5e = result["v5e-8"]["target"]
    assert "v5e-8" in out and "v4-8" in out and f"{v5e['total'] / 2**30:.2f}" in out


@pytest.mark.parametrize("path", PAPER[-1:], ids=lambda p: p.name)
def test_plan_matches_xla_on_the_production_mesh_shape(path):
    """The tiny variant compiled on 8 fake CPU devices with the config's mesh (data x model): XLA's argument bytes
    per device equal the plan's state + batch; the activation estimate is within a factor of XLA's temporaries."""
    cfg = load_config(path, variant="tiny")
    devices = jax.devices()[:8]
    t = plan_mod.target_plan(cfg, 8, 16 * 2**30)
    trainer = Trainer(cfg.target, cfg.optim, cfg.mesh, 10, cfg.cpt.batch_size, cfg.data.record_len - 1, devices)
    assert dict(trainer.mesh.shape) == t["mesh"]
    xla = trainer.memory
    assert xla["argument"] == t["params"] + t["adam"] + t["batch"] + 4  # + the state's step counter
    # XLA's temporaries hold the gradients and the activations the backward pass keeps (measured: the plan's
    # activations + gradients are 0.74x XLA's temp here; the rest is XLA's own scratch)
    assert 0.5 <= (t["activations"] + t["grads"]) / xla["temp"] <= 2, (t["activations"], t["grads"], xla["temp"])

    s = plan_mod.sweep_plan(cfg, 8, 16 * 2**30)
    sc = cfg.sweep
    bench = ProxyBench(cfg.proxy, cfg.optim, sc.steps_per_stage, sc.batch_size, sc.seq_len, devices)
    exe, _, mesh = bench.compiled(s["chunk"], s["traj_devices"])
    xla = exe.memory_analysis()
    n = s["proxies_per_device"]
    pools = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(bench.pools))  # the synthetic pools' arrays
    inputs = n * POOL_DOMAINS * 4 + n * 4 + 4  # weights, trajectory ids, stage (spike thresholds: unused, dropped)
    assert xla.argument_size_in_bytes == s["state"] + pools + inputs
    assert math.isfinite(s["activations"]) and s["activations"] > 0

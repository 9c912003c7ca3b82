"""`bash bench/accelerator_check.sh OUT --quick` on this CPU, end to end: the JSON's structure, and every figure
recomputed from the JSON's raw fields and the configs (tokens, seconds, FLOPs counted here from the models'
weight shapes, the measured peaks), not read back from the code. No speed is asserted.

Also: the refusal on a CPU without --quick, a zero time budget (every item skipped, goals unmeasured), the
clock's caps on a fake clock, and the markdown's table cells against the JSON.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import types

import jax
import numpy as np
import pytest

from dma_jax.config import load_config
from dma_jax.models.lm import LMDef
from dma_jax.perf import accelerator
from tests.paths import REPO

SCRIPT = REPO / "bench" / "accelerator_check.sh"
DEMO, PAPER = (load_config(REPO / "configs" / f, variant="tiny") for f in ("demo.yaml", "paper-math.yaml"))
RTOL = 1e-9


def _bench_module():
    spec = importlib.util.spec_from_file_location("accelerator_check", REPO / "bench" / "accelerator_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator")
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # one CPU device, as the device machine has one accelerator
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:  # XLA reads a blank XLA_FLAGS as a file name and aborts
        env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--quick", "--budget-s", "2000"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((out / "accelerator_check.json").read_text())
    return r, (out / "accelerator_check.md").read_text(), proc.stdout


def _train_flops_per_token(model, seq_len: int) -> float:
    """From the built model's weights: 2 FLOPs per weight of every matrix forward (the tied embedding once, as
    the output head), 2 L H K for each of QK^T and PV per layer; backward twice the forward."""
    params = LMDef.build(model).abstract_params
    weights = sum(math.prod(a.shape) for a in jax.tree.leaves(params) if a.ndim >= 2)
    H, K = model.n_heads, model.d_model // model.n_heads
    return 3 * (2 * weights + model.n_layers * 2 * (2 * seq_len * H * K))


def _n_params(model) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(LMDef.build(model).abstract_params))


MODELS = {"demo proxy": DEMO.proxy, "paper proxy": PAPER.proxy, "demo target": DEMO.target,
          "paper target": PAPER.target}


def _mfu(r, tokens, seconds, model, seq_len, dtype, devices=1) -> float:
    peak = r["peak"][dtype]
    peak_flops = peak["reps"] * 2 * peak["n"] ** 3 / peak["seconds"]  # CPU devices share one peak
    return tokens / seconds * _train_flops_per_token(model, seq_len) / peak_flops


def test_structure_and_statuses(quick):
    r, md, stdout = quick
    m = r["meta"]
    assert m["complete"] and m["platform"] == "cpu" and m["n_devices"] == len(m["devices"]) == 1
    assert m["jax"] == jax.__version__ and m["jaxlib"] and m["device_kind"] and "jax" in m["environment"]
    assert r["plan"]["quick"] and r["plan"]["proxies"] == {"demo proxy": [1, 2], "paper proxy": [1, 2]}
    assert sorted(r["peak"]) == ["bfloat16", "float32"] and r["peak_failed"] == []
    assert [(s["proxy"], s["N"], s["dtype"]) for s in r["sweep"]] == [
        ("demo proxy", 1, "float32"), ("demo proxy", 2, "float32"),
        ("paper proxy", 1, "bfloat16"), ("paper proxy", 2, "bfloat16")]
    assert [(t["model"], t["dtype"]) for t in r["target"]] == [("demo target", "float32"),
                                                                ("paper target", "bfloat16")]
    assert all(x["status"] == "ok" for k in ("sweep", "target", "memory") for x in r[k])
    statuses = {a["impl"]: a["status"] for a in r["attention"]}
    assert statuses["xla"] == "ok" and r["attention_auto"] == "xla"
    assert statuses["cudnn"].startswith("unavailable") and statuses["splash"].startswith("unavailable")
    assert stdout.strip().endswith(md.strip()) and md.startswith("## Accelerator check")
    assert 0 < m["seconds"] < m["budget_s"]


def test_peaks_recomputed(quick):
    r, _, _ = quick
    for dtype, p in r["peak"].items():
        assert p["dtype"] == dtype and p["seconds"] > 0
        np.testing.assert_allclose(p["flops_per_s"], p["reps"] * 2 * p["n"] ** 3 / p["seconds"], rtol=RTOL)


def test_sweep_figures_recomputed(quick):
    r, _, _ = quick
    for s in r["sweep"]:
        model, sweep_cfg = MODELS[s["proxy"]], (DEMO if s["proxy"] == "demo proxy" else PAPER).sweep
        assert (s["batch"], s["seq_len"]) == (sweep_cfg.batch_size, sweep_cfg.seq_len)
        assert s["tokens"] == s["N"] * s["S"] * sweep_cfg.batch_size * sweep_cfg.seq_len
        assert s["params"] == _n_params(model)
        np.testing.assert_allclose(s["flops_per_token"], _train_flops_per_token(model, s["seq_len"]), rtol=RTOL)
        for way in ("vmapped", "one_at_a_time", "plain_loop"):
            x = s[way]
            np.testing.assert_allclose(x["tokens_per_s"], s["tokens"] / x["seconds"], rtol=RTOL)
            np.testing.assert_allclose(x["mfu"], _mfu(r, s["tokens"], x["seconds"], model, s["seq_len"], s["dtype"]),
                                       rtol=RTOL)
        for way in ("one_at_a_time", "plain_loop"):  # same tokens each way: a ratio of seconds
            np.testing.assert_allclose(s[f"x_{way}"], s[way]["seconds"] / s["vmapped"]["seconds"], rtol=RTOL)


def test_target_figures_recomputed(quick):
    r, _, _ = quick
    for t in r["target"]:
        model, cfg = MODELS[t["model"]], DEMO if t["model"] == "demo target" else PAPER
        assert (t["batch"], t["seq_len"]) == (cfg.cpt.batch_size, cfg.data.record_len - 1)
        tokens = t["batch"] * t["seq_len"]
        np.testing.assert_allclose(t["tokens_per_s"], tokens / t["step_s"], rtol=RTOL)
        np.testing.assert_allclose(t["mfu"], _mfu(r, tokens, t["step_s"], model, t["seq_len"], t["dtype"]), rtol=RTOL)


def test_attention_figures_recomputed(quick):
    r, _, _ = quick
    a = next(x for x in r["attention"] if x["impl"] == "xla")
    B, L, H = PAPER.cpt.batch_size, PAPER.data.record_len - 1, PAPER.target.n_heads
    K = PAPER.target.d_model // H
    assert (a["batch"], a["seq_len"], a["n_heads"], a["kv_heads"], a["head_dim"]) == (B, L, H, PAPER.target.n_kv_heads, K)
    per_head_row = 2 * L * L * K  # one L x L x K product: QK^T, PV forward; four more backward (dQ, dK, dP, dV)
    assert a["flops"] == B * H * 6 * per_head_row
    np.testing.assert_allclose(a["flops_per_s"], a["flops"] / a["seconds"], rtol=RTOL)
    peak = r["peak"][a["dtype"]]
    np.testing.assert_allclose(a["mfu"], a["flops"] / a["seconds"] / peak["flops_per_s"], rtol=RTOL)
    assert a["max_abs_diff_vs_xla"] == {"out": 0.0, "dq": 0.0}  # the reference against itself


def test_goals_recomputed(quick):
    r, _, _ = quick
    demo2 = next(s for s in r["sweep"] if s["proxy"] == "demo proxy" and s["N"] == 2)
    paper2 = next(s for s in r["sweep"] if s["proxy"] == "paper proxy" and s["N"] == 2)
    target = next(t for t in r["target"] if t["model"] == "paper target")
    expected = [demo2["one_at_a_time"]["seconds"] / demo2["vmapped"]["seconds"],
                _mfu(r, paper2["tokens"], paper2["vmapped"]["seconds"], PAPER.proxy, paper2["seq_len"], "bfloat16"),
                _mfu(r, target["batch"] * target["seq_len"], target["step_s"], PAPER.target, target["seq_len"],
                     "bfloat16")]
    assert [g["threshold"] for g in r["goals"]] == [10.0, 0.4, 0.4]
    for g, value in zip(r["goals"], expected):
        np.testing.assert_allclose(g["value"], value, rtol=RTOL)
        assert g["met"] == (value >= g["threshold"])


def test_markdown_cells_match_json(quick):
    r, md, _ = quick
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    for s in r["sweep"]:
        row = next(x for x in rows if x[:4] == [s["proxy"], f"{s['params'] / 1e6:.2f}M", s["dtype"], str(s["N"])])
        v, one = s["vmapped"], s["one_at_a_time"]
        assert row[7] == f"{s['tokens'] / v['seconds']:,.0f} ({v['mfu']:.0%})"
        assert row[10] == f"{one['seconds'] / v['seconds']:.2f}"
    for g in r["goals"]:
        row = next(x for x in rows if x[0] == g["goal"])
        assert row[1:] == [f"{g['value']:.3g}", f">= {g['threshold']:g}", "met" if g["met"] else "**missed**"]


def test_refuses_cpu_without_quick(tmp_path, capsys):
    assert _bench_module().main([str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--allow-cpu" in err and "cpu" in err
    assert not (tmp_path / "r.json").exists()


def test_zero_budget_skips_every_item(tmp_path):
    assert _bench_module().main([str(tmp_path / "r.json"), "--quick", "--budget-s", "0"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    items = r["peak_failed"] + r["target"] + r["memory"] + r["sweep"]
    assert r["meta"]["complete"] and r["peak"] == {} and len(items) == 2 + 2 + 2 + 4
    assert [x["status"] for x in r["peak_failed"] + r["memory"]] == [accelerator.SKIPPED] * 4
    # with no peak, what needs one is skipped for that (and the time budget would have skipped it too)
    assert all(x["status"].startswith("skipped") for x in items)
    assert [g["value"] for g in r["goals"]] == [None] * 3 and [g["met"] for g in r["goals"]] == [None] * 3
    assert "skipped: time budget" in (tmp_path / "r.md").read_text()


def test_clock_caps_and_predictions(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(accelerator, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    caps = accelerator.CAPS
    clock = accelerator.Clock(100.0)
    clock.start("peak")  # its share over all shares of the 100 s left
    cap = 100.0 * caps["peak"] / sum(caps.values())
    assert clock.cap_end == pytest.approx(100.0 + cap) and clock.allows()  # the first item: half the cap
    clock.took(cap / 2)
    now[0] += cap / 2
    assert not clock.allows()  # 1.5 x cap / 2 more would end past the cap
    now[0] = 150.0  # the attention, last, gets all that is left
    clock.start("attention")
    assert clock.cap_end == pytest.approx(200.0)
    now[0] = 201.0
    clock.start("attention")
    assert not clock.allows()  # past the deadline nothing starts


def test_failure_statuses():
    assert accelerator._failure(accelerator.DoesNotFit("too big")).startswith("skipped: does not fit")
    assert accelerator._failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")).startswith(
        "skipped: does not fit")
    assert accelerator._failure(ValueError("bad\nsecond line")) == "error: ValueError: bad"

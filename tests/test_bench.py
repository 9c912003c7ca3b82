"""`dma bench`: the quick mode runs end to end; timings are not asserted, only what can be known without a clock.

Checked against independent numbers: tokens trained (N * S * B * L from the config), the FLOPs per
token behind every MFU (counted here from the model's weight shapes), the speed-ups against the
seconds of the same tokens, the bytes an AdamW train state needs at least (3 float32 copies of the
parameters per proxy), the loader's consumption and the agent's share derived from the target step
time, the table's numbers against the JSON's, the largest divisor chosen as a chunk, the goals'
verdicts on made-up results, and the warm-up/repeat rule of the timer on a fake clock. The stage the
bench times is checked to be the sweep's own: same inputs, bitwise the same outputs as
`sweep.make_stage`.
"""

import json
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dma_jax import sweep
from dma_jax.config import load_config
from dma_jax.errors import DmaError
from dma_jax.models.lm import LMDef, param_count_formula
from dma_jax.perf import bench, measure, proxies
from dma_jax.train import TrainState
from tests.paths import DEMO

FAST = ["proxy.n_layers=1", "target.n_layers=1"]  # compiles faster


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cfg = load_config(DEMO, FAST, variant="tiny")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    results = bench.run_bench(True, None, out, cfg, ns=(1, 2), devices=jax.devices()[:1], progress=False)
    return cfg, out, results


def _finite_positive(x, where=""):
    assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, f"{where}: {x!r}"


def _train_flops_per_token(model, seq_len: int) -> float:
    """Counted from the built model: a forward pass spends 2 FLOPs per weight of every matrix (the tied
    embedding counts once, as the output head; the input lookup is a gather) and 2 L H K on each of
    QK^T and PV per layer; the backward pass twice the forward."""
    params = LMDef.build(model).abstract_params
    weights = sum(math.prod(a.shape) for a in jax.tree.leaves(params) if a.ndim >= 2)
    attention = 0
    for block in params["blocks"].values():
        _, H, K = block["attn"]["wq_DxHxK"].shape
        attention += 2 * (2 * seq_len * H * K)
    return 3 * (2 * weights + attention)


def test_quick_bench_measures_every_section(quick):
    cfg, out, r = quick
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))  # the JSON file holds the returned results
    sc, S = cfg.sweep, 2
    assert [(s["proxy"], s["N"]) for s in r["sweep"]] == [(bench.DEMO_PROXY, 1), (bench.DEMO_PROXY, 2)]
    peak = r["peak"]["flops_per_s"]
    _finite_positive(peak)
    for s in r["sweep"]:
        assert s["tokens"] == s["N"] * S * sc.batch_size * sc.seq_len
        assert s["params"] == param_count_formula(cfg.proxy)
        for way in ("vmapped", "plain_loop", "one_at_a_time"):
            for key in ("seconds", "tokens_per_s", "mfu"):
                _finite_positive(s[way][key], f"N={s['N']} {way} {key}")
            # the FLOPs per token behind the MFU (one device: one peak), against a count of the model's matrices
            np.testing.assert_allclose(s[way]["mfu"] * peak / s[way]["tokens_per_s"],
                                       _train_flops_per_token(cfg.proxy, sc.seq_len), rtol=1e-9)
            assert s[way]["compile_s"] >= 0
        for way in ("plain_loop", "one_at_a_time"):  # the same tokens each way: the speed-up is a ratio of seconds
            np.testing.assert_allclose(s[f"x_{way}"], s[way]["seconds"] / s["vmapped"]["seconds"], rtol=1e-9)
    assert [(x["N"], x["T"]) for x in r["time_vs_t"]] == [(2, 1), (2, 2)]
    assert 0 < r["time_vs_t"][0]["seconds"] < r["time_vs_t"][1]["seconds"]
    (target,) = r["target"]
    assert (target["batch"], target["seq_len"]) == (cfg.cpt.batch_size, cfg.data.record_len - 1)
    _finite_positive(target["step_s"])
    np.testing.assert_allclose(target["tokens_per_s"], cfg.cpt.batch_size * (cfg.data.record_len - 1)
                               / target["step_s"], rtol=1e-9)
    np.testing.assert_allclose(target["mfu"] * peak / target["tokens_per_s"],
                               _train_flops_per_token(cfg.target, cfg.data.record_len - 1), rtol=1e-9)
    loader = r["loader"]
    records_per_s = cfg.cpt.batch_size / target["step_s"]
    np.testing.assert_allclose(loader["train_tokens_per_s"], records_per_s * cfg.data.record_len)
    assert [(x["reader"], x["threads"], x["processes"]) for x in loader["runs"]] == [
        ("DomainMixer", 0, 0), ("DomainMixer", 2, 0), ("grain mix (fixed)", 0, 0), ("grain mix (fixed)", 0, 2)]
    for x in loader["runs"]:
        _finite_positive(x["tokens_per_s"])
    agent = r["agent"]
    assert agent["model"] == cfg.agent.model.model_dump(mode="json") and agent["horizon"] == cfg.cpt.num_stages
    _finite_positive(agent["decision_s"])
    np.testing.assert_allclose(agent["stage_s"], cfg.cpt.steps_per_stage * target["step_s"])
    np.testing.assert_allclose(agent["share"], agent["decision_s"] / (agent["decision_s"] + agent["stage_s"]))
    assert len(r["goals"]) == 6


def test_bench_times_the_sweeps_own_stage():
    """ProxyBench's compiled stage, run on the same inputs as `sweep.make_stage` called directly, gives bitwise
    the same proxies and losses: a bench that drifted from the sweep's code would fail here."""
    cfg = load_config(DEMO, FAST, variant="tiny")
    sc, n, S = cfg.sweep, 2, 2
    pb = proxies.ProxyBench(cfg.proxy, cfg.optim, S, sc.batch_size, sc.seq_len, jax.devices()[:2], seed=3)
    exe, _, mesh = pb.compiled(n, 2)
    traj, rep = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
    direct = sweep.make_stage(pb.lm, pb.tx, steps=S, batch_size=sc.batch_size, seq_len=sc.seq_len, seed=3,
                              mesh=mesh)

    def inputs():
        params = jax.tree.map(jnp.asarray, pb.base_params)
        state_n = jax.vmap(lambda _: TrainState(jnp.zeros((), jnp.int32), params, pb.tx.init(params)))(jnp.arange(n))
        return (jax.device_put(state_n, traj), jax.device_put(pb.weights(n), traj),
                jax.device_put(np.array([5, 9], np.int32), traj), jax.device_put(np.int32(4), rep),
                jax.device_put(np.full(n, np.inf, np.float32), traj), jax.device_put(pb.pools, rep))

    state_b, losses_b = exe(*inputs())
    state_d, losses_d = direct(*inputs())
    assert losses_b.shape == (n, S) and np.all(np.isfinite(losses_b))
    np.testing.assert_array_equal(np.asarray(state_b.step), [S] * n)  # S optimizer steps per proxy
    np.testing.assert_array_equal(np.asarray(losses_b), np.asarray(losses_d))
    for a, b in zip(jax.tree.leaves(state_b), jax.tree.leaves(state_d)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p0, p1 = (jax.tree.map(lambda a, i=i: np.asarray(a[i]), state_b.params) for i in range(n))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))  # own mixtures


def test_compiled_memory_grows_by_at_least_a_train_state_per_proxy(quick):
    cfg, _, r = quick
    (mem,) = r["memory"]
    b1, b2 = (p["bytes"] for p in mem["points"])
    state_bytes = 3 * 4 * param_count_formula(cfg.proxy)  # parameters and two AdamW moments, float32
    assert b2 - b1 >= state_bytes
    np.testing.assert_allclose(mem["per_proxy_bytes"], b2 - b1, rtol=1e-6)
    budget = mem["budget_bytes"]
    assert mem["max_n"] * mem["per_proxy_bytes"] + mem["fixed_bytes"] <= budget
    assert (mem["max_n"] + 1) * mem["per_proxy_bytes"] + mem["fixed_bytes"] > budget


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%M"))


def test_format_table_shows_the_jsons_numbers(quick):
    r = quick[2]
    lines = bench.format_table(r).splitlines()
    cells = lambda prefix: [re.split(r"\s{2,}", ln.strip()) for ln in lines if ln.startswith(prefix)]  # noqa: E731
    rows = cells("  demo proxy ")
    sweep_rows, mem_rows = rows[:len(r["sweep"])], rows[len(r["sweep"]):]
    assert len(sweep_rows) == 2 and len(mem_rows) == 1
    for row, s in zip(sweep_rows, r["sweep"]):
        proxy, params, n, steps, chunk, vm, plain, one, x_plain, x_one, sweep_s, compile_s = row
        assert (proxy, int(n), int(steps), int(chunk)) == (s["proxy"], s["N"], s["S"], s["chunk"])
        assert abs(_number(params) * 1e6 - s["params"]) <= 0.0051e6
        for cell, way in ((vm, "vmapped"), (plain, "plain_loop"), (one, "one_at_a_time")):
            tokens_per_s, mfu = re.fullmatch(r"([\d,]+) \((\d+)%\)", cell).groups()
            assert abs(_number(tokens_per_s) - s[way]["tokens_per_s"]) <= 0.5
            assert abs(int(mfu) - 100 * s[way]["mfu"]) <= 0.5
        assert abs(float(x_plain) - s["x_plain_loop"]) <= 0.005 and abs(float(x_one) - s["x_one_at_a_time"]) <= 0.005
        np.testing.assert_allclose(float(sweep_s), s["vmapped"]["seconds"], rtol=5e-3)
        assert abs(float(compile_s) - s["vmapped"]["compile_s"]) <= 0.05
    (mem,) = r["memory"]
    _, at_n, per_proxy, fixed, max_n = mem_rows[0]
    for cell, p in zip(at_n.split(" / "), mem["points"]):
        assert abs(_number(cell) * 2**20 - p["bytes"]) <= 0.05 * 2**20
    assert abs(_number(per_proxy) * 2**20 - mem["per_proxy_bytes"]) <= 0.05 * 2**20
    assert abs(_number(fixed) * 2**20 - mem["fixed_bytes"]) <= 0.05 * 2**20
    assert int(max_n) == mem["max_n"]
    (target_row,) = cells("  demo target ")
    t = r["target"][0]
    assert abs(float(target_row[3]) - t["step_s"]) <= 5e-4 and abs(_number(target_row[4]) - t["tokens_per_s"]) <= 0.5
    loader_rows = cells("  DomainMixer ") + cells("  grain mix (fixed) ")
    for row, x in zip(loader_rows, r["loader"]["runs"]):
        assert abs(_number(row[-2]) - x["tokens_per_s"]) <= 0.5 and abs(float(row[-1]) - x["x_train_step"]) <= 0.05
    assert len(loader_rows) == len(r["loader"]["runs"])
    (agent,) = [ln for ln in lines if ln.startswith("4. Agent")]
    assert f"one decision {r['agent']['decision_s'] * 1e3:.2f} ms" in agent
    goal_lines = lines[lines.index("Goals") + 1:]
    assert len(goal_lines) == len(r["goals"])
    for line, g in zip(goal_lines, r["goals"]):
        assert g["goal"] in line and ("[met ]" in line) == (g["met"] is True)


def test_full_plan_has_the_sizes_the_issue_asks_for():
    cfg = load_config(DEMO)
    plan = bench.plan_for(cfg, quick=False)
    assert isinstance(plan, bench.BenchPlan) and plan.ns == (1, 4, 16, 64)
    (_, demo, _), (_, large, _) = plan.proxies
    assert demo == cfg.proxy and param_count_formula(large) >= 6e6
    assert plan.targets[0][1] == cfg.target and param_count_formula(plan.targets[1][1]) >= 50e6
    assert len(bench.plan_for(cfg, quick=True).proxies) == 1


def test_chunk_is_the_largest_divisor_that_fits_per_device():
    assert proxies.chunk_for(64, {"max_n_per_device": 10}, 1) == 8
    assert proxies.chunk_for(64, {"max_n_per_device": 10}, 8) == 64  # 8 proxies on each of 8 devices
    assert proxies.chunk_for(64, {"max_n_per_device": 10, "shared_host": True}, 8) == 8  # CPU: one budget
    assert proxies.chunk_for(48, {"max_n_per_device": 5}, 1) == 4
    assert proxies.chunk_for(16, {"max_n_per_device": 0}, 1) == 1
    assert proxies.chunk_for(16, {"max_n_per_device": None}, 1) == 16


class _FakeClock:
    """`perf_counter` that only moves when `run` is called, by the next of `durations`."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, iter(durations), 0

    def perf_counter(self):
        return self.now

    def run(self):
        self.now += next(self.durations)
        self.calls += 1


@pytest.mark.parametrize("durations, min_seconds, seconds, calls", [
    ([3.0], 0.1, 3.0, 1),  # >= 20 * min_seconds: the first call counts alone
    ([1.0, 0.9], 0.1, 0.9, 2),  # shorter: the first call is a warm-up, then at least one more
    ([0.05, 0.02, 0.01, 0.03], 0.06, 0.01, 4),  # repeated until ~min_seconds, the fastest kept
    ([1e-4] * 51, 0.1, 1e-4, 51),  # at most 50 repeats
])
def test_seconds_warms_up_repeats_and_keeps_the_fastest(monkeypatch, durations, min_seconds, seconds, calls):
    clock = _FakeClock(durations)
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    assert measure.best_seconds(clock.run, min_seconds) == pytest.approx(seconds)
    assert clock.calls == calls


def _row(proxy, n, mfu, x_plain, x_one):
    return {"proxy": proxy, "N": n, "vmapped": {"mfu": mfu}, "x_plain_loop": x_plain, "x_one_at_a_time": x_one}


def test_goals_verdicts():
    r = {"sweep": [_row(bench.DEMO_PROXY, 1, 0.1, 1.0, 0.9), _row(bench.DEMO_PROXY, 16, 0.45, 2.5, 1.2),
                   _row(bench.LARGE_PROXY, 16, 0.5, 1.1, 1.05)],
         "loader": {"runs": [{"x_train_step": 4.0}, {"x_train_step": 12.0}]}, "agent": {"share": 0.02}}
    verdicts = {g["goal"]: (g["value"], g["met"]) for g in bench.goals(r)}
    assert verdicts == {
        "sweep MFU, large proxy, largest N": (0.5, False),
        "sweep MFU, demo proxy, largest N": (0.45, True),
        "vmapped sweep / plain loop, demo proxy, N=16": (2.5, True),
        "vmapped sweep / one at a time, worst N > 1": (1.05, True),  # N = 1 (0.9) runs one program both ways
        "loader / train-step consumption, best threads": (12.0, True),
        "agent decision / re-weighting step": (0.02, False),
    }
    r["sweep"] = []
    assert {g["met"] for g in bench.goals(r)[:4]} == {None}


@pytest.mark.parametrize("kwargs, match", [({"memory_budget_gb": 0.0}, "memory-budget-gb"),
                                           ({"memory_budget_gb": float("nan")}, "memory-budget-gb"),
                                           ({"ns": (0, 4)}, "proxies")])
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, match):
    args = {"memory_budget_gb": None, "ns": None} | kwargs
    with pytest.raises(DmaError, match=match):
        bench.run_bench(True, args["memory_budget_gb"], tmp_path / "b.json", load_config(DEMO, variant="tiny"),
                        ns=args["ns"], progress=False)

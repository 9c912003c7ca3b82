"""`dma bench`: the quick mode runs end to end; timings are not asserted, only what can be known without a clock.

Checked against independent numbers: tokens trained (N * S * B * L), the bytes an
AdamW train state needs at least (3 float32 copies of the parameters per proxy),
the loader's consumption and the agent's share derived from the target step time,
the largest divisor chosen as a chunk, the goals' verdicts on made-up results, and
the warm-up/repeat rule of the timer on a fake clock.
"""

import json
import math
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from dma_jax import bench, measure
from dma_jax.config import load_config
from dma_jax.errors import DmaError
from dma_jax.models.lm import param_count_formula

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cfg = load_config(DEMO, ["proxy.n_layers=1", "target.n_layers=1"], variant="tiny")  # compiles faster
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    results = bench.run_bench(True, None, out, cfg, ns=(1, 2), devices=jax.devices()[:1], progress=False)
    return cfg, out, results


def _finite_positive(x, where=""):
    assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, f"{where}: {x!r}"


def test_quick_bench_measures_every_section(quick):
    cfg, out, r = quick
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))  # the JSON file holds the returned results
    sc, S = cfg.sweep, 2
    assert [(s["proxy"], s["N"]) for s in r["sweep"]] == [(bench.DEMO_PROXY, 1), (bench.DEMO_PROXY, 2)]
    for s in r["sweep"]:
        assert s["tokens"] == s["N"] * S * sc.batch_size * sc.seq_len
        assert s["params"] == param_count_formula(cfg.proxy)
        for way in ("vmapped", "plain_loop", "one_at_a_time"):
            for key in ("seconds", "tokens_per_s", "mfu"):
                _finite_positive(s[way][key], f"N={s['N']} {way} {key}")
            np.testing.assert_allclose(s[way]["tokens_per_s"] * s[way]["seconds"], s["tokens"], rtol=1e-9)
            assert s[way]["compile_s"] >= 0
        np.testing.assert_allclose(s["x_plain_loop"], s["vmapped"]["tokens_per_s"] / s["plain_loop"]["tokens_per_s"])
    assert [(x["N"], x["T"]) for x in r["time_vs_t"]] == [(2, 1), (2, 2)]
    assert 0 < r["time_vs_t"][0]["seconds"] < r["time_vs_t"][1]["seconds"]
    _finite_positive(r["peak"]["flops_per_s"])
    (target,) = r["target"]
    assert (target["batch"], target["seq_len"]) == (cfg.cpt.batch_size, cfg.data.record_len - 1)
    _finite_positive(target["step_s"])
    _finite_positive(target["mfu"])
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


def test_format_table_shows_every_section(quick):
    text = bench.format_table(quick[2])
    for heading in ("1. Sweep throughput", "2. Cost growth", "3. Loader", "4. Agent", "5. Target training", "Goals"):
        assert heading in text
    assert "demo proxy" in text and "demo target" in text


def test_full_plan_has_the_sizes_the_issue_asks_for():
    cfg = load_config(DEMO)
    plan = bench.plan_for(cfg, quick=False)
    assert plan.ns == (1, 4, 16, 64)
    (_, demo, _), (_, large, _) = plan.proxies
    assert demo == cfg.proxy and param_count_formula(large) >= 6e6
    assert plan.targets[0][1] == cfg.target and param_count_formula(plan.targets[1][1]) >= 50e6
    assert len(bench.plan_for(cfg, quick=True).proxies) == 1


def test_chunk_is_the_largest_divisor_that_fits_per_device():
    assert measure.chunk_for(64, {"max_n_per_device": 10}, 1) == 8
    assert measure.chunk_for(64, {"max_n_per_device": 10}, 8) == 64  # 8 proxies on each of 8 devices
    assert measure.chunk_for(64, {"max_n_per_device": 10, "shared_host": True}, 8) == 8  # CPU: one budget
    assert measure.chunk_for(48, {"max_n_per_device": 5}, 1) == 4
    assert measure.chunk_for(16, {"max_n_per_device": 0}, 1) == 1
    assert measure.chunk_for(16, {"max_n_per_device": None}, 1) == 16


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
    assert measure._seconds(clock.run, min_seconds) == pytest.approx(seconds)
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

"""`dma bench`: what the pipeline's hot paths cost on this machine, measured in one run (table + JSON).

1. Sweep throughput: N proxies trained by the sweep's own stage (`sweep.make_stage`) vs the same N
   proxies trained (a) by the project's plain per-step loop (`Trainer.step` fed host
   batches, proxy after proxy, as a user without the sweep would write it) and (b) one
   proxy at a time through the same stage; same tokens. Tokens/s over all proxies
   and model-FLOPs utilisation (MFU) against a matmul peak measured in the same run.
2. Cost growth: sweep time vs N (table 1) and vs T; compiled bytes per proxy from the AOT
   memory analysis, fitted over N, and the largest N that fits a memory budget. Sweeps
   whose N does not fit run in chunks, as `sweep.chunk_size` would.
3. Loader: the Grain mixer reading packed ArrayRecord shards (the CPT read path), with 0 and
   2 reader threads, and a fixed-mixture Grain pipeline with 0 and 2 worker processes, vs the
   target train step's consumption.
4. Agent: latency of one decision and its share of a re-weighting step.
5. Target training: train-step MFU.
Synthetic data (random tokens) throughout: nothing needs `dma prepare`. The measurements live in
`dma_jax.perf.measure` and `dma_jax.perf.proxies`; this module plans them, checks the goals and prints the table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import jax
from tqdm.auto import tqdm

from dma_jax.config import Config, ModelConfig
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_json
from dma_jax.perf import measure, proxies

DEMO_PROXY, LARGE_PROXY = "demo proxy", "large proxy"


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    """What one bench run measures; `plan_for` derives it from a config and the mode."""

    proxies: tuple[tuple[str, ModelConfig, int], ...]  # (name, model, S optimizer steps per timed stage)
    targets: tuple[tuple[str, ModelConfig, int, int], ...]  # (name, model, batch, seq_len); the first is the demo
    ns: tuple[int, ...]  # numbers of proxies
    t_values: tuple[int, ...]  # re-weighting steps of the time-vs-T curve
    min_seconds: float  # a timed run shorter than this is repeated and the fastest repeat kept
    loader_batches: int
    agent_domains: int  # the paper's domain space has 52
    agent_decisions: int


def plan_for(cfg: Config, quick: bool, ns: Sequence[int] | None = None) -> BenchPlan:
    """The demo sizes of `cfg`; full mode adds a >= 6M-parameter proxy and a >= 50M-parameter target."""
    vocab = cfg.proxy.vocab_size
    large_proxy = ModelConfig(vocab_size=vocab, d_model=384, n_layers=4, n_heads=6, d_ff=1024,
                              max_seq_len=cfg.sweep.seq_len)
    large_target = ModelConfig(vocab_size=vocab, d_model=768, n_layers=8, n_heads=12, d_ff=2048, max_seq_len=256)
    demo_target = ("demo target", cfg.target, cfg.cpt.batch_size, cfg.data.record_len - 1)
    if quick:
        return BenchPlan(proxies=((DEMO_PROXY, cfg.proxy, 2),), targets=(demo_target,), ns=tuple(ns or (1, 4)),
                    t_values=(1, 2), min_seconds=0.2, loader_batches=30, agent_domains=52, agent_decisions=10)
    return BenchPlan(proxies=((DEMO_PROXY, cfg.proxy, 5), (LARGE_PROXY, large_proxy, 1)),
                targets=(demo_target, ("large target", large_target, 4, 256)), ns=tuple(ns or (1, 4, 16, 64)),
                t_values=(1, 2, 4, 8), min_seconds=1.0, loader_batches=400, agent_domains=52, agent_decisions=50)


def run_bench(quick: bool, memory_budget_gb: float | None, out_json: str | Path, cfg: Config,
              ns: Sequence[int] | None = None, devices=None, progress: bool = True) -> dict:
    """Run every measurement, write the results to `out_json` (atomically) and return them."""
    if memory_budget_gb is not None and not (math.isfinite(memory_budget_gb) and memory_budget_gb > 0):
        raise DmaError(f"bench: --memory-budget-gb={memory_budget_gb} must be a positive number of GiB")
    if ns is not None and (not ns or min(ns) < 1):
        raise DmaError(f"bench: --n {list(ns)}: numbers of proxies must be >= 1")
    plan = plan_for(cfg, quick, sorted(set(ns)) if ns else None)
    devices = list(devices if devices is not None else jax.devices())
    n_dev, dev0 = len(devices), devices[0]
    budget, budget_source = proxies.memory_budget(memory_budget_gb, dev0)
    t_start = time.perf_counter()
    r: dict = {"meta": {"quick": quick, "platform": dev0.platform, "device_kind": dev0.device_kind,
                        "n_devices": n_dev, "jax": jax.__version__, "machine": platform.machine(),
                        "cpu_count": os.cpu_count(), "memory_budget_bytes": budget,
                        "memory_budget_source": budget_source, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "sweep": [], "memory": [], "time_vs_t": [], "target": []}
    n_tasks = 4 + len(plan.targets) + sum(1 + len(plan.ns) for _ in plan.proxies)
    bar = tqdm(total=n_tasks, desc="bench", unit="task", disable=not progress, dynamic_ncols=True)

    def task(what: str) -> None:
        bar.set_postfix_str(what)

    task("matmul peak")
    r["peak"] = peak = measure.measure_peak(dev0, plan.min_seconds)
    bar.update()
    for name, model, batch, seq_len in plan.targets:  # targets, loader and agent first: they fail fast
        task(name)
        r["target"].append(measure.bench_target(name, model, batch, seq_len, cfg.optim, devices, peak,
                                                plan.min_seconds))
        bar.update()
    demo_step_s = r["target"][0]["step_s"]
    task("loader")
    r["loader"] = measure.bench_loader(cfg.data.record_len, cfg.target.vocab_size, cfg.cpt.batch_size,
                                       plan.loader_batches, demo_step_s)
    bar.update()
    task("agent")
    r["agent"] = measure.bench_agent(cfg.agent.model, plan.agent_domains, cfg.cpt.num_stages, plan.agent_decisions,
                                     cfg.cpt.steps_per_stage * demo_step_s)
    bar.update()
    for name, model, steps in plan.proxies:
        pb = proxies.ProxyBench(model, cfg.optim, steps, cfg.sweep.batch_size, cfg.sweep.seq_len, devices,
                                cfg.run.seed)
        task(f"{name}: compiled memory")
        mem = dict(proxies.memory_fit(pb, plan.ns, budget, n_dev, dev0.platform == "cpu"), proxy=name)
        r["memory"].append(mem)
        bar.update()
        for n in plan.ns:
            task(f"{name}: N={n}")
            r["sweep"].append(proxies.bench_sweep(pb, name, n, proxies.chunk_for(n, mem, n_dev), peak,
                                                  plan.min_seconds))
            bar.update()
        if name == DEMO_PROXY:
            task(f"{name}: time vs T")
            n = min([k for k in plan.ns if k > 1], default=plan.ns[0])
            r["time_vs_t"] = proxies.time_vs_t(pb, n, proxies.chunk_for(n, mem, n_dev), plan.t_values)
            bar.update()
        del pb
    bar.close()
    r["goals"] = goals(r)
    r["meta"]["seconds"] = time.perf_counter() - t_start
    atomic_write_json(out_json, r)
    return r


def goals(r: dict) -> list[dict]:
    """The issue's goals, each with the measured value and whether it is met (None: not measured)."""
    out: list[dict] = []

    def add(goal: str, value: float | None, threshold: float, at_least: bool = True) -> None:
        met = None if value is None else bool(value >= threshold if at_least else value < threshold)
        out.append({"goal": goal, "value": value, "threshold": threshold, "at_least": at_least, "met": met})

    rows = {name: [s for s in r["sweep"] if s["proxy"] == name] for name in (DEMO_PROXY, LARGE_PROXY)}
    for name, threshold in ((LARGE_PROXY, 0.6), (DEMO_PROXY, 0.4)):
        add(f"sweep MFU, {name}, largest N", rows[name][-1]["vmapped"]["mfu"] if rows[name] else None, threshold)
    n16 = [s["x_plain_loop"] for s in rows[DEMO_PROXY] if s["N"] == 16]
    add("vmapped sweep / plain loop, demo proxy, N=16", n16[0] if n16 else None, 2.0)
    vs_one = [s["x_one_at_a_time"] for s in r["sweep"] if s["N"] > 1]  # at N = 1 both run one program
    add("vmapped sweep / one at a time, worst N > 1", min(vs_one) if vs_one else None, 1.0)
    add("loader / train-step consumption, best threads", max(x["x_train_step"] for x in r["loader"]["runs"]), 10.0)
    add("agent decision / re-weighting step", r["agent"]["share"], 0.01, at_least=False)
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return ["  " + fmt(row) for row in cells]


def _rate(x: dict) -> str:
    return f"{x['tokens_per_s']:,.0f} ({x['mfu']:.0%})"


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def format_table(r: dict) -> str:
    """The results as plain-text tables, one per measurement, then the goals."""
    m, peak = r["meta"], r["peak"]
    lines = [f"dma bench{' --quick' if m['quick'] else ''}: {m['n_devices']} {m['platform']} device(s) "
             f"({m['device_kind']}, {m['cpu_count']} CPUs), jax {m['jax']}, {m['seconds']:.0f} s",
             f"matmul peak {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s ({peak['matmul']}); every MFU is against it", "",
             "1. Sweep throughput: tokens/s over all N proxies (MFU), same tokens each way"]
    lines += _table(
        ["proxy", "params", "N", "S", "chunk", "vmapped sweep", "plain loop", "one at a time", "x plain",
         "x one", "sweep s", "compile s"],
        [[s["proxy"], f"{s['params'] / 1e6:.2f}M", s["N"], s["S"], s["chunk"], _rate(s["vmapped"]),
          _rate(s["plain_loop"]), _rate(s["one_at_a_time"]), f"{s['x_plain_loop']:.2f}",
          f"{s['x_one_at_a_time']:.2f}", f"{s['vmapped']['seconds']:.3g}", f"{s['vmapped']['compile_s']:.1f}"]
         for s in r["sweep"]])
    lines += ["", "2. Cost growth: sweep time vs N is 'sweep s' above; vs T (re-weighting steps):"]
    lines += ["  " + "   ".join(f"N={x['N']} S={x['S']} T={x['T']}: {x['seconds']:.3g} s" for x in r["time_vs_t"])]
    lines += [f"  compiled memory per device (XLA memory analysis); budget {m['memory_budget_bytes'] / 2**30:.3g} GiB "
              f"({m['memory_budget_source']})"]
    lines += _table(["proxy", "MiB at N=" + ",".join(str(p["n"]) for p in r["memory"][0]["points"]),
                     "MiB per proxy", "MiB fixed", "largest N"],
                    [[x["proxy"], " / ".join(_mib(p["bytes"]) for p in x["points"]), _mib(x["per_proxy_bytes"]),
                      _mib(x["fixed_bytes"]), "n/a" if x["max_n"] is None else x["max_n"]] for x in r["memory"]])
    ld = r["loader"]
    lines += ["", f"3. Loader: Grain mixer over ArrayRecord shards; the demo target step consumes "
                  f"{ld['train_tokens_per_s']:,.0f} tokens/s (batch {ld['batch']} x {ld['record_len']})"]
    lines += _table(["reader", "threads", "processes", "tokens/s", "x train step"],
                    [[x["reader"], x["threads"], x["processes"], f"{x['tokens_per_s']:,.0f}",
                      f"{x['x_train_step']:.1f}"] for x in ld["runs"]])
    a = r["agent"]
    lines += ["", f"4. Agent: one decision {a['decision_s'] * 1e3:.2f} ms (D={a['n_domains']}, T={a['horizon']}; "
                  f"compile {a['compile_s']:.1f} s); a re-weighting step trains {a['stage_s']:.2f} s "
                  f"-> share {a['share']:.3%}", "", "5. Target training step"]
    lines += _table(["model", "params", "batch x seq", "step s", "tokens/s", "MFU", "compile s"],
                    [[t["model"], f"{t['params'] / 1e6:.1f}M", f"{t['batch']} x {t['seq_len']}", f"{t['step_s']:.3f}",
                      f"{t['tokens_per_s']:,.0f}", f"{t['mfu']:.0%}", f"{t['compile_s']:.1f}"] for t in r["target"]])
    lines += ["", "Goals"]
    for g in r["goals"]:
        mark = {True: "met ", False: "MISS", None: "n/a "}[g["met"]]
        value = "not measured" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"  [{mark}] {g['goal']}: {value} (goal {'>=' if g['at_least'] else '<'} {g['threshold']:g})")
    return "\n".join(lines)

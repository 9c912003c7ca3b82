"""The one-command accelerator check (`bash bench/accelerator_check.sh OUT_DIR`, issue 19): on a GPU or TPU,
within 8 minutes, what the sweep and training cost at the demo's and the paper's sizes, against the goals.

1. Matmul peaks in bfloat16 and float32, measured in the run: every MFU is against the peak of its model's
   compute dtype.
2. Target train steps (`measure.bench_target`): the demo target (its float32, and bfloat16) and the paper's
   1.06B target in bfloat16 (float32 master weights), skipped if its train state cannot fit a device.
3. The sweep (`proxies.bench_sweep`): its stage vmapped over N proxies vs one proxy at a time (and the plain
   loop) for the demo proxy at N = 1, 4, 16, 64 and the paper's 48M proxy in bfloat16 at N = 1, 4, 16.
4. Attention: forward + backward of the paper target's attention at 1024 tokens by each `model.attention`
   kernel the backend has (`dma_jax.models.attention`); the others are recorded as unavailable.

Every measurement has a time cap (its share of what is left of the budget) and the run a deadline: an item
predicted to end past its cap is recorded as "skipped: time budget" instead of run. `save` is called after every item, so
a run killed from outside keeps what it measured. `quick` runs the configs' `tiny` sizes at N = 1, 2.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.config import Config, ModelConfig, OptimConfig
from dma_jax.errors import DmaError
from dma_jax.models import attention
from dma_jax.models.lm import flops_per_token, param_count_formula
from dma_jax.perf import measure, proxies

DEMO_PROXY, PAPER_PROXY, DEMO_TARGET, PAPER_TARGET = "demo proxy", "paper proxy", "demo target", "paper target"
GOAL_X_ONE, GOAL_MFU = 10.0, 0.4  # vmapped / one at a time at the demo proxy's largest N; bf16 MFU at paper sizes
# The measurements in the order they run, each with its share of the time: a measurement's cap is its share of
# what is left of the budget over its own and the later measurements' shares (time one leaves flows on).
CAPS = {"peak": 0.05, DEMO_TARGET: 0.08, DEMO_PROXY: 0.2, PAPER_PROXY: 0.3, PAPER_TARGET: 0.25, "attention": 0.12}
FIRST_GUESS, GROWTH = 0.5, 1.5  # predicted item cost: the first of a cap its half, the next 1.5x the previous
SKIPPED = "skipped: time budget"
STATE_BYTES_PER_PARAM = 16  # float32 parameters, gradients and two AdamW moments


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one check measures; `plan_for` derives it from the demo and paper configs."""

    quick: bool
    peak_n: int  # the peak's matmul is n x n x n, `peak_reps` of them chained in one call
    peak_reps: int
    min_seconds: float  # `measure.best_seconds`: repeat a timed run shorter than this, keep the fastest
    targets: tuple[tuple[str, ModelConfig, OptimConfig, int, int], ...]  # (name, model, optim, batch, seq_len)
    proxies: tuple[tuple[str, ModelConfig, OptimConfig, int, int, int, tuple[int, ...]], ...]  # + S, B, L, Ns
    attention: tuple[ModelConfig, int, int]  # (model, batch, seq_len)
    seed: int


def plan_for(demo: Config, paper: Config, quick: bool) -> Plan:
    """Full: the configs as given (paper models in bfloat16; the demo target also in bfloat16). Quick: their `tiny`
    variants (pass those), N = 1, 2, the demo target in its own dtype only."""
    bf16 = lambda m: m.model_copy(update={"compute_dtype": "bfloat16"})  # noqa: E731
    paper_len = paper.data.record_len - 1
    demo_targets = (demo.target,) if quick else (demo.target, bf16(demo.target))  # its own dtype, and bfloat16
    targets = tuple((DEMO_TARGET, m, demo.optim, demo.cpt.batch_size, demo.data.record_len - 1) for m in demo_targets)
    targets += ((PAPER_TARGET, bf16(paper.target), paper.optim, paper.cpt.batch_size, paper_len),)
    ns_demo, ns_paper = ((1, 2), (1, 2)) if quick else ((1, 4, 16, 64), (1, 4, 16))
    sweep = ((DEMO_PROXY, demo.proxy, demo.optim, 2 if quick else 5, demo.sweep.batch_size, demo.sweep.seq_len,
              ns_demo),
             (PAPER_PROXY, bf16(paper.proxy), paper.optim, 2 if quick else 4, paper.sweep.batch_size,
              paper.sweep.seq_len, ns_paper))
    return Plan(quick=quick, peak_n=256 if quick else 8192, peak_reps=2 if quick else 4,
                min_seconds=0.05 if quick else 0.5,
                targets=targets, proxies=sweep, attention=(bf16(paper.target), paper.cpt.batch_size, paper_len),
                seed=demo.run.seed)


class Clock:
    """The run's deadline, the current measurement's cap and the predicted cost of its next item."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.deadline = self.cap_end = self.t0 + budget_s
        self.predicted = 0.0

    def start(self, what: str) -> None:
        names = list(CAPS)
        now = time.perf_counter()
        cap = max(self.deadline - now, 0.0) * CAPS[what] / sum(CAPS[n] for n in names[names.index(what):])
        self.cap_end, self.predicted = now + cap, FIRST_GUESS * cap

    def allows(self) -> bool:
        return time.perf_counter() + self.predicted < self.cap_end

    def took(self, seconds: float) -> None:
        self.predicted = GROWTH * seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def matmul_peak(device, dtype: str, n: int, reps: int, min_seconds: float) -> dict:
    """FLOP/s of `reps` chained n x n x n matmuls in `dtype` on `device` (one dispatch, so that its overhead
    does not count; `measure.measure_peak` times one 2048^3 float32 product, too small for an accelerator)."""
    rng = np.random.default_rng(0)
    a_NxN = jax.device_put(rng.standard_normal((n, n), np.float32), device).astype(dtype)
    b_NxN = jax.device_put((rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32), device).astype(dtype)
    chain = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda _, x: x @ b, a)).lower(a_NxN, b_NxN).compile()
    seconds = measure.best_seconds(lambda: chain(a_NxN, b_NxN), max(min_seconds, 0.2))
    return {"flops_per_s": reps * 2 * n**3 / seconds, "seconds": seconds, "n": n, "reps": reps, "dtype": dtype,
            "matmul": f"{reps} x {n}^3 {dtype}", "platform": device.platform}


def attention_flops(B: int, L: int, H: int, K: int) -> float:
    """Forward + backward FLOPs of attention over B rows of L tokens, H heads of dim K: QK^T and PV (2 B H L^2 K
    each) forward, twice that backward; the full, non-causal count, as `lm.flops_per_token` counts it."""
    return 3.0 * 2.0 * 2.0 * B * H * L * L * K


def kernel_unavailable(impl: str, model: ModelConfig, backend: str) -> str | None:
    """Why `impl` has no kernel of its own on `backend` (None: it has)."""
    if impl == "cudnn" and backend != "gpu":
        return f"unavailable: cuDNN is a GPU library (on {backend}, jax.nn.dot_product_attention's XLA fallback)"
    if impl == "splash" and backend != "tpu":
        return f"unavailable: a Pallas TPU kernel (on {backend}, only its interpreter)"
    try:
        attention.resolve(model.model_copy(update={"attention": impl}), backend)
    except DmaError as e:
        return f"unavailable: {e}"
    return None


def bench_attention_kernel(impl: str, model: ModelConfig, B: int, L: int, peak: dict, min_seconds: float,
                           seed: int) -> tuple[dict, tuple]:
    """Seconds and MFU of `impl`'s attention forward + backward (jitted `jax.vjp`) on random q, k, v in the
    model's compute dtype, rows packed with documents of ~L/4 tokens; also returns (out, dq) to compare."""
    H, G, K, dt = model.n_heads, model.kv_heads, model.head_dim, jnp.dtype(model.compute_dtype)
    rng = np.random.default_rng(seed)
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, ct_BxLxHxK = (jnp.asarray(rng.standard_normal(s, np.float32), dt) for s in
                                                   ((B, L, H, K), (B, L, G, K), (B, L, G, K), (B, L, H, K)))
    segment_ids_BxL = jnp.asarray(1 + np.cumsum(rng.random((B, L)) < 4 / L, axis=1), jnp.int32)

    def fwd_bwd(q, k, v, seg, ct):
        mask = attention.causal_mask(seg, B, L) if impl == "xla" else None
        out, vjp = jax.vjp(lambda q, k, v: attention.attend(impl, q, k, v, mask, seg), q, k, v)
        return out, vjp(ct)

    args = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, ct_BxLxHxK)
    t0 = time.perf_counter()
    exe = jax.jit(fwd_bwd).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    seconds = measure.best_seconds(lambda: exe(*args), min_seconds)
    out, (dq, _, _) = exe(*args)
    flops = attention_flops(B, L, H, K)
    return ({"impl": impl, "batch": B, "seq_len": L, "n_heads": H, "kv_heads": G, "head_dim": K,
             "dtype": model.compute_dtype, "flops": flops, "seconds": seconds, "flops_per_s": flops / seconds,
             "mfu": flops / seconds / measure.peak_for(peak, 1), "compile_s": compile_s}, (out, dq))


def machine_info(devices: list, budget_bytes: int, budget_source: str) -> dict:
    import jaxlib

    d0 = devices[0]
    return {"platform": d0.platform, "device_kind": d0.device_kind, "n_devices": len(devices),
            "devices": [str(d) for d in devices], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "memory_budget_bytes": budget_bytes, "memory_budget_source": budget_source,
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "environment": jax.print_environment_info(return_string=True),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class DoesNotFit(Exception):
    """A model whose train state alone exceeds the memory budget of a device."""


def _failure(e: Exception) -> str:
    text = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
    oom = isinstance(e, DoesNotFit) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
    return f"skipped: does not fit ({text})" if oom else f"error: {text}"


class Check:
    """One run of the check: the results so far (`r`), the clock, and one method per measurement."""

    def __init__(self, plan: Plan, budget_s: float, devices: list, save: Callable[[dict], None],
                 log: Callable[[str], None]):
        self.plan, self.devices, self.save, self.log = plan, devices, save, log
        self.backend = devices[0].platform
        self.budget, source = proxies.memory_budget(None, devices[0])
        self.clock = Clock(budget_s)
        self.r: dict = {"meta": dict(machine_info(devices, self.budget, source), budget_s=budget_s, complete=False),
                        "plan": {"quick": plan.quick, "proxies": {name: list(ns) for name, *_, ns in plan.proxies},
                                 "peak_n": plan.peak_n, "peak_reps": plan.peak_reps, "min_seconds": plan.min_seconds},
                        "peak": {}, "peak_failed": [], "target": [], "memory": [], "sweep": [], "attention": [],
                        "goals": []}

    def item(self, what: str, record: dict, measure_fn: Callable[[], dict], dtype: str | None = None) -> dict:
        """`record` with `measure_fn()`'s figures and a status, if the clock allows and the `dtype` peak exists."""
        if dtype is not None and dtype not in self.r["peak"]:
            return dict(record, status=f"skipped: no {dtype} matmul peak")
        if not self.clock.allows():
            self.log(f"{what}: {SKIPPED}")
            return dict(record, status=SKIPPED)
        self.log(f"{what} ...")
        gc.collect()  # what earlier items left on the device
        t0 = time.perf_counter()
        try:
            out = dict(record, **measure_fn(), status="ok")
        except Exception as e:  # one failing measurement must not lose the others
            out = dict(record, status=_failure(e))
        out["wall_s"] = time.perf_counter() - t0
        self.clock.took(out["wall_s"])
        self.log(f"{what}: {out['status']} ({out['wall_s']:.1f} s)")
        return out

    def finish(self, section: str, record: dict) -> None:
        self.r[section].append(record)
        self.save(self.r)

    def peaks(self) -> None:
        self.clock.start("peak")
        p = self.plan
        for dtype in ("bfloat16", "float32"):
            rec = self.item(f"matmul peak {dtype}", {"dtype": dtype},
                            lambda: matmul_peak(self.devices[0], dtype, p.peak_n, p.peak_reps, p.min_seconds))
            if rec["status"] == "ok":
                self.r["peak"][dtype] = rec
                self.save(self.r)
            else:
                self.finish("peak_failed", rec)

    def targets(self, which: str) -> None:
        """The train steps of the plan's targets named `which` (one time cap)."""
        self.clock.start(which)
        for name, model, optim, batch, seq_len in [t for t in self.plan.targets if t[0] == which]:
            params = param_count_formula(model)
            record = {"model": name, "params": params, "dtype": model.compute_dtype,
                      "attention": attention.resolve(model, self.backend), "batch": batch, "seq_len": seq_len,
                      "flops_per_token": flops_per_token(model, seq_len)}

            def run():
                if params * STATE_BYTES_PER_PARAM > self.budget:
                    raise DoesNotFit(f"the train state needs >= {params * STATE_BYTES_PER_PARAM / 2**30:.1f} GiB "
                                     f"per device; the budget is {self.budget / 2**30:.1f} GiB")
                return measure.bench_target(name, model, batch, seq_len, optim, self.devices,
                                            self.r["peak"][model.compute_dtype], self.plan.min_seconds)

            self.finish("target", self.item(f"{name} {model.compute_dtype}", record, run, model.compute_dtype))

    def sweep(self, which: str) -> None:
        """The sweep vmapped vs one proxy at a time (and the plain loop) at each N of the proxy named `which`."""
        self.clock.start(which)
        name, model, optim, S, B, L, ns = next(p for p in self.plan.proxies if p[0] == which)
        n_dev = len(self.devices)
        pb = proxies.ProxyBench(model, optim, S, B, L, self.devices, self.plan.seed)
        mem = self.item(f"{name}: compiled memory", {"proxy": name},
                        lambda: proxies.memory_fit(pb, ns[:2], self.budget, n_dev, self.backend == "cpu"))
        self.finish("memory", mem)
        self.clock.predicted = 0.0  # its compiles serve the first two Ns: they predict nothing
        base = {"proxy": name, "params": param_count_formula(model), "dtype": model.compute_dtype,
                "attention": attention.resolve(model, self.backend), "S": S, "batch": B, "seq_len": L,
                "flops_per_token": flops_per_token(model, L)}
        for n in ns:
            chunk = proxies.chunk_for(n, mem, n_dev) if mem["status"] == "ok" else n
            self.finish("sweep", self.item(f"{name}: N={n}", dict(base, N=n), lambda: proxies.bench_sweep(
                pb, name, n, chunk, self.r["peak"][model.compute_dtype], self.plan.min_seconds), model.compute_dtype))

    def attention(self) -> None:
        """Each `model.attention` kernel's forward + backward side by side, each compared with `xla`'s output."""
        self.clock.start("attention")
        model, B, L = self.plan.attention
        self.r["attention_auto"] = attention.resolve(model.model_copy(update={"attention": "auto"}), self.backend)
        reference = None
        for impl in attention.IMPLEMENTATIONS:
            record = {"impl": impl, "batch": B, "seq_len": L, "dtype": model.compute_dtype}
            if why := kernel_unavailable(impl, model, self.backend):
                self.finish("attention", dict(record, status=why))
                continue
            outputs: dict = {}

            def run():
                rec, outputs["out"] = bench_attention_kernel(impl, model, B, L, self.r["peak"][model.compute_dtype],
                                                             self.plan.min_seconds, self.plan.seed)
                return rec

            rec = self.item(f"attention {impl}", record, run, model.compute_dtype)
            if impl == "xla":
                reference = outputs.get("out")
            if reference is not None and "out" in outputs:
                rec["max_abs_diff_vs_xla"] = {
                    k: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for k, a, b in zip(("out", "dq"), outputs["out"], reference)}
            self.finish("attention", rec)


def run_check(plan: Plan, budget_s: float, devices: list, save: Callable[[dict], None],
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Every measurement of `plan` within `budget_s` seconds, cheapest and most wanted first; `save(results)`
    after each item. Returns the results."""
    check = Check(plan, budget_s, devices, save, log)
    check.peaks()
    check.targets(DEMO_TARGET)
    check.sweep(DEMO_PROXY)
    check.sweep(PAPER_PROXY)
    check.targets(PAPER_TARGET)
    check.attention()
    r = check.r
    r["goals"] = goals(r)
    r["meta"].update(seconds=check.clock.elapsed(), complete=True)
    save(r)
    return r


def goals(r: dict) -> list[dict]:
    """The issue's goals with the measured value and whether it is met (None: not measured)."""
    ok = lambda rows: [x for x in rows if x["status"] == "ok"]  # noqa: E731
    out: list[dict] = []

    def add(goal: str, value: float | None, threshold: float) -> None:
        out.append({"goal": goal, "value": value, "threshold": threshold, "at_least": True,
                    "met": None if value is None else bool(value >= threshold)})

    n_demo, n_paper = r["plan"]["proxies"][DEMO_PROXY][-1], r["plan"]["proxies"][PAPER_PROXY][-1]
    demo = [s for s in ok(r["sweep"]) if s["proxy"] == DEMO_PROXY and s["N"] == n_demo]
    add(f"vmapped / one at a time, {DEMO_PROXY}, N={n_demo}", demo[0]["x_one_at_a_time"] if demo else None,
        GOAL_X_ONE)
    paper = [s for s in ok(r["sweep"]) if s["proxy"] == PAPER_PROXY and s["N"] == n_paper]
    add(f"sweep MFU (vmapped), {PAPER_PROXY} bfloat16, N={n_paper}", paper[0]["vmapped"]["mfu"] if paper else None,
        GOAL_MFU)
    tgt = [t for t in ok(r["target"]) if t["model"] == PAPER_TARGET and t["dtype"] == "bfloat16"]
    add(f"train-step MFU, {PAPER_TARGET} bfloat16", tgt[0]["mfu"] if tgt else None, GOAL_MFU)
    return out

"""Measurements behind `dma bench` (see `dma_jax.bench`): timing, matmul peak, the sweep and its
baselines, compiled memory, target training, the Grain loader and the agent's decision latency.

Each function builds what it times from synthetic data (random tokens), excludes
compilation from the timed part and reports the compile time on its own.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dma_jax.config import MeshConfig, ModelConfig, OptimConfig
from dma_jax.data.device_sampler import make_pools
from dma_jax.data.mixer import DomainMixer, measure_throughput
from dma_jax.data.packing import read_records, write_shards
from dma_jax.models.lm import flops_per_token, param_count_formula
from dma_jax.sweep import proxy_stage, stage_keys
from dma_jax.models.lm import LMDef
from dma_jax.train import Trainer, TrainState, make_optimizer, memory_estimate

POOL_DOMAINS = 8
POOL_TOKENS = 50_000  # per domain


def _seconds(run: Callable[[], Any], min_seconds: float) -> float:
    """Wall time of one `run()` (its outputs blocked on). The first call of an executable carries a fixed
    cost (~0.5 s on CPU), so it counts alone only for a long run (>= 20 * min_seconds); otherwise it is a
    warm-up, the run is repeated until about `min_seconds` have passed (1 to 50 times) and the fastest
    repeat is kept."""

    def once() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        return time.perf_counter() - t0

    first = once()
    if first >= 20 * min_seconds:
        return first
    best = once()
    for _ in range(min(49, math.ceil(min_seconds / max(best, 1e-9)) - 1)):
        best = min(best, once())
    return best


def measure_peak(device, min_seconds: float, n: int = 2048) -> dict:
    """FLOP/s of an n^3 float32 matmul on `device`, at the default precision the models use."""
    a_NxN = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), device)
    dot = jax.jit(jnp.dot).lower(a_NxN, a_NxN).compile()
    seconds = _seconds(lambda: dot(a_NxN, a_NxN), max(min_seconds, 0.5))
    return {"flops_per_s": 2 * n**3 / seconds, "matmul": f"{n}x{n}x{n} float32", "seconds": seconds,
            "platform": device.platform}


def random_params(abstract_params: dict, seed: int) -> dict:
    """Parameters of the LM's shapes drawn on the host (N(0, 0.02) matrices, unit norm scales): timing does not
    depend on the values, and this skips compiling the model's initialiser."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.ones(a.shape, a.dtype) if a.ndim == 1 else
                        rng.normal(0.0, 0.02, a.shape).astype(a.dtype), abstract_params)


def _fresh_state(trainer: Trainer, params: dict) -> TrainState:
    """A train state on the trainer's shardings, in buffers of its own (the step donates it)."""
    params = jax.tree.map(jnp.array, params)
    return jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, trainer.tx.init(params)),
                          trainer.state_sharding)


def _rate(tokens: int, seconds: float, flops_per_tok: float, peak: float, **extra) -> dict:
    return dict(extra, seconds=seconds, tokens_per_s=tokens / seconds, mfu=tokens / seconds * flops_per_tok / peak)


class ProxyBench:
    """The sweep's scanned, vmapped stage for one proxy size, compiled per (N, mesh), and its two baselines."""

    def __init__(self, model: ModelConfig, optim: OptimConfig, steps: int, batch_size: int, seq_len: int,
                 devices: list, seed: int = 0):
        self.model, self.optim, self.steps, self.B, self.L = model, optim, steps, batch_size, seq_len
        self.devices, self.seed = devices, seed
        self.lm = LMDef.build(model)
        self.tx = make_optimizer(optim, 1000)
        rng = np.random.default_rng(seed)
        per_domain = [rng.integers(0, model.vocab_size, POOL_TOKENS, dtype=np.int32) for _ in range(POOL_DOMAINS)]
        self.pools = make_pools(per_domain, seq_len)
        self.host_tokens = np.concatenate(per_domain)
        self.host_starts = np.arange(POOL_DOMAINS) * POOL_TOKENS
        self.base_params = random_params(self.lm.abstract_params, seed)
        self._compiled: dict = {}
        self._trainer, self._trainer_compile_s = None, 0.0

    def tokens(self, n: int) -> int:
        """Tokens that n proxies train on in one stage."""
        return n * self.steps * self.B * self.L

    def weights(self, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, n]).dirichlet(np.ones(POOL_DOMAINS), n).astype(np.float32)

    def compiled(self, n: int, n_devices: int) -> tuple[Any, float, Mesh]:
        """The stage for n proxies on a ("traj",) mesh of `n_devices` devices: (executable, compile s, mesh)."""
        key = (n, n_devices)
        if key not in self._compiled:
            mesh = Mesh(np.array(self.devices[:n_devices]), ("traj",))
            traj, rep = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
            lm, tx, seed = self.lm, self.tx, self.seed
            one = lambda st, w, k, pools: proxy_stage(  # noqa: E731
                st, w, k, pools, lm=lm, tx=tx, steps=self.steps, batch_size=self.B, seq_len=self.L)
            stage = jax.jit(
                lambda st, w_nxD, ids_n, t, pools: jax.vmap(one, in_axes=(0, 0, 0, None))(
                    st, w_nxD, stage_keys(seed, ids_n, t), pools),
                in_shardings=(traj, traj, traj, rep, rep), out_shardings=(traj, traj), donate_argnums=0)
            spec = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
            state = jax.tree.map(lambda a: spec(a, traj), jax.eval_shape(self._init_fn(n), self.lm.abstract_params))
            args = (state, spec(jax.ShapeDtypeStruct((n, POOL_DOMAINS), jnp.float32), traj),
                    spec(jax.ShapeDtypeStruct((n,), jnp.int32), traj), spec(jax.ShapeDtypeStruct((), jnp.int32), rep),
                    jax.tree.map(lambda a: spec(a, rep), self.pools))
            t0 = time.perf_counter()
            exe = stage.lower(*args).compile()
            self._compiled[key] = (exe, time.perf_counter() - t0, mesh)
        return self._compiled[key]

    def _init_fn(self, n: int):
        tx = self.tx
        return lambda p: jax.vmap(lambda _: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)))(jnp.arange(n))

    def memory_bytes(self, n: int) -> int | None:
        """Compiled bytes (arguments + outputs + temporaries - aliased) of the stage for n proxies on one device."""
        return memory_estimate(self.compiled(n, 1)[0]).get("total")

    def scanned(self, n: int, chunk: int) -> tuple[Callable[[], Any], float]:
        """A run that trains n proxies one stage, `chunk` at a time, through the vmapped scanned step."""
        n_dev = math.gcd(chunk, len(self.devices))
        exe, compile_s, mesh = self.compiled(chunk, n_dev)
        traj, rep = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
        pools = jax.device_put(self.pools, rep)
        state = [jax.jit(self._init_fn(chunk), out_shardings=traj)(jax.device_put(self.base_params, rep))]
        w_NxD = self.weights(n)
        calls = [(jax.device_put(w_NxD[i:i + chunk], traj), jax.device_put(np.arange(i, i + chunk, dtype=np.int32),
                                                                          traj)) for i in range(0, n, chunk)]
        stage0 = jax.device_put(np.int32(0), rep)

        def run():
            st = state[0]
            for w, ids in calls:
                st, losses = exe(st, w, ids, stage0, pools)
            state[0] = st
            return st, losses

        return run, compile_s

    def plain_loop(self, n: int) -> tuple[Callable[[], Any], float]:
        """A run of the project's per-step loop: S `Trainer.step`s per proxy on host-sampled batches, proxy by proxy."""
        if self._trainer is None:
            k = math.gcd(self.B, len(self.devices))
            t0 = time.perf_counter()
            self._trainer = Trainer(self.model, self.optim, MeshConfig(data=k), 1000, self.B, self.L,
                                    self.devices[:k])
            self._trainer_compile_s = time.perf_counter() - t0
        trainer = self._trainer
        state = [_fresh_state(trainer, self.base_params)]
        w_NxD = self.weights(n).astype(np.float64)
        w_NxD /= w_NxD.sum(1, keepdims=True)
        rng = np.random.default_rng(self.seed)
        window_L1 = np.arange(self.L + 1)

        def run():
            st = state[0]
            for i in range(n):
                for _ in range(self.steps):
                    domain_B = rng.choice(POOL_DOMAINS, self.B, p=w_NxD[i])
                    start_B = self.host_starts[domain_B] + rng.integers(0, POOL_TOKENS - self.L - 1, self.B,
                                                                        endpoint=True)
                    st, _ = trainer.step(st, trainer.put_batch(self.host_tokens[start_B[:, None] + window_L1]))
            state[0] = st
            return st

        return run, self._trainer_compile_s


def _peak_for(peak: dict, n_devices: int) -> float:
    """Peak FLOP/s of the devices a measurement used (CPU devices share the host's cores: one peak)."""
    return peak["flops_per_s"] * (1 if peak["platform"] == "cpu" else n_devices)


def memory_budget(memory_budget_gb: float | None, device) -> tuple[int, str]:
    """Bytes per device for the sweep, and where the number came from (CPU devices share the host's)."""
    if memory_budget_gb is not None:
        return int(memory_budget_gb * 2**30), "--memory-budget-gb"
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # backends without memory stats
        limit = None
    if limit:
        return int(limit), "device bytes_limit"
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # Linux: what other processes leave free
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields.get("MemAvailable", f"{available // 1024} kB").split()[0]) * 1024
    return int(0.8 * available), "80% of available host RAM"


def memory_fit(pb: ProxyBench, ns: Sequence[int], budget: int, n_devices: int, shared_host: bool) -> dict:
    """Compiled bytes of the stage at each N on one device, a line through them (fixed + per proxy * N),
    and the largest N under `budget` (per device; on CPU all devices share it)."""
    points = [{"n": int(n), "bytes": pb.memory_bytes(n)} for n in ns]
    out: dict = {"points": points, "budget_bytes": budget, "shared_host": shared_host, "per_proxy_bytes": None,
                 "fixed_bytes": None, "max_n_per_device": None, "max_n": None}
    if len(ns) < 2 or any(p["bytes"] is None for p in points):
        return out
    per_proxy, fixed = np.polyfit([p["n"] for p in points], [p["bytes"] for p in points], 1)
    per_device = max(int((budget - fixed) // per_proxy), 0) if per_proxy > 0 else None
    out.update(per_proxy_bytes=float(per_proxy), fixed_bytes=float(fixed), max_n_per_device=per_device,
               max_n=None if per_device is None else per_device * (1 if shared_host else n_devices))
    return out


def chunk_for(n: int, mem: dict, n_devices: int) -> int:
    """The largest divisor of n whose proxies fit the memory budget (1 if none does); a chunk of c runs on
    gcd(c, devices) devices, which on CPU share one budget."""
    per_device = mem["max_n_per_device"]
    if per_device is None:
        return n
    sharing = 1 if mem.get("shared_host") else n_devices
    fits = [c for c in range(1, n + 1) if n % c == 0 and math.ceil(c / math.gcd(c, sharing)) <= per_device]
    return max(fits, default=1)


def bench_sweep(pb: ProxyBench, name: str, n: int, chunk: int, peak: dict, min_seconds: float) -> dict:
    """One N: the vmapped sweep vs the plain loop and vs one proxy at a time, on the same tokens."""
    tokens, model, L = pb.tokens(n), pb.model, pb.L
    out: dict = {"proxy": name, "params": param_count_formula(model), "N": n, "S": pb.steps, "batch": pb.B,
                 "seq_len": L, "tokens": tokens, "chunk": chunk}
    for key, make, n_dev in (("vmapped", lambda: pb.scanned(n, chunk), math.gcd(chunk, len(pb.devices))),
                             ("one_at_a_time", lambda: pb.scanned(n, 1), 1),
                             ("plain_loop", lambda: pb.plain_loop(n), math.gcd(pb.B, len(pb.devices)))):
        run, compile_s = make()  # one method's train state is alive at a time
        out[key] = _rate(tokens, _seconds(run, min_seconds), flops_per_token(model, L), _peak_for(peak, n_dev),
                         compile_s=compile_s, devices=n_dev)
        del run
    for key in ("plain_loop", "one_at_a_time"):
        out[f"x_{key}"] = out["vmapped"]["tokens_per_s"] / out[key]["tokens_per_s"]
    return out


def time_vs_t(pb: ProxyBench, n: int, chunk: int, t_values: Sequence[int]) -> list[dict]:
    """Cumulative seconds of T re-weighting steps of n proxies (the host syncs after each, as the sweep does)."""
    run, _ = pb.scanned(n, chunk)
    jax.block_until_ready(run())
    out, t0 = [], time.perf_counter()
    for t in range(1, max(t_values) + 1):
        jax.block_until_ready(run())
        if t in t_values:
            out.append({"N": n, "T": t, "S": pb.steps, "seconds": time.perf_counter() - t0})
    return out


def bench_target(name: str, model: ModelConfig, batch: int, seq_len: int, optim: OptimConfig, devices: list,
                 peak: dict, min_seconds: float) -> dict:
    """Seconds and MFU of one `Trainer.step` (batch already on device) on a (data,) mesh."""
    k = math.gcd(batch, len(devices))
    t0 = time.perf_counter()
    trainer = Trainer(model, optim, MeshConfig(data=k), 1000, batch, seq_len, devices[:k])
    compile_s = time.perf_counter() - t0
    tokens_BxL1 = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    batch_dev = trainer.put_batch(tokens_BxL1)
    state = [_fresh_state(trainer, random_params(trainer.lm.abstract_params, 0))]

    def run():
        state[0], metrics = trainer.step(state[0], batch_dev)
        return metrics

    seconds = _seconds(run, min_seconds)
    return _rate(batch * seq_len, seconds, flops_per_token(model, seq_len), _peak_for(peak, k), model=name,
                 params=param_count_formula(model), batch=batch, seq_len=seq_len, step_s=seconds,
                 compile_s=compile_s, devices=k)


def bench_loader(record_len: int, vocab: int, batch: int, n_batches: int, step_s: float,
                 threads: Sequence[int] = (0, 2), records_per_domain: int = 512,
                 processes: Sequence[int] = (0, 2)) -> dict:
    """The Grain mixer over packed ArrayRecord shards (the CPT read path) with 0 and 2 reader threads, and a
    fixed-mixture Grain pipeline with 0 and 2 worker processes, vs one target step's consumption."""
    rng = np.random.default_rng(0)
    consumption = batch * record_len / step_s
    out: dict = {"batch": batch, "record_len": record_len, "train_tokens_per_s": consumption, "runs": []}
    with tempfile.TemporaryDirectory(prefix="dma-bench-") as tmp:
        sources = []
        for d in range(POOL_DOMAINS):
            recs = ({"tokens": rng.integers(0, vocab, record_len, dtype=np.int32),
                     "segment_ids": np.ones(record_len, np.int32)} for _ in range(records_per_domain))
            infos = write_shards(recs, Path(tmp) / str(d), "train", 256)
            sources.append(read_records([Path(tmp) / str(d) / i["path"] for i in infos], record_len))
        weights_D = np.full(POOL_DOMAINS, 1.0 / POOL_DOMAINS)
        names = [f"d{d}" for d in range(POOL_DOMAINS)]
        for n_threads in threads:
            with DomainMixer(sources, names, batch, lambda step: weights_D, 0, num_threads=n_threads) as mixer:
                next(mixer)  # opens the shard readers
                tokens_per_s = measure_throughput(mixer, n_batches)
            out["runs"].append({"reader": "DomainMixer", "threads": n_threads, "processes": 0,
                                "tokens_per_s": tokens_per_s, "x_train_step": tokens_per_s / consumption})
        for n_procs in processes:
            tokens_per_s = _grain_fixed_mix_throughput(sources, weights_D, batch, n_batches, n_procs)
            out["runs"].append({"reader": "grain mix (fixed)", "threads": 0, "processes": n_procs,
                                "tokens_per_s": tokens_per_s, "x_train_step": tokens_per_s / consumption})
    return out


def _grain_fixed_mix_throughput(sources: Sequence, weights_D: np.ndarray, batch: int, n_batches: int,
                                n_procs: int) -> float:
    """Tokens/s of a plain Grain pipeline over the same shards (`MapDataset.mix` of shuffled, repeated domains,
    batched), with `n_procs` worker processes (`mp_prefetch`). Its mixture is fixed when it is built, and worker
    processes read ahead: what the CPT mixer gives up to make a new mixture take effect at the next batch."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags
        flags.FLAGS.mark_as_parsed()
    streams = [grain.MapDataset.source(s).shuffle(seed=d).repeat() for d, s in enumerate(sources)]
    ds = grain.MapDataset.mix(streams, [float(w) for w in weights_D]).to_iter_dataset().batch(batch)
    if n_procs:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=n_procs))
    it = iter(ds)
    try:
        first = next(it)  # starts the workers
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        seconds = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return n_batches * batch * first["tokens"].shape[1] / seconds


def bench_agent(model_cfg, n_domains: int, horizon: int, decisions: int, stage_s: float) -> dict:
    """Latency of one decision of an exported-agent policy (`agent.runner.AgentPolicy.act`: features, forward,
    device_get) of the `AgentModelConfig` `model_cfg`, random parameters, at the last step of an episode
    (the longest history)."""
    from dma_jax.agent.features import DOMAIN_FEATURES, GLOBAL_FEATURES, FeatureStats, FeedbackLayout, History
    from dma_jax.agent.model import AgentDef
    from dma_jax.agent.runner import AgentPolicy

    agent = AgentDef.build(model_cfg)
    n_dom, n_glob = len(DOMAIN_FEATURES), len(GLOBAL_FEATURES)
    stats = FeatureStats((0.0,) * n_dom, (1.0,) * n_dom, (0.0,) * n_glob, (1.0,) * n_glob)
    policy = AgentPolicy(agent, agent.init(0)[0], stats, {})
    D, rng = n_domains, np.random.default_rng(0)
    layout = FeedbackLayout(tuple(range(D)), tuple(d >= D // 2 for d in range(D)), (D,), (D + 1,))
    history = History(rng.dirichlet(np.ones(D), horizon - 1), rng.normal(size=(horizon, D + 2)), layout, horizon)
    t0 = time.perf_counter()
    policy.act(history)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(decisions):
        t0 = time.perf_counter()
        policy.act(history)
        times.append(time.perf_counter() - t0)
    decision_s = float(np.median(times))
    return {"n_domains": D, "horizon": horizon, "model": model_cfg.model_dump(mode="json"), "decision_s": decision_s,
            "compile_s": compile_s, "stage_s": stage_s, "share": decision_s / (decision_s + stage_s)}

"""The sweep's cost for `dma bench` (see `dma_jax.perf.bench`): `sweep.make_stage`, the very function `dma sweep`
runs, compiled for N proxies and timed against two baselines (the plain per-step loop, one proxy at a time);
its compiled memory per device fitted over N, and the chunking that keeps a sweep within a memory budget.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dma_jax.config import MeshConfig, ModelConfig, OptimConfig
from dma_jax.data.device_sampler import make_pools
from dma_jax.data.packing import pack_documents
from dma_jax.models.lm import LMDef, flops_per_token, param_count_formula
from dma_jax.perf.measure import POOL_DOMAINS, POOL_TOKENS, best_seconds, fresh_state, peak_for, random_params, rate
from dma_jax.sweep import make_stage
from dma_jax.train import Trainer, TrainState, make_optimizer, memory_estimate


class ProxyBench:
    """The sweep's stage (`sweep.make_stage`) for one proxy size, compiled per (N, mesh), and its two baselines."""

    def __init__(self, model: ModelConfig, optim: OptimConfig, steps: int, batch_size: int, seq_len: int,
                 devices: list, seed: int = 0):
        self.model, self.optim, self.steps, self.B, self.L = model, optim, steps, batch_size, seq_len
        self.devices, self.seed = devices, seed
        self.lm = LMDef.build(model)
        self.tx = make_optimizer(optim, 1000)
        self.records = [synthetic_records(np.random.default_rng([seed, d]), model.vocab_size, seq_len + 1)
                        for d in range(POOL_DOMAINS)]
        self.pools = make_pools(self.records, seq_len, seed)
        self.base_params = random_params(self.lm.abstract_params, seed)
        self._compiled: dict = {}
        self._trainer, self._trainer_compile_s = None, 0.0

    def tokens(self, n: int) -> int:
        """Tokens that n proxies train on in one stage."""
        return n * self.steps * self.B * self.L

    def weights(self, n: int) -> np.ndarray:
        """[n, POOL_DOMAINS] float32 mixtures, one per proxy (Dirichlet(1), fixed by the seed and n)."""
        return np.random.default_rng([self.seed, n]).dirichlet(np.ones(POOL_DOMAINS), n).astype(np.float32)

    def compiled(self, n: int, n_devices: int) -> tuple[Any, float, Mesh]:
        """`sweep.make_stage` for n proxies on a ("traj",) mesh of `n_devices` devices, compiled ahead of time
        from abstract arguments: (executable, compile s, mesh). It is called as the sweep calls it:
        (state_n, weights_nxD, traj_ids_n, stage, max_loss_n, pools) -> (state_n, losses_nxS)."""
        key = (n, n_devices)
        if key not in self._compiled:
            mesh = Mesh(np.array(self.devices[:n_devices]), ("traj",))
            traj, rep = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
            stage = make_stage(self.lm, self.tx, steps=self.steps, batch_size=self.B, seq_len=self.L, seed=self.seed,
                               mesh=mesh, skip_bad=self.optim.on_nonfinite == "skip")
            spec = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
            state = jax.tree.map(lambda a: spec(a.shape, a.dtype, traj),
                                 jax.eval_shape(self._init_fn(n), self.lm.abstract_params))
            args = (state, spec((n, POOL_DOMAINS), jnp.float32, traj), spec((n,), jnp.int32, traj),
                    spec((), jnp.int32, rep), spec((n,), jnp.float32, traj),
                    jax.tree.map(lambda a: spec(a.shape, a.dtype, rep), self.pools))
            t0 = time.perf_counter()
            exe = stage.lower(*args).compile()
            self._compiled[key] = (exe, time.perf_counter() - t0, mesh)
        return self._compiled[key]

    def _init_fn(self, n: int):
        """Parameters -> n fresh train states with a leading proxy axis (as `Sweep.init_chunk` builds them)."""
        tx = self.tx
        return lambda p: jax.vmap(lambda _: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)))(jnp.arange(n))

    def memory_bytes(self, n: int) -> int | None:
        """Compiled bytes (arguments + outputs + temporaries - aliased) of the stage for n proxies on one device."""
        return memory_estimate(self.compiled(n, 1)[0]).get("total")

    def scanned(self, n: int, chunk: int) -> tuple[Callable[[], Any], float]:
        """A run that trains n proxies one stage, `chunk` at a time, through the sweep's compiled stage."""
        n_dev = math.gcd(chunk, len(self.devices))
        exe, compile_s, mesh = self.compiled(chunk, n_dev)
        traj, rep = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
        pools = jax.device_put(self.pools, rep)
        state = [jax.jit(self._init_fn(chunk), out_shardings=traj)(jax.device_put(self.base_params, rep))]
        w_NxD = self.weights(n)
        calls = [(jax.device_put(w_NxD[i:i + chunk], traj), jax.device_put(np.arange(i, i + chunk, dtype=np.int32),
                                                                          traj)) for i in range(0, n, chunk)]
        stage0 = jax.device_put(np.int32(0), rep)
        max_loss = jax.device_put(np.full(chunk, np.inf, np.float32), traj)  # no step is a spike

        def run():
            st = state[0]
            for w, ids in calls:
                st, losses = exe(st, w, ids, stage0, max_loss, pools)
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
        state = [fresh_state(trainer, self.base_params)]
        w_NxD = self.weights(n).astype(np.float64)
        w_NxD /= w_NxD.sum(1, keepdims=True)
        rng = np.random.default_rng(self.seed)
        tokens_RxL1 = np.concatenate([r["tokens"] for r in self.records])
        segments_RxL1 = np.concatenate([r["segment_ids"] for r in self.records])
        sizes_D = np.array([len(r["tokens"]) for r in self.records])
        starts_D = np.cumsum(sizes_D) - sizes_D

        def run():
            st = state[0]
            for i in range(n):
                for _ in range(self.steps):
                    domain_B = rng.choice(POOL_DOMAINS, self.B, p=w_NxD[i])
                    record_B = starts_D[domain_B] + rng.integers(0, sizes_D[domain_B])
                    rows = {"tokens": tokens_RxL1[record_B], "segment_ids": segments_RxL1[record_B]}
                    st, _ = trainer.step(st, trainer.put_batch(rows))
            state[0] = st
            return st

        return run, self._trainer_compile_s


def synthetic_records(rng: np.random.Generator, vocab: int, record_len: int) -> dict[str, np.ndarray]:
    """POOL_TOKENS random tokens of one domain packed into records of `record_len` (documents of 1 to 400 tokens,
    so the segment ids mask attention as real records do): {"tokens", "segment_ids"} [R, record_len]."""
    docs, n = [], 0
    while n < POOL_TOKENS:
        docs.append(rng.integers(0, vocab, rng.integers(1, 400), dtype=np.int32))
        n += len(docs[-1]) + 1
    recs = list(pack_documents(docs, record_len, eos_id=vocab - 1))
    return {key: np.stack([r[key] for r in recs]) for key in ("tokens", "segment_ids")}


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
        out[key] = rate(tokens, best_seconds(run, min_seconds), flops_per_token(model, L), peak_for(peak, n_dev),
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


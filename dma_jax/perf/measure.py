"""Measurements behind `dma bench` (see `dma_jax.perf.bench`): the timer, the matmul peak every MFU is
against, target training, the Grain loader and the agent's decision latency (the sweep's are in
`dma_jax.perf.proxies`).

Each function builds what it times from synthetic data (random tokens), excludes
compilation from the timed part and reports the compile time on its own.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.config import MeshConfig, ModelConfig, OptimConfig
from dma_jax.data.mixer import DomainMixer, measure_throughput
from dma_jax.data.packing import read_records, write_shards
from dma_jax.models.lm import flops_per_token, param_count_formula
from dma_jax.train import Trainer, TrainState

POOL_DOMAINS = 8  # synthetic domains of the sweep's token pools and of the loader's shards
POOL_TOKENS = 50_000  # per domain


def best_seconds(run: Callable[[], Any], min_seconds: float) -> float:
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
    seconds = best_seconds(lambda: dot(a_NxN, a_NxN), max(min_seconds, 0.5))
    return {"flops_per_s": 2 * n**3 / seconds, "matmul": f"{n}x{n}x{n} float32", "seconds": seconds,
            "platform": device.platform}


def random_params(abstract_params: dict, seed: int) -> dict:
    """Parameters of the LM's shapes drawn on the host (N(0, 0.02) matrices, unit norm scales): timing does not
    depend on the values, and this skips compiling the model's initialiser."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.ones(a.shape, a.dtype) if a.ndim == 1 else
                        rng.normal(0.0, 0.02, a.shape).astype(a.dtype), abstract_params)


def fresh_state(trainer: Trainer, params: dict) -> TrainState:
    """A train state on the trainer's shardings, in buffers of its own (the step donates it)."""
    params = jax.tree.map(jnp.array, params)
    return jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, trainer.tx.init(params)),
                          trainer.state_sharding)


def rate(tokens: int, seconds: float, flops_per_tok: float, peak: float, **extra) -> dict:
    """`extra` with the seconds, tokens/s and MFU (model FLOPs/s over the `peak` FLOP/s) of `tokens` in `seconds`."""
    return dict(extra, seconds=seconds, tokens_per_s=tokens / seconds, mfu=tokens / seconds * flops_per_tok / peak)


def peak_for(peak: dict, n_devices: int) -> float:
    """Peak FLOP/s of the devices a measurement used (CPU devices share the host's cores: one peak)."""
    return peak["flops_per_s"] * (1 if peak["platform"] == "cpu" else n_devices)


def bench_target(name: str, model: ModelConfig, batch: int, seq_len: int, optim: OptimConfig, devices: list,
                 peak: dict, min_seconds: float) -> dict:
    """Seconds and MFU of one `Trainer.step` (batch already on device) on a (data,) mesh."""
    k = math.gcd(batch, len(devices))
    t0 = time.perf_counter()
    trainer = Trainer(model, optim, MeshConfig(data=k), 1000, batch, seq_len, devices[:k])
    compile_s = time.perf_counter() - t0
    tokens_BxL1 = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    batch_dev = trainer.put_batch(tokens_BxL1)
    state = [fresh_state(trainer, random_params(trainer.lm.abstract_params, 0))]

    def run():
        state[0], metrics = trainer.step(state[0], batch_dev)
        return metrics

    seconds = best_seconds(run, min_seconds)
    return rate(batch * seq_len, seconds, flops_per_token(model, seq_len), peak_for(peak, k), model=name,
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
    """Latency of one decision of an exported-agent policy (`agent.runner.LoadedAgent.act`: features, forward,
    device_get) of the `AgentModelConfig` `model_cfg`, random parameters, at the last step of an episode
    (the longest history)."""
    from dma_jax.agent.features import DOMAIN_FEATURES, GLOBAL_FEATURES, FeatureStats, FeedbackLayout, History
    from dma_jax.agent.model import AgentDef
    from dma_jax.agent.runner import LoadedAgent

    agent = AgentDef.build(model_cfg)
    n_dom, n_glob = len(DOMAIN_FEATURES), len(GLOBAL_FEATURES)
    stats = FeatureStats((0.0,) * n_dom, (1.0,) * n_dom, (0.0,) * n_glob, (1.0,) * n_glob)
    policy = LoadedAgent(agent, agent.init(0)[0], stats, {})
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

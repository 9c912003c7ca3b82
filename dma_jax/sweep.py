"""`dma sweep`: the proxy environment that produces the agent's offline data.

N proxies start from the base proxy and each follows its own mixture trajectory
[T, D]. They are trained at once: the train state carries a leading trajectory
axis, sharded over a ("traj",) mesh; one jitted function vmaps `train_step` and
`lax.scan`s over the S optimizer steps of a re-weighting step, drawing each
batch on device by the CPT mixer's rule (`data.device_sampler`): exact per-batch
domain counts with carried remainders (reset at each re-weighting step), of windows
of `sweep.seq_len + 1` tokens cut from packed records, with their segment ids, read
in a per-proxy order. After every re-weighting step all proxies are evaluated,
vmapped (`evaluation.evaluate`). N larger than `chunk_size` runs chunk by chunk.
Batches are keyed by (seed, trajectory id, stage, step), so chunking and the device
count change no number.

Resumable: after each re-weighting step the chunk's state and the feedback so far
are checkpointed (Orbax, atomic); re-running resumes from the last finished step.
Output: `<run.out_dir>/sweep/offline/` (see `dma_jax.offline_data`); TensorBoard events in `sweep/tb/`
(`tb_log`; one point per re-weighting step of a chunk: `run_sweep`'s `unit`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dma_jax import evaluation as ev
from dma_jax import offline_data, trajectories
from dma_jax import sharding as shd
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, dump_config
from dma_jax.data import device_sampler as sampler
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.faults import stop_on_sigterm
from dma_jax.io_utils import AnyPath
from dma_jax.numerics import LossGuard, last_good
from dma_jax.models.lm import LMDef
from dma_jax.runs import RunDir
from dma_jax.sample import run_sample
from dma_jax.stage_loop import StageLoop
from dma_jax.tb_log import events
from dma_jax.train import TrainState, guarded_train_step, load_base_params, make_optimizer, train_step

log = logging.getLogger(__name__)


def load_trajectories(path: Path, space: DomainSpace, cfg: Config) -> np.ndarray:
    """The sampled trajectories (read by `trajectories.load`, their format's one reader), checked against the
    domain space and the sweep's N and T."""
    w, names, _, _ = trajectories.load(path)
    if names != space.names:
        only_file = sorted(set(names) - set(space.names))
        only_space = sorted(set(space.names) - set(names))
        raise DmaError(f"{path}: trajectories were sampled for other domains (only in file: {only_file}, "
                       f"only in the domain space: {only_space}); re-run `dma sample`")
    sc = cfg.sweep
    if w.shape != (sc.num_trajectories, sc.num_stages, space.num_domains):
        raise DmaError(f"{path}: shape {w.shape}, config wants "
                       f"[{sc.num_trajectories}, {sc.num_stages}, {space.num_domains}]; re-run `dma sample`")
    return w


# ------------------------------------------------------------------------------ the vmapped step


def proxy_keys(seed: int, traj_ids_n: jax.Array) -> jax.Array:
    """One key per proxy: depends on the trajectory id, not its chunk (stages and steps fold in below it)."""
    root = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(traj_ids_n)


def proxy_stage(state: TrainState, weights_D: jax.Array, key: jax.Array, stage: jax.Array,
                pools: sampler.RecordPools, *, lm: LMDef, tx, steps: int, batch_size: int, seq_len: int,
                max_loss: jax.Array | None = None):
    """S optimizer steps of one proxy under one mixture (lax.scan): (state, losses [S]).

    `key` is the proxy's (`proxy_keys`); batch s is `device_sampler.draw_stage(...)`'s s-th, drawn in the scan.
    With `max_loss` (optim.on_nonfinite=skip) a step whose loss is NaN/Inf or above it keeps the state.
    """
    if pools.tokens_WxL1.shape[1] != seq_len + 1:
        raise DmaError(f"sweep: pools hold windows of {pools.tokens_WxL1.shape[1]} tokens, seq_len={seq_len} "
                       f"needs {seq_len + 1}")
    order_key, stage_key = sampler.stage_keys(key, stage)

    def body(carry, s):
        st, cursor = carry
        step_key = jax.random.fold_in(stage_key, s)
        rows, cursor = sampler.draw_batch(pools, weights_D, cursor, order_key, step_key, batch_size)
        batch = sampler.train_batch(rows)
        if max_loss is None:
            st, m = train_step(st, batch, lm=lm, tx=tx)
        else:
            st, m = guarded_train_step(st, batch, max_loss, lm=lm, tx=tx)
        return (st, cursor), m["loss"]

    start = sampler.stage_cursor(pools.sizes_D.shape[0], stage, steps, batch_size)
    (state, _), losses_S = jax.lax.scan(body, (state, start), jnp.arange(steps))
    return state, losses_S


def make_stage(lm: LMDef, tx, *, steps: int, batch_size: int, seq_len: int, seed: int, mesh: Mesh,
               skip_bad: bool = False):
    """The sweep's compiled unit, and what `dma bench` times: S optimizer steps of n proxies at once (`jax.vmap`
    over proxies of `proxy_stage`, a `lax.scan` over steps), the proxy axis sharded over the mesh's "traj" axis.

    Returns a jitted (state_n, weights_nxD, traj_ids_n, stage, max_loss_n, pools) -> (state_n, losses_nxS);
    the state is donated. With `skip_bad` (optim.on_nonfinite=skip) each proxy keeps its state on a step whose
    loss is NaN/Inf or above its `max_loss_n` entry (numerics.py); without, `max_loss_n` is ignored.
    """
    traj, rep = NamedSharding(mesh, P("traj")), NamedSharding(mesh, P())
    one = lambda st, w, k, stage, m, pools: proxy_stage(  # noqa: E731
        st, w, k, stage, pools, lm=lm, tx=tx, steps=steps, batch_size=batch_size, seq_len=seq_len,
        max_loss=m if skip_bad else None)
    return jax.jit(
        lambda st, w_nxD, ids_n, stage, max_n, pools: jax.vmap(one, in_axes=(0, 0, 0, None, 0, None))(
            st, w_nxD, proxy_keys(seed, ids_n), stage, max_n, pools),
        in_shardings=(traj, traj, traj, None, traj, rep),
        out_shardings=(traj, traj),
        donate_argnums=0,
    )


class Sweep:
    """Compiled pieces of the sweep for one config: init, stage (train S steps), evaluate."""

    def __init__(self, cfg: Config, space: DomainSpace, devices=None):
        sc = cfg.sweep
        self.cfg, self.space = cfg, space
        self.lm = LMDef.build(cfg.proxy)
        self.tx = make_optimizer(cfg.optim, sc.num_stages * sc.steps_per_stage)
        self.chunk = min(sc.chunk_size or sc.num_trajectories, sc.num_trajectories)
        devices = list(devices if devices is not None else jax.devices())
        n_dev = len(devices) if sc.devices == -1 else sc.devices
        if n_dev > len(devices):
            raise DmaError(f"sweep.devices={n_dev} but only {len(devices)} devices are visible")
        n_dev = math.gcd(self.chunk, n_dev)
        self.mesh = Mesh(np.array(shd.spread_devices(devices, n_dev)), ("traj",))
        self.traj_sharding = NamedSharding(self.mesh, P("traj"))
        self.replicated = NamedSharding(self.mesh, P())
        records = [sampler.pool_records(space.records(d, "train"), sc.pool_tokens_per_domain)
                   for d in range(space.num_domains)]
        self.pools = shd.put_global(sampler.make_pools(records, sc.seq_len, cfg.run.seed), self.replicated)
        ec = cfg.eval
        self.eval_set = shd.put_global(ev.EvalSet.for_space(space, ec), self.replicated)

        lm, tx = self.lm, self.tx
        self._stage = make_stage(lm, tx, steps=sc.steps_per_stage, batch_size=sc.batch_size, seq_len=sc.seq_len,
                                 seed=cfg.run.seed, mesh=self.mesh, skip_bad=cfg.optim.on_nonfinite == "skip")
        eval_one = lambda p, es: ev.evaluate(lm, p, es, ec.batch_size)  # noqa: E731
        self._eval = jax.jit(jax.vmap(eval_one, in_axes=(0, None)),
                             in_shardings=(self.traj_sharding, self.replicated), out_shardings=self.traj_sharding)
        self.eval_single = jax.jit(eval_one)
        self._init = jax.jit(
            lambda p: jax.vmap(lambda _: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)))(jnp.arange(self.chunk)),
            out_shardings=self.traj_sharding,
        )
        abstract = jax.eval_shape(self._init, self.lm.abstract_params)
        self.abstract_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.traj_sharding), abstract)

    def init_chunk(self, base_params) -> TrainState:
        return self._init(shd.put_global(base_params, self.replicated))

    def stage(self, state: TrainState, weights_nxD: np.ndarray, traj_ids_n: np.ndarray, stage: int,
              max_loss_n: np.ndarray | None = None):
        """S steps of every proxy; `max_loss_n` [n]: per-proxy spike thresholds (used with on_nonfinite=skip)."""
        w = shd.put_global(np.asarray(weights_nxD, np.float32), self.traj_sharding)
        ids = shd.put_global(np.asarray(traj_ids_n, np.int32), self.traj_sharding)
        max_n = np.full(len(traj_ids_n), np.inf, np.float32) if max_loss_n is None else max_loss_n
        max_n = shd.put_global(np.asarray(max_n, np.float32), self.traj_sharding)
        return self._stage(state, w, ids, np.int32(stage), max_n, self.pools)

    def evaluate(self, params_n) -> dict:
        return self._eval(params_n, self.eval_set)


# ------------------------------------------------------------------------------ the run


def pretraining_mixture(space: DomainSpace) -> list[float]:
    """The mixture the base models were trained on: source domains by train tokens, 0 elsewhere."""
    w_D = np.where(np.array(space.fields_of_domain) == "source", space.train_tokens.astype(np.float64), 0.0)
    return (w_D / w_D.sum()).tolist()


def _meta(cfg: Config, space: DomainSpace) -> dict:
    config = dump_config(cfg)
    return {
        "format": offline_data.FORMAT,
        "domain_names": space.names,
        "domain_fields": space.fields_of_domain,
        "fields": space.fields,
        "target_field": cfg.sweep.target_field,
        "initial_weights": pretraining_mixture(space),
        "feedback_names": ev.feedback_names(space.names, space.fields),
        "domain_loss_index": ev.domain_loss_index(space.names, space.fields),
        "field_score_index": ev.field_score_index(space.names, space.fields),
        "balanced": cfg.eval.balanced,
        "config": config,
        "config_hash": config_hash(cfg),
    }


def config_hash(cfg: Config) -> str:
    """What makes two sweeps the same: the config without `run.out_dir` (where it lives), so a moved run
    folder still resumes."""
    config = dump_config(cfg)
    config["run"].pop("out_dir", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _spread(x_n: np.ndarray) -> dict:
    return {"mean": float(x_n.mean()), "min": float(x_n.min()), "max": float(x_n.max())}


@dataclasses.dataclass(frozen=True)
class SweepResult:
    out_dir: AnyPath  # the offline dataset
    N: int
    T: int
    S: int
    seconds: float  # of this invocation
    tokens_per_s: float  # over all proxies, this invocation
    returns: np.ndarray  # [N]


@stop_on_sigterm
def run_sweep(cfg: Config, devices=None, progress: bool = True) -> SweepResult:
    sc = cfg.sweep
    run = RunDir(cfg)
    space = DomainSpace.for_sweep(cfg)
    traj_path = run.trajectories
    if not traj_path.is_file():
        log.warning("no %s: sampling trajectories first (dma sample)", traj_path)
        run_sample(cfg)
    shd.barrier("dma-sweep-trajectories")  # process 0 has written them
    weights_NxTxD = load_trajectories(traj_path, space, cfg)
    base_params = load_base_params(cfg, "proxy", run.pretrain_checkpoints("proxy"))
    sw = Sweep(cfg, space, devices)
    base_params = shd.put_global(base_params, sw.replicated)
    N, T, n = sc.num_trajectories, sc.num_stages, sw.chunk
    n_chunks = math.ceil(N / n)
    base_full = shd.to_host(sw.eval_single(base_params, sw.eval_set))
    base_raw = ev.summary(base_full)  # the reference: per field / domain values only
    meta = _meta(cfg, space)
    M = len(meta["feedback_names"])
    base_fb = np.asarray(ev.feedback_vector(ev.normalise(base_full, base_raw, cfg.eval)), np.float32)

    ckpt = Checkpointer(run.sweep_checkpoints, keep=2)
    metrics_log = events(run.sweep, shd.is_primary())
    feedback_NxT1xM = np.zeros((N, T + 1, M), np.float32)
    feedback_NxT1xM[:, 0] = base_fb
    chunk, stage, state, guard_states = 0, 0, None, [None] * N
    if ckpt.latest_step() is not None:
        m = ckpt.read_meta()
        if m.get("config_hash") != meta["config_hash"]:
            raise DmaError(f"{ckpt.directory}: the sweep checkpoint was written with another config; "
                           f"delete {run.sweep} or restore the config")
        abstract = {"state": sw.abstract_state,
                    "feedback": jax.ShapeDtypeStruct(feedback_NxT1xM.shape, jnp.float32, sharding=sw.replicated)}
        restored, m, _ = ckpt.restore(abstract)
        chunk, stage = int(m["chunk"]), int(m["stage"])
        guard_states = m.get("loss_guards") or guard_states  # per trajectory (absent: a checkpoint from before)
        feedback_NxT1xM = np.array(restored["feedback"])
        state = restored["state"]
        log.info("resuming the sweep at chunk %d, stage %d", chunk, stage)
        if stage == T:
            chunk, stage, state = chunk + 1, 0, None

    metrics_log.truncate_after(chunk * T + stage)
    tokens_per_stage = n * sc.steps_per_stage * sc.batch_size * sc.seq_len
    t_start, tokens_done = time.perf_counter(), 0
    normalise_n = jax.jit(jax.vmap(lambda raw: ev.feedback_vector(ev.normalise(raw, base_raw, cfg.eval))))
    guards = [LossGuard("sweep", cfg.optim.on_nonfinite, cfg.optim.max_loss_spike).restore(g) for g in guard_states]
    loop = StageLoop("sweep", ckpt, n_chunks * T, "stage", progress, event_after_save="sweep.stage_done",
                     describe_stop=lambda done: f"after re-weighting step {(done - 1) % T + 1} of chunk "
                                                f"{(done - 1) // T + 1}/{n_chunks}", log=metrics_log)

    def unit(u: int) -> None:  # re-weighting step t of chunk c; TensorBoard at step u + 1 (the checkpoint's):
        # train/loss/{mean,min,max} over the chunk's proxies of their mean loss over the S steps, eval/balanced/
        # {mean,min,max} of their balanced scores after them, tokens_per_s (of this unit: training and evaluation)
        nonlocal state, tokens_done
        c, t = divmod(u, T)
        t_unit = time.perf_counter()
        ids_n = np.arange(c * n, (c + 1) * n) % N  # the last chunk wraps; its extra rows are dropped
        if state is None:
            state = sw.init_chunk(base_params)
        max_n = np.array([guards[i].max_loss() for i in ids_n], np.float32)
        state, losses = sw.stage(state, weights_NxTxD[ids_n, t], ids_n, t, max_n)
        fb_nxM = shd.to_host(normalise_n(sw.evaluate(state.params)))
        keep = ids_n < N if c < n_chunks - 1 else np.arange(n) < N - c * n
        losses_nxS = shd.to_host(losses)  # per proxy: NaN/spike -> stop (raise) or skipped
        for i in np.flatnonzero(keep):
            guards[ids_n[i]].check_many(t * sc.steps_per_stage + np.arange(1, sc.steps_per_stage + 1),
                                        losses_nxS[i], last_good(ckpt), float(max_n[i]), who=f"proxy {ids_n[i]}")
        feedback_NxT1xM[ids_n[keep], t + 1] = fb_nxM[keep]
        tokens_done += tokens_per_stage
        now = time.perf_counter()
        rate = tokens_done / (now - t_start)
        balanced_k = np.asarray(ev.balanced_score(fb_nxM[keep][:, meta["field_score_index"]], cfg.eval.balanced))
        metrics_log.append({"step": u + 1, "train": {"loss": _spread(losses_nxS[keep].mean(axis=1))},
                            "eval": {"balanced": _spread(balanced_k)},
                            "tokens_per_s": tokens_per_stage / max(now - t_unit, 1e-9)})
        loop.bar.set_postfix(proxies=f"{c * n}/{N}", loss=f"{float(np.mean(losses_nxS[:, -1])):.3f}",
                             tok_s=f"{rate:,.0f}")

    def save(done: int) -> None:
        nonlocal state
        c, t1 = divmod(done - 1, T)
        metrics_log.flush()
        ckpt.save(done, {"state": state, "feedback": shd.put_global(feedback_NxT1xM, sw.replicated)},
                  meta={"chunk": c, "stage": t1 + 1, "config_hash": meta["config_hash"],
                        "loss_guards": [g.state() for g in guards]})
        if t1 + 1 == T:
            state = None  # the chunk is finished: the next unit starts the next chunk from the base model

    loop.run(chunk * T + stage, unit, save)

    idx = np.asarray(meta["field_score_index"])
    balanced_NxT1 = np.asarray(ev.balanced_score(jnp.asarray(feedback_NxT1xM[..., idx]), cfg.eval.balanced))
    rewards_NxT = np.diff(balanced_NxT1, axis=1).astype(np.float32)
    se_idx = ev.field_score_se_index(space.names, space.fields)
    ds = offline_data.OfflineDataset(
        actions=weights_NxTxD.astype(np.float32), feedback=feedback_NxT1xM, rewards=rewards_NxT,
        returns=rewards_NxT.sum(1).astype(np.float32), meta=meta, field_score_se=feedback_NxT1xM[..., se_idx])
    if shd.is_primary():
        offline_data.save(ds, run.offline)
    elapsed = time.perf_counter() - t_start
    return SweepResult(run.offline, N, T, sc.steps_per_stage, elapsed, tokens_done / max(elapsed, 1e-9), ds.returns)

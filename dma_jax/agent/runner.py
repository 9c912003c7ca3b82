"""`dma train-agent` and `dma export agent`: train SFT then CQL on an offline dataset, export, load a policy.

Layout under `out_dir`: `<stage>/checkpoints/<step>/` (Orbax) and `<stage>/metrics.jsonl` (its
TensorBoard events in `<stage>/tb/`, written by process 0: `tb_log`) for stage in {sft, cql}.
Re-running a stage resumes from its last checkpoint; CQL starts from the finished SFT actor. An export is `<export_dir>/checkpoint/` (the
actor's parameters only) plus `<export_dir>/agent_spec.json` (written last): the
model's hyper-parameters, the feature layout and standardisation, and versions, so
the agent loads without the training config.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic

from dma_jax import offline_data
from dma_jax import sharding as shd
from dma_jax.agent import cql, distributions as dist, optim, sft
from dma_jax.config import AgentConfig, AgentModelConfig
from dma_jax.agent.features import (DOMAIN_FEATURES, FEATURE_VERSION, GLOBAL_FEATURES, FeatureStats, FeedbackLayout,
                                    History, history_features, trajectories)
from dma_jax.agent.model import AgentDef
from dma_jax.checkpoint import Checkpointer
from dma_jax.errors import DmaError
from dma_jax.faults import stop_on_sigterm
from dma_jax.io_utils import atomic_write_json, read_json_file, rmtree, upath
from dma_jax.numerics import LossGuard, last_good
from dma_jax.stage_loop import StageLoop
from dma_jax.tb_log import stage_log

log = logging.getLogger(__name__)

SPEC_FORMAT = "dma-agent-v1"
SPEC_FILE = "agent_spec.json"
STAGES = ("sft", "cql")


def _spec(cfg: AgentConfig, ds: offline_data.OfflineDataset, stats: FeatureStats, stage: str) -> dict:
    m = ds.meta
    return {
        "format": SPEC_FORMAT, "feature_version": FEATURE_VERSION,
        "domain_features": list(DOMAIN_FEATURES), "global_features": list(GLOBAL_FEATURES),
        "feature_stats": stats.to_json(), "model": cfg.model.model_dump(mode="json"), "stage": stage,
        "trained_on": {"n_domains": ds.n_domains, "horizon": ds.horizon, "n_trajectories": ds.n,
                       "domain_names": m["domain_names"], "domain_fields": m["domain_fields"], "fields": m["fields"],
                       "target_field": m["target_field"], "dataset_sha256": m.get("data_sha256", "")},
    }


def _check_resume(meta: dict, now: dict, ckpt_dir: Path) -> None:
    for key in ("model", "stage_config", "dataset_sha256"):
        if meta.get(key) != now[key]:
            raise DmaError(f"{ckpt_dir}: checkpoint was written with another {key.replace('_', ' ')}; "
                           "use a new out_dir or restore the original settings")


def _device() -> jax.Device:
    return jax.local_devices()[0]


def _abstract(init_fn) -> Any:
    """Shapes of `init_fn()`'s state, placed on the training device (a restore lands where training runs)."""
    sharding = jax.sharding.SingleDeviceSharding(_device())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(init_fn))


def _sft_init(cfg: AgentConfig, agent: AgentDef, seed: int):
    """A function building the initial SFT state: parameters drawn on the host, the rest in one jitted program."""
    tx = optim.adam(cfg.sft.lr, cfg.grad_clip)
    make = jax.jit(lambda actor: sft.init_state(actor, tx, seed))
    return lambda: make(jax.device_put(agent.init(seed)[0], _device()))


def _cql_setup(cfg: AgentConfig, agent: AgentDef, returns_N: np.ndarray, n_domains: int) -> cql.CqlSetup:
    scale = cfg.cql.reward_scale
    if scale is None:
        std = float(np.std(returns_N))
        scale = 1.0 / std if std > 1e-12 else 1.0
    target_entropy = dist.symmetric_entropy(1.0 + cfg.cql.target_concentration, n_domains)
    return cql.CqlSetup(agent, cfg.cql, cfg.grad_clip, target_entropy, scale)


def _cql_init(setup: cql.CqlSetup, actor_fn, seed: int):
    """A function building the initial CQL state from `actor_fn()` (the SFT actor) and a fresh critic."""
    make = jax.jit(lambda actor, critic: cql.init_state(setup, actor, critic, seed))
    return lambda: make(actor_fn(), jax.device_put(setup.agent.init(seed)[1], _device()))


def _finished_sft_actor(cfg: AgentConfig, agent: AgentDef, sft_dir: Path, dataset_sha: str, seed: int):
    with Checkpointer(sft_dir, create=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise DmaError(f"{sft_dir}: no SFT checkpoint; run `dma train-agent --stage sft` first")
        meta = ckpt.read_meta(step)
        if step < meta.get("total_steps", step) or meta.get("dataset_sha256") != dataset_sha:
            raise DmaError(f"{sft_dir}: SFT is unfinished (step {step} of {meta.get('total_steps')}) or was trained "
                           "on another dataset; re-run `dma train-agent --stage sft`")
        state, _, _ = ckpt.restore(_abstract(_sft_init(cfg, agent, seed)), step)
    return state.actor


_all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                                                      if jnp.issubdtype(x.dtype, jnp.floating)])))


@dataclasses.dataclass(frozen=True)
class AgentTrainResult:
    stage: str
    out_dir: Path
    steps: int
    resumed_from: int
    seconds: float  # of this invocation
    final_metrics: dict  # the last dispatch's metrics (empty when nothing was left to train)
    info: dict  # sft: n_trajectories, min_return_kept; cql: n_trajectories, reward_scale, target_entropy


@stop_on_sigterm
def run_train_agent(agent_cfg: AgentConfig, dataset_dir: str | Path, out_dir: str | Path, stage: str,
                    seed: int = 0, progress: bool = True) -> AgentTrainResult:
    """Train (or resume) one stage on the dataset in `dataset_dir`. SIGTERM: checkpoint, raise `Preempted`."""
    if stage not in STAGES:
        raise DmaError(f"train-agent: stage={stage!r} must be one of {list(STAGES)}")
    cfg = agent_cfg
    ds = offline_data.load(dataset_dir)
    layout = FeedbackLayout.from_meta(ds.meta)
    stats = FeatureStats.fit(*history_features(ds.actions, ds.feedback, layout, ds.horizon),
                             feedback_masked=not cfg.model.use_feedback)
    agent = AgentDef.build(cfg.model)
    out = upath(out_dir) / stage
    stage_cfg = cfg.sft if stage == "sft" else cfg.cql
    meta = {
        "spec": _spec(cfg, ds, stats, stage), "model": cfg.model.model_dump(mode="json"),
        "stage_config": stage_cfg.model_dump(mode="json", exclude={"steps"}),
        "dataset_sha256": ds.meta.get("data_sha256", ""), "total_steps": stage_cfg.steps, "seed": seed,
    }

    if stage == "sft":
        keep_N = sft.top_trajectories(ds.returns, cfg.sft.top_percent)
        init_fn = _sft_init(cfg, agent, seed)
        step_fn = sft.make_sft_step(agent, optim.adam(cfg.sft.lr, cfg.grad_clip), cfg.sft.batch_size,
                                    cfg.updates_per_dispatch, skip_bad=cfg.on_nonfinite == "skip")
        extra = {"n_trajectories": int(keep_N.size), "min_return_kept": float(ds.returns[keep_N].min())}
    else:
        keep_N = np.arange(ds.n)
        setup = _cql_setup(cfg, agent, ds.returns, ds.n_domains)
        sft_dir = upath(out_dir) / "sft" / "checkpoints"
        actor = _finished_sft_actor(cfg, agent, sft_dir, meta["dataset_sha256"], seed)
        init_fn = _cql_init(setup, lambda: actor, seed)
        step_fn = cql.make_cql_step(setup, cfg.cql.batch_size, cfg.updates_per_dispatch,
                                    skip_bad=cfg.on_nonfinite == "skip")
        extra = {"n_trajectories": ds.n, "reward_scale": setup.reward_scale, "target_entropy": setup.target_entropy}
    data = trajectories(ds.actions[keep_N], ds.feedback[keep_N], ds.rewards[keep_N], layout, stats)
    data = jax.device_put(data, _device())

    ckpt = Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints)
    metrics_log = stage_log(out / "metrics.jsonl", shd.is_primary())  # and its TensorBoard events in tb/
    start = ckpt.latest_step()
    resumed = {}
    if start is not None:
        resumed = ckpt.read_meta(start)
        _check_resume(resumed, meta, ckpt.directory)
        state, _, _ = ckpt.restore(_abstract(init_fn), start)
        log.info("agent %s: resumed from step %d", stage, start)
    else:
        start, state = 0, init_fn()
    metrics_log.truncate_after(start)

    total, k = stage_cfg.steps, cfg.updates_per_dispatch
    guard = LossGuard(f"agent {stage}", cfg.on_nonfinite, cfg.max_loss_spike, setting="agent")
    guard.restore(resumed.get("loss_guard"))
    loss_key = "bc_nll" if stage == "sft" else "critic_loss"  # the loss whose spikes count
    loop = StageLoop(f"agent {stage}", ckpt, total // k, "step", progress, bar_scale=k,
                     due=lambda d: (d * k) % cfg.checkpoint_every == 0, event_before_save="agent.dispatch",
                     describe_stop=lambda d: f"at step {d * k}/{total}", log=metrics_log)
    t0 = time.perf_counter()
    record: dict = {}

    def unit(j: int) -> None:  # dispatch j: updates j*k+1 .. (j+1)*k
        nonlocal state, record
        done = (j + 1) * k
        t_last = time.perf_counter()
        max_loss = guard.max_loss()
        state, metrics = step_fn(state, data, max_loss)
        record = {name: float(v) for name, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(v) for v in record.values()):
            bad = ", ".join(f"{name}={v}" for name, v in sorted(record.items()) if not np.isfinite(v))
            raise DmaError(f"agent {stage}: {bad} at step {done}; stopped, last good checkpoint: "
                           f"{last_good(ckpt)} (lower the learning rates, or set agent.on_nonfinite=skip)")
        if record.get("skipped", 0) < k:  # a spike (stop: raise; skip: those updates were skipped on device)
            guard.check(done, record[loss_key], last_good(ckpt), max_loss)
        if record.get("skipped"):
            log.warning("agent %s: %d of %d updates up to step %d skipped (NaN/Inf or loss spike)", stage,
                        int(record["skipped"]), k, done)
        record = dict(record, step=done, stage=stage, updates_per_s=k / max(time.perf_counter() - t_last, 1e-9))
        metrics_log.append(record)
        shown = ("bc_nll", "entropy") if stage == "sft" else ("q_data", "q_random", "cql_gap", "entropy")
        loop.bar.set_postfix({name: f"{record[name]:.3g}" for name in shown})

    def save(d: int) -> None:
        if not bool(_all_finite(state)):
            raise DmaError(f"agent {stage}: the state has NaN/Inf values at step {d * k}; last good checkpoint: "
                           f"step {ckpt.latest_step()} in {ckpt.directory}")
        metrics_log.flush()
        ckpt.save(d * k, state, meta=meta | {"loss_guard": guard.state()},
                  check_finite=False)  # checked above in one compiled program

    loop.run(start // k, unit, save)
    metrics_log.flush()
    return AgentTrainResult(stage, out, total, start, time.perf_counter() - t0, record, extra)


def _find_checkpoints(path: Path) -> Path:
    for candidate in (path / "cql" / "checkpoints", path / "sft" / "checkpoints", path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    raise DmaError(f"{path}: no agent checkpoint here (looked for cql/checkpoints, sft/checkpoints, checkpoints)")


def load_trained_critic(out_dir: str | Path) -> tuple[AgentDef, Any, dict]:
    """(agent, the critic's parameters, the spec) of the latest CQL checkpoint under `out_dir` (`<out_dir>/cql/`)."""
    with Checkpointer(upath(out_dir) / "cql" / "checkpoints", create=False) as ckpt:
        if ckpt.latest_step() is None:
            raise DmaError(f"{upath(out_dir) / 'cql' / 'checkpoints'}: no CQL checkpoint (run `dma train-agent`)")
        spec = ckpt.read_meta()["spec"]
        cfg = AgentConfig(model=AgentModelConfig.model_validate(spec["model"]))
        agent = AgentDef.build(cfg.model)  # only shapes matter: hyper-parameters do not change the state's layout
        init_fn = _cql_init(cql.CqlSetup(agent, cfg.cql, cfg.grad_clip, 0.0, 1.0), lambda: agent.init(0)[0], 0)
        state, _, _ = ckpt.restore(_abstract(init_fn))
    return agent, state.critic, spec


def export_agent(ckpt_dir_or_out_dir: str | Path, export_dir: str | Path) -> dict:
    """Write the latest actor (CQL if trained, else SFT) as a standalone checkpoint + JSON spec; returns the spec."""
    with Checkpointer(_find_checkpoints(upath(ckpt_dir_or_out_dir)), create=False) as ckpt:
        meta = ckpt.read_meta()
        spec = dict(meta["spec"], step=ckpt.latest_step())
        cfg = AgentConfig(model=AgentModelConfig.model_validate(spec["model"]))
        agent = AgentDef.build(cfg.model)
        if spec["stage"] == "sft":
            init_fn = _sft_init(cfg, agent, 0)
        else:  # only shapes matter here: hyper-parameters do not change the state's layout
            init_fn = _cql_init(cql.CqlSetup(agent, cfg.cql, cfg.grad_clip, 0.0, 1.0), lambda: agent.init(0)[0], 0)
        state, _, _ = ckpt.restore(_abstract(init_fn))
    export_dir = upath(export_dir)
    (export_dir / SPEC_FILE).unlink(missing_ok=True)  # an export without its spec reads as unfinished
    rmtree(export_dir / "checkpoint")
    out = Checkpointer(export_dir / "checkpoint", keep=1)
    out.save(0, {"actor": state.actor}, meta={"format": SPEC_FORMAT}, check_finite=False)  # checked when trained
    out.close()
    atomic_write_json(export_dir / SPEC_FILE, spec)
    return spec


class LoadedAgent:
    """A loaded agent: `act(history)` returns the mean of the policy's next-mixture distribution, [D]."""

    def __init__(self, agent: AgentDef, actor: dict, stats: FeatureStats, spec: dict):
        self.agent, self.actor, self.stats, self.spec = agent, actor, stats, spec
        self._mean_at = jax.jit(
            lambda p, dom, glob, t: dist.mean(agent.concentrations(p, dom, glob))[0, t])

    def act(self, history: History) -> np.ndarray:
        t = history.actions_txD.shape[0]
        dom, glob = history_features(np.asarray(history.actions_txD)[None], np.asarray(history.feedback_t1xM)[None],
                                     history.layout, history.horizon)
        dom, glob = self.stats.apply(dom, glob)
        pad = history.horizon - (t + 1)  # causal: padding after token t never changes the output at t
        dom = np.pad(dom, ((0, 0), (0, pad), (0, 0), (0, 0)))
        glob = np.pad(glob, ((0, 0), (0, pad), (0, 0)))
        return np.asarray(self._mean_at(self.actor, dom, glob, jnp.int32(t)), np.float64)


def load_exported_agent(export_dir: str | Path) -> LoadedAgent:
    """Load an export; refuses (one-line DmaError) a spec whose format or feature layout this code does not know."""
    export_dir = upath(export_dir)
    spec_path = export_dir / SPEC_FILE
    spec = read_json_file(spec_path, "missing (not an exported agent, or the export did not finish)")
    expected = {"format": SPEC_FORMAT, "feature_version": FEATURE_VERSION,
                "domain_features": list(DOMAIN_FEATURES), "global_features": list(GLOBAL_FEATURES)}
    for key, want in expected.items():
        if spec.get(key) != want:
            raise DmaError(f"{spec_path}: {key} is {spec.get(key)!r}, this version understands {want!r}")
    try:
        model_cfg = AgentModelConfig.model_validate(spec.get("model"))
    except pydantic.ValidationError as e:
        raise DmaError(f"{spec_path}: model: {e.errors()[0]['msg']}") from None
    stats = FeatureStats.from_json(spec.get("feature_stats") or {}, str(spec_path))
    agent = AgentDef.build(model_cfg)
    with Checkpointer(export_dir / "checkpoint", create=False) as ckpt:
        restored, _, _ = ckpt.restore({"actor": agent.abstract_actor})
    return LoadedAgent(agent, restored["actor"], stats, spec)

"""Policies run on the sweep's proxies: one vmapped, resumable run of N rows (one per policy) per seed.

Each row starts from the base proxy and trains T re-weighting steps of the sweep's environment (`sweep.Sweep`:
its data path, optimiser and evaluation), `run.seed` = the seed (the data order). All rows of a seed draw their
batches with the same keys (trajectory id 0, common random numbers), which cuts the noise in their paired
differences. A row's mixtures are either given up front (open loop: `weights_NxTxD`, as `dma headroom`'s fixed
shares and ramps) or chosen step by step by its policy from the feedback of its own proxy (closed loop:
`policies`, e.g. the agents, as in CPT: the same normalised feedback vectors, `evaluation.feedback_vector`).

A run is checkpointed after every re-weighting step under `<folder>/checkpoints/` until its `result.json` (returns,
final-score SEs, balanced scores per step, the mixtures used and the feedback they were chosen on) is written; a
folder with a result is read, not run again, and one written with another config or policy list is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax import evaluation as ev
from dma_jax import sharding as shd
from dma_jax import sweep
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, dump_config
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_json, read_json_file, rmtree
from dma_jax.policies import Policy, PolicyInput, SafePolicy, SpaceInfo, make_policy
from dma_jax.runs import AGENT_SPEC_FILE, RunDir
from dma_jax.stage_loop import StageLoop
from dma_jax.train import load_base_params

FORMAT = "dma-proxy-runs-v1"
RESULT = "result.json"  # a seed's returns, written last


def space_info(cfg: Config, space: DomainSpace) -> SpaceInfo:
    return SpaceInfo(tuple(space.names), tuple(space.fields_of_domain), cfg.sweep.target_field,
                     tuple(float(x) for x in space.train_tokens))


def make_policies(cfg: Config, space: DomainSpace, names: Sequence[str]) -> list[Policy]:
    """The named policies over the sweep's domain space (the sweep's offline data and the run's agents)."""
    run, info = RunDir(cfg), space_info(cfg, space)
    return [make_policy(name, info, sweep_dir=run.offline, agent_dirs=run.agent_exports(), spread=cfg.cpt.spread,
                        curriculum_end=cfg.cpt.curriculum_end, exclude=cfg.eval.unscored_domains)
            for name in names]


def trajectories(cfg: Config, space: DomainSpace, names: Sequence[str]) -> np.ndarray:
    """Open-loop policies' mixtures [N, T, D] over the sweep's domain space, T = sweep.num_stages."""
    info = space_info(cfg, space)
    out = []
    for name in names:
        policy = make_policy(name, info, spread=cfg.cpt.spread, exclude=cfg.eval.unscored_domains)
        history = PolicyInput([], [], cfg.sweep.num_stages)
        for _ in range(cfg.sweep.num_stages):
            history.weights.append(np.asarray(policy(history), np.float64))
        out.append(np.stack(history.weights))
    return np.stack(out).astype(np.float32)


def seed_config(cfg: Config, seed: int, n_rows: int) -> Config:
    """The sweep config of one proxy seed: `run.seed` = seed (the data order), one trajectory per row."""
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": seed}),
                                  "sweep": cfg.sweep.model_copy(update={"num_trajectories": n_rows})})


def _key(cfg: Config, seed: int, names, what: dict) -> str:
    """What a seed's numbers depend on (not chunking, devices or the sampler of `dma sample`)."""
    d = dump_config(cfg)
    doc = {k: d[k] for k in ("data", "proxy", "optim", "pretrain", "eval")}
    doc["sweep"] = {k: v for k, v in d["sweep"].items() if k not in ("sampler", "num_trajectories", "chunk_size",
                                                                     "devices")}
    doc |= {"seed": seed, "policies": list(names)} | what
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _agents_key(cfg: Config, names) -> dict:
    """The closed-loop part of a key: the run's sweep and each agent's export spec (their trained step)."""
    run, out = RunDir(cfg), {}
    exports = run.agent_exports()
    for name in names:
        if name.startswith("agent-"):
            spec = exports[name] / AGENT_SPEC_FILE if name in exports else None
            out[name] = read_json_file(spec, "") if spec is not None and spec.is_file() else None
    meta = run.offline / "meta.json"
    return {"closed_loop": out, "sweep": read_json_file(meta, "") if meta.is_file() else None}


def run_seed(cfg: Config, space: DomainSpace, names: Sequence[str], seed: int, base_params: Callable, folder: AnyPath,
             *, weights_NxTxD: np.ndarray | None = None, progress: bool = True, devices=None,
             desc: str = "proxy") -> dict:
    """One seed's rows (open loop: `weights_NxTxD` given; closed loop: None, the named policies act on their own
    proxy's feedback) trained from the base proxy, resumably; its result document."""
    names = list(names)
    closed = weights_NxTxD is None
    what = _agents_key(cfg, names) if closed else {"weights": np.round(weights_NxTxD, 7).tolist()}
    key = _key(cfg, seed, names, what)
    stale = DmaError(f"{folder}: written with another config or policy list; delete it or restore the config")
    if (folder / RESULT).is_file():  # done: nothing to compute
        found = read_json_file(folder / RESULT, "")
        if found.get("key") != key:
            raise stale
        return found
    ckpt = Checkpointer(folder / "checkpoints", keep=2)
    if ckpt.latest_step() is not None and ckpt.read_meta().get("key") != key:
        ckpt.close()
        raise stale
    N, T = len(names), cfg.sweep.num_stages
    W = np.zeros((N, T, space.num_domains), np.float32) if closed else np.asarray(weights_NxTxD, np.float32)
    if W.shape[:2] != (N, T):
        raise DmaError(f"proxy runs: {W.shape[0]} x {W.shape[1]} mixtures for {N} policies x {T} steps")
    safe = None
    if closed:
        info = space_info(cfg, space)
        safe = [SafePolicy(p, space.num_domains, info.spread("source", cfg.cpt.spread))
                for p in make_policies(cfg, space, names)]
    sw = sweep.Sweep(seed_config(cfg, seed, N), space, devices)
    base = shd.put_global(base_params(), sw.replicated)
    base_full = shd.to_host(sw.eval_single(base, sw.eval_set))
    base_raw, ec = ev.summary(base_full), cfg.eval  # as run_sweep: every score relative to the base proxy
    normalise_n = jax.jit(jax.vmap(lambda raw: ev.feedback_vector(ev.normalise(raw, base_raw, ec))))
    base_fb = np.asarray(ev.feedback_vector(ev.normalise(base_full, base_raw, ec)), np.float32)
    feedback_NxT1xM = np.repeat(base_fb[None, None], N, axis=0).repeat(T + 1, axis=1)
    n = sw.chunk
    start, state = 0, None
    if ckpt.latest_step() is not None:
        abstract = {"state": sw.abstract_state,
                    "feedback": jax.ShapeDtypeStruct(feedback_NxT1xM.shape, jnp.float32, sharding=sw.replicated)}
        if closed:
            abstract["weights"] = jax.ShapeDtypeStruct(W.shape, jnp.float32, sharding=sw.replicated)
        restored, _, _ = ckpt.restore(abstract)
        start, feedback_NxT1xM = ckpt.latest_step(), np.array(restored["feedback"])
        W = np.array(restored["weights"]) if closed else W
        state = restored["state"] if start % T else None

    def unit(u: int) -> None:  # re-weighting step t of chunk c; the last chunk wraps, its extra rows dropped
        nonlocal state
        c, t = divmod(u, T)
        rows_n = np.arange(c * n, (c + 1) * n)
        if closed:  # each row's policy chooses from its own history (the first mixture: from the base's feedback)
            for r in rows_n[rows_n < N]:
                history = PolicyInput(list(W[r, :t].astype(np.float64)), list(feedback_NxT1xM[r, :t + 1]), T)
                W[r, t] = safe[r](history)
        state = sw.init_chunk(base) if state is None else state
        state, _ = sw.stage(state, W[rows_n % N, t], np.zeros(n, np.int32), t)
        fb_nxM = shd.to_host(normalise_n(sw.evaluate(state.params)))
        feedback_NxT1xM[rows_n[rows_n < N], t + 1] = fb_nxM[rows_n < N]

    def save(done: int) -> None:
        nonlocal state
        tree = {"state": state, "feedback": shd.put_global(feedback_NxT1xM, sw.replicated)}
        if closed:
            tree["weights"] = shd.put_global(W, sw.replicated)
        ckpt.save(done, tree, meta={"key": key})
        state = None if done % T == 0 else state

    StageLoop(f"{desc} seed {seed}", ckpt, math.ceil(N / n) * T, "stage", progress).run(start, unit, save)
    idx, se_idx = ev.field_score_index(space.names, space.fields), ev.field_score_se_index(space.names, space.fields)
    balanced_NxT1 = np.asarray(ev.balanced_score(jnp.asarray(feedback_NxT1xM[..., idx]), ec.balanced), np.float64)
    se_N = ev.balanced_se(feedback_NxT1xM[:, -1, idx], feedback_NxT1xM[:, -1, se_idx], ec.balanced)
    returns_N = balanced_NxT1[:, -1] - balanced_NxT1[:, 0]
    if not np.isfinite(returns_N).all():
        raise DmaError(f"{desc} seed {seed}: policy {names[int(np.argmax(~np.isfinite(returns_N)))]} "
                       "has a non-finite return (a NaN/Inf loss; see optim.on_nonfinite)")
    doc = {"format": FORMAT, "seed": seed, "key": key, "policies": names, "returns": returns_N.tolist(),
           "eval_se": np.asarray(se_N, np.float64).tolist(), "balanced": balanced_NxT1.tolist(), "weights": W.tolist(),
           "feedback": feedback_NxT1xM.tolist()}
    if shd.is_primary():
        atomic_write_json(folder / RESULT, doc)
        rmtree(folder / "checkpoints")  # the result is the seed's whole output (the proxies are not kept)
    return doc


def base_loader(cfg: Config) -> Callable:
    """The base proxy's parameters, loaded once and only if a seed has work to do."""
    base: list = []

    def load():
        if not base:
            base.append(load_base_params(cfg, "proxy", RunDir(cfg).pretrain_checkpoints("proxy")))
        return base[0]

    return load

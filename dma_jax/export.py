"""Moving models in and out: the CPT'd target (Orbax + Hugging Face layout), agents, HF imports.

- `export_target`: the final params of a CPT run -> `<out>/orbax` (an Orbax checkpoint of the
  params) and `<out>/hf` (config.json + model.safetensors, loadable by transformers).
- `import_target`: a Hugging Face LLaMA checkpoint becomes the base target model (a
  `pretrain-target` checkpoint), so `dma cpt` continually pre-trains it.
- `export_agent_stage`: a trained agent -> a standalone folder CPT loads without the config.
- `export_schedule`: the mixtures a CPT run used -> a schedule file (`schedule_file`: JSON in levanter's staged
  mixture shape, and CSV) that `dma cpt --policy schedule:FILE` replays; `export_rollout`: the same for the
  mixtures an exported agent chooses given a file of per-step feedback.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax import evaluation as ev
from dma_jax import history as hist_format
from dma_jax import schedule_file
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, dump_config
from dma_jax.config.sections import EXECUTION_FIELDS
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, read_json_file, rmtree, upath
from dma_jax.models import hf
from dma_jax.models.lm import LMDef
from dma_jax.policies import PolicyInput, SafePolicy, SpaceInfo, make_policy
from dma_jax.runs import RunDir
from dma_jax.train import init_state, load_cpt_params, make_optimizer


def export_target(cfg: Config, policy: str, seed: int, out: str | None) -> Path:
    out_dir = upath(out) if out else RunDir(cfg).export_target(policy, seed)
    params = load_cpt_params(cfg, policy, seed, RunDir(cfg).cpt_checkpoints(policy, seed))
    rmtree(out_dir / "orbax")  # a re-run re-exports (the CPT run's final params; derived, cheap to redo)
    ck = Checkpointer(out_dir / "orbax", keep=1)
    ck.save(0, params, meta={"model": dump_config(cfg)["target"], "policy": policy, "seed": seed})
    ck.close()
    hf.export_hf(cfg.target, jax.tree.map(np.asarray, params), out_dir / "hf")
    return out_dir


def import_target(cfg: Config, hf_dir: str) -> Path:
    model_cfg, params = hf.import_hf(hf_dir)
    want = dump_config(cfg)["target"]
    got = model_cfg.model_dump(mode="json")
    keys = [k for k in want if k not in EXECUTION_FIELDS | {"init_std", "n_kv_heads"}]
    diff = [k for k in keys if want[k] != got[k]]
    if cfg.target.kv_heads != model_cfg.kv_heads:
        diff.append("n_kv_heads")
    if diff:
        fix = ", ".join(f"target.{k}={got[k]}" for k in diff)
        raise DmaError(f"{hf_dir}: the checkpoint's shape differs from the config's target model; set {fix}")
    ckpt = Checkpointer(RunDir(cfg).pretrain_checkpoints("target"), keep=1)
    if (step := ckpt.latest_step()) is not None:
        ckpt.close()
        raise DmaError(f"{ckpt.directory}: already holds a base target (step {step}); delete that folder to "
                       "import another, or use another run.out_dir (nothing was changed)")
    lm = LMDef.build(cfg.target)
    steps = cfg.pretrain.steps_for("target")
    tx = make_optimizer(cfg.optim, steps)
    state = init_state(lm, tx, 0)._replace(params=jax.tree.map(jnp.asarray, params))
    ckpt.save(steps, state, meta={"model": want, "imported_from": str(Path(hf_dir).absolute())})
    ckpt.close()
    return ckpt.directory


def export_agent_stage(cfg: Config, stage: str, out: str | None) -> Path:
    from dma_jax.agent.runner import export_agent

    run = RunDir(cfg)
    src = run.agent_stage(stage)
    out_dir = upath(out) if out else run.agent_export(stage)
    export_agent(src, out_dir)
    return out_dir


def export_schedule(cfg: Config, policy: str, seed: int, out: str | None) -> tuple[AnyPath, AnyPath]:
    """The mixtures of `dma cpt --policy policy --seed seed` (its history) -> schedule JSON and CSV."""
    run = RunDir(cfg)
    path = run.cpt_run(policy, seed) / hist_format.FILE
    if not path.is_file():
        raise DmaError(f"{path}: no finished CPT run of policy '{policy}' seed {seed} "
                       f"(run `dma cpt --policy {policy} --seed {seed}`)")
    h = hist_format.load(path)
    doc = schedule_file.make(f"cpt/{path.parent.parent.name}/seed{seed}", h.domain_names, h.steps_per_stage,
                             h.weights_TxD)
    files = run.schedule_files(run.schedule_name(policy, seed), out)
    schedule_file.write(doc, *files)
    return files


def export_rollout(cfg: Config, stage: str, feedback_file: str, out: str | None) -> tuple[AnyPath, AnyPath]:
    """The mixtures the exported `stage` agent chooses, step by step, when the feedback after each re-weighting step
    is the file's (as `dma cpt --policy agent-<stage>` would, invalid outputs replaced as there) -> JSON and CSV.

    The feedback file: {"feedback": [{name: value}, ...]}, one object per evaluation, row 0 the base model's, row t
    after re-weighting step t; names `evaluation.feedback_names` (loss/<domain>, score/<field>, ...: the `eval/` tags
    of the CPT's TensorBoard events); cpt.num_stages rows, or one more (the last evaluation, which no mixture sees)."""
    cc = cfg.cpt
    space = DomainSpace.for_config(cfg).subset(["source", cc.target_field])
    info = SpaceInfo.of(space, cc.target_field)
    run = RunDir(cfg)
    name = f"agent-{stage}"
    policy = SafePolicy(make_policy(name, info, agent_dirs=run.agent_exports()), space.num_domains,
                        info.spread("source", cc.spread))
    feedback_TxM = _read_feedback(feedback_file, ev.feedback_names(space.names, space.fields), cc.num_stages)
    history = PolicyInput([], [feedback_TxM[0]], cc.num_stages)
    for t in range(cc.num_stages):
        history.weights.append(np.asarray(policy(history), np.float64))
        if t + 1 < cc.num_stages:
            history.feedback.append(feedback_TxM[t + 1])
    doc = schedule_file.make(f"{name} on {upath(feedback_file).name}", space.names, cc.steps_per_stage,
                             history.weights)
    files = run.schedule_files(run.rollout_name(stage, feedback_file), out)
    schedule_file.write(doc, *files)
    return files


def _read_feedback(path: str, names: list[str], num_stages: int) -> np.ndarray:
    """The feedback file's first `num_stages` rows as float32 [T, M] (the precision the CPT loop computes)."""
    obj = read_json_file(path, "feedback file missing")
    rows = obj.get("feedback") if isinstance(obj, dict) else None
    if not isinstance(rows, list) or len(rows) not in (num_stages, num_stages + 1):
        got = f"{len(rows)} rows" if isinstance(rows, list) else "no 'feedback' list"
        raise DmaError(f"{path}: 'feedback' must list {num_stages} or {num_stages + 1} evaluations "
                       f"(cpt.num_stages, row 0 the base model), got {got}")
    out = []
    for t, row in enumerate(rows[:num_stages]):
        if not isinstance(row, dict) or set(row) != set(names):
            have = set(row) if isinstance(row, dict) else set()
            raise DmaError(f"{path}: feedback[{t}] must name exactly this run's feedback (missing: "
                           f"{sorted(set(names) - have)[:5]}; unknown: {sorted(have - set(names))[:5]})")
        bad = [n for n in names if not isinstance(row[n], (int, float)) or isinstance(row[n], bool)
               or not np.isfinite(row[n])]
        if bad:
            raise DmaError(f"{path}: feedback[{t}][{bad[0]!r}] is {row[bad[0]]!r}, not a finite number")
        out.append([row[n] for n in names])
    return np.asarray(out, np.float32)

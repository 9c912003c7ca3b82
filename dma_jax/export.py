"""Moving models in and out: the CPT'd target (Orbax + Hugging Face layout), agents, HF imports.

- `export_target`: the final params of a CPT run -> `<out>/orbax` (an Orbax checkpoint of the
  params) and `<out>/hf` (config.json + model.safetensors, loadable by transformers).
- `import_target`: a Hugging Face LLaMA checkpoint becomes the base target model (a
  `pretrain-target` checkpoint), so `dma cpt` continually pre-trains it.
- `export_agent_stage`: a trained agent -> a standalone folder CPT loads without the config.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, dump_config
from dma_jax.errors import DmaError
from dma_jax.io_utils import rmtree, upath
from dma_jax.models import hf
from dma_jax.models.lm import LMDef
from dma_jax.runs import RunDir
from dma_jax.train import check_model_meta, init_state, load_cpt_params, make_optimizer


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
    keys = [k for k in want if k not in ("init_std", "compute_dtype", "n_kv_heads")]
    diff = [k for k in keys if want[k] != got[k]]
    if cfg.target.kv_heads != model_cfg.kv_heads:
        diff.append("n_kv_heads")
    if diff:
        fix = ", ".join(f"target.{k}={got[k]}" for k in diff)
        raise DmaError(f"{hf_dir}: the checkpoint's shape differs from the config's target model; set {fix}")
    ckpt = Checkpointer(RunDir(cfg).pretrain_checkpoints("target"), keep=1)
    if ckpt.latest_step() is not None:
        check_model_meta(ckpt.read_meta(), want, "target", ckpt.directory)
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

"""Re-score finished CPT runs on a larger evaluation set: their final models, all benchmark items.

CPT scores its models on `eval.benchmark_items_per_field` items per field (16 in the demo and the study,
to keep the per-step feedback cheap; a stratified subset, `evaluation.select_items`, whose larger subsets
start with the smaller ones). `rescore_runs` loads each run's last checkpoint (the final model) and
evaluates it, and the base target, on up to `items` items per field and `windows` held-out windows
per domain; field and balanced scores are computed exactly as CPT computes them
(`evaluation.normalise`, relative to the base model on the same set). One `rescore-<items>x<windows>.json`
per run, next to its history.json (`path`), so re-running reads it back.
"""

from __future__ import annotations

import numpy as np

from dma_jax import evaluation as ev
from dma_jax import history
from dma_jax import sharding as shd
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_json, read_json_file, upath
from dma_jax.runs import RunDir
from dma_jax.train import load_base_params, shared_trainer


def path(run_dir: AnyPath, items: int, windows: int) -> AnyPath:
    """Where `rescore_runs` records the scores of the CPT run in `run_dir` (`RunDir.cpt_run`)."""
    return upath(run_dir) / f"rescore-{items}x{windows}.json"


def rescore_runs(cfg: Config, run_dirs: list[AnyPath], items: int, windows: int,
                 space: DomainSpace | None = None) -> list[dict]:
    """{"policy", "seed", "field_scores" {field: score}, "balanced", "items" {field: n}} per run dir
    (`<cpt dir>/<policy>/seed<k>`), each of a finished CPT run of `cfg`."""
    ec = cfg.eval.model_copy(update={"benchmark_items_per_field": items, "heldout_windows_per_domain": windows})
    out, todo = {}, []
    for d in run_dirs:
        if path(d, items, windows).is_file():
            out[str(d)] = read_json_file(path(d, items, windows), "missing")
        else:
            todo.append(d)
    if todo:
        cc = cfg.cpt
        space = space or DomainSpace.for_config(cfg).subset(["source", cc.target_field])
        shape = (cfg.target, cfg.optim, cfg.mesh, cc.num_stages * cc.steps_per_stage, cc.batch_size,
                 space.record_len - 1)
        trainer = shared_trainer(*shape)
        host_set = ev.EvalSet.for_space(space, ec)
        n_items = {f: int(n) for f, n in zip(space.fields, np.asarray(host_set.items_per_field_F))}
        eval_set = shd.put_global(host_set, shd.replicated(trainer.mesh))
        evaluate = ev.shared_evaluate(trainer, ec.batch_size)
        base = shd.put_global(load_base_params(cfg, "target", RunDir(cfg).pretrain_checkpoints("target")),
                              trainer.state_sharding.params)
        base_raw = shd.to_host(evaluate(base, eval_set))
        for d in todo:
            hist = history.load(upath(d) / history.FILE)
            if not hist.complete or list(hist.domain_names) != space.names:
                raise DmaError(f"{d}: not a finished CPT run of this domain space")
            ckpt = Checkpointer(upath(d) / "checkpoints")
            state, _, _ = ckpt.restore(trainer.abstract_state)
            ckpt.close()
            raw = shd.to_host(evaluate(state.params, eval_set))
            norm = ev.normalise(raw, base_raw, ec)
            scores = np.asarray(norm["field_score"], np.float64)
            doc = {"policy": hist.policy, "seed": hist.seed, "fields": list(space.fields),
                   "field_scores": dict(zip(space.fields, scores.tolist())),
                   "balanced": float(ev.balanced_score(np.asarray(norm["field_score"]), ec.balanced)),
                   "items_per_field": items, "heldout_windows_per_domain": windows, "items": n_items}
            if shd.is_primary():
                atomic_write_json(path(d, items, windows), doc)
            out[str(d)] = doc
    return [out[str(d)] for d in run_dirs]

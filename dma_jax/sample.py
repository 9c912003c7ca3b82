"""`dma sample`: the sweep's mixture trajectories (`trajectories.sample_trajectories`, knobs in `SamplerConfig`),
written once by process 0 with a plot of a few of them and their coverage (plot and table).

Output: `<run.out_dir>/sweep/trajectories.npz` (its format: `dma_jax.trajectories`), read by `dma sweep` (which
samples first when the file is missing). It sits in the layer of `trajectories`, below the stages, so `sweep` may
call it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dma_jax import sharding as shd
from dma_jax import trajectories
from dma_jax.config import Config
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.runs import RunDir, latest_step


def _refuse_to_replace_swept(run: RunDir, weights_NxTxD, names) -> None:
    """Other trajectories than those a started or finished sweep trained on would orphan its data: refused (the
    same ones are written again: a re-run of the same command)."""
    if not run.trajectories.is_file() or (latest_step(run.sweep_checkpoints) is None and not run.swept()):
        return
    old_NxTxD, old_names, _, _ = trajectories.load(run.trajectories)
    if list(old_names) != list(names) or old_NxTxD.shape != weights_NxTxD.shape or not np.array_equal(
            old_NxTxD, weights_NxTxD.astype(old_NxTxD.dtype)):
        raise DmaError(f"{run.trajectories}: a sweep has run on these trajectories and this config samples others "
                       f"(shape {list(old_NxTxD.shape)} -> {list(weights_NxTxD.shape)}); delete {run.sweep} to "
                       "sample and sweep again, or use another run.out_dir")


def run_sample(cfg: Config) -> Path:
    """Sample N trajectories [N, T, D]; write `trajectories.npz`, a PNG of a few and their coverage (PNG, table)."""
    sc = cfg.sweep
    space = DomainSpace.for_sweep(cfg)
    weights_NxTxD = trajectories.sample_trajectories(
        sc.num_trajectories, sc.num_stages, space.fields_of_domain, space.train_tokens.astype(float),
        sc.target_field, sc.sampler, cfg.run.seed,
    )
    run = RunDir(cfg)
    if not shd.is_primary():  # every process samples the same trajectories; process 0 writes them
        return run.trajectories
    _refuse_to_replace_swept(run, weights_NxTxD, space.names)
    run.sweep.mkdir(parents=True, exist_ok=True)
    trajectories.save(run.trajectories, weights_NxTxD, space.names, space.fields_of_domain, sc.target_field)
    trajectories.plot_trajectories(weights_NxTxD, space.names, space.fields_of_domain,
                                   run.trajectories.with_suffix(".png"))
    trajectories.write_coverage(weights_NxTxD, space.names, space.fields_of_domain, run.coverage_plot,
                                run.coverage_table)
    return run.trajectories

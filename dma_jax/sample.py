"""`dma sample`: the sweep's mixture trajectories (`trajectories.sample_trajectories`, knobs in `SamplerConfig`),
written once by process 0 with a plot of a few of them and their coverage (plot and table).

Output: `<run.out_dir>/sweep/trajectories.npz` (its format: `dma_jax.trajectories`), read by `dma sweep` (which
samples first when the file is missing). It sits in the layer of `trajectories`, below the stages, so `sweep` may
call it.
"""

from __future__ import annotations

from pathlib import Path

from dma_jax import sharding as shd
from dma_jax import trajectories
from dma_jax.config import Config
from dma_jax.data.domains import DomainSpace
from dma_jax.runs import RunDir


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
    run.sweep.mkdir(parents=True, exist_ok=True)
    trajectories.save(run.trajectories, weights_NxTxD, space.names, space.fields_of_domain, sc.target_field)
    trajectories.plot_trajectories(weights_NxTxD, space.names, space.fields_of_domain,
                                   run.trajectories.with_suffix(".png"))
    trajectories.write_coverage(weights_NxTxD, space.names, space.fields_of_domain, run.coverage_plot,
                                run.coverage_table)
    return run.trajectories

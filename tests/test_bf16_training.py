"""bfloat16 compute with float32 master weights, end to end on the tiny demo (`model.compute_dtype`): the LM
casts its float32 parameters to the compute dtype inside each matmul (`models.lm`), keeps norms, rotary
tables, softmax and logits in float32, and AdamW updates the float32 parameters. A short sweep and a short
CPT run from the same float32 base models follow their float32 runs within the tolerances below, and every
parameter is still float32 after training."""

import jax
import numpy as np
import pytest

from dma_jax import cpt as cpt_mod
from dma_jax import sweep as sweep_mod
from dma_jax.config import load_config
from dma_jax.runs import RunDir
from dma_jax.train import load_base_params, load_cpt_params
from dma_jax.data.domains import DomainSpace
from tests.paths import DEMO

DTYPES = ("float32", "bfloat16")


def _all_float32(tree) -> bool:
    """Every floating-point leaf is float32 (the optimizer's step counts are int32)."""
    floats = [x for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)]
    return bool(floats) and all(x.dtype == np.float32 for x in floats)


@pytest.mark.slow
def test_sweep_in_bf16_follows_float32(prepared_world, tmp_path):
    """4 proxies, 2 re-weighting steps of 4 optimizer steps each, on the same batches: the 32 training losses
    within 5e-3 nats of float32 (measured: max |diff| 1.7e-4, mean 6e-5)."""
    losses, T, S = {}, 2, 4
    w_NxTxD = None
    for dt in DTYPES:
        out = prepared_world.link_base(tmp_path / dt, ("proxy",))
        cfg = load_config(DEMO, prepared_world.run_overrides(
            out, "sweep.num_trajectories=4", "sweep.chunk_size=4", f"sweep.num_stages={T}",
            f"sweep.steps_per_stage={S}", f"proxy.compute_dtype={dt}"), variant="tiny")
        space = DomainSpace.for_sweep(cfg)
        if w_NxTxD is None:
            w_NxTxD = np.random.default_rng(0).dirichlet(np.ones(space.num_domains), size=(4, T)).astype(np.float32)
        sw = sweep_mod.Sweep(cfg, space, devices=jax.devices()[:4])
        state = sw.init_chunk(load_base_params(cfg, "proxy", RunDir(cfg).pretrain_checkpoints("proxy")))
        per_stage = []
        for t in range(T):
            state, losses_nxS = sw.stage(state, w_NxTxD[:, t], np.arange(4), t)
            per_stage.append(np.asarray(losses_nxS))
        losses[dt] = np.concatenate(per_stage, axis=1)
        assert _all_float32(state.params) and _all_float32(state.opt_state)
    diff = np.abs(losses["bfloat16"] - losses["float32"])
    assert losses["float32"].shape == (4, T * S) and np.isfinite(losses["bfloat16"]).all()
    assert 0 < diff.max() <= 5e-3, diff.max()  # > 0: really computed in bfloat16


@pytest.mark.slow
def test_cpt_in_bf16_follows_float32(prepared_world, tmp_path):
    """`dma cpt` of the float32 base target under a fixed mixture, 3 re-weighting steps of 4 optimizer steps:
    the per-domain held-out losses of every evaluation (base model included) within 5e-3 nats of float32
    (measured: max |diff| 7.5e-4, mean 1.6e-4, over 4 evaluations x 14 domains); the final parameters are
    float32."""
    loss_T1xD = {}
    for dt in DTYPES:
        out = prepared_world.link_base(tmp_path / dt, ("target",))
        cfg = load_config(DEMO, prepared_world.run_overrides(
            out, "cpt.num_stages=3", "cpt.steps_per_stage=4", "mesh.data=1", f"target.compute_dtype={dt}"),
            variant="tiny")
        doc = cpt_mod.run_cpt(cfg, "fixed-0.5", 0, devices=jax.devices()[:1], progress=False)
        assert doc.complete
        loss_T1xD[dt] = doc.domain_loss_T1xD
        assert _all_float32(load_cpt_params(cfg, "fixed-0.5", 0, RunDir(cfg).cpt_checkpoints("fixed-0.5", 0)))
    diff = np.abs(loss_T1xD["bfloat16"] - loss_T1xD["float32"])
    assert loss_T1xD["float32"].shape[0] == 4 and np.isfinite(loss_T1xD["bfloat16"]).all()
    assert 0 < diff.max() <= 5e-3, diff.max()

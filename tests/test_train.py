import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_jax.config import MeshConfig, ModelConfig, OptimConfig
from dma_jax.models.lm import LMDef
from dma_jax.train import Trainer, batch_from_tokens, loss_fn, lr_schedule

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2)


def _batches(n, B=8, L=16, V=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, (B, L + 1)) for _ in range(n)]


def _run(trainer, batches, seed=0):
    state = trainer.init(seed)
    losses = []
    for b in batches:
        state, m = trainer.step(state, trainer.put_batch(b))
        losses.append(float(m["loss"]))
    return state, np.array(losses)


def test_one_device_and_eight_devices_give_same_losses():
    batches = _batches(2) * 3
    t1 = Trainer(MODEL, OPTIM, MeshConfig(data=1, model=1), 6, 8, 16, devices=jax.devices()[:1])
    t8 = Trainer(MODEL, OPTIM, MeshConfig(data=-1, model=2), 6, 8, 16)
    assert dict(t8.mesh.shape) == {"data": 4, "model": 2}
    s1, l1 = _run(t1, batches)
    s8, l8 = _run(t8, batches)
    np.testing.assert_allclose(l1, l8, atol=1e-5, rtol=0)
    assert l1[-1] < l1[0] and l1[-2] < l1[1]  # it learns (each batch is seen 3 times)
    # The 8-device state really is sharded: an MLP kernel is split over `model`.
    w = s8.params["blocks"][0]["mlp"]["w_gate_DxF"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (32, 24)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_masked_loss_matches_numpy():
    lm = LMDef.build(MODEL)
    params = lm.init(0)
    tokens = _batches(1, B=3, L=7)[0]
    batch = batch_from_tokens(jnp.asarray(tokens))
    mask = np.random.default_rng(1).integers(0, 2, (3, 7)).astype(np.float32)
    batch["mask"] = jnp.asarray(mask)
    loss, _ = loss_fn(params, lm, batch)
    logits = np.asarray(lm.apply(params, batch["inputs"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    want = (nll * mask).sum() / mask.sum()
    assert abs(float(loss) - want) < 1e-5


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, total_steps=110)
    assert float(sched(0)) == 0.0
    assert abs(float(sched(5)) - 0.5) < 1e-6
    assert abs(float(sched(10)) - 1.0) < 1e-6
    # Cosine from 1.0 to 0.1 over the 100 steps after warm-up.
    for s in (35, 60, 110):
        want = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - 10) / 100))
        assert abs(float(sched(s)) - want) < 1e-5


def _numpy_schedule(kind, lr, warmup, total, decay_fraction=0.2, min_ratio=0.1):
    """An independent per-step learning rate: warm-up ramp, then constant or WSD's linear decay."""
    out = np.empty(total)
    decay = min(max(round(decay_fraction * total), 1), total - warmup)
    start = total - decay  # first step of the decay
    for s in range(total):
        if s < warmup:
            out[s] = lr * s / warmup
        elif kind == "constant" or s < start:
            out[s] = lr
        else:
            out[s] = lr + (lr * min_ratio - lr) * (s - start) / (decay - 1)
    return out


@pytest.mark.parametrize("kind", ["constant", "wsd"])
def test_lr_schedule_constant_and_wsd_match_numpy(kind):
    cfg = OptimConfig(lr=2.0, warmup_steps=6, schedule=kind, decay_fraction=0.25, min_lr_ratio=0.1)
    got = np.array([float(lr_schedule(cfg, 80)(s)) for s in range(80)])
    np.testing.assert_allclose(got, _numpy_schedule(kind, 2.0, 6, 80, 0.25), rtol=1e-5, atol=1e-6)
    assert abs(got[-1] - (0.2 if kind == "wsd" else 2.0)) < 1e-5  # WSD ends at min_lr_ratio * lr


def _stage_mass(cfg, T, S):
    lrs = np.array([float(lr_schedule(cfg, T * S)(s)) for s in range(T * S)])
    return lrs.reshape(T, S).sum(1) / lrs.sum()


def test_wsd_gives_every_stage_before_the_decay_the_same_learning_rate_mass():
    """The point of WSD here: late re-weighting decisions count. With warm-up inside the first stage and the decay
    inside the last, stages 2..T-1 carry exactly 1/T-ish equal mass; cosine front-loads the middle instead."""
    T, S = 10, 20
    wsd = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.1)
    mass = _stage_mass(wsd, T, S)
    np.testing.assert_allclose(mass[1:-1], mass[1], rtol=1e-6)  # equal mass in every middle stage
    assert mass[0] > 0.5 * mass[1] and mass[-1] > 0.5 * mass[1]  # first and last stages still count
    cos = _stage_mass(OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine"), T, S)
    assert cos.max() / cos[-1] > 5  # under cosine the last stage carries a small fraction of the peak stage


def test_gradient_clipping_bounds_the_update():
    """With a tiny clip norm, one AdamW step is still lr-sized, but the grad norm reported is the raw one."""
    clip = OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1e-6, weight_decay=0.0)
    tr = Trainer(MODEL, clip, MeshConfig(data=1), 3, 8, 16, devices=jax.devices()[:1])
    state = tr.init(0)
    before = jax.tree.map(np.asarray, state.params)
    state, m = tr.step(state, tr.put_batch(_batches(1)[0]))
    assert float(m["grad_norm"]) > 1e-3
    delta = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params),
                                                                        jax.tree.leaves(before)))
    assert delta <= 1e-3 * 1.01  # Adam's first step moves each weight by at most lr


def test_bf16_training_runs_and_learns():
    cfg = MODEL.model_copy(update={"compute_dtype": "bfloat16"})
    tr = Trainer(cfg, OPTIM, MeshConfig(data=1), 6, 8, 16, devices=jax.devices()[:1])
    state, losses = _run(tr, _batches(1) * 6)
    assert state.params["embed_VxD"].dtype == jnp.float32  # float32 master weights
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_compiled_memory_estimate_is_reported():
    tr = Trainer(MODEL, OPTIM, MeshConfig(data=1), 3, 8, 16, devices=jax.devices()[:1])
    assert tr.memory.get("argument", 0) > 0
    # The arguments hold at least the parameters and two Adam moments in float32.
    from dma_jax.models.lm import param_count_formula
    assert tr.memory["argument"] >= 3 * 4 * param_count_formula(MODEL)


def test_batch_not_divisible_by_data_axis_is_a_clear_error():
    from dma_jax.errors import DmaError
    with pytest.raises(DmaError, match="batch_size=6"):
        Trainer(MODEL, OPTIM, MeshConfig(data=4), 3, 6, 16)

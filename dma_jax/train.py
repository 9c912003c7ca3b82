"""LM training: the functional model, the loss, AdamW, and a sharded, AOT-compiled train step.

The hot path is plain JAX: `nnx.split` once at build time; the step is
`jax.jit(train_step)` over a pure-pytree `TrainState` with explicit in/out
shardings and a donated state. The sweep (many proxies) vmaps the same
`train_step`; target training runs it on a ("data", "model") mesh.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dma_jax import numerics, sharding as shd
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, MeshConfig, ModelConfig, OptimConfig, dump_config
from dma_jax.config.sections import EXECUTION_FIELDS
from dma_jax.errors import DmaError
from dma_jax.models.lm import LMDef, Params

log = logging.getLogger(__name__)



class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Params
    opt_state: Any


def batch_from_tokens(tokens_BxL1: jax.Array) -> dict[str, jax.Array]:
    """[B, L+1] token windows -> inputs/targets/mask for next-token prediction."""
    return {
        "inputs": tokens_BxL1[:, :-1],
        "targets": tokens_BxL1[:, 1:],
        "mask": jnp.ones(tokens_BxL1[:, 1:].shape, jnp.float32),
    }


def host_batch(records: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Next-token batch from packed records [B, L+1]: padding (segment 0) targets are masked out.

    Segment ids are kept so a token attends only within its own document.
    """
    if not isinstance(records, dict):
        records = {"tokens": records, "segment_ids": np.ones_like(records)}
    tokens, seg = np.asarray(records["tokens"], np.int32), np.asarray(records["segment_ids"], np.int32)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "mask": (seg[:, 1:] != 0).astype(np.float32),
        "segment_ids": np.ascontiguousarray(seg[:, :-1]),
    }


def token_losses(lm: LMDef, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-token cross-entropy [B, L] (unmasked)."""
    logits_BxLxV = lm.apply(params, batch["inputs"], batch.get("segment_ids"))
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])


def loss_fn(params: Params, lm: LMDef, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    losses_BxL = token_losses(lm, params, batch)
    mask_BxL = batch["mask"]
    n_tokens = jnp.maximum(mask_BxL.sum(), 1.0)
    loss = (losses_BxL * mask_BxL).sum() / n_tokens
    return loss, {"loss": loss, "tokens": mask_BxL.sum()}


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate at each step of a `total_steps` run: linear warm-up, then `cfg.schedule`
    (cosine / constant / wsd, see `OptimConfig`)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
                                                  decay_steps=max(total_steps, warmup + 1), end_value=end)
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
    if cfg.schedule == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(cfg.lr)], [warmup])
    decay = min(max(round(cfg.decay_fraction * total_steps), 1), max(total_steps - warmup, 1))
    stable = max(total_steps - warmup - decay, 0)
    # the decay reaches `end` at the last step (index total_steps - 1)
    down = optax.linear_schedule(cfg.lr, end, max(decay - 1, 1))
    return optax.join_schedules([ramp, optax.constant_schedule(cfg.lr), down], [warmup, warmup + stable])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(
        lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask,
    )
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, lm: LMDef, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step. Pure: vmappable over a leading trajectory axis (the sweep)."""
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, lm, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics


def guarded_train_step(state: TrainState, batch: dict[str, jax.Array], max_loss: jax.Array, *, lm: LMDef,
                       tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """`train_step` that keeps `state` when the loss is NaN/Inf or above `max_loss` (optim.on_nonfinite=skip)."""
    new_state, metrics = train_step(state, batch, lm=lm, tx=tx)
    ok = numerics.step_ok(metrics["loss"], max_loss, metrics["grad_norm"])
    return numerics.keep_if(ok, new_state, state), dict(metrics, skipped=~ok)


def init_state(lm: LMDef, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = lm.init(seed)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def state_shardings(lm: LMDef, tx: optax.GradientTransformation, mesh: Mesh, rules) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameters."""
    param_sh = shd.tree_shardings(lm.logical_axes, lm.abstract_params, rules, mesh)
    abstract_opt = jax.eval_shape(tx.init, lm.abstract_params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh,
        transform_non_params=lambda _: shd.replicated(mesh),
    )
    return TrainState(shd.replicated(mesh), param_sh, opt_sh)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Trainer:
    """A sharded, ahead-of-time compiled train step for one LM on one mesh."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh_cfg: MeshConfig,
                 total_steps: int, batch_size: int, seq_len: int, devices=None):
        self.lm = LMDef.build(model_cfg)
        self.tx = make_optimizer(optim_cfg, total_steps)
        self.mesh = shd.make_mesh(mesh_cfg, devices)
        data_size = self.mesh.shape["data"]
        if batch_size % data_size:
            raise DmaError(f"batch_size={batch_size} is not divisible by the mesh's data axis ({data_size} devices)")
        self.rules = mesh_cfg.rules
        self.state_sharding = state_shardings(self.lm, self.tx, self.mesh, self.rules)
        self.batch_sharding = shd.batch_sharding(self.mesh)
        abstract_state = jax.eval_shape(lambda: init_state(self.lm, self.tx, 0))
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_sharding
        )
        abstract_batch = {
            k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=self.batch_sharding)
            for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("mask", jnp.float32),
                          ("segment_ids", jnp.int32))
        }
        self.skip_bad_steps = optim_cfg.on_nonfinite == "skip"  # then the step takes a max_loss scalar too
        if self.skip_bad_steps:
            step_fn = jax.jit(
                lambda s, b, m: guarded_train_step(s, b, m, lm=self.lm, tx=self.tx),
                in_shardings=(self.state_sharding, self.batch_sharding, shd.replicated(self.mesh)),
                out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
                donate_argnums=0,
            )
            abstract_max = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(self.mesh))
            self.compiled_step = step_fn.lower(self.abstract_state, abstract_batch, abstract_max).compile()
        else:
            step_fn = jax.jit(
                lambda s, b: train_step(s, b, lm=self.lm, tx=self.tx),
                in_shardings=(self.state_sharding, self.batch_sharding),
                out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
                donate_argnums=0,
            )
            self.compiled_step = step_fn.lower(self.abstract_state, abstract_batch).compile()
        self.memory = memory_estimate(self.compiled_step)
        eval_fn = jax.jit(
            lambda p, b: loss_fn(p, self.lm, b)[0],
            in_shardings=(self.state_sharding.params, self.batch_sharding),
            out_shardings=shd.replicated(self.mesh),
        )
        self.compiled_eval = eval_fn.lower(self.abstract_state.params, abstract_batch).compile()

    def init(self, seed: int) -> TrainState:
        fn = jax.jit(lambda: init_state(self.lm, self.tx, seed), out_shardings=self.state_sharding)
        return fn()

    def put_batch(self, records: dict[str, np.ndarray] | np.ndarray) -> dict[str, jax.Array]:
        """Packed records {"tokens", "segment_ids"} [B, L+1] (or bare token windows) -> a sharded batch."""
        return shd.put_global(host_batch(records), self.batch_sharding)  # multi-host: each process its shards

    def step(self, state: TrainState, batch: dict[str, jax.Array], max_loss: float = float("inf")):
        """One step; with optim.on_nonfinite=skip a loss that is NaN/Inf or above `max_loss` leaves `state` as is."""
        if self.skip_bad_steps:
            return self.compiled_step(state, batch, jax.device_put(np.float32(max_loss), shd.replicated(self.mesh)))
        return self.compiled_step(state, batch)

    def eval_loss(self, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
        return self.compiled_eval(params, batch)


def memory_estimate(compiled) -> dict[str, int]:
    """Bytes per device from XLA's memory analysis of a compiled function ({} if unavailable)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if ma is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(ma, f, 0) or 0) for f in fields}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


@functools.lru_cache(maxsize=8)
def shared_trainer(*shape) -> Trainer:
    """One Trainer (AOT-compiled step, no training state) per configuration and shape, so a process running many
    CPT runs (`dma cpt`, `dma study`, the re-scoring) traces and compiles it once instead of once per run."""
    return Trainer(*shape)


def check_model_meta(meta: dict, model_cfg: dict, which: str, where) -> None:
    """Refuse a checkpoint whose recorded model config differs from `model_cfg` (one line, fields named); how the
    model computes (`EXECUTION_FIELDS`: compute dtype, attention kernel, remat) may differ."""
    saved = meta.get("model")
    if saved is not None:
        diff = sorted(k for k in (set(saved) | set(model_cfg)) - EXECUTION_FIELDS if saved.get(k) != model_cfg.get(k))
        if diff:
            raise DmaError(f"{where}: checkpoint was written for another model (differs in "
                           f"{which}.{f', {which}.'.join(diff)})")


def load_base_params(cfg: Config, which: str, ckpt_dir) -> Params:
    """The parameters of the final checkpoint of `dma pretrain --model which` in `ckpt_dir` (on the default
    device); the model config recorded with it must be the config's, and pretraining must have finished (a base
    left at an earlier step by a killed or shortened pretraining is refused, not used)."""
    steps = cfg.pretrain.steps_for(which)
    with Checkpointer(ckpt_dir, create=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise DmaError(f"{ckpt_dir}: no base {which} checkpoint (run `dma pretrain --model {which}` first)")
        if step < steps:
            raise DmaError(f"{ckpt_dir}: the base {which} is at step {step} of pretrain steps {steps}: pretraining "
                           f"did not finish (run `dma pretrain --model {which}` to finish it)")
        check_model_meta(ckpt.read_meta(step), dump_config(cfg)[which], which, ckpt.directory)
        lm = LMDef.build(getattr(cfg, which))
        tx = make_optimizer(cfg.optim, steps)
        sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("d",)), PartitionSpec())
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                jax.eval_shape(lambda: init_state(lm, tx, 0)))
        state, _, _ = ckpt.restore(abstract, step)
    return state.params


def load_cpt_params(cfg: Config, policy: str, seed: int, ckpt_dir) -> Params:
    """The final target parameters of `dma cpt --policy policy --seed seed`, checkpointed in `ckpt_dir`
    (on the first device)."""
    with Checkpointer(ckpt_dir, create=False) as ck:
        if ck.latest_step() is None:
            raise DmaError(f"{ckpt_dir}: no CPT checkpoint (run `dma cpt --policy {policy} --seed {seed}` first)")
        lm = LMDef.build(cfg.target)
        tx = make_optimizer(cfg.optim, cfg.cpt.num_stages * cfg.cpt.steps_per_stage)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                                jax.eval_shape(lambda: init_state(lm, tx, 0)))
        state, _, _ = ck.restore(abstract)
    return state.params

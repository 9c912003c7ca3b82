"""`dma plan`: memory per device of a config's target training (`dma cpt`) and sweep (`dma sweep`) on a
TPU slice, computed before paying for one.

Everything comes from abstract shapes (`jax.eval_shape`, nothing is allocated) placed on an abstract
mesh of the slice's size, the way `Trainer` and `Sweep` would place them: the target's train state on
the config's ("data", "model") mesh, the sweep's chunk of proxies on the ("traj",) mesh. Parameters,
AdamW moments and gradients per device are exact; activations are an estimate of what the backward
pass keeps under each remat policy (`activation_bytes`), and the plan names the least recomputing policy
that fits (`remat_that_fits`); XLA's own numbers come from compiling (`Trainer.memory`) where a
program is small enough to compile on this machine (tests/test_paper_configs.py compares the two).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from dma_jax import sharding as shd
from dma_jax.config import Config, ModelConfig, OptimConfig
from dma_jax.errors import DmaError
from dma_jax.models import attention
from dma_jax.models.lm import LMDef
from dma_jax.train import TrainState, init_state, make_optimizer, state_shardings

SLICES = {"v5e-8": (8, 16 * 2**30), "v4-8": (4, 32 * 2**30)}  # chips, HBM bytes per chip
HEADROOM = 0.9  # share of HBM a plan may use: XLA scratch, fragmentation and the runtime take the rest


@functools.lru_cache(maxsize=8)
def _abstract(model: ModelConfig, optim: OptimConfig, total_steps: int):
    """(LMDef, optimizer, abstract TrainState) of one model: tracing a 1B model's init takes seconds."""
    lm = LMDef.build(model)
    tx = make_optimizer(optim, total_steps)
    return lm, tx, jax.eval_shape(lambda: init_state(lm, tx, 0))


def shard_bytes(abstract_tree, shardings_tree) -> int:
    """Bytes one device holds of a pytree of abstract arrays under a same-structured pytree of shardings."""
    leaves, shardings = jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shardings))


REMATS = ("none", "dots", "full")  # `ModelConfig.remat`, from the least recomputation to the least memory


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, model_shards: int = 1, remat: str | None = None,
                     backend: str = "tpu") -> int:
    """Estimate of the activations one train step keeps for its backward pass under `remat` (default
    `cfg.remat`; `models.lm.REMAT`), on a device that holds `batch` sequences and 1/`model_shards` of the
    heads, MLP and vocabulary, with the attention kernel `cfg.attention` means on `backend`.

    Per layer and token, in the compute dtype, each block keeps: without remat 4 d_model (the two norms'
    inputs and outputs), q/k/v and the attention output, 3 d_ff (gate, up, their product); under "dots" the
    block's input, the q/k/v and output projections' outputs and gate and up (2 d_model + q/k/v + 2 d_ff);
    under "full" only its input (d_model). Per layer and sequence, without remat, the attention matrix:
    float32 for the softmax's backward plus its copy in the compute dtype where the kernel builds the full
    L x L scores (`xla`, and `cudnn` off GPU), a float32 log-sum-exp per query and head for a flash kernel.
    Under remat the backward rebuilds one block at a time: plus one layer as without remat. Once: float32
    logits and their gradient.
    """
    remat = remat or cfg.remat
    c = jnp.dtype(cfg.compute_dtype).itemsize
    split = lambda n: n // model_shards if n % model_shards == 0 else n  # noqa: E731 (replicated otherwise)
    H, G, K, F, V = split(cfg.n_heads), split(cfg.kv_heads), cfg.head_dim, split(cfg.d_ff), split(cfg.vocab_size)
    D = cfg.d_model
    impl = attention.resolve(cfg, backend)
    flash = impl == "splash" or (impl == "cudnn" and backend == "gpu")
    scores = H * seq_len * (4 if flash else seq_len * (4 + c))
    one_layer = batch * (seq_len * (4 * D + (2 * H + 2 * G) * K + 3 * F) * c + scores)
    kept_per_token = {"none": 0, "dots": 2 * D + (H + 2 * G) * K + 2 * F, "full": D}[remat]
    blocks = cfg.n_layers * one_layer if remat == "none" else cfg.n_layers * batch * seq_len * kept_per_token * c + one_layer
    return blocks + 2 * batch * seq_len * V * 4


def cheapest_remat(total_of, hbm: int) -> str | None:
    """The first of `REMATS` (least recomputation first) whose `total_of(remat)` bytes fit `hbm` (None if no
    policy does)."""
    return next((r for r in REMATS if total_of(r) <= HEADROOM * hbm), None)


def _verdict(total: int, hbm: int) -> dict:
    return {"total": total, "hbm": hbm, "fits": total <= HEADROOM * hbm}


def target_plan(cfg: Config, n_devices: int, hbm: int) -> dict:
    """Bytes per device of `dma cpt`'s train step for the target on `n_devices` chips."""
    data, model = shd.mesh_shape(cfg.mesh, n_devices)
    if cfg.cpt.batch_size % data:
        raise DmaError(f"cpt.batch_size={cfg.cpt.batch_size} is not divisible by the mesh's data axis ({data})")
    mesh = AbstractMesh((data, model), ("data", "model"))
    lm, tx, abstract = _abstract(cfg.target, cfg.optim, cfg.cpt.num_stages * cfg.cpt.steps_per_stage)
    sh = state_shardings(lm, tx, mesh, cfg.mesh.rules)
    b, L = cfg.cpt.batch_size // data, cfg.data.record_len - 1
    out = {"mesh": {"data": data, "model": model}, "batch_per_device": b, "seq_len": L,
           "n_params": sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params)),
           "params": shard_bytes(abstract.params, sh.params), "adam": shard_bytes(abstract.opt_state, sh.opt_state),
           "batch": 4 * b * L * 4,  # inputs, targets, mask, segment ids
           "activations_by_remat": {r: activation_bytes(cfg.target, b, L, model, r) for r in REMATS}}
    out["activations"] = out["activations_by_remat"][cfg.target.remat]
    out["grads"] = out["params"]  # float32, sharded like the parameters
    rest = sum(out[k] for k in ("params", "adam", "grads", "batch"))
    out["remat_that_fits"] = cheapest_remat(lambda r: rest + out["activations_by_remat"][r], hbm)
    return dict(out, **_verdict(rest + out["activations"], hbm))


def sweep_domains(cfg: Config) -> int | None:
    """Domains of the sweep's space (source + target field) when the config lists them (None for the demo)."""
    if cfg.data.demo:
        return None
    return sum(d.field in ("source", cfg.sweep.target_field) for d in cfg.data.domains)


def sweep_plan(cfg: Config, n_devices: int, hbm: int) -> dict:
    """Bytes per device of `dma sweep`'s vmapped stage: a chunk of proxies over a ("traj",) mesh."""
    sc = cfg.sweep
    chunk = min(sc.chunk_size or sc.num_trajectories, sc.num_trajectories)
    n_traj = math.gcd(chunk, n_devices if sc.devices == -1 else min(sc.devices, n_devices))
    lm, tx, _ = _abstract(cfg.proxy, cfg.optim, sc.num_stages * sc.steps_per_stage)
    abstract = jax.eval_shape(lambda p: jax.vmap(lambda _: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)))(
        jnp.arange(chunk)), lm.abstract_params)
    traj = NamedSharding(AbstractMesh((n_traj,), ("traj",)), P("traj"))
    per_device = chunk // n_traj
    n_domains = sweep_domains(cfg)
    out = {"chunk": chunk, "traj_devices": n_traj, "proxies_per_device": per_device,
           "n_params": sum(math.prod(a.shape) for a in jax.tree.leaves(lm.abstract_params)),
           "state": shard_bytes(abstract, jax.tree.map(lambda _: traj, abstract)),
           "activations_by_remat": {r: per_device * activation_bytes(cfg.proxy, sc.batch_size, sc.seq_len, remat=r)
                                    for r in REMATS},
           "pools": None if n_domains is None else n_domains * sc.pool_tokens_per_domain * 8}  # int32 tokens + segment ids, replicated
    out["activations"] = out["activations_by_remat"][cfg.proxy.remat]
    out["grads"] = per_device * sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(lm.abstract_params))
    rest = out["state"] + out["grads"] + (out["pools"] or 0)
    out["remat_that_fits"] = cheapest_remat(lambda r: rest + out["activations_by_remat"][r], hbm)
    total = rest + out["activations"]
    per_proxy = (total - (out["pools"] or 0)) / per_device
    out["max_proxies_per_device"] = max(int((HEADROOM * hbm - (out["pools"] or 0)) // per_proxy), 0)
    return dict(out, **_verdict(total, hbm))


def memory_plan(cfg: Config, slices: dict[str, tuple[int, int]] | None = None) -> dict:
    """{slice name: {"target": target_plan, "sweep": sweep_plan}} for each slice (default `SLICES`)."""
    out = {}
    for name, (n, hbm) in (slices or SLICES).items():
        try:
            out[name] = {"chips": n, "target": target_plan(cfg, n, hbm), "sweep": sweep_plan(cfg, n, hbm)}
        except DmaError as e:  # say which slice: the mesh (and its data axis) is the slice's
            raise DmaError(f"slice {name} ({n} chips): {e}") from None
    return out


def format_memory_plan(cfg: Config, result: dict) -> str:
    """`memory_plan`'s result as the two tables `dma plan` prints: the target's train step, the sweep's stage."""
    gib = lambda n: "?" if n is None else f"{n / 2**30:.2f}"  # noqa: E731
    first = next(iter(result.values()))
    t, s = first["target"], first["sweep"]
    lines = [f"target: {t['n_params'] / 1e6:,.1f}M parameters ({cfg.target.compute_dtype} compute), "
             f"cpt.batch_size {cfg.cpt.batch_size} x {t['seq_len']} tokens; GiB per device:",
             f"  {'slice':<7} {'mesh':>9} {'params':>7} {'adam':>7} {'grads':>7} {'batch':>6} {'activ.*':>8} "
             f"{'total':>7} {'HBM':>6}  fits (<= {HEADROOM:.0%} of HBM)"]
    for name, r in result.items():
        t = r["target"]
        lines.append(f"  {name:<7} {t['mesh']['data']:>4}x{t['mesh']['model']:<4} {gib(t['params']):>7} "
                     f"{gib(t['adam']):>7} {gib(t['grads']):>7} {gib(t['batch']):>6} {gib(t['activations']):>8} "
                     f"{gib(t['total']):>7} {gib(t['hbm']):>6}  {'yes' if t['fits'] else 'NO'}")
    lines.append(_remat_line(result, "target"))
    lines += [f"sweep: chunks of {s['chunk']} proxies of {s['n_params'] / 1e6:,.1f}M parameters, batch "
              f"{cfg.sweep.batch_size} x {cfg.sweep.seq_len} tokens each; GiB per device:",
              f"  {'slice':<7} {'traj':>5} {'proxies':>7} {'state':>7} {'grads':>7} {'pools':>6} {'activ.*':>8} "
              f"{'total':>7} {'HBM':>6}  fits   (max proxies per device)"]
    for name, r in result.items():
        s = r["sweep"]
        lines.append(f"  {name:<7} {s['traj_devices']:>5} {s['proxies_per_device']:>7} {gib(s['state']):>7} "
                     f"{gib(s['grads']):>7} {gib(s['pools']):>6} {gib(s['activations']):>8} {gib(s['total']):>7} "
                     f"{gib(s['hbm']):>6}  {'yes' if s['fits'] else 'NO ':<5}  ({s['max_proxies_per_device']})")
    lines.append(_remat_line(result, "sweep"))
    lines.append(f"* activations: an estimate, with the config's remat (target: {cfg.target.remat}, proxy: "
                 f"{cfg.proxy.remat}); parameters, AdamW state and gradients are exact.")
    return "\n".join(lines)


def _remat_line(result: dict, part: str) -> str:
    """Activations per remat policy on each slice, and the least recomputing policy that fits there."""
    per_slice = [f"{name}: " + ", ".join(f"{r} {v / 2**30:.2f}" for r, v in r_[part]["activations_by_remat"].items())
                 + f" -> {r_[part]['remat_that_fits'] or 'nothing fits'}" for name, r_ in result.items()]
    return f"  activ. GiB per remat policy (-> cheapest that fits): {'; '.join(per_slice)}"

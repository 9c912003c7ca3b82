"""Where a target train step's time goes on this machine: forward, forward+backward, and the full step
(AdamW + clipping), side by side in one process, each against the matmul peak measured here.

    .venv/bin/python bench/train_step_breakdown.py [--config configs/demo.yaml] [--model target|proxy] [--batch 16] [--seq 128]

Used in BENCHMARKS.md to explain the target step's MFU (the backward pass is the gap).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax.config import MeshConfig, load_config
from dma_jax.models.lm import LMDef, flops_per_token
from dma_jax.perf import measure
from dma_jax.train import Trainer, batch_from_tokens, loss_fn


def best_of(fn, *args, reps: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", choices=("proxy", "target"), default="target")
    args = ap.parse_args()
    cfg = load_config(args.config)
    model = cfg.target if args.model == "target" else cfg.proxy
    dev = jax.devices()[:1]
    peak = measure.measure_peak(dev[0], 0.5)["flops_per_s"]
    lm = LMDef.build(model)
    params = jax.tree.map(jnp.asarray, measure.random_params(lm.abstract_params, 0))
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    batch = batch_from_tokens(jnp.asarray(tokens))
    fwd = jax.jit(lambda p, b: loss_fn(p, lm, b)[0])
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, lm, b)[0]))
    trainer = Trainer(model, cfg.optim, MeshConfig(data=1), 1000, args.batch, args.seq, dev)
    state = [jax.device_put(measure.fresh_state(trainer, measure.random_params(lm.abstract_params, 0)),
                            trainer.state_sharding)]
    dev_batch = trainer.put_batch(tokens)

    def step():
        state[0], m = trainer.step(state[0], dev_batch)
        return m

    f_tok = flops_per_token(model, args.seq)  # forward + backward model FLOPs per token (6N + attention)
    n_tok = args.batch * args.seq
    rows = [("forward", best_of(fwd, params, batch), f_tok / 3), ("forward + backward", best_of(grad, params, batch),
                                                                   f_tok), ("full train step", best_of(step), f_tok)]
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; {args.model} {model.d_model}d x {model.n_layers} layers, "
          f"batch {args.batch} x {args.seq}")
    for name, seconds, flops in rows:
        print(f"  {name:<20} {seconds * 1e3:8.1f} ms  {n_tok * flops / seconds / 1e9:7.1f} GFLOP/s  "
              f"{n_tok * flops / seconds / peak:6.1%} of peak")


if __name__ == "__main__":
    main()

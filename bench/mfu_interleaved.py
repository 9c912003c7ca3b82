"""The train step's share of the matmul peak, each figure a ratio of two timings taken back to back in one process
(issue 19, point 3: "% of the measured matmul peak").

    .venv/bin/python bench/mfu_interleaved.py [--rounds 15] [--out bench_mfu.json]

Why: on a shared host the peak itself moves by 2x between processes and over minutes (BENCHMARKS.md: 82-212 GFLOP/s),
so a step timed now against a peak timed a minute earlier, or in another process, says little. Here every round
times the 2048^3 float32 matmul and then the step (best of a short burst each) and keeps their ratio; the table gives
the median and the spread of those ratios over the rounds, per model. The models are issue 19's: the demo proxy
(batch 8 x 64), the demo target (16 x 128) and the bench's large proxy (7.18M, 8 x 64); the step is the full
`Trainer.step` (AdamW + clipping) with the process's XLA:CPU defaults (`dma_jax.xla_cpu`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--burst", type=float, default=0.4, help="seconds per timing (best of the calls in it)")
    p.add_argument("--out", type=Path, default=Path("bench_mfu.json"))
    p.add_argument("--attention", default="xla", help="comma-separated model.attention values, each a row per model "
                   "(e.g. xla,cudnn: side by side in the same rounds)")
    p.add_argument("--only", action="append", help="this model only (repeatable: demo proxy, demo target, large proxy)")
    args = p.parse_args(argv)

    from dma_jax import xla_cpu

    xla_cpu.apply_defaults()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dma_jax.config import MeshConfig, ModelConfig, load_config
    from dma_jax.perf import measure
    from dma_jax.models.lm import flops_per_token
    from dma_jax.train import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    large = ModelConfig(vocab_size=cfg.proxy.vocab_size, d_model=384, n_layers=4, n_heads=6, d_ff=1024,
                        max_seq_len=128)
    models = (("demo proxy", cfg.proxy, 8, 64), ("demo target", cfg.target, 16, 128), ("large proxy", large, 8, 64))
    models = tuple(m for m in models if not args.only or m[0] in args.only)
    kinds = args.attention.split(",")
    models = tuple((name if len(kinds) == 1 else f"{name} ({a})", model.model_copy(update={"attention": a}), b, L)
                   for name, model, b, L in models for a in kinds)
    dev = jax.devices()[0]
    n = 2048
    a_NxN = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), dev)
    dot = jax.jit(jnp.dot).lower(a_NxN, a_NxN).compile()
    steps = []
    for name, model, batch, seq in models:
        trainer = Trainer(model, cfg.optim, MeshConfig(data=1), 1000, batch, seq, [dev])
        tokens = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq + 1), dtype=np.int32)
        batch_dev = trainer.put_batch(tokens)
        state = [measure.fresh_state(trainer, measure.random_params(trainer.lm.abstract_params, 0))]

        def run(trainer=trainer, batch_dev=batch_dev, state=state):
            state[0], metrics = trainer.step(state[0], batch_dev)
            return metrics

        run()  # compiled and warm
        steps.append((name, run, batch * seq, flops_per_token(model, seq) * batch * seq))
    rows = {name: [] for name, *_ in steps}
    for r in range(args.rounds):
        for name, run, tokens, flops in steps:  # the peak right before each model's step: a ratio of neighbours
            peak_s = measure.best_seconds(lambda: dot(a_NxN, a_NxN), args.burst)
            step_s = measure.best_seconds(run, args.burst)
            peak, step = 2 * n**3 / peak_s / 1e9, flops / step_s / 1e9
            rows[name].append({"peak_gflops": peak, "step_gflops": step, "tokens_per_s": tokens / step_s,
                               "share": step / peak})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]['share']:.0%}" for k, v in rows.items()),
              flush=True)
    out = {"rounds": args.rounds, "burst_s": args.burst, "matmul": f"{n}x{n}x{n} float32",
           "jax": jax.__version__, "models": {}}
    print("\n| model | step GFLOP/s (median) | peak GFLOP/s (median) | share of peak: median [min, max] |")
    print("|---|---:|---:|---:|")
    for name, recs in rows.items():
        share = [x["share"] for x in recs]
        med = {k: statistics.median(x[k] for x in recs) for k in ("step_gflops", "peak_gflops")}
        out["models"][name] = {"share_median": statistics.median(share), "share_min": min(share),
                               "share_max": max(share), **{f"{k}_median": v for k, v in med.items()}, "rounds": recs}
        print(f"| {name} | {med['step_gflops']:.1f} | {med['peak_gflops']:.1f} | "
              f"{statistics.median(share):.0%} [{min(share):.0%}, {max(share):.0%}] |")
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What XLA:CPU's own options do to the train step (issue 19, point 3): each variant's XLA_FLAGS in a fresh
process (XLA reads them once), the variants interleaved round by round so every ratio is side by side.

    .venv/bin/python bench/xla_cpu_options.py [--rounds 3] [--out bench_xla_cpu.json] [--only baseline,xnn-dot]

Per variant and model: the full train step (AdamW + clipping, `Trainer.step`) in tokens/s and % of the matmul
peak measured in the baseline's process of the same round (an option can change the peak matmul as well), its ratio to the baseline of the same round (median over rounds), and the
largest difference of the first three steps' losses from the baseline's (an option that changes the numbers
must say so). Models: the demo proxy (batch 8 x 64), the demo target (16 x 128) and the bench's large proxy
(7.18M, 8 x 64), the sizes issue 19 compares with a PyTorch eager loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, XLA_FLAGS added to the environment's, what it tries); a name ending "model.<field>=<value>" also changes
# the model config. The children call no `dma_jax.xla_cpu.apply_defaults`: "baseline" is jaxlib's own defaults.
VARIANTS = (
    ("baseline", "", "jaxlib's defaults"),
    ("xnn-dot", "--xla_cpu_experimental_xnn_fusion_type=dot", "matmuls through XNNPACK"),
    ("xnn-all", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", "XNNPACK fusions of dots, "
     "elementwise ops and reductions"),
    ("xnn-graph", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
     "XNNPACK graph fusion (greedy)"),
    ("ynn-dot", "--xla_cpu_experimental_ynn_fusion_type=dot", "matmuls through YNNPACK"),
    ("onednn", "--xla_cpu_experimental_onednn_custom_call=true --xla_cpu_experimental_onednn_fusion_type=dot",
     "matmuls through oneDNN custom calls"),
    ("fast-math", "--xla_cpu_enable_fast_math=true", "LLVM fast math (changes rounding)"),
    ("concurrent-sched", "--xla_cpu_enable_concurrency_optimized_scheduler=true",
     "the scheduler that overlaps independent ops"),
    ("vec512", "--xla_cpu_prefer_vector_width=512", "512-bit vectors in generated loops (AVX-512 here)"),
    ("no-eigen-threads", "--xla_cpu_multi_thread_eigen=false", "single-threaded Eigen matmuls"),
    ("model.attention=cudnn", "", "attention through jax.nn.dot_product_attention (its XLA path on CPU) instead "
     "of our einsums: other transposes"),
    ("ynn-dot+model.attention=cudnn", "--xla_cpu_experimental_ynn_fusion_type=dot", "the two together (YNNPACK dots "
     "are dma's CPU default)"),
)
MODELS = ("demo proxy", "demo target", "large proxy")


def child(model_override: str) -> None:
    """One process, one variant (its XLA_FLAGS already in the environment, `model_override` "field=value" or ""):
    one JSON line on stdout."""
    import jax
    import numpy as np

    from dma_jax.config import MeshConfig, ModelConfig, load_config
    from dma_jax.perf import measure
    from dma_jax.train import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    large = ModelConfig(vocab_size=cfg.proxy.vocab_size, d_model=384, n_layers=4, n_heads=6, d_ff=1024,
                        max_seq_len=cfg.sweep.seq_len)  # perf.bench.plan_for's large proxy
    shapes = {"demo proxy": (cfg.proxy, cfg.sweep.batch_size, cfg.sweep.seq_len),
              "demo target": (cfg.target, cfg.cpt.batch_size, cfg.data.record_len - 1),
              "large proxy": (large, cfg.sweep.batch_size, cfg.sweep.seq_len)}
    if model_override:
        field, value = model_override.split("=", 1)
        shapes = {k: (m.model_copy(update={field: value}), b, n) for k, (m, b, n) in shapes.items()}
    dev = jax.devices()[:1]
    peak = measure.measure_peak(dev[0], 0.5)
    rows = []
    for name in MODELS:
        model, batch, seq = shapes[name]
        row = measure.bench_target(name, model, batch, seq, cfg.optim, dev, peak, 1.0)
        trainer = Trainer(model, cfg.optim, MeshConfig(data=1), 1000, batch, seq, dev)  # the numbers: 3 steps
        state = measure.fresh_state(trainer, measure.random_params(trainer.lm.abstract_params, 0))
        tokens = np.random.default_rng(1).integers(0, model.vocab_size, (batch, seq + 1), dtype=np.int32)
        losses = []
        for _ in range(3):
            state, metrics = trainer.step(state, trainer.put_batch(tokens))
            losses.append(float(metrics["loss"]))
        rows.append({"model": name, "tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"],
                     "step_s": row["step_s"], "losses": losses})
    print(json.dumps({"peak_flops_per_s": peak["flops_per_s"], "rows": rows}))


def run_variant(name: str, flags: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(x for x in (env.get("XLA_FLAGS", ""), flags) if x)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    override = name.split("model.", 1)[1] if "model." in name else ""
    done = subprocess.run([sys.executable, __file__, "--child", override], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median over rounds)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all; baseline always)")
    ap.add_argument("--out", default="bench_xla_cpu.json", help="JSON with every round's raw figures")
    ap.add_argument("--child", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    only = set(filter(None, args.only.split(",")))
    unknown = only - {v[0] for v in VARIANTS}
    if unknown:
        sys.exit(f"--only: no variant {sorted(unknown)[0]!r} (variants: {', '.join(v[0] for v in VARIANTS)})")
    variants = [v for v in VARIANTS if not only or v[0] in only or v[0] == "baseline"]
    raw: dict[str, list[dict]] = {v[0]: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no variant always first
        for name, flags, _ in order:
            raw[name].append(run_variant(name, flags))
            Path(args.out).write_text(json.dumps({"rounds": r + 1, "partial": True, "raw": raw}, indent=1))  # kill-safe
            print(f"round {r + 1}/{args.rounds} {name}: "
                  + (raw[name][-1].get("error") or ", ".join(f"{x['model']} {x['tokens_per_s']:,.0f} tok/s"
                                                            for x in raw[name][-1]["rows"])), flush=True)
    base = raw["baseline"]
    table = []
    for name, flags, what in variants:
        cells = []
        for m, model in enumerate(MODELS):
            ok = [(b, v) for b, v in zip(base, raw[name]) if "rows" in b and "rows" in v]
            if not ok:
                cells.append(None)
                continue
            ratio = statistics.median(v["rows"][m]["tokens_per_s"] / b["rows"][m]["tokens_per_s"] for b, v in ok)
            tok = statistics.median(v["rows"][m]["tokens_per_s"] for _, v in ok)
            # against the baseline process's matmul peak of the same round: an option may change the peak matmul too
            mfu = statistics.median(v["rows"][m]["mfu"] * v["peak_flops_per_s"] / b["peak_flops_per_s"] for b, v in ok)
            dloss = max(abs(x - y) for b, v in ok for x, y in zip(v["rows"][m]["losses"], b["rows"][m]["losses"]))
            cells.append({"model": model, "tokens_per_s": tok, "mfu": mfu, "ratio": ratio, "max_loss_diff": dloss})
        errors = [x["error"] for x in raw[name] if "error" in x]
        table.append({"variant": name, "flags": flags, "what": what, "cells": cells, "errors": errors})
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "table": table, "raw": raw}, indent=1))
    print("\n| variant | XLA_FLAGS | " + " | ".join(f"{m}: tok/s (% of baseline peak), x baseline" for m in MODELS)
          + " | max loss diff |")
    print("|---|---|" + "---:|" * len(MODELS) + "---:|")
    for row in table:
        if row["errors"] and all(c is None for c in row["cells"]):
            print(f"| {row['variant']} | `{row['flags']}` | " + " | ".join("–" for _ in MODELS)
                  + f" | failed: {row['errors'][0]} |")
            continue
        print(f"| {row['variant']} | `{row['flags'] or '(none)'}` | "
              + " | ".join(f"{c['tokens_per_s']:,.0f} ({c['mfu']:.0%}), {c['ratio']:.2f}x" for c in row["cells"])
              + f" | {max(c['max_loss_diff'] for c in row['cells']):.1e} |")


if __name__ == "__main__":
    main()

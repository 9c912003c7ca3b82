"""Time the sweep's training and its evaluation, per re-weighting step, at a config's sizes (the demo's by default).

Run from a checkout (it imports the `dma_jax` found first on sys.path, so the same script times two versions
side by side); the run folder must hold prepared data (`dma prepare`). Parameters are a fresh init: only the
shapes matter for the time.
    python bench/eval_cost.py RUN_DIR [key=value ...]
Prints one JSON line: seconds per re-weighting step for training (S steps of N proxies) and for evaluating the
N proxies, the eval share, and the eval cost per proxy.
"""

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dma_jax.config import load_config  # noqa: E402
from dma_jax.data.domains import DomainSpace  # noqa: E402
from dma_jax.sweep import Sweep  # noqa: E402


def best(fn, reps=3):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main(run_dir: str, *overrides: str) -> dict:
    cfg = load_config("configs/demo.yaml", [f"run.out_dir={run_dir}", *overrides])
    space = DomainSpace.for_sweep(cfg)
    sw = Sweep(cfg, space)
    n, D = sw.chunk, space.num_domains
    state = sw.init_chunk(sw.lm.init(0))
    w, ids = np.full((n, D), 1.0 / D, np.float32), np.arange(n)
    holder = {"state": state}

    def train():
        holder["state"], losses = sw.stage(holder["state"], w, ids, 0)
        return losses

    train()  # compile
    jax.block_until_ready(sw.evaluate(holder["state"].params))  # compile
    t_train = best(train)
    t_eval = best(lambda: sw.evaluate(holder["state"].params))
    es = sw.eval_set
    return {"proxies": n, "items": int(np.asarray(es.items_per_field_F).sum()),
            "windows": int(np.prod(np.asarray(es.heldout_tokens_DxExL1).shape[:2])),
            "train_s_per_step": round(t_train, 4), "eval_s_per_step": round(t_eval, 4),
            "eval_share": round(t_eval / (t_train + t_eval), 3), "eval_ms_per_proxy": round(1e3 * t_eval / n, 2)}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], *sys.argv[2:])))

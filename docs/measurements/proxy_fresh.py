"""Fresh-seed proxy headroom: the two policies chosen on proxy seeds 0-3 (dma headroom --on proxy), run on
fresh proxy seeds, open loop, common random numbers within a seed (proxy_runs.run_seed)."""
import json, math, sys
import numpy as np
from dma_jax import proxy_runs, sweep
from dma_jax.config import load_config
from dma_jax.headroom import run_headroom

out = sys.argv[1]
cfg = load_config("configs/demo.yaml", [f"run.out_dir={out}", "headroom.proxy_seeds=[0, 1, 2, 3]"])
r = run_headroom(cfg, on=("proxy",), progress=False).sides["proxy"]
print(f"tuning proxy seeds 0-3: best_fixed {r.best_fixed}, best_alt {r.best_alt}, H {r.h:+.4f} ± {r.h_se:.4f} ({r.h_over_se:.2f} SE)", flush=True)
names = [r.best_fixed, r.best_alt]
space = sweep.sweep_space(cfg)
W = proxy_runs.trajectories(cfg, space, names)
base = proxy_runs.base_loader(cfg)
d = []
for s in range(int(sys.argv[2]), int(sys.argv[3]) + 1):
    doc = proxy_runs.run_seed(cfg, space, names, s, base, __import__("pathlib").Path(out) / "proxyfresh" / f"seed{s}",
                              weights_NxTxD=W, progress=False, desc="fresh proxy")
    d.append(doc["returns"][1] - doc["returns"][0])
    a = np.array(d)
    se = a.std(ddof=1) / math.sqrt(a.size) if a.size > 1 else float("nan")
    print(f"fresh proxy seeds {sys.argv[2]}-{s} (n={a.size}): H {a.mean():+.4f} ± {se:.4f} ({a.mean() / se:.2f} SE); positive {int((a > 0).sum())}/{a.size}", flush=True)
print("per-seed d", np.round(d, 4).tolist())

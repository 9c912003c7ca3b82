"""Part 5, proxy fidelity: do the proxies and the target rank the same mixtures alike?

The fidelity sub-run sweeps proxies along its own trajectories (`write_trajectories`: `n_static` constant
mixtures and `n_sampled` of main's sweep trajectories) and CPTs the target along the same ones (policy
`replay-K`); `section` compares the two sides' final scores in RESULTS.md.

    <fidelity run>/sweep/plan.json   {"labels", "kinds" (static | sampled), "sweep_index"} per trajectory
    <fidelity run>/fidelity.png      proxy vs target final balanced scores
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np

from dma_jax import offline_data
from dma_jax.config import Config
from dma_jax.errors import DmaError
from dma_jax.history import RunHistory
from dma_jax.io_utils import AnyPath, atomic_write_bytes, atomic_write_json, read_json_file
from dma_jax.policies import SpaceInfo
from dma_jax.runs import RunDir
from dma_jax.study.stats import spearman


def plan_path(run: RunDir) -> AnyPath:
    return run.sweep / "plan.json"


def scatter_path(run: RunDir) -> AnyPath:
    return run.root / "fidelity.png"


def trajectories_written(run: RunDir) -> bool:
    return run.trajectories.is_file() and plan_path(run).is_file()


def write_trajectories(cfg: Config, main: RunDir, n_static: int, n_sampled: int) -> str:
    """`n_static` constant mixtures + `n_sampled` of main's sweep trajectories (spread over its returns)."""
    from dma_jax.data.domains import DomainSpace

    run = RunDir(cfg)
    space = DomainSpace.for_sweep(cfg)
    info = SpaceInfo(tuple(space.names), tuple(space.fields_of_domain), cfg.sweep.target_field,
                     tuple(float(x) for x in space.train_tokens))
    T = cfg.sweep.num_stages
    shares = np.linspace(0.0, 1.0, n_static)
    static_KxTxD = np.stack([np.tile(info.target_share(p, cfg.cpt.spread), (T, 1)) for p in shares])
    ds = offline_data.load(main.offline)
    if ds.horizon != T or ds.meta["domain_names"] != space.names:
        raise DmaError(f"{main.sweep}: the main sweep has another horizon or domain space")
    order = np.argsort(ds.returns, kind="stable")
    picks = [int(order[i]) for i in np.round(np.linspace(0, ds.n - 1, n_sampled)).astype(int)]
    weights = np.concatenate([static_KxTxD, ds.actions[picks]]).astype(np.float32)
    labels = ([f"static, target share {p:.2f}" for p in shares]
              + [f"sampled: main sweep #{i} (return {ds.returns[i]:+.4f})" for i in picks])
    atomic_write_json(plan_path(run), {"labels": labels, "kinds": ["static"] * len(shares) + ["sampled"] * len(picks),
                                       "sweep_index": [None] * len(shares) + picks})
    buf = io.BytesIO()
    np.savez(buf, weights_NxTxD=weights, domain_names=np.array(space.names),
             domain_fields=np.array(space.fields_of_domain))
    atomic_write_bytes(run.trajectories, buf.getvalue())
    return f"fidelity: {len(shares)} static + {len(picks)} sampled trajectories in {run.trajectories}"


def section(run: RunDir, runs: Sequence[RunHistory], policies: Sequence[str], seeds: Sequence[int],
            rel: Callable[[AnyPath], str], plots: str) -> tuple[list[str], list[str]]:
    """(RESULTS.md lines, reading lines) from the fidelity sub-run's finished CPT runs `runs` (policies
    `replay-0` ... `replay-<K-1>`); `rel(path)` is a path as RESULTS.md links it, `plots` the line of links
    to the sub-run's report."""
    plan = read_json_file(plan_path(run), "missing")
    ds = offline_data.load(run.offline)
    fields, idx = ds.meta["fields"], ds.meta["field_score_index"]
    proxy = {"balanced": ds.returns + 1.0, **{f: ds.feedback[:, -1, i] for f, i in zip(fields, idx)}}
    K = len(policies)
    target = {"balanced": np.zeros(K), **{f: np.zeros(K) for f in fields}}
    for k in range(K):
        mine = [r for r in runs if r.policy == f"replay-{k}"]
        target["balanced"][k] = np.mean([r.balanced_T1[-1] for r in mine])
        for f in fields:
            target[f][k] = np.mean([r.field_scores_T1xF[-1][list(r.fields).index(f)] for r in mine])
    lines = [f"{K} mixtures: each trained {ds.horizon} re-weighting steps on a proxy (the sweep's setting) and on "
             f"the target (CPT, seeds {list(seeds)}); final scores (base = 1).", "",
             "| mixture | proxy balanced | target balanced | " + " | ".join(f"proxy {f} | target {f}" for f in fields)
             + " |", "|---|---:|---:|" + "---:|---:|" * len(fields)]
    for k, label in enumerate(plan["labels"]):
        lines.append(f"| {label} | {proxy['balanced'][k]:.4f} | {target['balanced'][k]:.4f} | "
                     + " | ".join(f"{proxy[f][k]:.4f} | {target[f][k]:.4f}" for f in fields) + " |")
    kinds = np.array(plan["kinds"])
    sets = (("all", np.ones(K, bool)), ("static", kinds == "static"), ("sampled", kinds == "sampled"))
    rho = {name: {key: spearman(proxy[key][sel], target[key][sel]) if sel.sum() >= 3 else float("nan")
                  for key in ("balanced", *fields)} for name, sel in sets}
    lines += ["", "Spearman rank correlation, proxy vs target:", "", "| set | n | balanced | " + " | ".join(fields)
              + " |", "|---|---:|---:|" + "---:|" * len(fields)]
    for name, sel in sets:
        lines.append(f"| {name} | {int(sel.sum())} | "
                     + " | ".join(f"{rho[name][key]:+.3f}" for key in ("balanced", *fields)) + " |")
    _scatter(proxy["balanced"], target["balanced"], kinds, scatter_path(run))
    lines += ["", f"![proxy vs target]({rel(scatter_path(run))}) " + plots, ""]
    return lines, [f"- Proxy fidelity: Spearman ρ = {rho['all']['balanced']:+.3f} between proxy and target final "
                   f"balanced scores over {K} mixtures ({rho['static']['balanced']:+.3f} over the static ones)."]


def _scatter(x_K, y_K, kinds_K, path: AnyPath) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for kind, marker in (("static", "o"), ("sampled", "^")):
        sel = kinds_K == kind
        ax.scatter(x_K[sel], y_K[sel], marker=marker, label=kind)
    ax.set(xlabel="proxy: final balanced score", ylabel="target: final balanced score", title="Proxy fidelity")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())

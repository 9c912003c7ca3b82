"""`dma headroom`: how much room the environment leaves a mixing policy over the best fixed mixture.

Every policy of `policy_names` (fixed target shares spread by size, the same shares on the scored domains
only, two linear ramps and their scored versions, source-only, target-only) is run on every seed, and its
return (final balanced score - base, `evaluation.balanced_score`) is measured on two sides:
- target: `cpt.run_cpt` per (policy, seed of `headroom.seeds`). These are `dma cpt`'s own runs
  (`cpt/<policy>/seed<k>/`), so a finished one is read and not run again;
- proxy: the policies as trajectories [N, T, D] on the sweep's proxies, one vmapped, resumable run for each seed
  of `headroom.proxy_seeds` in `headroom/proxy/seed<k>/` (`proxy_runs.run_seed`: the sweep's environment and
  evaluation, common random numbers across the policies of a seed).
H = the mean over seeds of (best_alt - best_fixed), paired per seed. best_fixed is the `fixed-P` with the
highest mean return; best_alt is the best scored or ramp policy. Choosing both on the seeds that measure H
biases H upward. Outputs: headroom.json, headroom.md and response.png under `headroom/` (`runs.RunDir`).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from dma_jax import cpt, proxy_runs
from dma_jax import sharding as shd
from dma_jax.config import Config
from dma_jax.config.headroom import HeadroomConfig
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_bytes, atomic_write_json, atomic_write_text
from dma_jax.numerics import se_of_mean
from dma_jax.runs import RunDir
from dma_jax.data.domains import DomainSpace

FORMAT = "dma-headroom-v1"
SIDES = ("target", "proxy")
SELECTION_NOTE = ("best_fixed and best_alt are chosen on the same seeds that measure H, so H is inflated "
                  "(selection bias); the study chooses on tuning seeds and tests on fresh ones.")


def policy_names(hc: HeadroomConfig) -> list[str]:
    """fixed-P, fixed-P-scored (P in shares), ramp-hi-lo, ramp-lo-hi, their -scored versions, source-/target-only."""
    fixed = [f"fixed-{p:g}" for p in hc.shares]
    ramps = [f"ramp-{a:g}-{b:g}" for a, b in (hc.high_low, hc.low_high)]
    scored = [f"{n}-scored" for n in fixed + ramps]
    return list(dict.fromkeys(fixed + scored[:len(fixed)] + ramps + scored[len(fixed):]
                              + ["source-only", "target-only"]))


def is_fixed(name: str) -> bool:
    """A size-spread fixed target share (the baseline family)."""
    return name.startswith("fixed-") and not name.endswith("-scored")


def is_alt(name: str) -> bool:
    """A "clean" (scored domains only) or scheduled policy."""
    return name.endswith("-scored") or name.startswith("ramp-")


@dataclasses.dataclass(frozen=True)
class SideResult:
    """One side's returns [policy, seed] and the statistics of the headroom H (NaN where undefined)."""

    side: str
    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    returns_PxK: np.ndarray
    eval_se_PxK: np.ndarray  # each run's SE of its final balanced score (NaN where unknown)
    mean_P: np.ndarray
    se_P: np.ndarray  # sd over seeds / sqrt(n); NaN with one seed
    best_fixed: str
    best_alt: str
    diff_K: np.ndarray  # best_alt - best_fixed per seed
    h: float
    h_se: float

    @property
    def h_over_se(self) -> float:
        return self.h / self.h_se if self.h_se > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class HeadroomResult:
    sides: dict[str, SideResult]
    json_path: AnyPath
    table_path: AnyPath
    plot_path: AnyPath


def side_stats(side: str, policies, seeds, returns_PxK, eval_se_PxK=None) -> SideResult:
    """Mean and SE per policy over seeds, the best fixed and best alternative policy, and H paired per seed."""
    policies, seeds = tuple(policies), tuple(seeds)
    R = np.asarray(returns_PxK, np.float64)
    if R.shape != (len(policies), len(seeds)) or not seeds:
        raise DmaError(f"headroom {side}: returns of shape {list(R.shape)} for {len(policies)} policies x "
                       f"{len(seeds)} seeds")
    K = len(seeds)
    mean_P = R.mean(axis=1)
    se_P = R.std(axis=1, ddof=1) / math.sqrt(K) if K > 1 else np.full(len(policies), math.nan)
    best = {}
    for family, keep in (("fixed-P", is_fixed), ("scored or ramp", is_alt)):
        idx = [i for i, n in enumerate(policies) if keep(n)]
        if not idx:
            raise DmaError(f"headroom {side}: no {family} policy among {list(policies)}")
        best[family] = idx[int(np.argmax(mean_P[idx]))]  # the first on a tie
    bf, ba = best["fixed-P"], best["scored or ramp"]
    diff_K = R[ba] - R[bf]
    h_se = se_of_mean(diff_K)
    E = np.full(R.shape, math.nan) if eval_se_PxK is None else np.asarray(eval_se_PxK, np.float64)
    return SideResult(side, policies, seeds, R, E, mean_P, se_P, policies[bf], policies[ba], diff_K,
                      float(diff_K.mean()), h_se)


# ------------------------------------------------------------------------------------------------ target


def target_returns(cfg: Config, policies, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(returns, final balanced SEs) [policy, seed] of the target CPT runs (`dma cpt`'s, skipped when finished)."""
    seeds = cfg.headroom.seeds
    R, E = np.zeros((len(policies), len(seeds))), np.full((len(policies), len(seeds)), math.nan)
    with tqdm(total=R.size, desc="headroom target", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for i, name in enumerate(policies):
            for k, seed in enumerate(seeds):
                bar.set_postfix(policy=name, seed=seed)
                h = cpt.run_cpt(cfg, name, seed, progress=False)
                R[i, k] = h.balanced_T1[-1] - h.balanced_T1[0]
                if h.balanced_se_T1 is not None:
                    E[i, k] = h.balanced_se_T1[-1]
                bar.update()
    return R, E


# ------------------------------------------------------------------------------------------------ proxy


def proxy_returns(cfg: Config, policies, progress: bool = True, devices=None) -> tuple[np.ndarray, np.ndarray]:
    """(returns, final balanced SEs) [policy, seed] of the proxies, one resumable run per proxy seed
    (`proxy_runs.run_seed`, open loop, in `headroom/proxy/seed<k>/`)."""
    space = DomainSpace.for_sweep(cfg)
    weights_NxTxD = proxy_runs.trajectories(cfg, space, policies)
    base = proxy_runs.base_loader(cfg)
    docs = [proxy_runs.run_seed(cfg, space, policies, s, base, RunDir(cfg).headroom_proxy(s),
                                weights_NxTxD=weights_NxTxD, progress=progress, devices=devices,
                                desc="headroom proxy") for s in cfg.headroom.proxy_seeds]
    return (np.array([d["returns"] for d in docs], np.float64).T, np.array([d["eval_se"] for d in docs]).T)


# ------------------------------------------------------------------------------------------------ outputs


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _pm(mean: float, se: float) -> str:
    return f"{mean:+.4f} ± {se:.4f}" if math.isfinite(se) else f"{mean:+.4f} ± n/a"


def to_json(sides: dict[str, SideResult]) -> dict:
    out = {}
    for name, s in sides.items():
        out[name] = {"policies": list(s.policies), "seeds": list(s.seeds),
                     "returns": {p: s.returns_PxK[i].tolist() for i, p in enumerate(s.policies)},
                     "eval_se": {p: [_num(x) for x in s.eval_se_PxK[i]] for i, p in enumerate(s.policies)},
                     "mean": {p: float(s.mean_P[i]) for i, p in enumerate(s.policies)},
                     "se": {p: _num(s.se_P[i]) for i, p in enumerate(s.policies)},
                     "best_fixed": s.best_fixed, "best_alt": s.best_alt, "diff_per_seed": s.diff_K.tolist(),
                     "H": s.h, "H_se": _num(s.h_se), "H_over_se": _num(s.h_over_se)}
    return {"format": FORMAT, "note": SELECTION_NOTE, "sides": out}


def to_markdown(sides: dict[str, SideResult]) -> str:
    what = {"target": "target CPT (`cpt.*`)", "proxy": "proxies (the sweep's environment)"}
    lines = ["# Headroom of the mixing decision", "",
             "Return = final balanced score - base (higher is better); mean ± SE over seeds (SE = sd / sqrt(n)). "
             "H = mean over seeds of (best_alt - best_fixed), paired per seed; best_fixed: the best size-spread "
             "`fixed-P`, best_alt: the best scored (`-scored`: `eval.unscored_domains` left out) or ramp policy.",
             "", f"Note: {SELECTION_NOTE}"]
    for name, s in sides.items():
        lines += ["", f"## {name}: {what[name]}, seeds {', '.join(map(str, s.seeds))}", "",
                  "| policy | mean return ± SE | role |", "|---|---|---|"]
        for i in np.argsort(-s.mean_P, kind="stable"):
            p = s.policies[i]
            role = "best_fixed" if p == s.best_fixed else "best_alt" if p == s.best_alt else ""
            lines.append(f"| {p} | {_pm(s.mean_P[i], s.se_P[i])} | {role} |")
        ratio = f"{s.h_over_se:.2f}" if math.isfinite(s.h_over_se) else "n/a"
        lines += ["", f"best_fixed: {s.best_fixed}; best_alt: {s.best_alt}; "
                      f"**H = {_pm(s.h, s.h_se)}**, H/SE = {ratio} ({len(s.seeds)} seeds)"]
    return "\n".join(lines) + "\n"


def plot_response(sides: dict[str, SideResult], path: AnyPath) -> None:
    """Mean return vs target share: the fixed-P and fixed-P-scored families with SE bars, the other policies
    as markers (a ramp at its mean share); `-scored` points are nudged right so that they stay visible."""
    fig = Figure(figsize=(5.0 * len(sides), 3.6), layout="constrained")
    for ax, s in zip(fig.subplots(1, len(sides), squeeze=False)[0], sides.values()):
        se = np.nan_to_num(s.se_P)
        for family, keep in (("fixed-P", is_fixed), ("fixed-P-scored", lambda n: n.startswith("fixed-")
                                                    and n.endswith("-scored"))):
            idx = sorted((i for i, n in enumerate(s.policies) if keep(n)), key=lambda i: _x(s.policies[i]))
            ax.errorbar([_x(s.policies[i]) for i in idx], s.mean_P[idx], yerr=se[idx], marker="o",
                        capsize=3, label=family)
        for i, p in enumerate(s.policies):
            if not p.startswith("fixed-"):
                ax.errorbar([_x(p)], [s.mean_P[i]], yerr=[se[i]], marker="s" if "ramp" in p else "D",
                            linestyle="none", capsize=3, label=p)
        ax.set(title=f"{s.side}: H = {_pm(s.h, s.h_se)}", xlabel="target share (ramps: mean share)",
               ylabel="return (balanced - base)")
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _x(name: str) -> float:
    """The (mean) target share of a headroom policy, +0.01 for a `-scored` one: the plot's x axis."""
    stem = name.removesuffix("-scored")
    nudge = 0.01 if stem != name else 0.0
    if stem.startswith("ramp-"):
        return float(np.mean([float(x) for x in stem.removeprefix("ramp-").split("-")])) + nudge
    ends = {"source-only": 0.0, "target-only": 1.0}
    return (ends[stem] if stem in ends else float(stem.removeprefix("fixed-"))) + nudge


def run_headroom(cfg: Config, on=None, progress: bool = True, devices=None) -> HeadroomResult:
    """Both sides (or those in `on`, default `headroom.on`) -> headroom.json, headroom.md, response.png."""
    on = tuple(dict.fromkeys(on or cfg.headroom.on))
    if not on or set(on) - set(SIDES):
        raise DmaError(f"headroom: on={list(on)} must name target and/or proxy")
    policies = policy_names(cfg.headroom)
    sides = {}
    if "target" in on:
        sides["target"] = side_stats("target", policies, cfg.headroom.seeds, *target_returns(cfg, policies, progress))
    if "proxy" in on:
        sides["proxy"] = side_stats("proxy", policies, cfg.headroom.proxy_seeds,
                                    *proxy_returns(cfg, policies, progress, devices))
    run = RunDir(cfg)
    result = HeadroomResult(sides, run.headroom_json, run.headroom_table, run.headroom_plot)
    if shd.is_primary():
        atomic_write_json(result.json_path, to_json(sides))
        atomic_write_text(result.table_path, to_markdown(sides))
        plot_response(sides, result.plot_path)
    return result

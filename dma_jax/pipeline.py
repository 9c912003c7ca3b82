"""The pipeline's stages in the order data flows, each run through one function that returns the line `dma`
prints, and `run_demo`: every stage of a config, skipping what `runs.RunDir` says is done (so a second
`make demo` rewrites nothing). `dma <stage>` and the study call these functions too.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dma_jax.config import Config
from dma_jax.io_utils import upath
from dma_jax.runs import AGENT_STAGES, RunDir


def prepare(cfg: Config, progress: bool = True) -> str:
    from dma_jax.prepare import run_prepare

    t0 = time.perf_counter()
    space = run_prepare(cfg, progress=progress)
    lines = [f"prepare: {space.num_domains} domains in {space.dir} ({time.perf_counter() - t0:.1f} s)"]
    for field in space.fields:
        idx = space.domain_indices(field)
        toks = int(space.train_tokens[idx].sum())
        lines.append(f"  {field:<8} {len(idx):>2} domains  {toks:>12,} train tokens  "
                     f"{len(space.benchmarks(field)):>4} benchmark items")
    return "\n".join(lines)


def pretrain(cfg: Config, which: str, progress: bool = True) -> str:
    from dma_jax.pretrain import run_pretrain

    r = run_pretrain(cfg, which, progress=progress)
    loss = "n/a (written by process 0)" if r.final_eval_loss is None else f"{r.final_eval_loss:.4f}"
    return (f"pretrain {which}: {r.steps} steps, {r.n_params / 1e6:.2f}M parameters, held-out loss {loss}, "
            f"checkpoints in {r.out_dir}/checkpoints")


def sample(cfg: Config) -> str:
    from dma_jax.sample import run_sample

    path = run_sample(cfg)
    return (f"sample: {cfg.sweep.num_trajectories} trajectories x {cfg.sweep.num_stages} re-weighting steps "
            f"in {path}; picture: {path.with_suffix('.png')}")


def sweep(cfg: Config, progress: bool = True) -> str:
    from dma_jax.sweep import run_sweep

    s = run_sweep(cfg, progress=progress)
    r = s.returns
    return (f"sweep: N={s.N} T={s.T} S={s.S} in {s.seconds:.0f} s ({s.tokens_per_s:,.0f} tokens/s over all "
            f"proxies); returns min {r.min():+.4f} median {np.median(r):+.4f} max {r.max():+.4f}; "
            f"offline dataset in {s.out_dir}")


def train_agent(cfg: Config, stage: str, progress: bool = True, agent_seed: int = 0) -> str:
    """Train (or resume) one agent stage of agent seed K on the run's offline dataset, then export it for CPT (policy
    `runs.agent_policy_name(stage, K)`). Training seed `run.seed + K`: agent seed 0 is the agent as it was before seeds."""
    from dma_jax.agent.runner import export_agent, run_train_agent

    run = RunDir(cfg)
    s = run_train_agent(cfg.agent, run.offline, run.agent_dir(agent_seed), stage, cfg.run.seed + agent_seed,
                        progress=progress)
    export_agent(run.agent_stage(stage, agent_seed), run.agent_export(stage, agent_seed))
    shown = ", ".join(f"{k} {v:.4g}" for k, v in s.final_metrics.items() if isinstance(v, float) and k != "updates_per_s")
    which = f" (agent seed {agent_seed})" if agent_seed else ""
    return (f"train-agent {stage}{which}: {s.steps} updates in {s.seconds:.0f} s ({shown}); "
            f"exported to {run.agent_export(stage, agent_seed)}")


def cpt(cfg: Config, policy: str, seed: int, progress: bool = True, space=None) -> str:
    from dma_jax.cpt import run_cpt

    h = run_cpt(cfg, policy, seed, progress=progress, space=space)
    fields = ", ".join(f"{f} {v:.4f}" for f, v in zip(h.fields, h.field_scores_T1xF[-1]))
    return f"cpt {policy} seed {seed}: {fields}; balanced {h.balanced_T1[-1]:.4f}"


def report(cfg: Config, out: str | None = None, title: str | None = None) -> str:
    from dma_jax.report import write_report

    run = RunDir(cfg)
    out_dir = upath(out) if out else run.report
    path = write_report(run.cpt, out_dir, title=title or f"{cfg.run.name}: continual pre-training report",
                        trajectories_path=run.trajectories, offline_dir=run.offline)
    plots = ["mixtures.png", "scores.png"] + (["response_surface.png"] if (out_dir / "response_surface.png").is_file()
                                              else [])
    return f"report: {path} (plots: {', '.join(str(out_dir / p) for p in plots)})"


def headroom(cfg: Config, on=None, progress: bool = True) -> str:
    """`dma headroom`: one line per side (best fixed share, best clean or scheduled policy, H), then the files."""
    from dma_jax.headroom import run_headroom

    r = run_headroom(cfg, on=on, progress=progress)
    lines = []
    for side, s in r.sides.items():
        i_f, i_a = s.policies.index(s.best_fixed), s.policies.index(s.best_alt)
        se = f"{s.h_se:.4f}" if np.isfinite(s.h_se) else "n/a"
        ratio = f"{s.h_over_se:.2f}" if np.isfinite(s.h_over_se) else "n/a"
        lines.append(f"headroom {side}: best fixed {s.best_fixed} {s.mean_P[i_f]:+.4f}, best clean/scheduled "
                     f"{s.best_alt} {s.mean_P[i_a]:+.4f}; H = {s.h:+.4f} ± {se} (H/SE {ratio}) over "
                     f"{len(s.seeds)} seeds")
    lines.append(f"headroom: table in {r.table_path}, numbers in {r.json_path}, plot {r.plot_path}")
    return "\n".join(lines)


def demo_steps(cfg: Config, progress: bool = True) -> list[tuple[str, Callable[[], bool], Callable[[], str]]]:
    """(title, is done?, run) for every stage of `dma demo`, in order."""
    run = RunDir(cfg)
    steps = [("prepare the demo domain space", run.prepared, lambda: prepare(cfg, progress))]
    steps += [(f"pre-train the base {w}", lambda w=w: run.pretrained(w), lambda w=w: pretrain(cfg, w, progress))
              for w in ("proxy", "target")]
    steps += [("sample trajectories", run.sampled, lambda: sample(cfg)),
              ("sweep: train the proxies", run.swept, lambda: sweep(cfg, progress))]
    steps += [(f"train the agent ({stage.upper()}{f', agent seed {k}' if k else ''})",
               lambda s=stage, k=k: run.agent_exported(s, k), lambda s=stage, k=k: train_agent(cfg, s, progress, k))
              for k in cfg.agent.seeds for stage in AGENT_STAGES]
    steps += [(f"CPT of the target: {p}, seed {k}", lambda p=p, k=k: run.cpt_done(p, k),
               lambda p=p, k=k: cpt(cfg, p, k, progress)) for p in cfg.cpt.policies for k in cfg.cpt.seeds]
    steps += [("report", run.report_fresh, lambda: report(cfg))]
    return steps


def run_demo(cfg: Config, progress: bool = True, echo: Callable[[str], None] = print) -> list[tuple[str, float]]:
    """Every stage of `cfg`, skipping finished ones; returns (title, seconds) per stage."""
    timings = []
    steps = demo_steps(cfg, progress)
    for i, (title, done, fn) in enumerate(steps, 1):
        echo(f"demo: [{i}/{len(steps)}] {title}")
        t0 = time.perf_counter()
        echo("  done already: skipped" if done() else fn())
        timings.append((title, time.perf_counter() - t0))
    return timings

"""The `dma` subcommands around the pipeline: export, import, eval (lm-evaluation-harness), bench, plan.

`dma_jax.cli` builds their parsers and dispatches to them; each loads the config and calls one function.
"""

from __future__ import annotations

import argparse

from dma_jax.errors import DmaError
from dma_jax.io_utils import upath


def _load(args: argparse.Namespace):
    """The config a subcommand's `--config`, `--variant` and overrides name."""
    from dma_jax.config import load_config

    return load_config(args.config, args.overrides, args.variant)


def cmd_export(args: argparse.Namespace) -> int:
    from dma_jax import export

    cfg = _load(args)
    if args.what == "target":
        out = export.export_target(cfg, args.policy, args.seed, args.out)
        print(f"export: target model ({args.policy}, seed {args.seed}) in {out}/orbax and {out}/hf")
    elif args.what == "schedule":
        files = (export.export_rollout(cfg, args.stage, args.feedback, args.out) if args.feedback else
                 export.export_schedule(cfg, args.policy, args.seed, args.out))
        print(f"export: mixture schedule in {files[0]} and {files[1]}; `dma cpt --policy schedule:FILE` replays it")
    else:
        out = export.export_agent_stage(cfg, args.stage, args.out)
        print(f"export: {args.stage} agent in {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from dma_jax import export

    cfg = _load(args)
    path = export.import_target(cfg, args.hf_dir)
    print(f"import: {args.hf_dir} is now the base target model ({path}); `dma cpt` continues from it")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model with lm-evaluation-harness (the `eval` extra) -> <run.out_dir>/eval/<what>.json."""
    from dma_jax import eval_harness

    eval_harness.import_lm_eval()  # without the extra: one line saying how to install it
    cfg = _load(args)
    path, res = eval_harness.run_eval(cfg, model=args.model, policy=args.policy, seed=args.seed, hf_dir=args.hf_dir,
                                      tasks=args.tasks, include_path=args.include_path or (), limit=args.limit,
                                      batch_size=args.batch_size, out=args.out, progress=not args.no_progress)
    for line in eval_harness.format_results(res):
        print(f"eval: {line}")
    print(f"eval: results in {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dma_jax.perf.bench import format_table, run_bench

    cfg = _load(args)
    from dma_jax.runs import RunDir

    out = upath(args.out) if args.out else RunDir(cfg).bench_json(args.quick)
    results = run_bench(args.quick, args.memory_budget_gb, out, cfg, ns=args.n, progress=not args.no_progress)
    print(format_table(results))
    print(f"bench: results in {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dma_jax.perf.memory import SLICES, format_memory_plan as format_plan, memory_plan as plan

    cfg = _load(args)
    unknown = sorted(set(args.slice or ()) - set(SLICES))
    if unknown:
        raise DmaError(f"plan: unknown slice(s) {', '.join(unknown)} (known: {', '.join(SLICES)})")
    slices = {k: SLICES[k] for k in (args.slice or SLICES)}
    print(f"plan: {args.config} on {', '.join(slices)} (from abstract shapes; nothing is allocated)")
    print(format_plan(cfg, plan(cfg, slices)))
    return 0

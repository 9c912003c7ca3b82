"""`dma`: the command line. Each subcommand parses a config and calls one function (`pipeline`, `perf`,
`study`, `eval_harness`) and prints its line. (One parser per subcommand, with its help text; the commands
that export, import, evaluate, benchmark and plan are in `cli_tools`.)

Errors the user can fix print one line (`dma: error: ...`) and exit 2; any other
failure prints one line too unless `--debug` is given, which shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from dma_jax.cli_tools import _load, cmd_bench, cmd_eval, cmd_export, cmd_import, cmd_plan  # noqa: F401
from dma_jax.errors import DmaError
from dma_jax.faults import PREEMPTED_EXIT_CODE, Preempted

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STUDY_CONFIG = DEMO_CONFIG.with_name("study.yaml")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`dma: error: ...`), like every other error of `dma`."""

    def error(self, message: str):
        self.exit(2, f"dma: error: {message} (see `{self.prog} --help`)\n")


def _add_config_args(p: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    p.add_argument(
        "--config", type=Path, default=default_config,
        help="YAML experiment config" + (f" (default: {default_config.name})" if default_config else ""),
    )
    p.add_argument("--variant", default=None, help="named variant inside the config, e.g. 'tiny' (tests and CI)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. pretrain.steps=50")


def pipeline():
    import dma_jax.pipeline

    return dma_jax.pipeline


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0")
    return value


_non_negative_int.__name__ = "non-negative integer"  # argparse names the type in its error: "invalid ... value"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


_positive_int.__name__ = "positive integer"


def cmd_prepare(args: argparse.Namespace) -> int:
    print(pipeline().prepare(_load(args), progress=not args.no_progress))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.config is None:
        raise DmaError("pretrain: --config is required (e.g. --config configs/demo.yaml)")
    print(pipeline().pretrain(_load(args), args.model, progress=not args.no_progress))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    print(pipeline().sample(_load(args)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    print(pipeline().sweep(_load(args), progress=not args.no_progress))
    return 0


def cmd_train_agent(args: argparse.Namespace) -> int:
    cfg = _load(args)
    for seed in args.agent_seed if args.agent_seed is not None else list(cfg.agent.seeds):
        for stage in (["sft", "cql"] if args.stage == "all" else [args.stage]):
            print(pipeline().train_agent(cfg, stage, progress=not args.no_progress, agent_seed=seed))
    return 0


def cmd_cpt(args: argparse.Namespace) -> int:
    cfg = _load(args)
    for name in args.policy or list(cfg.cpt.policies):  # neither list is empty (CptConfig)
        for seed in args.seed if args.seed is not None else list(cfg.cpt.seeds):
            print(pipeline().cpt(cfg, name, seed, progress=not args.no_progress))
    return 0


def cmd_headroom(args: argparse.Namespace) -> int:
    print(pipeline().headroom(_load(args), on=args.on, progress=not args.no_progress))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(pipeline().report(_load(args), out=args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Every stage on the demo config; finished stages are skipped (`runs.RunDir` says which)."""
    cfg = _load(args)
    timings = pipeline().run_demo(cfg, progress=not args.no_progress, echo=lambda line: print(line, flush=True))
    print("demo: wall time per stage: " + "; ".join(f"{n} {t:.0f} s" for n, t in timings)
          + f"; total {sum(t for _, t in timings):.0f} s")
    from dma_jax.runs import RunDir

    print(f"demo: report in {RunDir(cfg).report / 'report.md'}, plots in {RunDir(cfg).report}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """The study of issue 10 (sub-runs under <run.out_dir>, resumable) -> RESULTS.md."""
    from dma_jax.study import run_study

    path = run_study(args.config, args.overrides, args.variant, quick=args.quick, results=args.results,
                     progress=not args.no_progress, only=args.only, report_only=args.report_only)
    print(f"study: results in {path}")
    return 0


def _enable_compilation_cache() -> None:
    """Persist compiled XLA programs so repeated runs skip compilation (DMA_JAX_CACHE=off disables)."""
    import os

    import jax

    where = os.environ.get("DMA_JAX_CACHE", str(Path.home() / ".cache" / "dma_jax" / "xla"))
    if where.lower() != "off":
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dma",
        description="Data Mixing Agent in JAX: learn to re-weight data domains during continual pre-training.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize and pack each domain into ArrayRecord shards + a manifest")
    _add_config_args(p, DEMO_CONFIG)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train the base proxy or target LM on the source field (resumable)")
    _add_config_args(p)
    p.add_argument("--model", choices=("proxy", "target"), default="proxy", help="which base model (default: proxy)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="sample mixture trajectories [N, T, D] with the sweep's inductive biases")
    _add_config_args(p, DEMO_CONFIG)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("sweep", help="train N proxies at once (vmapped, sharded) along the trajectories -> offline data")
    _add_config_args(p, DEMO_CONFIG)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train-agent", help="train the mixing agent on the sweep's offline data: SFT, then CQL")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--stage", choices=("sft", "cql", "all"), default="all", help="default: all (sft then cql)")
    p.add_argument("--agent-seed", action="append", type=_non_negative_int, help="agent seed K (repeatable; default: "
                   "agent.seeds): K > 0 trains in agent/seed<K>/, CPT loads it as policy agent-<stage>@K")
    p.set_defaults(func=cmd_train_agent)

    p = sub.add_parser("cpt", help="continually pre-train the target model under mixing policies (resumable)")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--policy", action="append", help="policy name (repeatable; default: cpt.policies); "
                   "schedule:FILE replays a schedule file (`dma export schedule`, JSON or CSV: one mixture per "
                   "re-weighting step), run in cpt/schedule-<file stem>-<first 8 hex digits of its SHA-256>/")
    p.add_argument("--seed", action="append", type=_non_negative_int, help="seed (repeatable; default: cpt.seeds)")
    p.set_defaults(func=cmd_cpt)

    p = sub.add_parser("headroom", help="how much a domain choice or schedule beats the best fixed target share, "
                                        "on the target and on proxies (resumable; headroom.* settings)")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--on", action="append", choices=("target", "proxy"),
                   help="only this side (repeatable; default: headroom.on)")
    p.set_defaults(func=cmd_headroom)

    p = sub.add_parser("report", help="markdown table of every CPT run + plots of mixtures and scores")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--out", help="output folder (default: <run.out_dir>/report)")
    p.set_defaults(func=cmd_report)

    _add_export_parser(sub)

    p = sub.add_parser("import", help="use a Hugging Face LLaMA checkpoint (config.json + safetensors) as the "
                                      "base target model")
    p.add_argument("what", choices=("target",))
    p.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
    _add_config_args(p, DEMO_CONFIG)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("eval", help="score a model (base, CPT'd or Hugging Face) with lm-evaluation-harness on our "
                                    "fields' benchmarks or local tasks (needs the `eval` extra)")
    _add_config_args(p, DEMO_CONFIG)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", choices=("proxy", "target"), help="a base model (default: target)")
    who.add_argument("--policy", help="the final model of `dma cpt --policy P --seed K`")
    who.add_argument("--hf-dir", help="a Hugging Face LLaMA checkpoint folder (scored with the config's tokenizer)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="with --policy: which seed (default: 0)")
    p.add_argument("--tasks", action="append", metavar="TASK",
                   help="lm-eval task name (repeatable; default: dma_<field> for every field with benchmarks)")
    p.add_argument("--include-path", action="append", metavar="DIR", help="folder of local lm-eval task YAMLs "
                   "(repeatable; the prepared data's dma_<field> tasks are always included)")
    p.add_argument("--limit", type=_positive_int, help="score at most this many items per task")
    p.add_argument("--batch-size", type=_positive_int, help="rows per forward pass (default: eval.batch_size)")
    p.add_argument("--out", help="results JSON (default: <run.out_dir>/eval/<what>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure the sweep, loader, agent and training throughput on this machine "
                                     "(table + JSON)")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--quick", action="store_true", help="demo sizes only, N in {1, 4}: about a minute")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="memory per device for the largest-N estimate and sweep chunking "
                        "(default: the device's limit, else 80%% of available host RAM)")
    p.add_argument("--n", type=_positive_int, action="append", metavar="N",
                   help="number of proxies (repeatable; default 1 4 16 64, --quick: 1 4)")
    p.add_argument("--out", help="JSON file (default: <run.out_dir>/bench.json, bench-quick.json with --quick)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="memory per device of the target's train step and the sweep on a TPU slice "
                                    "(v5e-8, v4-8), and whether it fits")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--slice", action="append", help="slice (repeatable; default: all known)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded offline demo, ending with a report")
    _add_config_args(p, DEMO_CONFIG)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("study", help="the study (issues 10, 18): agent vs baselines, generalisation, ablations, proxy "
                                     "fidelity -> RESULTS.md (resumable; on 2 CPU cores the main protocol took "
                                     "98.7 min, all sub-runs together ~7 h: RESULTS.md)")
    _add_config_args(p, STUDY_CONFIG)
    p.add_argument("--quick", action="store_true", help="every part on the tiny variant, few steps (a pulse test)")
    p.add_argument("--results", type=Path, default=None, help="where to write RESULTS.md "
                   "(default: <run.out_dir>/RESULTS.md)")
    p.add_argument("--only", action="append", metavar="SUBRUN", help="run only this sub-run (repeatable: main, "
                   "wide-sweep, gen-code, gen-domains, gen-more-domains, gen-large, cql-alpha-<a>, no-feedback, "
                   "fidelity, cql-chosen, cql-chosen-gen-<gen run>)")
    p.add_argument("--report-only", action="store_true", help="run nothing: write RESULTS.md again from the "
                   "sub-runs that have run (after a change to the report's code; the pre-registration is still checked)")
    p.set_defaults(func=cmd_study)
    return parser


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export the CPT'd target model (Orbax + Hugging Face layout), an agent, or "
                                      "the mixture schedule of a CPT run",
                       epilog="schedule: writes <policy>-seed<k>.json (--feedback: agent-<stage>-<file stem>.json), "
                       "whose train_weights ([[start step, {domain: weight}], ...], the start an optimizer step "
                       "from 0) is levanter's staged LMMixtureDatasetConfig.train_weights, and a .csv "
                       "(stage,start_step,<domain>,...) beside it; `dma cpt --policy schedule:FILE` replays either.")
    p.add_argument("what", choices=("target", "agent", "schedule"))
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--policy", default="agent-cql", help="target, schedule: which CPT run (default: agent-cql)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="target, schedule: which seed (default: 0)")
    p.add_argument("--stage", choices=("sft", "cql"), default="cql", help="agent, schedule --feedback: which "
                   "stage (default: cql)")
    p.add_argument("--feedback", metavar="FILE", help="schedule: instead of a CPT run's, the mixtures the exported "
                   "--stage agent chooses given this JSON of per-step feedback ({\"feedback\": [{name: value}, ...]}, "
                   "row 0 the base model's; names as the CPT's eval/ TensorBoard tags)")
    p.add_argument("--out", help="output folder (default: under <run.out_dir>; schedule: export/schedules)")
    p.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    from dma_jax.xla_cpu import apply_defaults

    apply_defaults()  # before anything starts a backend (`dma_jax.xla_cpu`)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills `overrides` at the first positional (`dma import target ...`), so key=value
    # arguments after later options arrive here; they are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    _enable_compilation_cache()
    try:
        from dma_jax.sharding import maybe_initialize_distributed

        maybe_initialize_distributed()  # multi-host: before anything touches a device
        return args.func(args)
    except DmaError as e:
        print(f"dma: error: {e}", file=sys.stderr)
        if args.debug:
            raise
        return 2
    except Preempted as e:  # SIGTERM: a checkpoint was saved; the same command resumes
        print(f"dma: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("dma: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # finished work is kept: re-running resumes
            print(f"dma: error: no space left on device writing {e.filename}; free space and re-run the same "
                  "command", file=sys.stderr)
            return 2
        if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                          FileNotFoundError)) and e.filename:  # a path the user gave that cannot be written/read
            print(f"dma: error: {e.filename}: {e.strerror}", file=sys.stderr)
            return 2
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"dma: internal error: {type(e).__name__}: {first[:300]} (re-run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

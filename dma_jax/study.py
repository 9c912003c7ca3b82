"""`dma study` (`make study`): a CPU-scale check of the paper's claims (issue 10), written up in RESULTS.md.

Every sub-run is ordinary pipeline stages (`run_prepare`, `run_pretrain`, `run_sweep`,
`run_train_agent`, `run_cpt`, `write_report`) with its own `run.out_dir` under the
study's root (`run.out_dir` of configs/study.yaml), so re-running resumes: finished
stages are skipped, unfinished ones continue from their checkpoints. What sub-runs
share (prepared data, base models, sweep, trained agent) is a relative symlink into
`main/`, never a copy; the data lives in `<root>/data` (`data.dir` of every sub-run).

  main/           (1, 2) pretrain proxy + target, sample + sweep (math), agent SFT then CQL,
                  CPT under every policy of `cpt.policies` x `cpt.seeds`, report
  gen-code/       (3a) the math-trained agent, unchanged, on the code field (source + code domains)
  gen-domains/    (3b) ... on a space without every second source domain (another D)
  gen-large/      (3c) ... on a larger target model (pre-trained there)
  (2c)            main's and wide-sweep's final models re-scored on every benchmark item
                  (rescore-<items>x<windows>.json next to each CPT history)
  wide-sweep/     (2b) a second sweep whose trajectories drift faster toward the target field
                  (`sweep.sampler.drift_rate_range` of the plan), agents trained on it, and the
                  policies that read a sweep, compared with main's other baselines (the same runs)
  cql-alpha-<a>/  (4) CQL retrained from main's SFT actor with penalty weight a
  no-feedback/    (4) SFT + CQL with the feedback features masked (mixture history only)
  fidelity/       (5) proxies trained along static mixtures and sampled trajectories, and the target
                  CPT'd along the same ones (policy `replay-K`): do their rankings agree?
  RESULTS.md, study.json (wall time per part, summed over invocations)

The study's own knobs (which policies the side runs use, the larger target, the alphas,
the fidelity set) are a `Plan`; `--quick` uses `QUICK` on the `tiny` variant.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

import numpy as np

from dma_jax.config import Config, load_config
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_json, read_json_file

STUDY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "study.yaml"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The study beyond the config. `overrides` apply to every sub-run (after the command line's)."""

    gen_policies: tuple[str, ...] = ("source-only", "fixed-0.3", "fixed-0.7", "curriculum", "agent-cql")
    large_target: tuple[str, ...] = ("target.d_model=192", "target.n_layers=8", "target.d_ff=512")
    source_keep_every: int = 2  # 3b keeps source domains 0, k, 2k, ... (and every target-field domain)
    cql_alphas: tuple[float, ...] = (0.0, 3.0)  # besides agent.cql.alpha of the config (main's agent)
    n_static: int = 8  # fidelity: static mixtures, target share evenly spaced in [0, 1]
    n_sampled: int = 4  # fidelity: sweep trajectories at evenly spaced return quantiles
    fidelity_seeds: tuple[int, ...] = (0,)
    # 2b: the main sweep's drift (0, 0.1) per step was set for long horizons; in T=5 steps its trajectories
    # end at a median 21% target share, below the fixed-0.3 baseline. The wide sweep's reach 52% (q90 74%).
    wide_drift: tuple[float, float] | None = (0.0, 0.3)
    wide_policies: tuple[str, ...] = ("regmix", "replay-best", "agent-sft", "agent-cql")
    # 2c: main's and wide-sweep's final models re-scored on all benchmark items (CPT's feedback uses 16 per field:
    # one item = 0.016 of the balanced score) and more held-out windows (dma_jax/rescore.py)
    rescore_items: int | None = 200
    rescore_windows: int = 16
    side_seeds: tuple[int, ...] | None = None  # seeds of the generalisation and ablation runs (None: cpt.seeds)
    no_feedback_policies: tuple[str, ...] = ("agent-sft", "agent-cql")
    overrides: tuple[str, ...] = ()


FULL = Plan()
# The pulse test: every part, as few CPT runs and distinct compiled programs as that allows (each CPT run
# traces its train step and evaluation anew, seconds each; a new CQL alpha or model size compiles anew).
QUICK = Plan(gen_policies=("fixed-0.3", "agent-cql"), large_target=("target.d_model=96", "target.d_ff=192"),
             cql_alphas=(0.0,), n_static=3, n_sampled=1, side_seeds=(0,), no_feedback_policies=("agent-cql",),
             wide_policies=("agent-cql",), rescore_items=8, rescore_windows=4,
             overrides=("cpt.policies=[fixed-0.3, agent-sft, agent-cql]",))


@dataclasses.dataclass(frozen=True)
class SubRun:
    """One sub-run: a folder under the root, its config overrides and the CPT runs it owns."""

    name: str
    part: str  # "main", "gen", "ablation", "fidelity"
    title: str
    overrides: tuple[str, ...]
    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    links: tuple[str, ...] = ()  # paths under main/ this sub-run reads (symlinked to the same path here)
    agent_stages: tuple[str, ...] = ()  # agent stages trained here (else the agent comes from a link)


def sub_runs(cfg: Config, plan: Plan) -> list[SubRun]:
    """Every sub-run of the study, in the order they run."""
    alpha = cfg.agent.cql.alpha
    seeds, side = tuple(cfg.cpt.seeds), tuple(plan.side_seeds or cfg.cpt.seeds)
    shared = ("pretrain-target", "sweep", "agent")
    runs = [
        SubRun("main", "main", "Main comparison", (), tuple(cfg.cpt.policies), seeds),
        SubRun("gen-code", "gen", "(a) code target field", ("cpt.target_field=code",), plan.gen_policies, side,
               shared),
        SubRun("gen-domains", "gen", f"(b) fewer domains: source domains 0, {plan.source_keep_every}, "
               f"{2 * plan.source_keep_every}, ... only", (),
               plan.gen_policies, side, shared),
        SubRun("gen-large", "gen", "(c) larger target model", plan.large_target, plan.gen_policies, side,
               ("sweep", "agent")),
    ]
    if plan.wide_drift is not None:
        lo, hi = plan.wide_drift
        runs.insert(1, SubRun("wide-sweep", "coverage", f"Wider sweep: drift_rate_range [{lo:g}, {hi:g}] per step",
                              (f"sweep.sampler.drift_rate_range=[{lo}, {hi}]",
                               f"cpt.policies=[{', '.join(plan.wide_policies)}]"),
                              plan.wide_policies, seeds, ("pretrain-proxy", "pretrain-target"), ("sft", "cql")))
    for a in plan.cql_alphas:
        if a != alpha:
            runs.append(SubRun(f"cql-alpha-{a:g}", "ablation", f"CQL, alpha={a:g}", (f"agent.cql.alpha={a}",),
                               ("agent-cql",), side, ("pretrain-target", "sweep", "agent/sft"), ("cql",)))
    runs.append(SubRun("no-feedback", "ablation", "no feedback features (mixture history only)",
                       ("agent.model.use_feedback=false",), plan.no_feedback_policies, side,
                       ("pretrain-target", "sweep"), ("sft", "cql")))
    n = plan.n_static + plan.n_sampled
    runs.append(SubRun("fidelity", "fidelity", "Proxy fidelity", (f"sweep.num_trajectories={n}",),
                       tuple(f"replay-{k}" for k in range(n)), plan.fidelity_seeds, ("pretrain-proxy", "pretrain-target")))
    return runs


def _link(target: Path, link: Path) -> None:
    """Make `link` a relative symlink to `target` unless it exists (a different existing target is an error)."""
    if link.is_symlink() or link.exists():
        if link.resolve() != target.resolve():
            raise DmaError(f"{link}: exists and is not a link to {target}; remove it to re-run the study")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target.absolute(), link.parent.absolute()), tmp)
    os.replace(tmp, link)


def _latest_step(ckpt_dir: Path) -> int | None:
    """The last committed checkpoint step (Orbax renames a finished step to its number)."""
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []
    return max(steps, default=None)


class Study:
    def __init__(self, config: Path, overrides: list[str], variant: str | None, plan: Plan, progress: bool = True,
                 results: Path | None = None, command: str = "dma study"):
        self.config, self.variant, self.plan, self.progress, self.command = config, variant, plan, progress, command
        self.overrides = [*overrides, *plan.overrides]
        self.base = load_config(config, self.overrides, variant)
        if "://" in self.base.run.out_dir:  # sub-runs share main/'s outputs through symlinks
            raise DmaError(f"run.out_dir={self.base.run.out_dir}: the study runs in a local folder "
                           "(copy it to a bucket afterwards)")
        self.root = Path(self.base.run.out_dir)
        self.results = Path(results) if results else self.root / "RESULTS.md"
        self.runs = sub_runs(self.base, plan)
        self.timings: dict[str, float] = {}

    def cfg(self, sub: SubRun) -> Config:
        return load_config(self.config, [*self.overrides, f"run.out_dir={self.root / sub.name}",
                                         f"data.dir={self.root / 'data'}", f"run.name=study-{sub.name}",
                                         *sub.overrides], self.variant)

    # ---------------------------------------------------------------------------------- stages
    def _pretrain(self, cfg: Config, which: str) -> None:
        from dma_jax.pretrain import pretrain_dir, run_pretrain

        steps = cfg.pretrain.steps_for(which)
        if _latest_step(pretrain_dir(cfg, which) / "checkpoints") != steps:
            run_pretrain(cfg, which, progress=self.progress)

    def _sweep(self, cfg: Config) -> None:
        from dma_jax.sweep import run_sample, run_sweep, sweep_dir

        out = sweep_dir(cfg)
        if not (out / "trajectories.npz").is_file():
            run_sample(cfg)
        if not (out / "offline" / "meta.json").is_file():
            run_sweep(cfg, progress=self.progress)

    def _agent(self, cfg: Config, stages: tuple[str, ...]) -> None:
        from dma_jax.agent.runner import SPEC_FILE, export_agent, run_train_agent

        out = Path(cfg.run.out_dir) / "agent"
        dataset = Path(cfg.run.out_dir) / "sweep" / "offline"  # main's (a link) but in main and wide-sweep
        for stage in stages:
            steps = (cfg.agent.sft if stage == "sft" else cfg.agent.cql).steps
            if _latest_step(out / stage / "checkpoints") != steps:
                run_train_agent(cfg.agent, dataset, out, stage, cfg.run.seed, progress=self.progress)
            spec = out / f"export-{stage}" / SPEC_FILE
            if not spec.is_file() or read_json_file(spec, "").get("step") != steps:
                export_agent(out / stage, out / f"export-{stage}")

    def _cpt(self, cfg: Config, sub: SubRun, space=None) -> None:
        from dma_jax import history
        from dma_jax.config import dump_config
        from dma_jax.cpt import cpt_dir, run_cpt
        from dma_jax.report import write_report

        for policy in sub.policies:
            for seed in sub.seeds:
                if history.is_finished(cpt_dir(cfg) / policy / f"seed{seed}", dump_config(cfg)["cpt"]):
                    continue  # run_cpt's own "finished" check, without loading the policy first
                run_cpt(cfg, policy, seed, progress=self.progress, space=space)
        report = Path(cfg.run.out_dir) / "report"
        newest = max(p.stat().st_mtime for p in cpt_dir(cfg).glob("*/seed*/history.json"))
        if not (report / "report.md").is_file() or (report / "report.md").stat().st_mtime < newest:
            write_report(cpt_dir(cfg), report, title=f"study {sub.name}: {sub.title}")

    # ---------------------------------------------------------------------------------- sub-runs
    def run_sub(self, sub: SubRun) -> None:
        cfg = self.cfg(sub)
        out = Path(cfg.run.out_dir)
        for rel in sub.links:
            _link(self.root / "main" / rel, out / rel)
        if sub.name == "main":
            from dma_jax.config import dump_config
            from dma_jax.prepare import run_prepare

            manifest = Path(cfg.data_dir) / "manifest.json"  # prepared with this data config: nothing to redo
            if not manifest.is_file() or read_json_file(manifest, "").get("config") != dump_config(cfg)["data"]:
                run_prepare(cfg, progress=self.progress)
            self._pretrain(cfg, "proxy")
            self._pretrain(cfg, "target")
            self._sweep(cfg)
            self._agent(cfg, ("sft", "cql"))
        elif sub.name == "gen-large":
            self._pretrain(cfg, "target")
        elif sub.name == "fidelity":
            self._fidelity_trajectories(cfg)
            self._sweep(cfg)
        elif sub.name == "wide-sweep":
            self._sweep(cfg)
        self._agent(cfg, sub.agent_stages)
        self._cpt(cfg, sub, self._source_subset(cfg) if sub.name == "gen-domains" else None)
        if sub.name in ("main", "wide-sweep") and self.plan.rescore_items:
            from dma_jax.cpt import cpt_dir
            from dma_jax.rescore import rescore_runs

            rescore_runs(cfg, [cpt_dir(cfg) / p / f"seed{s}" for p in sub.policies for s in sub.seeds],
                         self.plan.rescore_items, self.plan.rescore_windows)

    def _source_subset(self, cfg: Config):
        """Source domains 0, k, 2k, ... and every domain of the target field: a space with another D."""
        from dma_jax.data.domains import DomainSpace

        full = DomainSpace.for_config(cfg)
        domains = full.manifest["domains"]
        source = [i for i, d in enumerate(domains) if d["field"] == "source"][:: self.plan.source_keep_every]
        keep = [i for i, d in enumerate(domains) if i in source or d["field"] == cfg.cpt.target_field]
        return DomainSpace(full.dir, full.manifest, keep)

    def _fidelity_trajectories(self, cfg: Config) -> None:
        """`n_static` constant mixtures + `n_sampled` of main's sweep trajectories (spread over its returns)."""
        from dma_jax import offline_data
        from dma_jax.policies import SpaceInfo
        from dma_jax.sweep import sweep_dir, sweep_space

        out = sweep_dir(cfg)
        if (out / "trajectories.npz").is_file() and (out / "plan.json").is_file():
            return
        space = sweep_space(cfg)
        info = SpaceInfo(tuple(space.names), tuple(space.fields_of_domain), cfg.sweep.target_field,
                         tuple(float(x) for x in space.train_tokens))
        T = cfg.sweep.num_stages
        shares = np.linspace(0.0, 1.0, self.plan.n_static)
        static_KxTxD = np.stack([np.tile(info.target_share(p, cfg.cpt.spread), (T, 1)) for p in shares])
        ds = offline_data.load(self.root / "main" / "sweep" / "offline")
        if ds.horizon != T or ds.meta["domain_names"] != space.names:
            raise DmaError(f"{self.root / 'main' / 'sweep'}: the main sweep has another horizon or domain space")
        order = np.argsort(ds.returns, kind="stable")
        picks = [int(order[i]) for i in np.round(np.linspace(0, ds.n - 1, self.plan.n_sampled)).astype(int)]
        weights = np.concatenate([static_KxTxD, ds.actions[picks]]).astype(np.float32)
        labels = ([f"static, target share {p:.2f}" for p in shares]
                  + [f"sampled: main sweep #{i} (return {ds.returns[i]:+.4f})" for i in picks])
        atomic_write_json(out / "plan.json", {"labels": labels, "kinds": ["static"] * len(shares)
                                              + ["sampled"] * len(picks), "sweep_index": [None] * len(shares) + picks})
        buf = io.BytesIO()
        np.savez(buf, weights_NxTxD=weights, domain_names=np.array(space.names),
                 domain_fields=np.array(space.fields_of_domain))
        atomic_write_bytes(out / "trajectories.npz", buf.getvalue())

    # ---------------------------------------------------------------------------------- the whole study
    def write_results(self) -> Path:
        from dma_jax.study_results import write_results

        return write_results(self)

    def run(self, only: list[str] | None = None) -> Path:
        timing_path = self.root / "study.json"
        done = read_json_file(timing_path, "").get("seconds", {}) if timing_path.is_file() else {}
        unknown = sorted(set(only or ()) - {s.name for s in self.runs})
        if unknown:
            raise DmaError(f"study: no sub-run {unknown[0]!r} (sub-runs: {', '.join(s.name for s in self.runs)})")
        todo = [s for s in self.runs if only is None or s.name in only]
        for i, sub in enumerate(todo, 1):
            print(f"study: [{i}/{len(todo)}] {sub.name}: {sub.title}", flush=True)
            t0 = time.perf_counter()
            self.run_sub(sub)
            done[sub.name] = done.get(sub.name, 0.0) + time.perf_counter() - t0
            self.timings = {s.name: done[s.name] for s in self.runs if s.name in done}
            atomic_write_json(timing_path, {"seconds": done, "command": self.command})
            self.write_results()
        self.timings = {s.name: done[s.name] for s in self.runs if s.name in done}
        print("study: wall time per sub-run (summed over invocations): "
              + "; ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()) + f"; total {sum(done.values()):.0f} s")
        return self.write_results()


def run_study(config: Path | None, overrides: list[str], variant: str | None, quick: bool = False,
              results: Path | None = None, progress: bool = True, only: list[str] | None = None) -> Path:
    config = Path(config) if config else STUDY_CONFIG
    if quick and variant is None:
        variant = "tiny"
    command = " ".join(["dma study", *(["--quick"] if quick else []),
                        *([f"--config {config}"] if config != STUDY_CONFIG else []),
                        *([f"--variant {variant}"] if variant and not (quick and variant == "tiny") else []),
                        *overrides])
    study = Study(config, overrides, variant, QUICK if quick else FULL, progress, results, command)
    return study.run(only)

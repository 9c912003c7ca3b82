"""The study's runner: each sub-run's config, its links into main/, its declared stages, the timings.

A sub-run (`plan.SubRun`) is ordinary pipeline stages (`dma_jax.pipeline`) with its own `run.out_dir`
under the study's root, so re-running resumes: a stage `runs.RunDir` says is done is skipped, an
unfinished one continues from its checkpoints. What sub-runs share (prepared data, base models,
sweep, trained agent) is a relative symlink into `main/`, never a copy; the data lives in
`<root>/data` (`data.dir` of every sub-run). After each sub-run RESULTS.md is rewritten
(`results.write_results`) and `<root>/study.json` records the wall time per sub-run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from dma_jax import pipeline
from dma_jax.config import Config, load_config
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_json, read_json_file
from dma_jax.runs import RunDir
from dma_jax.study import fidelity, fingerprint, followup, protocol, rescore
from dma_jax.study.plan import (FOLLOWUP, FULL, LINKS, QUICK, StudyPlan, SubRun, followup_gen_runs, followup_run,
                                sub_runs)
from dma_jax.study.results import StudyView, write_results

STUDY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "study.yaml"
TIMINGS_FILE = "study.json"  # under the root: {"seconds": {sub-run: wall seconds, summed}, "command"}


@dataclasses.dataclass(frozen=True)
class SubRunContext:
    """What a stage of a sub-run reads: the sub-run, its RunDir (config inside), main's RunDir, the plan."""

    sub: SubRun
    run: RunDir
    main: RunDir
    plan: StudyPlan
    progress: bool
    dirs: Mapping[str, RunDir] = dataclasses.field(default_factory=dict)  # every sub-run's (`SubRun.link_from`)

    @property
    def cfg(self) -> Config:
        return self.run.cfg

    def space(self) -> DomainSpace | None:
        """The CPT domain space the sub-run declares (None: the config's)."""
        if self.sub.space == "full":
            return None
        full = DomainSpace.for_config(self.cfg)
        if self.sub.space == "split":  # every domain of source + the target field cut into `split_parts`
            return full.subset(["source", self.cfg.cpt.target_field]).split(self.plan.split_parts,
                                                                            self.plan.split_heldout)
        # "source-subset": source domains 0, k, 2k, ... + the target field
        domains = full.manifest["domains"]
        source = [i for i, d in enumerate(domains) if d["field"] == "source"][:: self.plan.source_keep_every]
        keep = [i for i, d in enumerate(domains) if i in source or d["field"] == self.cfg.cpt.target_field]
        return DomainSpace(full.dir, full.manifest, keep)

    @property
    def root(self) -> Path:
        """The study's root folder (every sub-run's `run.out_dir` is `<root>/<sub-run>`)."""
        return Path(self.run.root).parent

    def cpt_runs(self) -> list[tuple[str, int]]:
        if self.sub.protocol:
            return protocol.cpt_pairs(self.run, self.cfg)
        return protocol.side_pairs(self.cfg, self.sub.policies, self.sub.seeds)

    def compared_runs(self) -> list[tuple[str, int]]:
        """The runs RESULTS.md compares and 2c re-scores (`protocol.compared_pairs`; none while unknown)."""
        return protocol.compared_pairs(self.sub, self.run) or []


def _unless(done: Callable[[SubRunContext], bool], run: Callable[[SubRunContext], str]):
    return lambda c: [] if done(c) else [run(c)]


def _cpt(c: SubRunContext) -> list[str]:
    """Every CPT run not done yet; for the protocol's sub-run again until none is left (its test runs are known
    once its tuning runs are done)."""
    lines: list[str] = []
    while todo := [(p, s) for p, s in c.cpt_runs() if not c.run.cpt_done(p, s)]:
        space = c.space()
        lines += [pipeline.cpt(c.cfg, p, s, c.progress, space=space) for p, s in todo]
        if not c.sub.protocol:
            break
    return lines


def _gate(c: SubRunContext) -> list[str]:
    """The headroom gate; under `study.gate: enforce` a failed gate stops the study (`protocol.StudyStopped`)."""
    doc = protocol.run_gate(c.cfg, c.root, c.progress)
    line = protocol.gate_line(doc)
    if not doc["passed"] and c.cfg.study.gate == "enforce":
        raise protocol.StudyStopped(f"study stopped before training agents: {line}")
    return [line]


def _rescore(c: SubRunContext) -> list[str]:
    items, windows = c.plan.rescore_items, c.plan.rescore_windows
    dirs = [c.run.cpt_run(p, s) for p, s in c.compared_runs()]
    if all(rescore.done(d, items, windows) for d in dirs):
        return []
    docs = rescore.rescore_runs(c.cfg, dirs, items, windows, space=c.space())
    return [f"rescore: {len(docs)} final models on up to {items} items per field and {windows} windows per domain"]


def _agent(stage: str):
    def step(c: SubRunContext) -> list[str]:  # every agent seed of the sub-run's config (agent.seeds)
        return [pipeline.train_agent(c.cfg, stage, c.progress, k) for k in c.cfg.agent.seeds
                if not (c.run.agent_trained(stage, k) and c.run.agent_exported(stage, k))]
    return step


def _pretrain(which: str):
    return _unless(lambda c: c.run.pretrained(which), lambda c: pipeline.pretrain(c.cfg, which, c.progress))


# Every stage a sub-run can declare (plan.STAGES): runs what is not done yet, returns the lines to print.
STEPS: dict[str, Callable[[SubRunContext], list[str]]] = {
    "prepare": _unless(lambda c: c.run.prepared(), lambda c: pipeline.prepare(c.cfg, c.progress)),
    "pretrain-proxy": _pretrain("proxy"),
    "pretrain-target": _pretrain("target"),
    "sample": _unless(lambda c: c.run.sampled(), lambda c: pipeline.sample(c.cfg)),
    "fidelity-trajectories": _unless(lambda c: fidelity.trajectories_written(c.run),
                                     lambda c: fidelity.write_trajectories(c.cfg, c.main, c.plan.n_static,
                                                                           c.plan.n_sampled)),
    "sweep": _unless(lambda c: c.run.swept(), lambda c: pipeline.sweep(c.cfg, c.progress)),
    "agent-sft": _agent("sft"),
    "agent-cql": _agent("cql"),
    "gate": _gate,
    "critic-probe": _unless(lambda c: c.run.protocol_probe.is_file(), lambda c: protocol.run_probe(c.cfg)),
    "cpt": _cpt,
    "proxy-policies": _unless(lambda c: protocol.proxies_done(c.cfg),
                              lambda c: "\n".join(protocol.run_proxy_policies(c.cfg, c.progress))),
    "followup-proxies": _unless(lambda c: followup.proxies_done(c.run),
                                lambda c: "\n".join(followup.run_proxies(c.cfg, c.main, c.progress))),
    "report": _unless(lambda c: c.run.report_fresh(),
                      lambda c: pipeline.report(c.cfg, title=f"study {c.sub.name}: {c.sub.title}")),
    "rescore": _rescore,
}


def _link(target: AnyPath, link: AnyPath) -> None:
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


def link_shared(c: SubRunContext) -> None:
    """Link what the sub-run shares with main/ or another sub-run (`SubRun.links`, `SubRun.link_from`; several
    folders for some, e.g. one per agent seed). What another sub-run has not made yet is an error naming it."""
    for name in c.sub.links:
        src = c.sub.source(name)
        source = c.main if src == "main" else c.dirs.get(src)
        if source is None:
            raise DmaError(f"sub-run {c.sub.name}: reads {name} of sub-run {src}, which this study does not have")
        for target, link in zip(LINKS[name](source), LINKS[name](c.run), strict=True):
            if src != "main" and not (target.is_symlink() or target.exists()):
                raise DmaError(f"sub-run {c.sub.name}: {target} is not there yet (run sub-run {src} first)")
            _link(target, link)


def run_sub(c: SubRunContext, echo: Callable[[str], None] = print) -> None:
    """Link what the sub-run shares with main/, then run each of its stages that is not done yet."""
    link_shared(c)
    for stage in c.sub.stages:
        for line in STEPS[stage](c):
            echo("  " + line.replace("\n", "\n  "))


def sub_config(config: Path, overrides: list[str], variant: str | None, root: Path, sub: SubRun) -> Config:
    """The sub-run's config: the study's, in `<root>/<sub>` with the data in `<root>/data`, plus its overrides."""
    return load_config(config, [*overrides, f"run.out_dir={root / sub.name}", f"data.dir={root / 'data'}",
                                f"run.name=study-{sub.name}", *sub.overrides], variant)


def _timings(runs, seconds: Mapping[str, float]) -> dict[str, float]:
    return {s.name: seconds[s.name] for s in runs if s.name in seconds}


def run_study(config: Path | None, overrides: list[str], variant: str | None, quick: bool = False,
              results: Path | None = None, progress: bool = True, only: list[str] | None = None,
              report_only: bool = False) -> Path:
    """Run the study's sub-runs (all, or those named in `only`), skipping finished stages; returns RESULTS.md.
    `report_only`: run nothing, only write RESULTS.md again from what has run (e.g. after the report's code changed)."""
    config = Path(config) if config else STUDY_CONFIG
    if quick and variant is None:
        variant = "tiny"
    command = " ".join(["dma study", *(["--quick"] if quick else []),
                        *([f"--config {config}"] if config != STUDY_CONFIG else []),
                        *([f"--variant {variant}"] if variant and not (quick and variant == "tiny") else []),
                        *overrides])
    plan = QUICK if quick else FULL
    overrides = [*overrides, *plan.overrides]
    base = load_config(config, overrides, variant)
    if "://" in base.run.out_dir:  # sub-runs share main/'s outputs through symlinks
        raise DmaError(f"run.out_dir={base.run.out_dir}: the study runs in a local folder "
                       "(copy it to a bucket afterwards)")
    root = Path(base.run.out_dir)
    runs = tuple(sub_runs(base, plan))
    later = [FOLLOWUP, *(f"{FOLLOWUP}-{s.name}" for s in runs if s.part == "gen")]  # once the alpha is chosen
    unknown = sorted(set(only or ()) - {s.name for s in runs} - set(later))
    if unknown:
        raise DmaError(f"study: no sub-run {unknown[0]!r} (sub-runs: {', '.join(s.name for s in runs)}, "
                       f"{', '.join(later)})")
    dirs = {s.name: RunDir(sub_config(config, overrides, variant, root, s)) for s in runs}

    def with_followup(runs: tuple[SubRun, ...]) -> tuple[SubRun, ...]:
        """`runs` and, once the tuning seeds have chosen CQL's alpha (`followup.choose`), the follow-up and the
        generalisation runs with its agents."""
        if any(s.name == FOLLOWUP for s in runs):
            return runs
        sub = followup_run(base, plan, followup.choose(root, dirs, runs))
        if sub is None:
            return runs
        new = [sub, *followup_gen_runs(sub, runs, plan)]
        for s in new:
            dirs[s.name] = RunDir(sub_config(config, overrides, variant, root, s))
        return (*runs, *new)

    timing_path = root / TIMINGS_FILE
    seconds = read_json_file(timing_path, "").get("seconds", {}) if timing_path.is_file() else {}

    def view() -> StudyView:
        doc = read_json_file(timing_path, "") if timing_path.is_file() else {}
        return StudyView(root, Path(results) if results else root / "RESULTS.md", base, plan, runs, dirs,
                         _timings(runs, seconds), command, config, variant, doc.get(fingerprint.ENV_KEY, {}))

    protocol.freeze(root, dirs["main"].cfg, write=False)  # a changed pre-registration is refused up front
    runs = with_followup(runs)
    if report_only:
        return write_results(view())
    todo = [s for s in runs if only is None or s.name in only]
    env = fingerprint.environment()  # what this invocation's numbers depend on besides code and config
    for i, sub in enumerate(todo, 1):  # the follow-up joins `todo` when the sub-run before it completes its inputs
        print(f"study: [{i}/{len(todo)}] {sub.name}: {sub.title}", flush=True)
        t0 = time.perf_counter()
        try:
            run_sub(SubRunContext(sub, dirs[sub.name], dirs["main"], plan, progress, dirs),
                    echo=lambda line: print(line, flush=True))
        except protocol.StudyStopped as stop:
            print(f"study: {stop}", flush=True)
            return write_results(view())
        finally:
            # read again first: another `dma study --only` on the same root may have written its sub-runs' times
            doc = read_json_file(timing_path, "") if timing_path.is_file() else {}
            seconds = doc.get("seconds", {})
            seconds[sub.name] = seconds.get(sub.name, 0.0) + time.perf_counter() - t0
            doc = fingerprint.record_environment(doc, sub.name, env)
            atomic_write_json(timing_path, {**doc, "seconds": seconds, "command": command})
        runs = with_followup(runs)
        todo += [s for s in runs if s.name.startswith(FOLLOWUP) and s not in todo and (only is None or s.name in only)]
        write_results(view())
    waiting = [n for n in (only or ()) if n.startswith(FOLLOWUP) and n not in dirs]
    if waiting:
        print(f"study: {', '.join(waiting)} not run: the follow-up waits for main's tuning runs and every alpha "
              "ablation (or the tuning seeds choose main's alpha)", flush=True)
    print("study: wall time per sub-run (summed over invocations): "
          + "; ".join(f"{k} {v:.0f} s" for k, v in _timings(runs, seconds).items())
          + f"; total {sum(seconds.values()):.0f} s")
    return write_results(view())

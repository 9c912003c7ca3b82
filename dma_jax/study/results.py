"""RESULTS.md of `dma study`: tables, paired differences with paired t CIs, rank correlations, plots.

Everything is read back from the sub-runs' files (CPT histories, the sweeps' offline data, agent
metrics, re-scores), so RESULTS.md can be rewritten at any point; a section whose sub-run has not
finished says so ("not run yet") instead of showing partial numbers. The runner hands over a
`StudyView`: what the study is, where its sub-runs live and how long they took.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dma_jax.config import Config
from dma_jax.errors import DmaError
from dma_jax.history import RunHistory, collect
from dma_jax.io_utils import AnyPath, atomic_write_text, read_json_file, read_jsonl
from dma_jax.runs import AGENT_STAGES, RunDir
from dma_jax.study import fidelity, fingerprint, followup, mixtures, protocol, rescore, verdicts
from dma_jax.study.plan import StudyPlan, SubRun
from dma_jax.study.stats import paired, t_quantile
from dma_jax.study.text import AGENT, cell, paired_line, verdict



@dataclasses.dataclass(frozen=True)
class StudyView:
    """What RESULTS.md is written from. `dirs`: every sub-run's RunDir (its own config), by name."""

    root: Path
    results: Path
    base: Config
    plan: StudyPlan
    runs: tuple[SubRun, ...]
    dirs: Mapping[str, RunDir]
    timings: Mapping[str, float]  # seconds per sub-run, summed over invocations
    command: str
    config: Path
    variant: str | None
    environments: Mapping[str, list[dict]] = dataclasses.field(default_factory=dict)  # study.json's, per sub-run

    def sub(self, name: str) -> SubRun | None:
        return next((s for s in self.runs if s.name == name), None)

    def rel(self, path: AnyPath) -> str:
        """`path` as RESULTS.md links it (relative to its folder)."""
        return os.path.relpath(Path(path).absolute(), self.results.parent.absolute())


# ---------------------------------------------------------------------------------- reading sub-runs
def sub_status(view: StudyView, sub: SubRun) -> tuple[list[RunHistory], int, int]:
    """(complete runs of the sub-run's policies x seeds, how many, how many expected). The protocol's sub-run:
    its test runs (`protocol.test_pairs`), each agent under its generic name (`agent-cql`, whatever its seed)."""
    run = view.dirs[sub.name]
    want = set(protocol.compared_pairs(sub, run) or ())
    if not want:
        return [], 0, 1
    try:
        runs = [r for r in collect(run.cpt) if r.complete and (r.policy, r.seed) in want]
    except DmaError:
        runs = []
    runs = [dataclasses.replace(r, policy=protocol.generic(r.policy)) for r in runs]
    return runs, len(runs), len(want)


def main_tuning_runs(view: StudyView) -> tuple[list[RunHistory], bool]:
    """(main's complete runs on the tuning seeds: the gate's headroom policies, the learned baselines and the
    agents, generic names; whether the protocol's tuning runs are all there): the reference of the side runs, whose
    seeds are the tuning seeds with the same agent seeds (`protocol.side_pairs`)."""
    run = view.dirs["main"]
    want = set(protocol.tuning_pairs(run.cfg))
    try:
        runs = [r for r in collect(run.cpt) if r.complete and r.seed in run.cfg.study.tuning_seeds]
    except DmaError:
        runs = []
    done = want <= {(r.policy, r.seed) for r in runs}
    return [dataclasses.replace(r, policy=protocol.generic(r.policy)) for r in runs], done


def best_baseline(runs) -> str | None:
    """The non-agent policy with the best mean final balanced score."""
    from dma_jax.report import summary_table

    rows = [r for r in summary_table(runs) if not r["policy"].startswith("agent-")]
    return rows[0]["policy"] if rows else None


def policy_table(runs) -> list[str]:
    from dma_jax.report import summary_table

    rows = summary_table(runs)
    fields = [*runs[0].fields, "balanced"]
    lines = ["| policy | seeds | " + " | ".join(fields) + " |", "|---|---:|" + "---:|" * len(fields)]
    for row in rows:
        lines.append(f"| {row['policy']} | {row['n']} | "
                     + " | ".join(cell(row["mean"][f], row["std"][f], row["n"]) for f in fields) + " |")
    return lines


def _plots(view: StudyView, name: str) -> str:
    rep = view.dirs[name].report
    return (f"Plots: [mixtures over time per policy]({view.rel(rep / 'mixtures.png')}), "
            f"[score curves]({view.rel(rep / 'scores.png')}); [dma report]({view.rel(rep / 'report.md')}).")


def _not_run(n: int, want: int) -> list[str]:
    return [f"Not run yet ({n} of {want} CPT runs finished)." if n else "Not run yet.", ""]


# ---------------------------------------------------------------------------------- sections
def _setup(view: StudyView) -> list[str]:
    from dma_jax.models.lm import param_count_formula

    c = view.base
    p, t = param_count_formula(c.proxy), param_count_formula(c.target)
    large = param_count_formula(view.dirs["gen-large"].cfg.target)
    total = sum(view.timings.values())
    return [f"Command: `{view.command}`" + (" (`make study`)" if view.command == "dma study" else "")
            + f"; config `{os.path.relpath(view.config)}`" + (f", variant `{view.variant}`" if view.variant else "")
            + ".",
            f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; wall time so far {total / 60:.1f} min ("
            + ", ".join(f"{k} {v / 60:.1f}" for k, v in view.timings.items()) + ").", "",
            f"Setup: proxy {p / 1e6:.2f}M parameters, target {t / 1e6:.2f}M ({t / p:.1f}x), larger target (3c) "
            f"{large / 1e6:.2f}M; sweep N={c.sweep.num_trajectories} trajectories x T={c.sweep.num_stages} "
            f"re-weighting steps x S={c.sweep.steps_per_stage} steps (batch {c.sweep.batch_size} x "
            f"{c.sweep.seq_len} tokens), target field {c.sweep.target_field}; CPT T={c.cpt.num_stages} x "
            f"S={c.cpt.steps_per_stage} (batch {c.cpt.batch_size} x {c.data.record_len - 1}); balanced score: "
            f"{c.eval.balanced} of the field scores (base model = 1). Cells are mean ± std (ddof=1) over seeds of "
            "the final scores.", ""]


def _sweep_agent(view: StudyView) -> list[str]:
    from dma_jax import offline_data

    main = view.dirs["main"]
    lines = ["## 1. Sweep and agent", ""]
    if not main.swept():
        return lines + ["Not run yet.", ""]
    r = offline_data.load(main.offline).returns
    lines += [f"Sweep: {r.size} proxy trajectories; return (final − initial balanced score) min {r.min():+.4f}, "
              f"median {np.median(r):+.4f}, max {r.max():+.4f}, std {r.std():.4f}. "
              f"[Sampled trajectories]({view.rel(main.trajectories.with_suffix('.png'))}).", ""]
    for k in main.cfg.agent.seeds:  # CQL's q_data, q_random and cql_gap per agent seed: does the penalty bind?
        for stage in AGENT_STAGES:
            path = main.agent_stage(stage, k) / "metrics.jsonl"
            last = read_jsonl(path)[-1] if path.is_file() and read_jsonl(path) else None
            shown = ", ".join(f"{name} {v:.4g}" for name, v in (last or {}).items()
                              if isinstance(v, float) and name != "updates_per_s")
            lines.append(f"- Agent {stage}, agent seed {k}: " + (f"{last['step']} updates; last metrics: {shown}."
                                                                 if last else "not run yet."))
    if main.protocol_probe.is_file():
        lines += ["", f"The CQL critics' Q against the target share, per step, on the offline states "
                  f"([plot]({view.rel(main.protocol_probe.with_suffix('.png'))})):", "",
                  *protocol.probe_lines(read_json_file(main.protocol_probe, ""))]
    return lines + [""]


def _comparison(view: StudyView, sub: SubRun) -> tuple[list[str], dict | None]:
    """The sub-run's policy table and its agent against its best baseline (no heading)."""
    runs, n, want = sub_status(view, sub)
    if n < want:
        return _not_run(n, want), None
    best = best_baseline(runs)
    p = paired(runs, AGENT, runs, best) if best and AGENT in sub.policies else None
    lines = policy_table(runs) + [""]
    if p:
        lines += [f"Paired by seed, final balanced score: {paired_line(p)}", ""]
    return lines + [_plots(view, sub.name), ""], p


def _gen_followup(view: StudyView, sub: SubRun) -> tuple[list[str], list[str]]:
    """A generalisation run again with the follow-up's agents (`plan.followup_gen_runs`): against the baselines
    and main's agent of the generalisation run it repeats (the same seeds, so paired)."""
    other = view.sub(sub.compare_with)
    mine, n, want = sub_status(view, sub)
    theirs, m, want_theirs = sub_status(view, other)
    if n < want or m < want_theirs:
        return [f"#### {sub.title}", "", *_not_run(n, want)], []
    alpha = view.dirs[sub.name].cfg.agent.cql.alpha
    chosen, main_agent = f"{AGENT} (chosen alpha {alpha:g})", f"{AGENT} (main's alpha {view.base.agent.cql.alpha:g})"
    mine = [dataclasses.replace(r, policy=chosen) for r in mine]
    theirs = [dataclasses.replace(r, policy=main_agent) if r.policy == AGENT else r for r in theirs]
    best = best_baseline(theirs)
    p_best, p_main = paired(mine, chosen, theirs, best), paired(mine, chosen, theirs, main_agent)
    lines = [f"#### {sub.title}", "", *policy_table(mine + theirs), "",
             f"Paired by seed, final balanced score: {paired_line(p_best)}", "",
             f"Against main's agent on the same seeds: {paired_line(p_main)}", "", _plots(view, sub.name), "",
             *mixtures.lines(mine)]
    return lines, [f"- Generalisation {sub.title}: {paired_line(p_best)}"]


def _wide(view: StudyView) -> tuple[list[str], list[str]]:
    """2b: the wider sweep's policies next to main's sweep-independent baselines (the same CPT runs)."""
    sub = next((s for s in view.runs if s.part == "coverage"), None)
    if sub is None:
        return [], []
    runs, n, want = sub_status(view, sub)
    main_runs, main_done = main_tuning_runs(view)  # the same (tuning) seeds and agent seeds
    lines = ["### 2b. " + sub.title, "",
             "The same comparison with a second sweep (same proxies, seeds and N) whose trajectories drift faster "
             f"toward the {view.base.cpt.target_field} field; the policies that read a sweep (RegMix, replay-best, "
             "the agents) use it, the other baselines are main's runs on the same (tuning) seeds.", ""]
    if n < want or not main_done:
        return lines + _not_run(n, want), []
    both = runs + [r for r in main_runs if r.policy not in sub.policies]
    best = best_baseline(both)
    p = paired(runs, AGENT, both, best) if best and AGENT in sub.policies else None
    p_main = paired(runs, AGENT, main_runs, AGENT) if AGENT in sub.policies else None
    lines += policy_table(both) + [""]
    reading = []
    if p:
        lines.append(f"Paired by seed, final balanced score: {paired_line(p)}")
        reading.append(f"- Wider sweep (2b): {paired_line(p)}")
    if p_main:
        lines.append(f"Against main's agent (narrow sweep): {paired_line(p_main)}")
        reading.append(f"- Wider sweep (2b) vs narrow sweep, same agent recipe: {paired_line(p_main)}")
    return lines + ["", _plots(view, sub.name), "", *_coverage(view, sub), ""], reading


def _ablations(view: StudyView) -> tuple[list[str], list[str]]:
    from dma_jax.report import summary_table

    main_runs, done = main_tuning_runs(view)
    alpha = view.base.agent.cql.alpha
    rows = [("SFT only (main, tuning seeds)", main_runs if done else None, "agent-sft"),
            (f"CQL, alpha={alpha:g} (main, tuning seeds)", main_runs if done else None, AGENT)]
    for sub in (s for s in view.runs if s.part == "ablation"):
        runs, k, w = sub_status(view, sub)
        for policy in sub.policies:
            label = f"{sub.title}, {'SFT' if policy == 'agent-sft' else 'CQL'}" if len(sub.policies) > 1 else sub.title
            rows.append((label, runs if k == w else None, policy))
    tf = view.base.cpt.target_field
    lines = ["## 4. Ablations", "", f"Δ: final balanced score minus main's {AGENT} on the same seeds (main's tuning "
             "runs; the i-th seed uses agent seed i mod A in both), paired by seed, with the paired t 95% CI.", "", f"| agent | seeds | {tf} | source | balanced | Δ balanced [paired t 95% CI] |",
             "|---|---:|---:|---:|---:|---|"]
    reading = []
    for label, runs, policy in rows:
        row = next((r for r in summary_table(runs) if r["policy"] == policy), None) if runs is not None else None
        if row is None:
            lines.append(f"| {label} | – | not run yet | | | |")
            continue
        p = paired(runs, policy, main_runs, AGENT) if done and (runs is not main_runs or policy != AGENT) else None
        delta = f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" if p else "–"
        lines.append(f"| {label} | {row['n']} | " + " | ".join(cell(row["mean"][f], row["std"][f], row["n"])
                                                             for f in (tf, "source", "balanced")) + f" | {delta} |")
        if p:
            reading.append(f"- Ablation {label} vs main {AGENT}: {p['mean']:+.4f} (paired t 95% CI [{p['lo']:+.4f}, "
                           f"{p['hi']:+.4f}], p = {p['p']:.3g}), {verdict(p)}.")
    return lines + [""], reading


def _fidelity(view: StudyView) -> tuple[list[str], list[str]]:
    sub = next(s for s in view.runs if s.part == "fidelity")
    runs, n, want = sub_status(view, sub)
    lines = ["## 5. Proxy fidelity", ""]
    if n < want:
        return lines + _not_run(n, want), []
    body, reading = fidelity.section(view.dirs[sub.name], runs, sub.policies, sub.seeds, view.rel,
                                     _plots(view, sub.name))
    return lines + body, reading


def _coverage(view: StudyView, sub: SubRun) -> list[str]:
    """Where the agent's target share sits relative to the sweep's trajectories, step by step."""
    from dma_jax import offline_data

    runs, n, want = sub_status(view, sub)
    mine = [r for r in runs if r.policy == AGENT]
    if n < want or not mine:
        return []
    ds = offline_data.load(view.dirs[sub.name].offline)
    tf = view.base.cpt.target_field
    sweep_NxT = ds.actions[..., [f == tf for f in ds.meta["domain_fields"]]].sum(-1)
    lo_T, hi_T = np.quantile(sweep_NxT, 0.05, axis=0), np.quantile(sweep_NxT, 0.95, axis=0)
    inside, total, shares = 0, 0, []
    for r in mine:
        share_T = r.weights_TxD[:, [f == tf for f in r.domain_fields]].sum(-1)
        at_T = np.minimum(np.arange(share_T.size) * ds.horizon // max(share_T.size, 1), ds.horizon - 1)
        inside += int(((share_T >= lo_T[at_T]) & (share_T <= hi_T[at_T])).sum())
        total += share_T.size
        shares.append(share_T)
    return [f"- Coverage ({sub.name}): {AGENT}'s {tf} share per step (mean over seeds: "
            + ", ".join(f"{v:.2f}" for v in np.mean(shares, 0)) + f") lies inside the sweep's 5–95% band at that "
            f"step in {inside} of {total} steps (sweep band: "
            + ", ".join(f"{a:.2f}–{b:.2f}" for a, b in zip(lo_T, hi_T)) + ")."]


def write_results(view: StudyView) -> Path:
    """Write RESULTS.md from the sub-runs' files; returns its path."""
    main = view.sub("main")
    lines = ["# Study: does the Data Mixing Agent beat the baselines? (CPU scale)", "", *_setup(view),
             *verdicts.preregistration_section(view), *_sweep_agent(view), *verdicts.sections(view)]
    runs, n, want = sub_status(view, main)
    if n == want:
        lines += ["All test runs, final balanced score (mean ± std over seeds):", "", *policy_table(runs), "",
                  *mixtures.lines(runs), _plots(view, "main"), ""]
    reading = ["- Main: the verdicts of section 2 (pre-registered rules)."]
    for section in (_wide, rescore.section, followup.section):
        body, more = section(view)
        lines += body
        reading += more
    lines += ["## 3. Generalisation without retraining", "",
              "The main run's agent, unchanged, against the baselines that need no sweep of the new setting; once "
              "the tuning seeds chose another CQL alpha (2d), that agent too, on the same seeds.", ""]
    for sub in (s for s in view.runs if s.part == "gen"):
        body, p = _comparison(view, sub)
        runs, n, want = sub_status(view, sub)
        lines += [f"### {sub.title}", "", *body, *(mixtures.lines(runs) if n == want and n else [])]
        reading.append(f"- Generalisation {sub.title}: " + (paired_line(p) if p else "not run yet."))
        for again in (s for s in view.runs if s.compare_with == sub.name):  # with the follow-up's agents
            body, more = _gen_followup(view, again)
            lines += body
            reading += more
    for section in (_ablations, _fidelity):
        body, more = section(view)
        lines += body
        reading += more
    reading += _coverage(view, main)
    n = len(view.plan.side_seeds or view.base.study.tuning_seeds)  # the side runs' seeds
    t_note = (f"the paired t 95% CI has {n - 1} degrees of freedom (half-width t_0.975,{n - 1} = "
              f"{t_quantile(0.975, n - 1):.3f} standard errors), so it is wide; " if n > 1 else
              "one seed gives no paired t interval; ")
    lines += ["## 6. Reading", "", *reading, "",
              "Caveats (sections 2b-5; section 2 follows the pre-registration): the best baseline is picked on the "
              "same runs it is compared on (this favours the baseline); "
              f"with {n} seeds {t_note}a percentile bootstrap over so few seeds would be too narrow (for 3 seeds "
              "its 95% interval is exactly [min, max] of the paired differences), so none is given; p-values are not corrected for the number "
              "of comparisons.", "",
              *fingerprint.section(view.environments, fingerprint.digests(view.root, view.dirs))]
    atomic_write_text(view.results, "\n".join(lines))
    return view.results

"""What the study runs: its knobs (`StudyPlan`, `FULL`, `QUICK`) and its sub-runs (`SubRun`, `sub_runs`).

A sub-run declares everything the runner needs: the pipeline stages it runs itself (in order), the
outputs of `main/` it reads through symlinks, the domain space its CPT runs on and the CPT runs it owns.
The runner (`study/run.py`) has no case per sub-run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dma_jax.config import Config
from dma_jax.io_utils import AnyPath
from dma_jax.runs import RunDir

# Stages a sub-run can declare, in the order the runner would meet them. "fidelity-trajectories" writes the
# fidelity sub-run's own trajectories (static mixtures + some of main's) in place of "sample".
STAGES = ("prepare", "pretrain-proxy", "pretrain-target", "sample", "fidelity-trajectories", "sweep", "gate",
          "agent-sft", "agent-cql", "critic-probe", "cpt", "proxy-policies", "followup-proxies", "report", "rescore")
# Outputs of main/ a sub-run can share: relative symlinks from these folders of its own run to main's.
LINKS: dict[str, Callable[[RunDir], list[AnyPath]]] = {
    "pretrain-proxy": lambda run: [run.pretrain("proxy")],
    "pretrain-target": lambda run: [run.pretrain("target")],
    "sweep": lambda run: [run.sweep],  # trajectories and offline data
    "agent": lambda run: [run.agent],  # both stages and their exports, every agent seed
    "agent-sft": lambda run: [run.agent_stage("sft", k) for k in run.cfg.agent.seeds],  # the SFT actors CQL starts from
}
SPACES = ("full", "source-subset", "split")
FOLLOWUP = "cql-chosen"  # the follow-up sub-run: CQL with the alpha the tuning seeds choose (`study.followup`)
FOLLOWUP_WHEN = ("if-changed", "always", "never")  # the CPT domain space: the config's, or source domains 0, k, 2k, ... only


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """The study beyond the config. `overrides` apply to every sub-run (after the command line's)."""

    # 3: fixed-0.5-scored (the low-quality domains left out) is the clean policy main's gate measured; it needs no
    # sweep of the new setting, so it runs there too (RegMix and replay-best would need one)
    gen_policies: tuple[str, ...] = ("source-only", "fixed-0.3", "fixed-0.7", "fixed-0.5-scored", "curriculum",
                                     "agent-cql")
    large_target: tuple[str, ...] = ("target.d_model=192", "target.n_layers=8", "target.d_ff=512")
    source_keep_every: int = 2  # 3b keeps source domains 0, k, 2k, ... (and every target-field domain)
    split_parts: int = 2  # 3b': every CPT domain cut into this many by record range (more domains than trained on)
    split_heldout: bool = True  # 3b': cut the held-out records too (False: every part keeps its domain's)
    cql_alphas: tuple[float, ...] = (0.0, 0.3, 3.0)  # besides agent.cql.alpha of the config (main's agent)
    n_static: int = 8  # fidelity: static mixtures, target share evenly spaced in [0, 1]
    n_sampled: int = 4  # fidelity: sweep trajectories at evenly spaced return quantiles
    fidelity_seeds: tuple[int, ...] = (0,)
    # 2b: a wider sweep than the sampler's default signed drift (-0.15, 0.25) per step (issue 17): faster rises
    # and falls. (The first study's main sweep drifted in (0, 0.1) only and never reached the fixed-0.3 region.)
    wide_drift: tuple[float, float] | None = (-0.3, 0.4)
    wide_start: tuple[float, float] = (0.0, 0.8)  # its start target share range (default sampler: 0-0.6)
    wide_policies: tuple[str, ...] = ("regmix", "replay-best", "agent-sft", "agent-cql")
    # 2c: main's and wide-sweep's final models re-scored on all benchmark items (CPT's feedback uses 16 per field:
    # one item = 0.016 of the balanced score) and more held-out windows (dma_jax/study/rescore.py)
    rescore_items: int | None = 200
    rescore_windows: int = 16
    # the follow-up (study/followup.py): run when the tuning seeds choose another alpha than main's ("if-changed"),
    # whatever they choose ("always": the pulse test checks the path), or not at all
    followup: str = "if-changed"
    followup_gen: bool = True  # ... and the generalisation runs (3) again with its agents (`followup_gen_runs`)
    side_seeds: tuple[int, ...] | None = None  # seeds of every sub-run but main (None: study.tuning_seeds)
    no_feedback_policies: tuple[str, ...] = ("agent-sft", "agent-cql")
    overrides: tuple[str, ...] = ()


FULL = StudyPlan()
# The pulse test: every part, as few CPT runs and distinct compiled programs as that allows (each CPT run
# traces its train step and evaluation anew, seconds each; a new CQL alpha or model size compiles anew).
QUICK = StudyPlan(gen_policies=("fixed-0.3", "agent-cql"), large_target=("target.d_model=96", "target.d_ff=192"),
                  cql_alphas=(0.0,), n_static=3, n_sampled=1, no_feedback_policies=("agent-cql",),
                  wide_policies=("agent-cql",), rescore_items=8, followup="always", rescore_windows=4,
                  split_heldout=False,  # the tiny variant's math held-out split is too short to cut into windows
                  overrides=("cpt.policies=[fixed-0.3, agent-sft, agent-cql]", "study.tuning_seeds=[0, 1]",
                             "study.test_seeds=[2, 3]", "study.proxy_test_seeds=[2, 3]", "study.agent_seeds=[0, 1]",
                             "study.anchors=[source-only]", "study.gate=report", "headroom.shares=[0.5]"))


@dataclasses.dataclass(frozen=True)
class SubRun:
    """One sub-run: a folder under the root, its config overrides, the stages it runs and the CPT runs it owns."""

    name: str
    part: str  # "main", "coverage", "gen", "ablation", "fidelity"
    title: str
    overrides: tuple[str, ...]
    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    stages: tuple[str, ...]  # of STAGES, run in this order (each skipped when its output is there)
    links: tuple[str, ...] = ()  # of LINKS: main/'s outputs this sub-run reads instead of making its own
    space: str = "full"  # of SPACES
    # its CPT runs are the protocol's (`protocol.cpt_pairs`: tuning, then test seeds), not policies x seeds
    protocol: bool = False
    link_from: tuple[tuple[str, str], ...] = ()  # (link, sub-run): links read from that sub-run instead of main/
    compare_with: str | None = None  # the sub-run whose baselines (and main's agent) this one's agent is compared with

    def __post_init__(self):
        for what, given, known in (("stage", self.stages, STAGES), ("link", self.links, LINKS),
                                   ("space", (self.space,), SPACES),
                                   ("link_from link", [k for k, _ in self.link_from], self.links)):
            unknown = [x for x in given if x not in known]
            if unknown:
                raise ValueError(f"sub-run {self.name}: unknown {what} {unknown[0]!r} (known: {', '.join(known)})")

    def source(self, link: str) -> str:
        """The sub-run a link of `links` reads from (main unless `link_from` says otherwise)."""
        return dict(self.link_from).get(link, "main")


def sub_runs(cfg: Config, plan: StudyPlan) -> list[SubRun]:
    """Every sub-run of the study, in the order they run."""
    alpha = cfg.agent.cql.alpha
    side = tuple(plan.side_seeds or cfg.study.tuning_seeds)  # with main's tuning runs as the ablations' reference
    if side != tuple(cfg.study.tuning_seeds[:len(side)]):  # else seed k would pair with another agent seed in main
        raise ValueError(f"side_seeds {list(side)}: must be the first tuning seeds {list(cfg.study.tuning_seeds)}")
    rescore = ("rescore",) if plan.rescore_items else ()
    cpt = ("cpt", "report")
    shared = ("pretrain-target", "sweep", "agent")
    st = cfg.study
    agents = f"agent.seeds=[{', '.join(map(str, st.agent_seeds))}]"  # every sub-run: its agents, or main's it reads
    runs = [
        SubRun("main", "main", "Main comparison (pre-registered)", (agents,),
               (*st.learned_baselines, "agent-sft", "agent-cql", *st.anchors), tuple(st.test_seeds),
               ("prepare", "pretrain-proxy", "pretrain-target", "sample", "sweep", "gate", "agent-sft", "agent-cql",
                "critic-probe", "cpt", "proxy-policies", "report", *rescore), protocol=True),
        SubRun("gen-code", "gen", "(a) code target field", ("cpt.target_field=code", agents), plan.gen_policies, side,
               cpt, shared),
        SubRun("gen-domains", "gen", f"(b) fewer domains: source domains 0, {plan.source_keep_every}, "
               f"{2 * plan.source_keep_every}, ... only", (agents,), plan.gen_policies, side, cpt, shared,
               space="source-subset"),
        SubRun("gen-more-domains", "gen", f"(b') more domains: every domain cut into {plan.split_parts} by record "
               f"range{'' if plan.split_heldout else ' (held-out not cut)'}", (agents,), plan.gen_policies, side, cpt,
               shared, space="split"),
        SubRun("gen-large", "gen", "(c) larger target model", (*plan.large_target, agents), plan.gen_policies, side,
               ("pretrain-target", *cpt), ("sweep", "agent")),
    ]
    if plan.wide_drift is not None:
        lo, hi = plan.wide_drift
        s0, s1 = plan.wide_start
        runs.insert(1, SubRun("wide-sweep", "coverage", f"Wider sweep: drift_rate_range [{lo:g}, {hi:g}] per step, "
                              f"start share [{s0:g}, {s1:g}]",
                              (f"sweep.sampler.drift_rate_range=[{lo}, {hi}]",
                               f"sweep.sampler.init_target_share_range=[{s0}, {s1}]",
                               f"cpt.policies=[{', '.join(plan.wide_policies)}]", agents),
                              plan.wide_policies, side, ("sample", "sweep", "agent-sft", "agent-cql", *cpt, *rescore),
                              ("pretrain-proxy", "pretrain-target")))
    for a in plan.cql_alphas:
        if a != alpha:
            runs.append(SubRun(f"cql-alpha-{a:g}", "ablation", f"CQL, alpha={a:g}", (f"agent.cql.alpha={a}", agents),
                               ("agent-cql",), side, ("agent-cql", *cpt), ("pretrain-target", "sweep", "agent-sft")))
    runs.append(SubRun("no-feedback", "ablation", "no feedback features (mixture history only)",
                       ("agent.model.use_feedback=false", agents), plan.no_feedback_policies, side,
                       ("agent-sft", "agent-cql", *cpt), ("pretrain-target", "sweep")))
    n = plan.n_static + plan.n_sampled
    runs.append(SubRun("fidelity", "fidelity", "Proxy fidelity", (f"sweep.num_trajectories={n}", agents),
                       tuple(f"replay-{k}" for k in range(n)), plan.fidelity_seeds,
                       ("fidelity-trajectories", "sweep", *cpt), ("pretrain-proxy", "pretrain-target")))
    return runs


def followup_run(cfg: Config, plan: StudyPlan, choice: dict | None) -> SubRun | None:
    """The follow-up sub-run once the alpha is chosen (`followup.choose`): CQL with it on main's test seeds."""
    if plan.followup not in FOLLOWUP_WHEN:
        raise ValueError(f"followup {plan.followup!r}: one of {', '.join(FOLLOWUP_WHEN)}")
    if choice is None or plan.followup == "never" or (plan.followup == "if-changed"
                                                      and choice["alpha"] == cfg.agent.cql.alpha):
        return None
    st, a = cfg.study, choice["alpha"]
    agents = f"agent.seeds=[{', '.join(map(str, st.agent_seeds))}]"
    return SubRun(FOLLOWUP, "followup", f"Follow-up: CQL, alpha={a:g} (chosen on the tuning seeds), on the test "
                  "seeds", (f"agent.cql.alpha={a}", agents), ("agent-cql",), tuple(st.test_seeds),
                  ("agent-cql", "critic-probe", "cpt", "followup-proxies", "report"),
                  ("pretrain-proxy", "pretrain-target", "sweep", "agent-sft"))


def followup_gen_runs(follow: SubRun | None, runs: list[SubRun] | tuple[SubRun, ...], plan: StudyPlan) -> list[SubRun]:
    """The generalisation runs again with the follow-up's agents (the alpha the tuning seeds chose): its agent-cql
    only, on each generalisation run's seeds and space, compared there with that run's baselines and main's agent."""
    if follow is None or not plan.followup_gen:
        return []
    alpha = next(o for o in follow.overrides if o.startswith("agent.cql.alpha="))
    out = []
    for g in (s for s in runs if s.part == "gen"):
        own = ("pretrain-target",) if "pretrain-target" in g.stages else ()  # gen-large: its own larger target
        links = tuple(x for x in LINKS if x in {*g.links, *own, "agent"})
        out.append(SubRun(f"{FOLLOWUP}-{g.name}", "gen-followup", f"{g.title}: the agent with the chosen "
                          f"{alpha.removeprefix('agent.cql.')}", (*g.overrides, alpha), ("agent-cql",), g.seeds,
                          ("cpt", "report"), links, g.space, link_from=(("agent", FOLLOWUP),
                                                                        *((k, g.name) for k in own)),
                          compare_with=g.name))
    return out

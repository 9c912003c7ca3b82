"""The study's runner: every sub-run declares what its stages read; the runner runs what is not done and links
what a sub-run shares (from main/ or another sub-run)."""

import os
from types import SimpleNamespace

import pytest

from dma_jax.errors import DmaError

# ---------------------------------------------------------------------------------- the runner
def test_sub_runs_declare_what_their_stages_read():
    """Every sub-run's stages are known and in pipeline order, and what its stages read is made or linked."""
    from dma_jax.config import load_config
    from dma_jax.study import FULL, QUICK, STUDY_CONFIG, SubRun, sub_runs
    from dma_jax.study.plan import FOLLOWUP, LINKS, STAGES, followup_gen_runs, followup_run
    from dma_jax.study.run import STEPS

    assert set(STEPS) == set(STAGES)
    for plan, variant in ((FULL, None), (QUICK, "tiny")):
        cfg = load_config(STUDY_CONFIG, list(plan.overrides), variant)
        runs = sub_runs(cfg, plan)
        # the follow-up joins once the tuning seeds chose an alpha: another than main's (the quick plan: any)
        assert followup_run(cfg, plan, None) is None
        same = followup_run(cfg, plan, {"alpha": cfg.agent.cql.alpha})
        assert (same is None) == (plan is FULL)
        runs.append(followup_run(cfg, plan, {"alpha": 0.3}))
        assert runs[-1].name == FOLLOWUP and "agent.cql.alpha=0.3" in runs[-1].overrides
        assert runs[-1].seeds == tuple(cfg.study.test_seeds)
        # ... and every generalisation run again with its agents: linked from it, compared with the original
        gens = [s for s in runs if s.part == "gen"]
        assert followup_gen_runs(None, runs, plan) == []
        again = followup_gen_runs(runs[-1], runs, plan)
        assert [(a.compare_with, a.space, a.seeds) for a in again] == [(g.name, g.space, g.seeds) for g in gens]
        for a, g in zip(again, gens):
            assert a.source("agent") == FOLLOWUP and "agent.cql.alpha=0.3" in a.overrides and a.policies == ("agent-cql",)
            assert set(g.overrides) <= set(a.overrides)  # the same target field / model size
            assert a.source("pretrain-target") == (g.name if "pretrain-target" in g.stages else "main")
        runs += again
        assert runs[0].name == "main" and len({s.name for s in runs}) == len(runs)
        for sub in runs:
            assert list(sub.stages) == sorted(sub.stages, key=STAGES.index), sub
            assert set(sub.links) <= set(LINKS) and not set(sub.links) & set(sub.stages), sub
            has = set(sub.stages) | set(sub.links) | ({"agent-sft", "agent-cql"} if "agent" in sub.links else set())
            assert "cpt" in has and "report" in has and "pretrain-target" in has, sub
            if sub.name != "main":
                assert "prepare" not in has, sub  # one prepared data folder, made by main
            for p in sub.policies:
                if p.startswith("agent-"):
                    assert p in has, (sub, p)
                if p.startswith(("replay", "regmix")) or {"agent-sft", "agent-cql", "sample"} & set(sub.stages):
                    assert "sweep" in has, (sub, p)
        assert {s.name for s in runs if "rescore" in s.stages} == {"main", "wide-sweep"}
        # the pre-registered protocol is main's: the gate before any agent, the proxies after the CPT runs
        assert [s.name for s in runs if s.protocol] == ["main"]
        st = runs[0].stages
        assert st.index("sweep") < st.index("gate") < st.index("agent-sft") < st.index("cpt") < st.index("proxy-policies")
        assert [s.space for s in runs if s.space != "full"] == ["source-subset", "split"] * 2
        names = {s.name for s in runs}
        assert all(src in names for s in runs for _, src in s.link_from)
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        SubRun("x", "main", "X", (), (), (), ("train",))
    with pytest.raises(ValueError, match="unknown link 'cpt'"):
        SubRun("x", "main", "X", (), (), (), ("cpt",), ("cpt",))
    with pytest.raises(ValueError, match="unknown link_from link 'agent'"):
        SubRun("x", "gen", "X", (), (), (), ("cpt",), ("sweep",), link_from=(("agent", "main"),))


class _FakeRun:
    """A RunDir whose is-done checks answer from a set of names."""

    def __init__(self, root, done, agent_seeds=(0,)):
        self.root, self.cfg, self.done = root, SimpleNamespace(root=root, agent=SimpleNamespace(seeds=agent_seeds)), set(done)

    def prepared(self):
        return "prepare" in self.done

    def pretrained(self, which):
        return f"pretrain-{which}" in self.done

    def sampled(self):
        return "sample" in self.done

    def swept(self):
        return "sweep" in self.done

    def agent_trained(self, stage, agent_seed=0):
        return f"agent-{stage}" in self.done or f"trained-{stage}" in self.done

    def agent_exported(self, stage, agent_seed=0):
        return f"agent-{stage}" in self.done

    def cpt_done(self, policy, seed):
        return f"cpt {policy} {seed}" in self.done

    def report_fresh(self):
        return "report" in self.done

    def pretrain(self, which):
        return self.root / f"pretrain-{which}"

    @property
    def sweep(self):
        return self.root / "sweep"

    @property
    def agent(self):
        return self.root / "agent"

    def agent_stage(self, stage, agent_seed=0):
        return self.agent / (f"seed{agent_seed}" if agent_seed else "") / stage


def test_runner_runs_the_declared_stages_that_are_not_done(tmp_path, monkeypatch):
    from dma_jax.study import QUICK, SubRun
    from dma_jax.study import run as study_run

    calls = []
    record = lambda name: lambda cfg, *args, **kw: calls.append((name, cfg.root.name, *args, kw)) or f"{name} ok"
    monkeypatch.setattr(study_run, "pipeline", SimpleNamespace(
        **{k: record(k) for k in ("prepare", "pretrain", "sample", "sweep", "train_agent", "cpt", "report")}))
    main = _FakeRun(tmp_path / "main", ())
    for path in (main.pretrain("target"), main.agent_stage("sft")):
        path.mkdir(parents=True)
    sub = SubRun("x", "ablation", "X", (), ("p", "q"), (0,),
                 ("prepare", "pretrain-proxy", "sample", "sweep", "agent-cql", "cpt", "report"),
                 ("pretrain-target", "agent-sft"))
    run = _FakeRun(tmp_path / "x", {"prepare", "sample", "trained-cql", "cpt p 0"})
    printed = []
    study_run.run_sub(study_run.SubRunContext(sub, run, main, QUICK, False), echo=printed.append)
    assert calls == [("pretrain", "x", "proxy", False, {}), ("sweep", "x", False, {}),
                     ("train_agent", "x", "cql", False, 0, {}),  # trained, not exported: train (resumes) + export
                     ("cpt", "x", "q", 0, False, {"space": None}), ("report", "x", {"title": "study x: X"})]
    assert printed == ["  pretrain ok", "  sweep ok", "  train_agent ok", "  cpt ok", "  report ok"]
    # main's outputs are relative symlinks at the same place, so a moved study folder still works
    assert os.readlink(run.pretrain("target")) == os.path.join("..", "main", "pretrain-target")
    assert os.readlink(run.agent_stage("sft")) == os.path.join("..", "..", "main", "agent", "sft")
    assert run.agent_stage("sft").resolve() == main.agent_stage("sft").resolve()
    # with several agent seeds, each seed's SFT actor is linked (the CQL of that seed starts from it)
    main2, run2 = _FakeRun(tmp_path / "main2", (), (0, 2)), _FakeRun(tmp_path / "x2", {"prepare"}, (0, 2))
    for path in (main2.pretrain("target"), main2.agent_stage("sft"), main2.agent_stage("sft", 2)):
        path.mkdir(parents=True)
    study_run.link_shared(study_run.SubRunContext(sub, run2, main2, QUICK, False))
    assert os.readlink(run2.agent_stage("sft", 2)) == os.path.join("..", "..", "..", "main2", "agent", "seed2", "sft")
    # all done: nothing runs, the links stay
    calls.clear()
    done = _FakeRun(run.root, {"prepare", "pretrain-proxy", "sample", "sweep", "agent-cql", "cpt p 0", "cpt q 0",
                               "report"})
    study_run.run_sub(study_run.SubRunContext(sub, done, main, QUICK, False), echo=printed.append)
    assert calls == []
    # a folder that is not main's link is never replaced
    other = _FakeRun(tmp_path / "y", ())
    other.pretrain("target").mkdir(parents=True)
    with pytest.raises(DmaError, match="is not a link to"):
        study_run.run_sub(study_run.SubRunContext(sub, other, main, QUICK, False), echo=printed.append)


def test_links_from_another_sub_run(tmp_path):
    """`link_from`: a link read from another sub-run than main (the follow-up's agents, gen-large's target)."""
    from dma_jax.study import QUICK, SubRun
    from dma_jax.study import run as study_run

    main, chosen, large = (_FakeRun(tmp_path / n, ()) for n in ("main", "cql-chosen", "gen-large"))
    for path in (main.pretrain("target"), main.pretrain("proxy"), chosen.agent, large.pretrain("target")):
        path.mkdir(parents=True)
    sub = SubRun("again", "gen-followup", "X", (), ("agent-cql",), (0,), ("cpt",), ("pretrain-target", "agent"),
                 link_from=(("agent", "cql-chosen"), ("pretrain-target", "gen-large")), compare_with="gen-large")
    run = _FakeRun(tmp_path / "again", ())
    dirs = {"main": main, "cql-chosen": chosen, "gen-large": large}
    study_run.link_shared(study_run.SubRunContext(sub, run, main, QUICK, False, dirs))
    assert run.agent.resolve() == chosen.agent.resolve() and os.readlink(run.agent) == os.path.join("..", "cql-chosen", "agent")
    assert run.pretrain("target").resolve() == large.pretrain("target").resolve()
    # what the other sub-run has not made yet: an error naming it, no dangling link
    late = _FakeRun(tmp_path / "late", ())
    not_yet = SubRun("late", "gen-followup", "X", (), ("agent-cql",), (0,), ("cpt",), ("agent",),
                     link_from=(("agent", "nowhere"),))
    with pytest.raises(DmaError, match="reads agent of sub-run nowhere"):
        study_run.link_shared(study_run.SubRunContext(not_yet, late, main, QUICK, False, dirs))
    (chosen.agent).rmdir()
    with pytest.raises(DmaError, match="not there yet \\(run sub-run cql-chosen first\\)"):
        study_run.link_shared(study_run.SubRunContext(sub, late, main, QUICK, False, dirs))
    assert not late.agent.is_symlink()

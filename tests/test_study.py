"""The study (issues 10, 18): a pulse run of `dma study --quick` end to end (the runner: test_study_runner.py; the
agent-side pieces: test_study_agents.py)."""

import json
import os
import time

import jax
import numpy as np
import pytest
import scipy.stats

from dma_jax import offline_data as od


# ---------------------------------------------------------------------------------- pulse
@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    from dma_jax.cli import main
    from dma_jax.history import collect

    over = [f"run.out_dir={tmp_path}", "mesh.data=1"]
    t0 = time.perf_counter()
    assert main(["--no-progress", "study", "--quick", *over]) == 0
    first = time.perf_counter() - t0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "not run yet" not in text.lower()
    for heading in ("## Pre-registration", "## 1. Sweep and agent", "## 1a. Headroom gate",
                    "## 2. Main comparison (test seeds)", "### Verdicts", "### Size of the test", "### 2b. Wider sweep",
                    "### 2c. Re-scored", "### 2d. Follow-up", "(a) code target field", "(b') more domains", "(c) larger target", "## 4. Ablations",
                    "## 5. Proxy fidelity", "## 6. Reading", "paired t 95% CI"):
        assert heading in text
    for png in ("main/report/scores.png", "main/report/mixtures.png", "gen-code/report/scores.png",
                "fidelity/fidelity.png", "main/headroom/response.png", "main/protocol/q_vs_share.png"):
        assert (tmp_path / png).is_file() and f"]({png})" in text
    # The pre-registration was frozen, and names the quick plan's seeds.
    frozen = json.loads((tmp_path / "preregistration.json").read_text())["study"]
    assert frozen["tuning_seeds"] == [0, 1] and frozen["test_seeds"] == [2, 3] and frozen["agent_seeds"] == [0, 1]
    # The numbers of section 2, recomputed from the raw history.json and result.json files (not through dma_jax).
    ret = {}
    for p in tmp_path.glob("main/cpt/*/seed*/history.json"):
        d = json.loads(p.read_text())
        ret[(d["policy"].split("@")[0], d["seed"])] = d["balanced"][-1] - d["balanced"][0]
    # agent seeds cycle: the second seed of each list (1: tuning, 3: test) used agent seed 1
    assert {p.name for p in tmp_path.glob("main/cpt/agent-cql@1/seed*")} == {"seed1", "seed3"}
    assert (tmp_path / "main/agent/seed1/export-cql/agent_spec.json").is_file()
    probe = json.loads((tmp_path / "main/protocol/q_vs_share.json").read_text())
    assert set(probe) == {"agent seed 0", "agent seed 1"} and probe["agent seed 0"] != probe["agent seed 1"]
    assert "- agent seed 1: Q peaks at target share" in text
    learned = max(("regmix", "replay-best"), key=lambda b: np.mean([ret[(b, s)] for s in (0, 1)]))
    d = np.array([ret[("agent-cql", s)] - ret[(learned, s)] for s in (2, 3)])
    lo, hi = scipy.stats.t.interval(0.95, 1, loc=d.mean(), scale=scipy.stats.sem(d))
    assert f"target agent-cql − {learned}: {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}], p = " in text
    proxy = {}
    for s in (0, 1, 2, 3):
        doc = json.loads((tmp_path / f"main/protocol/proxy/policies/seed{s}/result.json").read_text())
        proxy |= {(n.split("@")[0], s): r for n, r in zip(doc["policies"], doc["returns"])}
    learned_p = max(("regmix", "replay-best"), key=lambda b: np.mean([proxy[(b, s)] for s in (0, 1)]))
    main_proxy = proxy
    d = np.array([proxy[("agent-cql", s)] - proxy[(learned_p, s)] for s in (2, 3)])
    lo, hi = scipy.stats.t.interval(0.95, 1, loc=d.mean(), scale=scipy.stats.sem(d))
    assert f"proxies agent-cql − {learned_p}: {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}], p = " in text
    # the gate: H on the test seeds of the two policies chosen on the tuning seeds
    gate = json.loads((tmp_path / "main/protocol/gate.json").read_text())
    fixed, alt = gate["target"]["policies"]
    h = np.array([ret[(alt, s)] - ret[(fixed, s)] for s in (2, 3)])
    assert gate["target"]["H"] == pytest.approx(h.mean(), abs=1e-12)
    assert gate["target"]["H_se"] == pytest.approx(scipy.stats.sem(h), rel=1e-9)
    assert ("gate passed" if gate["passed"] else "gate FAILED") in text
    rescored = [json.loads(p.read_text())["balanced"] for p in tmp_path.glob("main/cpt/agent-cql*/seed[23]/rescore-8x4.json")]
    section = text.split("### 2c.")[1].split("## 3.")[0]
    assert f" | {np.mean(rescored):.4f} ± {np.std(rescored, ddof=1):.4f} |\n" in section.split("| agent-cql | 2 |")[1]
    # the two-level bootstrap's point estimate is the re-scored difference of the raw rescore files
    two = text.split("### Two-level bootstrap (target, re-scored)")[1].split("### ")[0]
    bal = {}
    for p in tmp_path.glob("main/cpt/agent-*/seed[23]/rescore-8x4.json"):
        doc = json.loads(p.read_text())
        bal[(doc["policy"].split("@")[0], doc["seed"])] = doc["balanced"]
    got = float(two.split("- agent-cql − agent-sft: two-level bootstrap ")[1].split(" ")[0])
    assert got == pytest.approx(np.mean([bal[("agent-cql", s)] - bal[("agent-sft", s)] for s in (2, 3)]), abs=2e-4)
    # 5: Spearman's rho of the proxies' and the target's final balanced scores, by scipy
    meta = json.loads((tmp_path / "fidelity" / "sweep" / "offline" / "meta.json").read_text())
    proxy = od.load(tmp_path / "fidelity" / "sweep" / "offline").returns + 1.0
    target = [json.loads((tmp_path / "fidelity" / "cpt" / f"replay-{k}" / "seed0" / "history.json").read_text())
              ["balanced"][-1] for k in range(len(proxy))]
    rho = scipy.stats.spearmanr(proxy, target).statistic
    assert len(proxy) == 4 and meta["fields"] and f"Spearman ρ = {rho:+.3f} between proxy and target" in text
    # 2b: the wider sweep drifts further toward the target field, and its agent learned from it, not from main's.
    shares = {}
    for name in ("main", "wide-sweep"):
        ds = od.load(tmp_path / name / "sweep" / "offline")
        shares[name] = ds.actions[:, -1, [f == "math" for f in ds.meta["domain_fields"]]].sum(-1).mean()
        spec = json.loads((tmp_path / name / "agent" / "export-cql" / "agent_spec.json").read_text())
        assert spec["trained_on"]["dataset_sha256"] == ds.meta["data_sha256"]
    assert shares["wide-sweep"] > shares["main"] + 0.05, shares
    # 2c: every main and wide-sweep run was re-scored (each file equal to its run's own re-evaluation: test_cpt.py).
    # main: its test runs only (2 seeds x the 2 agents, the chosen learned baseline, the gate's two policies, the
    # best hand schedule and source-only, some of which may coincide)
    tested = {p.parent.parent.name.split("@")[0] for p in tmp_path.glob("main/cpt/*/seed[23]/history.json")}
    assert 5 <= len(tested) <= 7 and "agent-cql" in tested
    assert len(list(tmp_path.glob("main/cpt/*/seed*/rescore-8x4.json"))) == 2 * len(tested)
    assert len(list(tmp_path.glob("wide-sweep/cpt/*/seed*/rescore-8x4.json"))) == 2
    # 3a/3b: the math-trained agent ran on another target field and on fewer domains.
    # 3: every generalisation run's mixture concentration, recomputed from the raw history.json files
    w = [np.array(json.loads(p.read_text())["weights"]) for p in tmp_path.glob("gen-code/cpt/agent-cql*/seed*/history.json")]
    largest = np.mean([x.max(-1) for x in w], 0).max()
    entropy = np.mean([-(x * np.log(np.where(x > 0, x, 1.0))).sum(-1) for x in w], 0).min()
    gen_code = text.split("(a) code target field")[1].split("### ")[0]
    assert f"| agent-cql | {largest:.3f} | {entropy:.3f} |" in gen_code
    code = collect(tmp_path / "gen-code" / "cpt")
    assert {r.target_field for r in code} == {"code"} and {"agent-cql", "fixed-0.3"} <= {r.policy for r in code}
    main_d = len(collect(tmp_path / "main" / "cpt")[0].domain_names)
    assert len(collect(tmp_path / "gen-domains" / "cpt")[0].domain_names) < main_d
    more = collect(tmp_path / "gen-more-domains" / "cpt")  # 3b': every main domain cut in two, the same agent
    assert [n.rsplit(".", 1)[0] for n in more[0].domain_names] == [n for n in collect(
        tmp_path / "main" / "cpt")[0].domain_names for _ in range(2)]
    assert {r.policy.split("@")[0] for r in more} == {"agent-cql", "fixed-0.3"}
    # side runs pair agent seeds with seeds as main does: the second side seed (1) used agent seed 1 everywhere
    for sub in ("gen-code", "gen-domains", "gen-more-domains", "gen-large", "no-feedback", "cql-alpha-0"):
        assert (tmp_path / sub / "cpt" / "agent-cql@1" / "seed1" / "history.json").is_file(), sub
    assert (tmp_path / "no-feedback/agent/seed1/export-cql/agent_spec.json").is_file()
    # 4: Δ against main's agent on the same (tuning) seeds, recomputed from the raw history files
    final = lambda sub, s: json.loads(next((tmp_path / sub / "cpt").glob(f"agent-cql*/seed{s}/history.json"))  # noqa: E731
                                      .read_text())["balanced"][-1]
    delta = np.mean([final("no-feedback", s) - final("main", s) for s in (0, 1)])
    row = next(line for line in text.split("## 4. Ablations")[1].splitlines() if line.startswith("| no feedback"))
    assert row.split(" | ")[-1].startswith(f"{delta:+.4f} ["), row
    # 4: the no-feedback agent was exported with its mask.
    spec = json.loads((tmp_path / "no-feedback" / "agent" / "export-cql" / "agent_spec.json").read_text())
    assert spec["feature_stats"]["feedback_masked"] is True and spec["model"]["use_feedback"] is False
    # 5: the fidelity CPT replayed the proxies' mixtures.
    fid = collect(tmp_path / "fidelity" / "cpt")
    traj = np.load(tmp_path / "fidelity" / "sweep" / "trajectories.npz")["weights_NxTxD"]
    r1 = next(r for r in fid if r.policy == "replay-1")
    np.testing.assert_allclose(r1.weights_TxD, traj[1], atol=1e-6)
    # 2d: the follow-up's alpha is the best mean tuning return of agent-cql over main's alpha and the ablation's
    choice = json.loads((tmp_path / "cql-choice.json").read_text())
    cfg_alpha = choice["main_alpha"]
    tuned = {cfg_alpha: np.mean([ret[("agent-cql", s)] for s in (0, 1)]),
             0.0: np.mean([final("cql-alpha-0", s) - json.loads(next((tmp_path / "cql-alpha-0" / "cpt").glob(
                 f"agent-cql*/seed{s}/history.json")).read_text())["balanced"][0] for s in (0, 1)])}
    assert choice["alpha"] == max(tuned, key=tuned.get)
    follow = {}
    for p in tmp_path.glob("cql-chosen/cpt/agent-cql*/seed*/history.json"):
        d = json.loads(p.read_text())
        follow[d["seed"]] = d["balanced"][-1] - d["balanced"][0]
    assert sorted(follow) == [2, 3] and (tmp_path / "cql-chosen/cpt/agent-cql@1/seed3/history.json").is_file()
    if choice["alpha"] == cfg_alpha:  # the same recipe and seeds: the same agents and CPT runs as main's
        for s in (2, 3):
            assert follow[s] == pytest.approx(ret[("agent-cql", s)], abs=1e-12)
    d = np.array([follow[s] - ret[(learned, s)] for s in (2, 3)])
    lo, hi = scipy.stats.t.interval(0.95, 1, loc=d.mean(), scale=scipy.stats.sem(d))
    followup = text.split("### 2d.")[1].split("## 3.")[0]
    assert f"- target, − {learned}: {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] (p = " in followup
    fp = {s: json.loads((tmp_path / f"cql-chosen/protocol/proxy/policies/seed{s}/result.json").read_text())
          for s in (2, 3)}
    assert [fp[s]["policies"] for s in (2, 3)] == [["agent-cql", learned_p], ["agent-cql@1", learned_p]]
    for s in (2, 3):  # the learned baseline re-run beside it: main's numbers (another batch of rows, same data)
        assert fp[s]["returns"][1] == pytest.approx(main_proxy[(learned_p, s)], abs=1e-4)
    # 3 again with the follow-up's agents: linked from cql-chosen (gen-large's larger target from gen-large), on each
    # generalisation run's seeds and space, paired with that run's best baseline (recomputed from the raw files)
    real = lambda p: os.path.realpath(tmp_path / p)  # noqa: E731
    assert real("cql-chosen-gen-more-domains/agent") == real("cql-chosen/agent")
    assert real("cql-chosen-gen-large/pretrain-target") == real("gen-large/pretrain-target")

    def finals(sub):
        return {(d["policy"].split("@")[0], d["seed"]): d["balanced"][-1] for d in (
            json.loads(p.read_text()) for p in (tmp_path / sub / "cpt").glob("*/seed*/history.json"))}

    mine, theirs = finals("cql-chosen-gen-more-domains"), finals("gen-more-domains")
    assert sorted(mine) == [("agent-cql", 0), ("agent-cql", 1)]
    assert len(collect(tmp_path / "cql-chosen-gen-more-domains" / "cpt")[0].domain_names) == 2 * main_d
    d = np.array([mine[("agent-cql", s)] - theirs[("fixed-0.3", s)] for s in (0, 1)])
    lo, hi = scipy.stats.t.interval(0.95, 1, loc=d.mean(), scale=scipy.stats.sem(d))
    again = text.split("#### (b') more domains")[1].split("###")[0]
    assert (f"agent-cql (chosen alpha {choice['alpha']:g}) − fixed-0.3: {d.mean():+.4f} (paired t 95% CI [{lo:+.4f}, "
            f"{hi:+.4f}]") in again
    assert f"| agent-cql (main's alpha {cfg_alpha:g}) | 2 |" in again
    if choice["alpha"] == cfg_alpha:  # the same recipe retrained: the same agents, so the same CPT runs
        assert all(mine[("agent-cql", s)] == theirs[("agent-cql", s)] for s in (0, 1))  # main's agent on the same seeds, beside it
    # Reproducing: every sub-run's environment in study.json; the digests of the offline data and of each exported
    # actor, recomputed from the raw files (np.load and Orbax through tests/golden.py, not through dma_jax).
    from tests.golden import _arrays_digest, _orbax_arrays

    envs = json.loads((tmp_path / "study.json").read_text())["environments"]
    assert {"main", "gen-code", "fidelity", "cql-chosen"} <= set(envs)
    assert envs["main"] == [dict(envs["main"][0], devices=len(jax.devices()))]
    repro = text.split("## Reproducing this run")[1]
    with np.load(tmp_path / "main/sweep/offline/data.npz", allow_pickle=False) as z:
        assert f"| main: offline data | `{_arrays_digest({k: z[k] for k in z.files})[:16]}` |" in repro
    ckpt = tmp_path / "no-feedback/agent/seed1/export-cql/checkpoint"
    step = max((p for p in ckpt.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    actor = _arrays_digest({k.replace("'", ""): v for k, v in _orbax_arrays(step / "state").items()})
    assert f"| no-feedback: cql agent seed 1 | `{actor[:16]}` |" in repro
    assert "| gen-code: " not in repro  # it links to main's agents: no artefact of its own
    if choice["alpha"] == cfg_alpha:  # the same recipe retrained: the same bits
        rows = dict(line.split(" | ")[:2] for line in repro.splitlines() if line.startswith("| ") and ": " in line)
        assert rows["| cql-chosen: cql agent seed 1"] == rows["| main: cql agent seed 1"]
    # Resumable: re-running a finished sub-run redoes nothing (no file of it is rewritten) and gives the same tables.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "main").rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    assert main(["--no-progress", "study", "--quick", "--only", "main", *over]) == 0
    assert time.perf_counter() - t0 < first / 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = (tmp_path / "RESULTS.md").read_text()
    assert again.split("## 1.")[1] == text.split("## 1.")[1]
    # --report-only: no sub-run runs (no file is written but the report's own: RESULTS.md and the fidelity plot),
    # the same report again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")
              if p.is_file() and p.name not in ("RESULTS.md", "fidelity.png")}
    assert main(["--no-progress", "study", "--quick", "--report-only", *over]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (tmp_path / "RESULTS.md").read_text().split("## 1.")[1] == text.split("## 1.")[1]

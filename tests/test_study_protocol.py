"""The study's protocol (issue 18): the pre-registration, agent seeds over CPT seeds, the gate's H, the choice on
tuning seeds, the verdict rules and the test's size, each checked against an independent computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from dma_jax.config import StudyConfig, dump_config, load_config
from dma_jax.errors import DmaError
from dma_jax.study import STUDY_CONFIG, protocol, verdicts
from dma_jax.study.stats import min_detectable_effect
from tests.paths import DEMO


def test_the_study_config_states_the_preregistration():
    cfg = load_config(STUDY_CONFIG)
    st = cfg.study
    assert len(st.test_seeds) >= 12 and len(st.proxy_test_seeds) >= 16 and len(st.agent_seeds) >= 4
    assert not set(st.tuning_seeds) & (set(st.test_seeds) | set(st.proxy_test_seeds))
    assert "regmix" in st.learned_baselines and st.min_headroom_se == 5.0 and st.gate == "enforce"
    # the section is left out of every other config's dump (their run folders and hashes stay as they were)
    assert "study" not in dump_config(load_config(DEMO))
    assert dump_config(load_config(DEMO, ["study.fail_fraction=0.5"]))["study"]["fail_fraction"] == 0.5


@pytest.mark.parametrize("override, message", [
    ("study.test_seeds=[3, 100]", "study: test_seeds: seed 3 is also a tuning seed"),
    ("study.agent_seeds=[1, 1]", "study: agent_seeds: must be a non-empty list without repeats"),
    ("study.proxy_test_seeds=[100]", "at least 2 seeds"),
    ("study.anchors=[agent-sft]", "agent-sft is an agent"),
    ("study.gate=maybe", "study.gate"),
])
def test_bad_preregistration_is_one_line(override, message):
    with pytest.raises(DmaError, match=message.replace("[", r"\[")) as e:
        load_config(STUDY_CONFIG, [override])
    assert "\n" not in str(e.value) and "study.yaml" in str(e.value)


def test_agent_seeds_cycle_over_cpt_seeds():
    cfg = load_config(DEMO, ["study.agent_seeds=[0, 5, 2]"])
    seeds = [10, 11, 12, 13, 14]
    assert [protocol.agent_seed_for(cfg, seeds, s) for s in seeds] == [0, 5, 2, 0, 5]
    assert protocol.agent_pairs(cfg, seeds[:4]) == [
        ("agent-sft", 10), ("agent-sft@5", 11), ("agent-sft@2", 12), ("agent-sft", 13),
        ("agent-cql", 10), ("agent-cql@5", 11), ("agent-cql@2", 12), ("agent-cql", 13)]
    assert [protocol.generic(p) for p in ("agent-cql@5", "agent-sft", "regmix", "fixed-0.5")] == [
        "agent-cql", "agent-sft", "regmix", "fixed-0.5"]


def test_freeze_writes_once_and_refuses_a_changed_preregistration(tmp_path):
    cfg = load_config(DEMO)
    assert protocol.freeze(tmp_path, cfg, write=False) is None and not (tmp_path / protocol.PREREG_FILE).exists()
    doc = protocol.freeze(tmp_path, cfg, write=True)
    assert json.loads((tmp_path / protocol.PREREG_FILE).read_text()) == doc
    assert doc["study"] == StudyConfig().model_dump(mode="json")
    assert protocol.freeze(tmp_path, cfg, write=False) == doc
    changed = load_config(DEMO, ["study.fail_fraction=0.5", "study.test_seeds=[7, 8]"])
    with pytest.raises(DmaError, match=r"differs .*study.fail_fraction, study.test_seeds\); restore it"):
        protocol.freeze(tmp_path, changed, write=True)


def test_gate_h_is_the_paired_mean_over_its_standard_error():
    d = [0.011, 0.004, 0.015, 0.009, -0.002, 0.012]
    doc = protocol.paired_h(d, 5.0)
    assert doc["H"] == pytest.approx(np.mean(d), abs=1e-15)
    assert doc["H_se"] == pytest.approx(scipy.stats.sem(d), rel=1e-12)
    assert doc["H_over_se"] == pytest.approx(scipy.stats.ttest_1samp(d, 0.0).statistic, rel=1e-12)
    assert doc["passed"] is False  # t = 3.4
    assert protocol.paired_h([0.010, 0.011, 0.0105, 0.0102], 5.0)["passed"] is True
    one = protocol.paired_h([0.01], 5.0)
    assert math.isnan(one["H_se"]) and one["passed"] is False
    # every seed the same difference: an exact zero SE and no ratio, whatever float rounding does to np.std
    # (1.96e-17 for [0.2] * 3, exactly 0 for [0.25] * 3): the gate does not pass a degenerate sample either way
    for value in (0.2, 0.25, 0.1):
        flat = protocol.paired_h([value] * 3, 5.0)
        assert flat["H_se"] == 0.0 and math.isnan(flat["H_over_se"]) and flat["passed"] is False


def test_rules_on_one_common_seed_are_not_applicable():
    # one seed gives no interval (NaN bounds): "not applicable", never "does not hold" or "holds"
    cfg = load_config(DEMO)
    gate = {"target": {"H": 0.01}, "proxy": {"H": 0.02}}
    one = {"agent-cql": {0: 0.05}, "agent-sft": {0: 0.0}, "regmix": {0: 0.0}}
    assert [r["holds"] for r in verdicts.rules(cfg, gate, one, one, "regmix", "regmix")] == [None, None, None]


def test_needed_seeds_is_the_first_n_whose_mde_fits():
    for sd, effect in ((0.0083, 0.0025), (0.02, 0.01), (0.001, 0.05)):
        n = verdicts.needed_seeds(sd, effect)
        assert min_detectable_effect(sd, n) <= effect
        assert n == 2 or min_detectable_effect(sd, n - 1) > effect
    assert verdicts.needed_seeds(0.01, -0.001) is None


def _scores(rng, means: dict, seeds, sd=0.004):
    return {p: {s: m + rng.normal(0, sd) for s in seeds} for p, m in means.items()}


def _upper(a: dict, b: dict) -> tuple[float, float]:
    d = np.array([a[s] - b[s] for s in sorted(a)])
    lo, hi = scipy.stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=scipy.stats.sem(d))
    return lo, hi


@pytest.mark.parametrize("case", ["agent-loses", "agent-wins-both", "wins-proxies-only"])
def test_rules_follow_their_definitions(case):
    rng = np.random.default_rng({"agent-loses": 0, "agent-wins-both": 1, "wins-proxies-only": 2}[case])
    cfg = load_config(DEMO)
    gate = {"target": {"H": 0.01}, "proxy": {"H": 0.02}}
    cql_p, cql_t = {"agent-loses": (0.0, 0.0), "agent-wins-both": (0.03, 0.03),
                    "wins-proxies-only": (0.03, 0.0)}[case]
    proxy = _scores(rng, {"agent-cql": cql_p, "agent-sft": 0.0, "regmix": 0.0, "replay-best": -0.01}, range(16))
    target = _scores(rng, {"agent-cql": cql_t, "agent-sft": 0.0, "regmix": 0.0}, range(12))
    rules = verdicts.rules(cfg, gate, target, proxy, "regmix", "regmix")
    lo_p, hi_p = _upper(proxy["agent-cql"], proxy["regmix"])
    lo_t, _ = _upper(target["agent-cql"], target["regmix"])
    _, hi_c = _upper(target["agent-cql"], target["agent-sft"])
    assert rules[0]["holds"] == (hi_p < 0.25 * 0.02)
    assert rules[0]["comparison"]["hi"] == pytest.approx(hi_p, rel=1e-9)
    assert rules[1]["holds"] == (None if lo_p <= 0 else not lo_t > 0)
    assert rules[2]["holds"] == (hi_c < 0.1 * 0.01)
    if case == "agent-wins-both":
        assert [r["holds"] for r in rules] == [False, False, False]
    if case == "wins-proxies-only":
        assert [r["holds"] for r in rules][:2] == [False, True]
    if case == "agent-loses":
        assert rules[1]["holds"] is None


def test_the_learned_comparator_is_chosen_on_tuning_scores():
    scores = {"regmix": {0: 0.10, 1: 0.12}, "replay-best": {0: 0.13, 1: 0.08}, "agent-cql": {0: 0.5, 1: 0.5}}
    assert protocol.choose_learned(scores, ["regmix", "replay-best"]) == "regmix"  # 0.110 > 0.105
    assert protocol.choose_learned(scores, ["replay-best"]) == "replay-best"


def test_results_md_states_the_same_preregistration_as_the_config():
    from tests.paths import REPO

    st = load_config(STUDY_CONFIG).study
    text = (REPO / "RESULTS.md").read_text().split("## Study v2: pre-registration")[1].split("\n## ")[0]
    span = lambda s: f"{min(s)}-{max(s)}"  # noqa: E731
    assert list(st.test_seeds) == list(range(min(st.test_seeds), max(st.test_seeds) + 1))
    for phrase in (f"Tuning seeds {span(st.tuning_seeds)}", f"{len(st.test_seeds)} fresh target CPT seeds "
                   f"({span(st.test_seeds)})", f"{len(st.proxy_test_seeds)} proxy seeds ({span(st.proxy_test_seeds)})",
                   f"{len(st.agent_seeds)} agent-training seeds", f"i mod {len(st.agent_seeds)}",
                   f"below {st.min_headroom_se:g} standard errors", f"U < {st.fail_fraction:g} H on the proxies",
                   f"U < {st.cql_fraction:g} H on the target",
                   "anchors " + ", ".join(st.anchors) if st.anchors else "no anchors on the test seeds",
                   f"alpha = {load_config(STUDY_CONFIG).agent.cql.alpha:g}"):
        assert phrase in text, phrase


def test_mixture_concentration_and_the_collapse_flag():
    from types import SimpleNamespace

    from dma_jax.study import mixtures

    spread = np.full((3, 4), 0.25)
    peaked = np.array([[0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.91, 0.03, 0.03, 0.03]])
    names = ("a", "b", "c", "d")
    runs = [SimpleNamespace(policy="fixed-0.3", weights_TxD=spread, seed=0, domain_names=names),
            SimpleNamespace(policy="agent-cql", weights_TxD=peaked, seed=0, domain_names=names),
            SimpleNamespace(policy="agent-cql", weights_TxD=spread, seed=1, domain_names=names)]
    stats = mixtures.per_step(runs)
    np.testing.assert_allclose(stats["agent-cql"][0], [0.25, 0.475, 0.58])  # mean over the two seeds
    ent = lambda w: -(w * np.log(w)).sum()  # noqa: E731
    np.testing.assert_allclose(stats["agent-cql"][1], [(ent(p) + ent(s)) / 2 for p, s in zip(peaked, spread)])
    # 0.58 on average over the seeds, but one run of two puts 0.91 on domain "a" at step 2: flagged, per run
    text = "\n".join(mixtures.lines(runs))
    assert "| agent-cql | 0.580 | " in text and "| 0.910 (a, seed 0, step 2) | 1 of 2 |" in text
    assert "| fixed-0.3 | 0.250 | " in text and "| 0 of 1 |" in text
    assert "**agent-cql collapses onto one domain in 1 of 2 runs** (largest weight 0.910 on a, seed 0, step 2)" in text
    assert not any("collapses" in line for line in mixtures.lines([runs[0], runs[2]]))  # spread runs only
    runs.append(SimpleNamespace(policy="target-only", weights_TxD=np.tile([0.0, 0.0, 0.0, 1.0], (3, 1)), seed=0,
                                domain_names=names))
    assert "collapses" not in "\n".join(mixtures.lines(runs[:2] + runs[3:]))  # a baseline collapses too: no flag

"""The pre-registered part of RESULTS.md: the pre-registration, the headroom gate, the test-seed comparison, the
verdict per rule and the test's size (issue 18). Everything is read back from the protocol's files
(`study.protocol`): CPT histories of the main sub-run, its `gate.json` and its proxy results.

Return = final balanced score - base, the primary metric. Comparisons are paired by seed (agent seeds cycle over
the seeds, `protocol.agent_seed_for`), with the paired t 95% interval; the secondary comparisons' p-values are
Holm-corrected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dma_jax.config import Config
from dma_jax.io_utils import read_json_file
from dma_jax.runs import RunDir
from dma_jax.study import protocol, rescore, unit_bootstrap
from dma_jax.study.stats import holm, min_detectable_effect, paired_scores, t_interval
from dma_jax.study.text import AGENT

Scores = Mapping[str, Mapping[int, float]]  # {generic policy: {seed: return}}
SFT = "agent-sft"


def target_test_scores(run: RunDir, cfg: Config) -> dict[str, dict[int, float]] | None:
    pairs = protocol.test_pairs(run, cfg)
    if pairs is None or not all(run.cpt_done(p, s) for p, s in pairs):
        return None
    out: dict[str, dict[int, float]] = {}
    for p, s in pairs:
        out.setdefault(protocol.generic(p), {})[s] = protocol.final_return(run, p, s)
    return out


def needed_seeds(sd: float, effect: float, most: int = 1000) -> int | None:
    """The fewest paired seeds whose minimum detectable effect (95%, power 0.8) is at most `effect`."""
    if not (sd >= 0 and effect > 0):
        return None
    return next((n for n in range(2, most + 1) if min_detectable_effect(sd, n) <= effect), None)


def rules(cfg: Config, gate: dict, target: Scores, proxy: Scores, learned_t: str, learned_p: str) -> list[dict]:
    """Each pre-registered rule: {"rule", "holds" (True / False / None: not applicable), "why", "comparison"}."""
    st = cfg.study
    h_t, h_p = gate["target"]["H"], gate["proxy"]["H"]
    on_p = paired_scores(proxy[AGENT], proxy[learned_p], AGENT, learned_p)
    on_t = paired_scores(target[AGENT], target[learned_t], AGENT, learned_t)
    cql = paired_scores(target[AGENT], target[SFT], AGENT, SFT)
    # one common seed has no interval (NaN bounds): a rule on it is not applicable (None), not "does not hold"
    below = lambda p, bound: bool(p["hi"] < bound) if p["n"] > 1 else None  # noqa: E731
    out = [{"rule": f"The method fails at this scale: {AGENT} − best learned baseline ({learned_p}) on the proxies "
                    f"has a 95% upper bound below {st.fail_fraction:g} H (H = {h_p:+.4f}, bound {st.fail_fraction * h_p:+.4f})",
            "holds": below(on_p, st.fail_fraction * h_p), "comparison": on_p}]
    if on_p["n"] > 1 and on_p["lo"] > 0 and on_t["n"] > 1:
        transfer = {"holds": bool(not on_t["lo"] > 0), "comparison": on_t}
    else:
        transfer = {"holds": None, "comparison": on_t}
    out.append({"rule": f"Transfer fails: {AGENT} is ahead on the proxies (lower bound > 0) but not on the target "
                        f"(against {learned_t})", **transfer})
    out.append({"rule": f"CQL adds nothing: {AGENT} − {SFT} on the target has a 95% upper bound below "
                        f"{st.cql_fraction:g} H (H = {h_t:+.4f}, bound {st.cql_fraction * h_t:+.4f})",
                "holds": below(cql, st.cql_fraction * h_t), "comparison": cql})
    return out


def _ci(p: dict) -> str:
    return (f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}], p = {p['p']:.3g}, n = {p['n']}, "
            f"ahead on {p['wins']}")


def _mean(x: Mapping[int, float]) -> float:
    return sum(x.values()) / len(x)


def _pm(x: Mapping[int, float]) -> str:
    m, _, _, se = t_interval(list(x.values()))
    return f"{m:+.4f} ± {se:.4f} ({len(x)})" if math.isfinite(se) else f"{m:+.4f} ({len(x)})"


def preregistration(cfg: Config, frozen: dict | None) -> list[str]:
    st = cfg.study
    a = len(st.agent_seeds)
    return ["## Pre-registration", "",
            ("Frozen in `preregistration.json` before the first test-seed run; a changed `study` section is refused."
             if frozen else "Not frozen yet (it is written just before the first test-seed run)."), "",
            "- Primary metric: the return of a run, final balanced score − base (mean of the field scores, "
            "`eval.balanced`), paired by seed.",
            f"- Tuning seeds {list(st.tuning_seeds)}: `dma headroom` chooses the best fixed share, the best clean or "
            "scheduled policy and the best hand schedule; the learned baselines "
            f"({', '.join(st.learned_baselines)}) run there and the best is the comparator. Nothing is chosen on "
            "test seeds.",
            f"- Test seeds: {len(st.test_seeds)} on the target {list(st.test_seeds)}, {len(st.proxy_test_seeds)} on "
            f"the proxies; agents: {a} agent-training seeds {list(st.agent_seeds)}, the i-th seed of a list uses "
            f"agent seed i mod {a}, so intervals hold agent-training variance.",
            f"- Compared on the test seeds: {AGENT}, {SFT}, the chosen learned baseline, the best fixed share, the "
            f"best clean-or-scheduled policy, the best hand schedule"
            + (f", anchors {', '.join(st.anchors)}." if st.anchors else " (no anchors)."),
            f"- Gate: H (best clean or scheduled − best fixed, chosen on tuning seeds) >= {st.min_headroom_se:g} SE "
            f"on the test seeds of the target and of the proxies, else the study stops (`study.gate: {st.gate}`).",
            f"- Rules: *the method fails at this scale* if {AGENT} − best learned baseline has a 95% upper bound "
            f"below {st.fail_fraction:g} H on the proxies; *transfer fails* if it is ahead on the proxies but not "
            f"on the target; *CQL adds nothing* if {AGENT} − {SFT} has an upper bound below {st.cql_fraction:g} H.",
            ""]


def gate_section(gate: dict | None, run: RunDir, rel) -> list[str]:
    lines = ["## 1a. Headroom gate", ""]
    if gate is None:
        return lines + ["Not run yet.", ""]
    lines += [f"Tuning seeds: [headroom table]({rel(run.headroom_table)}), [response surface]"
              f"({rel(run.headroom_plot)}).", ""]
    lines += ["| side | chosen on tuning seeds (best fixed / best clean or scheduled / best hand schedule) | "
              "H on tuning seeds (biased) | H on test seeds ± SE | H / SE |", "|---|---|---:|---:|---:|"]
    for side in ("target", "proxy"):
        t, g = gate["tuning"][side], gate[side]
        lines.append(f"| {side} | {t['best_fixed']} / {t['best_alt']} / {t['best_schedule']} | {t['H']:+.4f} | "
                     f"{g['H']:+.4f} ± {g['H_se']:.4f} ({len(g['seeds'])} seeds) | {g['H_over_se']:.1f} |")
    return lines + ["", f"**{protocol.gate_line(gate)}**", ""]


def comparison(cfg: Config, gate: dict, target: Scores | None, proxy: Scores | None, learned_t: str | None,
               learned_p: str | None) -> list[str]:
    """The test-seed table, the primary and secondary comparisons, the verdicts and the test's size."""
    lines = ["## 2. Main comparison (test seeds)", ""]
    if target is None or proxy is None:
        return lines + ["Not run yet.", ""]
    names = sorted(set(target) | set(proxy), key=lambda n: -_mean(target.get(n) or proxy[n]))
    lines += ["Mean return ± SE (seeds).", "", "| policy | target | proxies |", "|---|---:|---:|"]
    lines += [f"| {n} | {_pm(target[n]) if n in target else '–'} | {_pm(proxy[n]) if n in proxy else '–'} |"
              for n in names]
    pairs = [(side, paired_scores(scores[AGENT], scores[b], AGENT, b))  # agent-cql against every other policy
             for side, scores, learned in (("target", target, learned_t), ("proxies", proxy, learned_p))
             for b in scores if b not in (AGENT, learned)]
    adj = holm([p["p"] if math.isfinite(p["p"]) else 1.0 for _, p in pairs]) if pairs else []
    lines += ["", f"Primary, paired by seed (mean [95% paired t CI]): target {AGENT} − {learned_t}: "
              f"{_ci(paired_scores(target[AGENT], target[learned_t], AGENT, learned_t))}; proxies {AGENT} − "
              f"{learned_p}: {_ci(paired_scores(proxy[AGENT], proxy[learned_p], AGENT, learned_p))}.", "",
              "Secondary (Holm-corrected p over these comparisons):", ""]
    lines += [f"- {side}: {p['a']} − {p['b']}: {_ci(p)}, Holm p = {a:.3g}" for (side, p), a in zip(pairs, adj)]
    lines += ["", "### Verdicts", ""]
    if not gate["passed"]:
        lines += ["The gate failed: the environment cannot test the claim, and the rules below are not verdicts.", ""]
    for r in rules(cfg, gate, target, proxy, learned_t, learned_p):
        state = {True: "**holds**", False: "**does not hold**", None: "not applicable"}[r["holds"]]
        lines.append(f"- {r['rule']}: {state} ({_ci(r['comparison'])}).")
    return lines + [""]


def sizing(cfg: Config, gate: dict, tuning: Scores | None, tuning_p: Scores | None, learned_t: str | None,
           learned_p: str | None) -> list[str]:
    """The paired sd on the tuning seeds and how many test seeds resolve fail_fraction * H."""
    lines = ["### Size of the test", ""]
    st = cfg.study
    for side, scores, learned, n, h in (("target", tuning, learned_t, len(st.test_seeds), gate["target"]["H"]),
                                        ("proxies", tuning_p, learned_p, len(st.proxy_test_seeds), gate["proxy"]["H"])):
        if scores is None or learned is None:
            lines.append(f"- {side}: tuning runs not done yet.")
            continue
        p = paired_scores(scores[AGENT], scores[learned], AGENT, learned)
        sd = p["se"] * math.sqrt(p["n"]) if math.isfinite(p["se"]) else math.nan
        if not math.isfinite(sd):
            lines.append(f"- {side}: one tuning seed gives no paired sd.")
            continue
        need = needed_seeds(sd, st.fail_fraction * h)
        lines.append(f"- {side}: paired sd of {AGENT} − {learned} on {p['n']} tuning seeds {sd:.4f}; with {n} test "
                     f"seeds the minimum detectable effect (95%, power 0.8) is {min_detectable_effect(sd, n):.4f} "
                     f"against {st.fail_fraction:g} H = {st.fail_fraction * h:+.4f}; seeds needed: "
                     + (str(need) if need else "more than 1000 (or H <= 0)") + ".")
    return lines + [""]


def two_level(run: RunDir, plan, target: Scores | None, learned_t: str | None) -> list[str]:
    """The target's rule comparisons again, on the re-scored final models with the two-level bootstrap (seeds,
    then items and windows: `unit_bootstrap`), beside the paired t interval of the same re-scored returns."""
    items, windows = plan.rescore_items, plan.rescore_windows
    if not items or target is None or learned_t is None:
        return []
    lines = ["### Two-level bootstrap (target, re-scored)", ""]
    docs = rescore.test_docs(run, items, windows)
    if docs is None:
        return lines + ["Not run yet (the test runs' final models are re-scored last).", ""]
    ec = run.cfg.eval
    lines += [f"The same final models re-scored on up to {items} items per field and {windows} held-out windows "
              "per domain (2c); a replicate draws the seeds, and the items of each field and the windows of each domain "
              "(once, shared by its seeds: every run was scored on the same set), with replacement (2,000 "
              "replicates); the interval is mean ± t_0.975,n−1 × SE, the SE the replicates' standard deviation × "
              "√(n/(n−1)) (a percentile interval over so few seeds would be too narrow). Mean [95% interval] of the "
              "re-scored difference:", ""]
    for a, b in ((AGENT, learned_t), (AGENT, SFT)):
        seeds = sorted(set(docs.get(a, {})) & set(docs.get(b, {})))
        if len(seeds) < 2:
            continue
        boot = unit_bootstrap.paired([docs[a][s]["units"] for s in seeds], [docs[b][s]["units"] for s in seeds],
                                     docs[a][seeds[0]]["base"], ec)
        t = paired_scores({s: docs[a][s]["balanced"] for s in seeds}, {s: docs[b][s]["balanced"] for s in seeds},
                          a, b)
        lines.append(f"- {a} − {b}: two-level bootstrap {boot['mean']:+.4f} [{boot['lo']:+.4f}, {boot['hi']:+.4f}] "
                     f"(SE {boot['se']:.4f}); paired t over seeds only {t['mean']:+.4f} [{t['lo']:+.4f}, "
                     f"{t['hi']:+.4f}] (n = {len(seeds)}).")
    return lines + [""]


def preregistration_section(view) -> list[str]:
    run = view.dirs["main"]
    return preregistration(run.cfg, protocol.freeze(view.root, run.cfg, write=False))


def sections(view) -> list[str]:
    """Sections 1a (the gate) and 2 (the test seeds, the verdicts, the test's size) from the main sub-run's
    protocol files."""
    run = view.dirs["main"]
    cfg = run.cfg
    gate = read_json_file(run.protocol_gate, "") if run.protocol_gate.is_file() else None
    lines = gate_section(gate, run, view.rel)
    if gate is None:
        return lines + ["## 2. Main comparison (test seeds)", "", "Not run yet.", ""]
    tuning = protocol.tuning_scores(run, cfg)
    tuning_p = protocol.proxy_scores(run, cfg, cfg.study.tuning_seeds)
    learned_t = protocol.choose_learned(tuning, cfg.study.learned_baselines) if tuning else None
    learned_p = protocol.choose_learned(tuning_p, cfg.study.learned_baselines) if tuning_p else None
    target = target_test_scores(run, cfg)
    proxy = protocol.proxy_scores(run, cfg, cfg.study.proxy_test_seeds)
    return (lines + comparison(cfg, gate, target, proxy, learned_t, learned_p)
            + two_level(run, view.plan, target, learned_t) + sizing(cfg, gate, tuning, tuning_p, learned_t, learned_p))

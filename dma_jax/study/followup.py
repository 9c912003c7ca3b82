"""Follow-up (issue 18.3): CQL's alpha chosen on the tuning seeds, then run on the test seeds.

The pre-registered main run fixed alpha before any study run (from the demo's exploratory runs). The issue asks
for an alpha chosen on the tuning seeds. Once main's tuning runs and every alpha ablation (`plan.cql_alphas`, run
on the tuning seeds with the same agent seeds: `protocol.side_pairs`) are done, `choose` picks the alpha with the
best mean tuning return of agent-cql (on a tie the first of main's alpha, then the ablations in plan order) and
freezes it in `<root>/cql-choice.json` before any follow-up run. The follow-up sub-run (`plan.followup_run`) then
trains CQL with that alpha (same agent seeds, main's SFT actors), runs it on main's target test seeds, and on
main's proxy test seeds beside main's chosen learned baseline (`run_proxies`). RESULTS.md section 2d
(`section`) compares it with main's runs. It is a second look at the test seeds and says so: the verdicts of
section 2 stay those of the pre-registered run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from dma_jax import proxy_runs
from dma_jax.config import Config
from dma_jax.errors import DmaError
from dma_jax.history import collect
from dma_jax.io_utils import AnyPath, atomic_write_json, read_json_file, read_jsonl
from dma_jax.runs import RunDir, agent_policy_name
from dma_jax.study import mixtures, protocol
from dma_jax.study.plan import FOLLOWUP
from dma_jax.study.stats import paired_scores, t_interval
from dma_jax.study.text import AGENT
from dma_jax.study.verdicts import target_test_scores
from dma_jax.data.domains import DomainSpace

CHOICE_FILE = "cql-choice.json"  # under the study's root
FORMAT = "dma-study-cql-choice-v1"


def alpha_runs(runs) -> list:
    """The alpha ablation sub-runs (`cql-alpha-<a>`), in plan order."""
    return [s for s in runs if s.part == "ablation" and s.name.startswith("cql-alpha-")]


def choose(root: AnyPath, dirs: Mapping[str, RunDir], runs) -> dict | None:
    """The frozen choice (module docstring): read back once written; written once every input run is done;
    None before."""
    path = root / CHOICE_FILE
    main = dirs["main"]
    subs = alpha_runs(runs)
    seeds = list(subs[0].seeds) if subs else []  # the side seeds: a prefix of the tuning seeds, same agent seeds
    if path.is_file():
        doc = read_json_file(path, "")
        if doc.get("format") != FORMAT or doc.get("seeds") != seeds:
            raise DmaError(f"{path}: made by another plan (format {doc.get('format')!r}, seeds {doc.get('seeds')}; "
                           f"this plan: {FORMAT!r}, seeds {seeds}); delete it to choose again")
        return doc
    # main's proxy runs too: the follow-up's proxies sit beside main's learned baseline chosen on them
    tuning = protocol.tuning_scores(main, main.cfg)
    if tuning is None or not subs or not protocol.proxies_done(main.cfg):
        return None
    returns = {main.cfg.agent.cql.alpha: [tuning[AGENT][s] for s in seeds]}
    for sub in subs:
        run = dirs[sub.name]
        pairs = protocol.side_pairs(run.cfg, (AGENT,), sub.seeds)
        if not all(run.cpt_done(p, s) for p, s in pairs):
            return None
        returns[run.cfg.agent.cql.alpha] = [protocol.final_return(run, p, s) for p, s in pairs]
    alpha = max(returns, key=lambda a: float(np.mean(returns[a])))  # max keeps the first of equal means
    doc = {"format": FORMAT, "alpha": alpha, "main_alpha": main.cfg.agent.cql.alpha, "seeds": seeds,
           "returns": {repr(a): r for a, r in returns.items()},
           "rule": f"the alpha of the best mean {AGENT} return on the tuning seeds (main's tuning runs and the "
                   "alpha ablations)"}
    atomic_write_json(path, doc)
    return doc


# ---------------------------------------------------------------------------------- proxies
def learned_on_proxies(main: RunDir) -> str | None:
    """Main's learned baseline chosen on the proxies' tuning seeds (`protocol.choose_learned`)."""
    cfg = main.cfg
    scores = protocol.proxy_scores(main, cfg, cfg.study.tuning_seeds)
    return protocol.choose_learned(scores, cfg.study.learned_baselines) if scores else None


def proxy_names(cfg: Config, seed: int, learned: str) -> list[str]:
    """One proxy test seed's rows: the follow-up's CQL agent of the seed's agent seed, and main's learned
    baseline (every row of a proxy seed reads the same data, so the pairing does not depend on the rows)."""
    k = protocol.agent_seed_for(cfg, cfg.study.proxy_test_seeds, seed)
    return [agent_policy_name("cql", k), learned]


def proxies_done(run: RunDir) -> bool:
    return all((run.protocol_proxy("policies", s) / proxy_runs.RESULT).is_file()
               for s in run.cfg.study.proxy_test_seeds)


def run_proxies(cfg: Config, main: RunDir, progress: bool = True) -> list[str]:
    """The follow-up's agent and main's learned baseline on main's proxy test seeds; the lines to print."""
    run, learned = RunDir(cfg), learned_on_proxies(main)
    space, base = DomainSpace.for_sweep(cfg), proxy_runs.base_loader(cfg)
    lines = []
    for s in cfg.study.proxy_test_seeds:
        folder = run.protocol_proxy("policies", s)
        if (folder / proxy_runs.RESULT).is_file():
            continue
        names = proxy_names(cfg, s, learned)
        proxy_runs.run_seed(cfg, space, names, s, base, folder, progress=progress, desc="follow-up proxies")
        lines.append(f"follow-up proxies seed {s}: {', '.join(names)}")
    return lines


# ---------------------------------------------------------------------------------- RESULTS.md
def _ci(p: dict) -> str:
    return f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] (p = {p['p']:.3g}, n = {p['n']}, ahead on {p['wins']})"


def _gap(run: RunDir, seeds: Sequence[int]) -> str:
    """The last logged cql_gap of each agent seed's CQL training."""
    gaps = []
    for k in seeds:
        path = run.agent_stage("cql", k) / "metrics.jsonl"
        rows = read_jsonl(path) if path.is_file() else []
        gaps.append(f"{rows[-1]['cql_gap']:+.3g}" if rows and "cql_gap" in rows[-1] else "–")
    return " / ".join(gaps)


def section(view) -> tuple[list[str], list[str]]:
    """Section 2d: the choice, then the follow-up's agent against main's runs on the test seeds."""
    lines = ["### 2d. Follow-up: CQL alpha chosen on the tuning seeds (a second look at the test seeds)", ""]
    main = view.dirs["main"]
    path = view.root / CHOICE_FILE
    if not path.is_file():
        return lines + ["Not run yet (the choice waits for main's tuning runs and every alpha ablation).", ""], []
    doc = read_json_file(path, "")
    alphas = [float(a) for a in doc["returns"]]
    subs = {run.cfg.agent.cql.alpha: run for run in (view.dirs[s.name] for s in alpha_runs(view.runs))}
    lines += [f"Rule ({doc['rule']}), frozen in `{CHOICE_FILE}` before the follow-up's first run. The main run's "
              f"alpha {doc['main_alpha']:g} was fixed before the study from the demo; the verdicts of section 2 "
              "stay those of the pre-registered run.", "",
              f"| alpha | mean {AGENT} return on tuning seeds {doc['seeds']} ± SE | last cql_gap per agent seed |",
              "|---:|---:|---|"]
    for a in alphas:
        m, _, _, se = t_interval(doc["returns"][repr(a)])
        run = main if a == doc["main_alpha"] else subs.get(a)
        chosen = " **(chosen)**" if a == doc["alpha"] else ""
        lines.append(f"| {a:g}{chosen} | {m:+.4f} ± {se:.4f} | {_gap(run, main.cfg.agent.seeds) if run else '–'} |")
    lines.append("")
    sub = view.sub(FOLLOWUP)
    if sub is None:
        return lines + ["The tuning seeds choose main's alpha: no follow-up to run.", ""], []
    run = view.dirs[sub.name]
    cfg = main.cfg
    target_main = target_test_scores(main, cfg)
    pairs = protocol.side_pairs(run.cfg, (AGENT,), sub.seeds)
    if target_main is None or not all(run.cpt_done(p, s) for p, s in pairs) or not proxies_done(run):
        return lines + ["Follow-up not run yet.", ""], []
    mine_t = {s: protocol.final_return(run, p, s) for p, s in pairs}
    tuning = protocol.tuning_scores(main, cfg)
    learned_t = protocol.choose_learned(tuning, cfg.study.learned_baselines)
    learned_p = learned_on_proxies(main)
    mine_p, theirs_p = {}, {}
    for s in cfg.study.proxy_test_seeds:
        res = read_json_file(run.protocol_proxy("policies", s) / proxy_runs.RESULT, "")
        mine_p[s], theirs_p[s] = float(res["returns"][0]), float(res["returns"][1])
    main_p = protocol.proxy_scores(main, cfg, cfg.study.proxy_test_seeds)
    if main_p is None or learned_p is None:
        return lines + ["Main's proxy runs not done yet.", ""], []
    drift = max(abs(theirs_p[s] - main_p[learned_p][s]) for s in theirs_p)
    gate = read_json_file(main.protocol_gate, "")
    h_p, h_t = gate["proxy"]["H"], gate["target"]["H"]
    name = f"{AGENT} (alpha {doc['alpha']:g})"
    on_p = paired_scores(mine_p, theirs_p, name, learned_p)  # the baseline re-run in the same proxy batches
    on_t = paired_scores(mine_t, target_main[learned_t], name, learned_t)
    vs_main_t = paired_scores(mine_t, target_main[AGENT], name, f"{AGENT} (alpha {doc['main_alpha']:g})")
    vs_main_p = paired_scores(mine_p, main_p[AGENT], name, f"{AGENT} (alpha {doc['main_alpha']:g})")
    vs_sft = paired_scores(mine_t, target_main["agent-sft"], name, "agent-sft")
    def reads(holds: bool | None) -> str:
        return {True: "would hold", False: "would not hold", None: "is not applicable"}[holds]

    def below(p: dict, bound: float) -> bool | None:  # None: one seed gives no interval
        return bool(p["hi"] < bound) if math.isfinite(p["hi"]) else None

    fail = below(on_p, cfg.study.fail_fraction * h_p)
    transfer = (not on_t["lo"] > 0) if math.isfinite(on_p["lo"]) and on_p["lo"] > 0 else None
    lines += [f"{name} on main's test seeds (agent seed i mod {len(cfg.study.agent_seeds)} on the i-th seed, as in "
              f"main), paired by seed (mean [95% paired t CI]); on the proxies against {learned_p} re-run in the "
              "same batches, on the target against main's runs:", "",
              f"- proxies, − {learned_p}: {_ci(on_p)}; {learned_p}'s rows, re-run beside it, "
              + ("equal main's exactly." if drift == 0 else f"differ from main's by at most {drift:.2g}."),
              f"- target, − {learned_t}: {_ci(on_t)}.",
              f"- − main's {AGENT}: proxies {_ci(vs_main_p)}; target {_ci(vs_main_t)}.",
              f"- target, − agent-sft: {_ci(vs_sft)}.",
              f"- The pre-registered rules read on it (not a verdict: a second look): *the method fails at this "
              f"scale* (upper bound on the proxies below {cfg.study.fail_fraction:g} H = "
              f"{cfg.study.fail_fraction * h_p:+.4f}) {reads(fail)}; *transfer fails* (ahead on the proxies, not "
              f"on the target) {reads(transfer)}; *CQL adds nothing* (upper bound below {cfg.study.cql_fraction:g} "
              f"H = {cfg.study.cql_fraction * h_t:+.4f}) {reads(below(vs_sft, cfg.study.cql_fraction * h_t))}.", ""]
    agents = [dataclasses.replace(r, policy=r.policy.split("@")[0]) for r in collect(run.cpt)]  # any agent seed
    lines += ["Its target runs' mixtures, against main's agent-cql in section 2:", "", *mixtures.lines(agents)]
    if run.protocol_probe.is_file():
        lines += [f"Its critics' Q against the target share ([plot]({view.rel(run.protocol_probe.with_suffix('.png'))}),"
                  f" main's alpha: [plot]({view.rel(main.protocol_probe.with_suffix('.png'))})):", "",
                  *protocol.probe_lines(read_json_file(run.protocol_probe, "")), ""]
    reading = [f"- Follow-up (alpha {doc['alpha']:g} chosen on the tuning seeds, a second look at the test seeds): "
               f"proxies − {learned_p} {on_p['mean']:+.4f} [{on_p['lo']:+.4f}, {on_p['hi']:+.4f}], target − "
               f"{learned_t} {on_t['mean']:+.4f} [{on_t['lo']:+.4f}, {on_t['hi']:+.4f}]."]
    return lines, reading


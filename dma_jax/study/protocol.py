"""The study's protocol (issue 18): the pre-registration, the headroom gate, and which runs are tuning and test.

Order, in the main sub-run (`plan.sub_runs`, `run.STEPS`):
1. `freeze`: the `study` section of the config is written to `<root>/preregistration.json` before the first test
   run; a later invocation with another `study` section is refused (a new study folder starts a new study).
2. `run_gate`: `dma headroom` on the tuning seeds (target CPT and proxies) chooses the best size-spread fixed share,
   the best clean-or-scheduled policy and the best hand schedule (a ramp); the first two are then run on the test
   seeds (target) and the proxy test seeds (proxies, open loop), and H = their paired difference there. The gate
   passes when H >= `study.min_headroom_se` standard errors on both sides; `gate.json` holds it all.
3. The agents (`agent.seeds` = `study.agent_seeds`), then `cpt_pairs`: the learned baselines and the agents on the
   tuning seeds, and, once those are done, the comparators chosen there (`choose_learned`), the gate's policies,
   the best hand schedule, the anchors and the agents on the test seeds. On the i-th seed of a list the agent is
   the one of agent seed `agent_seeds[i % len(agent_seeds)]` (`agent_pairs`), so agent-training variance is in
   every interval over seeds.
4. `run_proxy_policies`: every compared policy on the proxies (closed loop for the agents), tuning and proxy test
   seeds, one vmapped run per seed (`proxy_runs.run_seed`).
The verdicts are read from these files by `study.verdicts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dma_jax import pipeline, proxy_runs
from dma_jax.config import Config
from dma_jax.errors import DmaError
from dma_jax.headroom import is_alt, is_fixed, run_headroom
from dma_jax.history import RunHistory
from dma_jax.history import load as load_history
from dma_jax.io_utils import AnyPath, atomic_write_json, read_json_file
from dma_jax.numerics import se_of_mean
from dma_jax.runs import AGENT_STAGES, RunDir, agent_policy, agent_policy_name
from dma_jax.data.domains import DomainSpace

PREREG_FILE = "preregistration.json"  # under the study's root
FORMAT = "dma-study-protocol-v1"


class StudyStopped(DmaError):
    """The gate failed under `study.gate: enforce`: the environment cannot test the claim."""


# ---------------------------------------------------------------------------------- pre-registration
def freeze(root: AnyPath, cfg: Config, write: bool) -> dict | None:
    """The frozen pre-registration: checked against `cfg.study` when it exists; written first when `write`."""
    path = root / PREREG_FILE
    mine = cfg.study.model_dump(mode="json")
    if path.is_file():
        frozen = read_json_file(path, "")
        if frozen.get("study") != mine:
            diff = sorted(k for k in mine if frozen.get("study", {}).get(k) != mine[k])
            raise DmaError(f"{path}: the study section differs from the one frozen before the test runs "
                           f"({', '.join(f'study.{k}' for k in diff)}); restore it, or start a new study folder")
        return frozen
    if not write:
        return None
    doc = {"format": FORMAT, "study": mine, "note": "frozen before the first test-seed run (dma_jax.study.protocol)"}
    atomic_write_json(path, doc)
    return doc


# ---------------------------------------------------------------------------------- agents and seeds
def agent_seed_for(cfg: Config, seeds: Sequence[int], seed: int) -> int:
    """The agent seed used on `seed`, the i-th of `seeds`: agent_seeds[i % len(agent_seeds)]."""
    a = cfg.study.agent_seeds
    return a[list(seeds).index(seed) % len(a)]


def agent_pairs(cfg: Config, seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(agent policy of the seed's agent seed, seed) for both agent stages over `seeds`."""
    return [(agent_policy_name(stage, agent_seed_for(cfg, seeds, s)), s) for stage in AGENT_STAGES for s in seeds]


def generic(policy: str) -> str:
    """`agent-cql@3` -> `agent-cql`: the name a compared policy has whatever its agent seed."""
    parsed = agent_policy(policy)
    return f"agent-{parsed[0]}" if parsed else policy


# ---------------------------------------------------------------------------------- the gate
def tuning_config(cfg: Config) -> Config:
    """`dma headroom` on the tuning seeds (target and proxies)."""
    seeds = tuple(cfg.study.tuning_seeds)
    return cfg.model_copy(update={"headroom": cfg.headroom.model_copy(update={"seeds": seeds, "proxy_seeds": seeds})})


def _side(name: str, policies, mean_P) -> dict:
    best = lambda keep: max((p for p in policies if keep(p)), key=lambda p: mean_P[policies.index(p)])  # noqa: E731
    return {"best_fixed": best(is_fixed), "best_alt": best(is_alt),
            "best_schedule": best(lambda p: p.startswith("ramp-"))}


def paired_h(diff_K: Sequence[float], min_se: float) -> dict:
    """H = mean of the paired differences, its SE (sd / sqrt(n)) and H / SE; `passed` when H / SE >= min_se."""
    d = np.asarray(diff_K, np.float64)
    se = se_of_mean(d)  # exactly 0 for equal differences: then no ratio, and the gate does not pass
    ratio = float(d.mean() / se) if se > 0 else math.nan
    return {"diffs": d.tolist(), "H": float(d.mean()), "H_se": se, "H_over_se": ratio,
            "passed": bool(math.isfinite(ratio) and ratio >= min_se)}


def final_return(run: RunDir, policy: str, seed: int) -> float:
    h: RunHistory = load_history(run.cpt_run(policy, seed) / "history.json")
    return float(h.balanced_T1[-1] - h.balanced_T1[0])


def run_gate(cfg: Config, root: AnyPath, progress: bool = True) -> dict:
    """The headroom gate (module docstring, step 2); writes and returns `gate.json` (read back when written)."""
    run = RunDir(cfg)
    if run.protocol_gate.is_file():
        return read_json_file(run.protocol_gate, "")
    hr = run_headroom(tuning_config(cfg), on=("target", "proxy"), progress=progress)
    tuning = {side: _side(side, list(s.policies), list(s.mean_P)) | {"H": s.h, "H_se": s.h_se}
              for side, s in hr.sides.items()}
    freeze(root, cfg, write=True)  # before the first test-seed run
    st = cfg.study
    t = tuning["target"]
    for p in (t["best_fixed"], t["best_alt"]):
        for s in st.test_seeds:
            pipeline.cpt(cfg, p, s, progress=False)
    target = paired_h([final_return(run, t["best_alt"], s) - final_return(run, t["best_fixed"], s)
                       for s in st.test_seeds], st.min_headroom_se)
    p = tuning["proxy"]
    names = [p["best_fixed"], p["best_alt"]]
    space = DomainSpace.for_sweep(cfg)
    weights = proxy_runs.trajectories(cfg, space, names)
    base = proxy_runs.base_loader(cfg)
    docs = [proxy_runs.run_seed(cfg, space, names, s, base, run.protocol_proxy("gate", s), weights_NxTxD=weights,
                                progress=progress, desc="gate proxy") for s in st.proxy_test_seeds]
    proxy = paired_h([d["returns"][1] - d["returns"][0] for d in docs], st.min_headroom_se)
    doc = {"format": FORMAT, "tuning": tuning, "min_headroom_se": st.min_headroom_se,
           "target": target | {"policies": [t["best_fixed"], t["best_alt"]], "seeds": list(st.test_seeds)},
           "proxy": proxy | {"policies": names, "seeds": list(st.proxy_test_seeds)},
           "passed": target["passed"] and proxy["passed"]}
    atomic_write_json(run.protocol_gate, doc)
    return doc


def gate_line(doc: dict) -> str:
    parts = [f"{side} H = {doc[side]['H']:+.4f} ± {doc[side]['H_se']:.4f} ({doc[side]['H_over_se']:.1f} SE, "
             f"{doc[side]['policies'][1]} - {doc[side]['policies'][0]} on {len(doc[side]['seeds'])} test seeds)"
             for side in ("target", "proxy")]
    verdict = "passed" if doc["passed"] else f"FAILED (needs >= {doc['min_headroom_se']:g} SE on both sides)"
    return f"gate {verdict}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------- the critics
def run_probe(cfg: Config) -> str:
    """Every agent seed's CQL critic: Q against the target share at each step on the offline data (`agent.probe`),
    to `q_vs_share.json` and `.png`."""
    from dma_jax.agent.probe import plot_q_vs_share, q_vs_share

    run = RunDir(cfg)
    curves = {f"agent seed {k}": q_vs_share(run.agent_dir(k), run.offline) for k in cfg.agent.seeds}
    plot_q_vs_share(curves, run.protocol_probe.with_suffix(".png"))
    atomic_write_json(run.protocol_probe, curves)
    return f"critic probe: Q vs target share for {len(curves)} agent seeds in {run.protocol_probe.with_suffix('.png')}"


def probe_lines(curves: dict) -> list[str]:
    """Per agent seed: the share where the critic's Q peaks at each step, against the data's mean share."""
    out = []
    for name, c in curves.items():
        shares = np.asarray(c["shares"])
        peak_T = shares[np.argmax(np.asarray(c["q_TxP"]), axis=1)]
        out.append(f"- {name}: Q peaks at target share " + ", ".join(f"{p:.2f}" for p in peak_T)
                   + " (steps 0..T-1); the data's mean share " + ", ".join(f"{s:.2f}" for s in c["data_share_T"])
                   + ".")
    return out


# ---------------------------------------------------------------------------------- CPT runs
def tuning_pairs(cfg: Config) -> list[tuple[str, int]]:
    seeds = cfg.study.tuning_seeds
    return [(p, s) for p in cfg.study.learned_baselines for s in seeds] + agent_pairs(cfg, seeds)


def choose_learned(scores: dict[str, dict[int, float]], names: Sequence[str]) -> str:
    """The learned baseline with the best mean return on the tuning seeds (the first on a tie)."""
    means = {n: float(np.mean(list(scores[n].values()))) for n in names}
    return max(names, key=lambda n: means[n])


def tuning_scores(run: RunDir, cfg: Config) -> dict[str, dict[int, float]] | None:
    """{generic policy: {tuning seed: return}} once every tuning run is done, else None."""
    pairs = tuning_pairs(cfg)
    if not all(run.cpt_done(p, s) for p, s in pairs):
        return None
    out: dict[str, dict[int, float]] = {}
    for p, s in pairs:
        out.setdefault(generic(p), {})[s] = final_return(run, p, s)
    return out


def test_policies(cfg: Config, gate: dict, learned: str) -> list[str]:
    """The non-agent policies of the test seeds: the chosen learned baseline, the gate's two policies, the best
    hand schedule and the anchors (each once)."""
    t = gate["tuning"]["target"]
    return list(dict.fromkeys([learned, t["best_fixed"], t["best_alt"], t["best_schedule"], *cfg.study.anchors]))


def test_pairs(run: RunDir, cfg: Config) -> list[tuple[str, int]] | None:
    """The test runs (target), known once the gate is written and the tuning runs are done (else None)."""
    scores = tuning_scores(run, cfg)
    if scores is None or not run.protocol_gate.is_file():
        return None
    gate = read_json_file(run.protocol_gate, "")
    learned = choose_learned(scores, cfg.study.learned_baselines)
    seeds = cfg.study.test_seeds
    return [(p, s) for p in test_policies(cfg, gate, learned) for s in seeds] + agent_pairs(cfg, seeds)


def side_pairs(cfg: Config, policies: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """policies x seeds, an agent (`agent-sft`, `agent-cql`) on the i-th seed being the one of agent seed
    agent_seeds[i mod A], as on the protocol's seeds: agent-training variance is in the side runs' intervals too."""
    out = []
    for p in policies:
        parsed = agent_policy(p)
        for s in seeds:
            out.append((agent_policy_name(parsed[0], agent_seed_for(cfg, seeds, s)), s) if parsed and parsed[1] == 0
                       else (p, s))
    return out


def compared_pairs(sub, run: RunDir) -> list[tuple[str, int]] | None:
    """The (policy, seed) runs a sub-run's tables compare and 2c re-scores: the protocol's test runs (None until
    they are known), or any other sub-run's `side_pairs`. One answer for the runner, RESULTS.md and 2c."""
    if sub.protocol:
        return test_pairs(run, run.cfg)
    return side_pairs(run.cfg, sub.policies, sub.seeds)


def cpt_pairs(run: RunDir, cfg: Config) -> list[tuple[str, int]]:
    """Every CPT run of the main sub-run the protocol knows so far: the tuning runs, then the test runs."""
    return tuning_pairs(cfg) + (test_pairs(run, cfg) or [])


# ---------------------------------------------------------------------------------- proxies
def proxy_policy_names(cfg: Config, gate: dict, seeds: Sequence[int], seed: int) -> list[str]:
    """The rows of one proxy seed: both agents (of the seed's agent seed), every learned baseline, the gate's
    proxy policies and the anchors."""
    k = agent_seed_for(cfg, seeds, seed)
    p = gate["tuning"]["proxy"]
    return list(dict.fromkeys([*(agent_policy_name(stage, k) for stage in AGENT_STAGES), *cfg.study.learned_baselines,
                               p["best_fixed"], p["best_alt"], p["best_schedule"], *cfg.study.anchors]))


def proxy_seed_lists(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(cfg.study.tuning_seeds), tuple(cfg.study.proxy_test_seeds)


def run_proxy_policies(cfg: Config, progress: bool = True) -> list[str]:
    """Every compared policy on the proxies, tuning then test seeds (closed loop); the lines to print."""
    run = RunDir(cfg)
    gate = read_json_file(run.protocol_gate, "")
    space, base = DomainSpace.for_sweep(cfg), proxy_runs.base_loader(cfg)
    lines = []
    for seeds in proxy_seed_lists(cfg):
        for s in seeds:
            folder = run.protocol_proxy("policies", s)
            if (folder / proxy_runs.RESULT).is_file():
                continue
            names = proxy_policy_names(cfg, gate, seeds, s)
            proxy_runs.run_seed(cfg, space, names, s, base, folder, progress=progress, desc="study proxies")
            lines.append(f"proxies seed {s}: {len(names)} policies")
    return lines


def proxy_scores(run: RunDir, cfg: Config, seeds: Sequence[int]) -> dict[str, dict[int, float]] | None:
    """{generic policy: {seed: return}} of the proxy runs of `seeds`, None until all are written."""
    out: dict[str, dict[int, float]] = {}
    for s in seeds:
        path = run.protocol_proxy("policies", s) / proxy_runs.RESULT
        if not path.is_file():
            return None
        doc = read_json_file(path, "")
        for name, r in zip(doc["policies"], doc["returns"]):
            out.setdefault(generic(name), {})[s] = float(r)
    return out


def proxies_done(cfg: Config) -> bool:
    run = RunDir(cfg)
    return all((run.protocol_proxy("policies", s) / proxy_runs.RESULT).is_file()
               for seeds in proxy_seed_lists(cfg) for s in seeds)

"""RESULTS.md of `dma study`: tables, paired differences with bootstrap CIs, rank correlations, plots.

Everything is read back from the sub-runs' files (CPT histories, the sweeps' offline data,
agent metrics), so RESULTS.md can be rewritten at any point; a section whose sub-run has
not finished says so ("not run yet") instead of showing partial numbers.

Statistics (numpy only): `bootstrap_ci` is the percentile bootstrap of the mean of paired
differences (fixed seed); `spearman` is Pearson's correlation of average ranks (ties share
the mean of their ranks), as scipy.stats.spearmanr.
"""

from __future__ import annotations

import datetime
import io
import os
from pathlib import Path

import numpy as np

from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_text, read_jsonl

AGENT = "agent-cql"


# ---------------------------------------------------------------------------------- statistics
def rankdata(x_N) -> np.ndarray:
    """1-based ranks; tied values get the mean of the ranks they span (scipy's method='average')."""
    x_N = np.asarray(x_N, np.float64)
    ranks_N = np.empty(x_N.size)
    ranks_N[np.argsort(x_N, kind="stable")] = np.arange(1, x_N.size + 1)
    _, group_N, counts = np.unique(x_N, return_inverse=True, return_counts=True)
    return (np.bincount(group_N, weights=ranks_N) / counts)[group_N]


def spearman(x_N, y_N) -> float:
    """Spearman's rank correlation; NaN when either side is constant or there are fewer than 2 points."""
    x_N, y_N = np.asarray(x_N, np.float64), np.asarray(y_N, np.float64)
    if x_N.shape != y_N.shape or x_N.ndim != 1:
        raise ValueError(f"spearman: need two 1-d arrays of one length, got {x_N.shape} and {y_N.shape}")
    rx, ry = rankdata(x_N) - (x_N.size + 1) / 2, rankdata(y_N) - (y_N.size + 1) / 2
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def bootstrap_ci(x_N, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x (resampling its entries with replacement)."""
    x_N = np.asarray(x_N, np.float64)
    if x_N.ndim != 1 or x_N.size == 0:
        raise ValueError(f"bootstrap_ci: need a non-empty 1-d array, got shape {x_N.shape}")
    idx_BxN = np.random.default_rng(seed).integers(0, x_N.size, size=(n_boot, x_N.size))
    means_B = x_N[idx_BxN].mean(axis=1)
    tail = (1.0 - level) / 2
    return float(np.quantile(means_B, tail)), float(np.quantile(means_B, 1.0 - tail))


# ---------------------------------------------------------------------------------- reading sub-runs
def sub_status(root: Path, sub) -> tuple[list, int, int]:
    """(complete runs of the sub-run's policies x seeds, how many, how many expected)."""
    from dma_jax.report import collect

    want = {(p, s) for p in sub.policies for s in sub.seeds}
    try:
        runs = [r for r in collect(root / sub.name / "cpt") if r.complete and (r.policy, r.seed) in want]
    except DmaError:
        runs = []
    return runs, len(runs), len(want)


def _final(runs) -> dict:
    return {(r.policy, r.seed): float(r.balanced_T1[-1]) for r in runs}


def paired(runs_a, policy_a: str, runs_b, policy_b: str) -> dict | None:
    """Final balanced score of policy_a minus policy_b, paired by seed, with a bootstrap 95% CI."""
    fa, fb = _final(runs_a), _final(runs_b)
    seeds = sorted({s for p, s in fa if p == policy_a} & {s for p, s in fb if p == policy_b})
    if not seeds:
        return None
    d_N = np.array([fa[(policy_a, s)] - fb[(policy_b, s)] for s in seeds])
    lo, hi = bootstrap_ci(d_N)
    return {"a": policy_a, "b": policy_b, "seeds": seeds, "diffs": d_N.tolist(), "mean": float(d_N.mean()),
            "lo": lo, "hi": hi, "wins": int((d_N > 0).sum())}


def best_baseline(runs) -> str | None:
    """The non-agent policy with the best mean final balanced score."""
    from dma_jax.report import summary_table

    rows = [r for r in summary_table(runs) if not r["policy"].startswith("agent-")]
    return rows[0]["policy"] if rows else None


def _verdict(p: dict) -> str:
    return "ahead" if p["lo"] > 0 else "behind" if p["hi"] < 0 else "not distinguishable from zero"


def _paired_line(p: dict | None) -> str:
    if p is None:
        return "no paired comparison (no common seeds)."
    return (f"{p['a']} − {p['b']}: {p['mean']:+.4f} (95% bootstrap CI [{p['lo']:+.4f}, {p['hi']:+.4f}], seeds "
            f"{p['seeds']}, ahead on {p['wins']} of {len(p['seeds'])}): {_verdict(p)}.")


def _cell(m: float, s: float, n: int) -> str:
    return f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"


def policy_table(runs) -> list[str]:
    from dma_jax.report import summary_table

    rows = summary_table(runs)
    fields = [*runs[0].fields, "balanced"]
    lines = ["| policy | seeds | " + " | ".join(fields) + " |", "|---|---:|" + "---:|" * len(fields)]
    for row in rows:
        lines.append(f"| {row['policy']} | {row['n']} | "
                     + " | ".join(_cell(row["mean"][f], row["std"][f], row["n"]) for f in fields) + " |")
    return lines


def _rel(path: Path, results: Path) -> str:
    return os.path.relpath(path.absolute(), results.parent.absolute())


def _plots(root: Path, name: str, results: Path) -> str:
    rep = root / name / "report"
    return (f"Plots: [mixtures over time per policy]({_rel(rep / 'mixtures.png', results)}), "
            f"[score curves]({_rel(rep / 'scores.png', results)}); [dma report]({_rel(rep / 'report.md', results)}).")


def _not_run(n: int, want: int) -> list[str]:
    return [f"Not run yet ({n} of {want} CPT runs finished)." if n else "Not run yet.", ""]


# ---------------------------------------------------------------------------------- sections
def _setup(study) -> list[str]:
    from dma_jax.models.lm import param_count_formula

    c = study.base
    p, t = param_count_formula(c.proxy), param_count_formula(c.target)
    large = param_count_formula(study.cfg(next(s for s in study.runs if s.name == "gen-large")).target)
    total = sum(study.timings.values())
    return [f"Command: `{study.command}`" + (" (`make study`)" if study.command == "dma study" else "")
            + f"; config `{os.path.relpath(study.config)}`" + (f", variant `{study.variant}`" if study.variant else "")
            + ".",
            f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; wall time so far {total / 60:.1f} min ("
            + ", ".join(f"{k} {v / 60:.1f}" for k, v in study.timings.items()) + ").", "",
            f"Setup: proxy {p / 1e6:.2f}M parameters, target {t / 1e6:.2f}M ({t / p:.1f}x), larger target (3c) "
            f"{large / 1e6:.2f}M; sweep N={c.sweep.num_trajectories} trajectories x T={c.sweep.num_stages} "
            f"re-weighting steps x S={c.sweep.steps_per_stage} steps (batch {c.sweep.batch_size} x "
            f"{c.sweep.seq_len} tokens), target field {c.sweep.target_field}; CPT T={c.cpt.num_stages} x "
            f"S={c.cpt.steps_per_stage} (batch {c.cpt.batch_size} x {c.data.record_len - 1}); balanced score: "
            f"{c.eval.balanced} of the field scores (base model = 1). Cells are mean ± std (ddof=1) over seeds of "
            "the final scores.", ""]


def _sweep_agent(study) -> list[str]:
    from dma_jax import offline_data

    main = study.root / "main"
    lines = ["## 1. Sweep and agent", ""]
    if not (main / "sweep" / "offline" / "meta.json").is_file():
        return lines + ["Not run yet.", ""]
    r = offline_data.load(main / "sweep" / "offline").returns
    lines += [f"Sweep: {r.size} proxy trajectories; return (final − initial balanced score) min {r.min():+.4f}, "
              f"median {np.median(r):+.4f}, max {r.max():+.4f}, std {r.std():.4f}. "
              f"[Sampled trajectories]({_rel(main / 'sweep' / 'trajectories.png', study.results)}).", ""]
    for stage in ("sft", "cql"):
        path = main / "agent" / stage / "metrics.jsonl"
        last = read_jsonl(path)[-1] if path.is_file() and read_jsonl(path) else None
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (last or {}).items()
                          if isinstance(v, float) and k != "updates_per_s")
        lines.append(f"- Agent {stage}: " + (f"{last['step']} updates; last metrics: {shown}." if last else
                                              "not run yet."))
    return lines + [""]


def _comparison(study, sub, level: str) -> tuple[list[str], dict | None]:
    runs, n, want = sub_status(study.root, sub)
    lines = [f"{level} {sub.title}", ""]
    if n < want:
        return lines + _not_run(n, want), None
    best = best_baseline(runs)
    p = paired(runs, AGENT, runs, best) if best and AGENT in sub.policies else None
    lines += policy_table(runs) + [""]
    if p:
        lines += [f"Paired by seed, final balanced score: {_paired_line(p)}", ""]
    return lines + [_plots(study.root, sub.name, study.results), ""], p


def _wide(study) -> tuple[list[str], list[str]]:
    """2b: the wider sweep's policies next to main's sweep-independent baselines (the same CPT runs)."""
    sub = next((s for s in study.runs if s.part == "coverage"), None)
    if sub is None:
        return [], []
    main = next(s for s in study.runs if s.name == "main")
    runs, n, want = sub_status(study.root, sub)
    main_runs, m, m_want = sub_status(study.root, main)
    lines = ["### 2b. " + sub.title, "",
             "The same comparison with a second sweep (same proxies, seeds and N) whose trajectories drift faster "
             f"toward the {study.base.cpt.target_field} field; the policies that read a sweep (RegMix, replay-best, "
             "the agents) use it, the other baselines are main's runs.", ""]
    if n < want or m < m_want:
        return lines + _not_run(n, want), []
    both = runs + [r for r in main_runs if r.policy not in sub.policies]
    best = best_baseline(both)
    p = paired(runs, AGENT, both, best) if best and AGENT in sub.policies else None
    p_main = paired(runs, AGENT, main_runs, AGENT) if AGENT in sub.policies else None
    lines += policy_table(both) + [""]
    reading = []
    if p:
        lines.append(f"Paired by seed, final balanced score: {_paired_line(p)}")
        reading.append(f"- Wider sweep (2b): {_paired_line(p)}")
    if p_main:
        lines.append(f"Against main's agent (narrow sweep): {_paired_line(p_main)}")
        reading.append(f"- Wider sweep (2b) vs narrow sweep, same agent recipe: {_paired_line(p_main)}")
    return lines + ["", _plots(study.root, sub.name, study.results), "", *_coverage(study, sub.name), ""], reading


def _rescored(study) -> tuple[list[str], list[str]]:
    """2c: the final models of main (and wide-sweep) on every benchmark item (rescore-*.json)."""
    from dma_jax.io_utils import read_json_file

    items, windows = study.plan.rescore_items, study.plan.rescore_windows
    if not items:
        return [], []
    subs = [s for s in study.runs if s.name in ("main", "wide-sweep")]
    lines = [f"### 2c. Re-scored on up to {items} benchmark items per field", "",
             f"CPT's scores use {study.base.eval.benchmark_items_per_field} items per field (one item = "
             f"{study.base.eval.acc_weight / study.base.eval.benchmark_items_per_field:.3f} of a field score); here "
             f"the same final models (and the base target, = 1) are evaluated on up to {items} items per field and "
             f"{windows} held-out windows per domain (`dma_jax/rescore.py`). The agents chose their mixtures from "
             "feedback on the first of these items; the rest they never saw.", ""]
    docs = {}
    for sub in subs:
        tag = "" if sub.name == "main" else " (wide)"
        for p in sub.policies:
            for s in sub.seeds:
                path = study.root / sub.name / "cpt" / p / f"seed{s}" / f"rescore-{items}x{windows}.json"
                if not path.is_file():
                    return lines + ["Not run yet.", ""], []
                docs[(p + tag, s)] = read_json_file(path, "missing")
    fields = [*next(iter(docs.values()))["fields"], "balanced"]
    value = lambda d, f: d["balanced"] if f == "balanced" else d["field_scores"][f]  # noqa: E731
    policies = sorted({p for p, _ in docs}, key=lambda p: -np.mean([d["balanced"] for (q, _), d in docs.items()
                                                                      if q == p]))
    n_items = next(iter(docs.values()))["items"]
    lines += [f"Items per field: {', '.join(f'{f} {n}' for f, n in n_items.items())}.", "",
              "| policy | seeds | " + " | ".join(fields) + " |", "|---|---:|" + "---:|" * len(fields)]
    for p in policies:
        rows = [d for (q, _), d in docs.items() if q == p]
        cells = [np.array([value(d, f) for d in rows]) for f in fields]
        lines.append(f"| {p} | {len(rows)} | " + " | ".join(
            _cell(c.mean(), c.std(ddof=1) if c.size > 1 else 0.0, c.size) for c in cells) + " |")
    best = next((p for p in policies if not p.startswith("agent-")), None)
    reading = []
    for agent in (p for p in policies if p.startswith(AGENT)):
        seeds = sorted(s for (q, s) in docs if q == agent and (best, s) in docs)
        if not best or not seeds:
            continue
        d_N = np.array([docs[(agent, s)]["balanced"] - docs[(best, s)]["balanced"] for s in seeds])
        lo, hi = bootstrap_ci(d_N)
        p = {"a": agent, "b": best, "seeds": seeds, "mean": float(d_N.mean()), "lo": lo, "hi": hi,
             "wins": int((d_N > 0).sum())}
        lines += ["", f"Paired by seed: {_paired_line(p)}"]
        reading.append(f"- Re-scored on all items (2c): {_paired_line(p)}")
    return lines + [""], reading


def _ablations(study) -> tuple[list[str], list[str]]:
    from dma_jax.report import summary_table

    main = next(s for s in study.runs if s.name == "main")
    main_runs, n, want = sub_status(study.root, main)
    alpha = study.base.agent.cql.alpha
    rows = [("SFT only (main)", main_runs if n == want else None, "agent-sft"),
            (f"CQL, alpha={alpha:g} (main)", main_runs if n == want else None, AGENT)]
    for sub in (s for s in study.runs if s.part == "ablation"):
        runs, k, w = sub_status(study.root, sub)
        for policy in sub.policies:
            label = f"{sub.title}, {'SFT' if policy == 'agent-sft' else 'CQL'}" if len(sub.policies) > 1 else sub.title
            rows.append((label, runs if k == w else None, policy))
    lines = ["## 4. Ablations", "", f"Δ: final balanced score minus main's {AGENT}, paired by seed, with a 95% "
             "bootstrap CI.", "", f"| agent | seeds | {study.base.cpt.target_field} | source | balanced | "
             "Δ balanced [95% CI] |",
             "|---|---:|---:|---:|---:|---|"]
    reading = []
    for label, runs, policy in rows:
        if runs is None:
            lines.append(f"| {label} | – | not run yet | | | |")
            continue
        row = next((r for r in summary_table(runs) if r["policy"] == policy), None)
        if row is None:
            lines.append(f"| {label} | – | not run yet | | | |")
            continue
        tf = study.base.cpt.target_field
        p = paired(runs, policy, main_runs, AGENT) if n == want and (runs is not main_runs or policy != AGENT) else None
        delta = f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" if p else "–"
        lines.append(f"| {label} | {row['n']} | " + " | ".join(_cell(row["mean"][f], row["std"][f], row["n"])
                                                             for f in (tf, "source", "balanced")) + f" | {delta} |")
        if p:
            reading.append(f"- Ablation {label} vs main {AGENT}: {p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}], "
                           f"{_verdict(p)}.")
    return lines + [""], reading


def _fidelity(study) -> tuple[list[str], list[str]]:
    from dma_jax import offline_data
    from dma_jax.io_utils import read_json_file

    sub = next(s for s in study.runs if s.part == "fidelity")
    runs, n, want = sub_status(study.root, sub)
    lines = ["## 5. Proxy fidelity", ""]
    if n < want:
        return lines + _not_run(n, want), []
    out = study.root / sub.name
    plan = read_json_file(out / "sweep" / "plan.json", "missing")
    ds = offline_data.load(out / "sweep" / "offline")
    fields, idx = ds.meta["fields"], ds.meta["field_score_index"]
    proxy = {"balanced": ds.returns + 1.0, **{f: ds.feedback[:, -1, i] for f, i in zip(fields, idx)}}
    K = len(sub.policies)
    target = {"balanced": np.zeros(K), **{f: np.zeros(K) for f in fields}}
    for k in range(K):
        mine = [r for r in runs if r.policy == f"replay-{k}"]
        target["balanced"][k] = np.mean([r.balanced_T1[-1] for r in mine])
        for f in fields:
            target[f][k] = np.mean([r.field_scores_T1xF[-1][list(r.fields).index(f)] for r in mine])
    lines += [f"{K} mixtures: each trained {ds.horizon} re-weighting steps on a proxy (the sweep's setting) and on "
              f"the target (CPT, seeds {list(sub.seeds)}); final scores (base = 1).", "",
              "| mixture | proxy balanced | target balanced | " + " | ".join(f"proxy {f} | target {f}" for f in fields)
              + " |", "|---|---:|---:|" + "---:|---:|" * len(fields)]
    for k, label in enumerate(plan["labels"]):
        lines.append(f"| {label} | {proxy['balanced'][k]:.4f} | {target['balanced'][k]:.4f} | "
                     + " | ".join(f"{proxy[f][k]:.4f} | {target[f][k]:.4f}" for f in fields) + " |")
    kinds = np.array(plan["kinds"])
    rho = {}
    for name, sel in (("all", np.ones(K, bool)), ("static", kinds == "static"), ("sampled", kinds == "sampled")):
        rho[name] = {key: spearman(proxy[key][sel], target[key][sel]) if sel.sum() >= 3 else float("nan")
                     for key in ("balanced", *fields)}
    lines += ["", "Spearman rank correlation, proxy vs target:", "", "| set | n | balanced | " + " | ".join(fields)
              + " |", "|---|---:|---:|" + "---:|" * len(fields)]
    for name, sel in (("all", K), ("static", int((kinds == "static").sum())), ("sampled", int((kinds == "sampled").sum()))):
        lines.append(f"| {name} | {sel} | " + " | ".join(f"{rho[name][key]:+.3f}" for key in ("balanced", *fields))
                     + " |")
    _scatter(proxy["balanced"], target["balanced"], kinds, out / "fidelity.png")
    lines += ["", f"![proxy vs target]({_rel(out / 'fidelity.png', study.results)}) "
              + _plots(study.root, sub.name, study.results), ""]
    return lines, [f"- Proxy fidelity: Spearman ρ = {rho['all']['balanced']:+.3f} between proxy and target final "
                   f"balanced scores over {K} mixtures ({rho['static']['balanced']:+.3f} over the static ones)."]


def _scatter(x_K, y_K, kinds_K, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for kind, marker in (("static", "o"), ("sampled", "^")):
        sel = kinds_K == kind
        ax.scatter(x_K[sel], y_K[sel], marker=marker, label=kind)
    ax.set(xlabel="proxy: final balanced score", ylabel="target: final balanced score", title="Proxy fidelity")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _coverage(study, name: str = "main") -> list[str]:
    """Where the agent's target share sits relative to the sweep's trajectories, step by step."""
    from dma_jax import offline_data

    sub = next(s for s in study.runs if s.name == name)
    runs, n, want = sub_status(study.root, sub)
    mine = [r for r in runs if r.policy == AGENT]
    if n < want or not mine:
        return []
    ds = offline_data.load(study.root / name / "sweep" / "offline")
    tf = study.base.cpt.target_field
    sweep_NxT = ds.actions[..., [f == tf for f in ds.meta["domain_fields"]]].sum(-1)
    lo_T, hi_T = np.quantile(sweep_NxT, 0.05, axis=0), np.quantile(sweep_NxT, 0.95, axis=0)
    inside, total, shares = 0, 0, []
    for r in mine:
        share_T = r.weights_TxD[:, [f == tf for f in r.domain_fields]].sum(-1)
        at_T = np.minimum(np.arange(share_T.size) * ds.horizon // max(share_T.size, 1), ds.horizon - 1)
        inside += int(((share_T >= lo_T[at_T]) & (share_T <= hi_T[at_T])).sum())
        total += share_T.size
        shares.append(share_T)
    return [f"- Coverage ({name}): {AGENT}'s {tf} share per step (mean over seeds: "
            + ", ".join(f"{v:.2f}" for v in np.mean(shares, 0)) + f") lies inside the sweep's 5–95% band at that "
            f"step in {inside} of {total} steps (sweep band: "
            + ", ".join(f"{a:.2f}–{b:.2f}" for a, b in zip(lo_T, hi_T)) + ")."]


def write_results(study) -> Path:
    lines = ["# Study: does the Data Mixing Agent beat the baselines? (CPU scale)", "", *_setup(study),
             *_sweep_agent(study), "## 2. Main comparison", ""]
    main = next(s for s in study.runs if s.name == "main")
    body, p_main = _comparison(study, main, "###")
    lines += body[2:]
    reading = [f"- Main ({study.base.cpt.target_field}): " + (_paired_line(p_main) if p_main else "not run yet.")]
    body, more = _wide(study)
    lines += body
    reading += more
    body, more = _rescored(study)
    lines += body
    reading += more
    lines += ["## 3. Generalisation without retraining", "",
              "The main run's agent, unchanged, against the baselines that need no sweep of the new setting.", ""]
    for sub in (s for s in study.runs if s.part == "gen"):
        body, p = _comparison(study, sub, "###")
        lines += body
        reading.append(f"- Generalisation {sub.title}: " + (_paired_line(p) if p else "not run yet."))
    body, more = _ablations(study)
    lines += body
    reading += more
    body, more = _fidelity(study)
    lines += body
    reading += more + _coverage(study)
    lines += ["## 6. Reading", "", *reading, "",
              "Caveats: the best baseline is picked on the same runs it is compared on (this favours the baseline); "
              f"with {len(study.base.cpt.seeds)} seeds the percentile bootstrap is coarse (for 3 seeds its 95% "
              "interval is exactly [min, max] of the paired differences), so an interval that excludes zero says the "
              "sign agreed on every seed, not that the difference is significant.", ""]
    atomic_write_text(study.results, "\n".join(lines))
    return study.results

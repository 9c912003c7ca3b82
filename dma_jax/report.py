"""`dma report`: a markdown table and plots of the continual pre-training (CPT) runs, set against the sweep.

Reads every `<cpt_dir>/<policy>/seed<k>/history.json` (`dma_jax.history`, which owns the format).
Runs with `complete: false` are still training: the report lists them, the table leaves them out.

`write_report` writes `report.md`, `mixtures.png` (the domain weights each policy chose) and
`scores.png` (balanced and field scores over training, mean ± std over seeds), all atomically. Given the
sweep's `trajectories.npz` (`dma_jax.trajectories`) it places each policy's target-field share inside the
sweep's envelope; given its offline data (`dma_jax.offline_data`) it plots the sweep's response surface
(`response_surface.png`: balanced score after each step vs that step's target share, return vs mean share).

Errors and ties. A policy's cell is the mean over its seeds ± a combined standard error
    SE = sqrt(s^2 / n + mean_i(se_i)^2),
s the sample std over its n seeds (training noise; 0 for one seed) and se_i each run's evaluation SE
(`field_score_se`, `balanced_se` of the history). All runs are scored on the same items, so their evaluation
errors are taken as fully correlated across seeds (the mean of the se_i, not se / sqrt(n)). Two policies
whose means differ by less than 2 * sqrt(SE_a^2 + SE_b^2) are tied: **bold** marks every policy tied with
the best of a column. The paired comparison is tied when |mean difference| < 2 SE of the difference, that SE
combining the seeds' spread of the paired differences and the runs' evaluation SEs the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dma_jax import offline_data
from dma_jax import trajectories as traj
from dma_jax.errors import DmaError
from dma_jax.history import RunHistory, collect
from dma_jax.io_utils import atomic_write_text, upath
from dma_jax.report_plots import plot_mixtures, plot_response_surface, plot_scores


def _by_policy(runs: Sequence[RunHistory]) -> dict[str, list[RunHistory]]:
    """Complete runs grouped by policy; checks they are comparable (fields, B, steps per policy)."""
    done = [r for r in runs if r.complete]
    groups: dict[str, list[RunHistory]] = {}
    for r in done:
        first = done[0]
        if (r.fields, r.balanced_how) != (first.fields, first.balanced_how):
            raise DmaError(f"{r.path}: fields={list(r.fields)}, balanced_how={r.balanced_how!r} differ from "
                           f"{first.path} ({list(first.fields)}, {first.balanced_how!r}); runs are not comparable")
        group = groups.setdefault(r.policy, [])
        if group and (r.n_steps, r.steps_per_stage) != (group[0].n_steps, group[0].steps_per_stage):
            raise DmaError(f"{r.path}: {r.n_steps} steps of {r.steps_per_stage} differ from {group[0].path} "
                           f"({group[0].n_steps} of {group[0].steps_per_stage}); seeds of one policy must match")
        group.append(r)
    return groups


def _mean_std(x_N: np.ndarray) -> tuple[float, float]:
    return float(x_N.mean()), float(x_N.std(ddof=1)) if len(x_N) > 1 else 0.0


def combined_se(x_N: np.ndarray, se_N: np.ndarray) -> float:
    """SE of the mean of x over seeds: sqrt(std(x, ddof=1)^2 / n + mean(se)^2) (module doc)."""
    x_N, se_N = np.asarray(x_N, np.float64), np.asarray(se_N, np.float64)
    seeds_var = x_N.var(ddof=1) / len(x_N) if len(x_N) > 1 else 0.0
    return float(np.sqrt(seeds_var + se_N.mean() ** 2))


def tied(mean_a: float, se_a: float, mean_b: float, se_b: float) -> bool:
    """Whether two means differ by less than two combined standard errors."""
    return abs(mean_a - mean_b) < 2.0 * math.sqrt(se_a ** 2 + se_b ** 2)


def summary_table(runs: Sequence[RunHistory]) -> list[dict]:
    """One row per policy over its complete runs, best balanced mean first.

    Row: policy, n, seeds, mean / std / se (dicts keyed by field and "balanced", final scores;
    std with ddof=1, 0.0 for a single seed; se the combined standard error, `combined_se`), rank (1 = best),
    tied_best (columns where the policy is within two combined SEs of the column's best mean).
    """
    rows = []
    for policy, group in _by_policy(runs).items():
        final_NxF = np.stack([r.field_scores_T1xF[-1] for r in group])
        final_se_NxF = np.stack([r.field_score_se_T1xF[-1] for r in group])
        cols = {f: (final_NxF[:, i], final_se_NxF[:, i]) for i, f in enumerate(group[0].fields)}
        cols["balanced"] = (np.array([r.balanced_T1[-1] for r in group]), np.array([r.balanced_se_T1[-1] for r in group]))
        stats = {k: (*_mean_std(x), combined_se(x, se)) for k, (x, se) in cols.items()}
        rows.append({"policy": policy, "n": len(group), "seeds": [r.seed for r in group],
                     "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
                     "se": {k: v[2] for k, v in stats.items()}})
    rows.sort(key=lambda row: (-row["mean"]["balanced"], row["policy"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    for c in (rows[0]["mean"] if rows else ()):
        best = max(rows, key=lambda row: row["mean"][c])
        for row in rows:
            if tied(row["mean"][c], row["se"][c], best["mean"][c], best["se"][c]):
                row.setdefault("tied_best", []).append(c)
    for row in rows:
        row.setdefault("tied_best", [])
    return rows


def paired_comparison(runs: Sequence[RunHistory], policy: str = "agent-cql") -> dict | None:
    """Final balanced score of `policy` minus that of the best other policy, paired by seed.

    Also `se_diff` (`combined_se` of the paired differences, each run pair's evaluation SE
    sqrt(se_a^2 + se_b^2)) and `tie` (|mean_diff| < 2 se_diff). None when `policy` or another policy has no
    complete run, or they share no seed.
    """
    table = summary_table(runs)
    others = [row for row in table if row["policy"] != policy]
    if not others or policy not in {row["policy"] for row in table}:
        return None
    best = others[0]["policy"]
    final = {(r.policy, r.seed): (float(r.balanced_T1[-1]), float(r.balanced_se_T1[-1])) for r in runs if r.complete}
    seeds = sorted({s for p, s in final if p == policy} & {s for p, s in final if p == best})
    if not seeds:
        return None
    diff_N = np.array([final[(policy, s)][0] - final[(best, s)][0] for s in seeds])
    diff_se_N = np.array([math.hypot(final[(policy, s)][1], final[(best, s)][1]) for s in seeds])
    mean, std = _mean_std(diff_N)
    se = combined_se(diff_N, diff_se_N)
    return {"policy": policy, "other": best, "seeds": seeds, "mean_diff": mean, "std_diff": std,
            "se_diff": se, "tie": abs(mean) < 2.0 * se, "wins": int((diff_N > 0).sum())}


def policy_target_shares(group: Sequence[RunHistory]) -> np.ndarray:
    """[T]: the target-field share of each re-weighting step, mean over the policy's seeds."""
    is_target_D = np.array(group[0].domain_fields) == group[0].target_field
    return np.mean([r.weights_TxD[:, is_target_D].sum(axis=1) for r in group], axis=0)


def _placement_markdown(groups: dict[str, list[RunHistory]], trajectories_path) -> list[str]:
    lines = ["## Policies inside the sweep's envelope", ""]
    if not upath(trajectories_path).is_file():
        return lines + [f"The sweep has no trajectories (`{trajectories_path}` is missing): nothing to compare.", ""]
    weights_NxTxD, _, domain_fields, _ = traj.load(trajectories_path)
    shares = {policy: policy_target_shares(group) for policy, group in groups.items()}
    n_cols = max(x.size for x in shares.values())
    lines += [f"Each policy's target-field share per re-weighting step (mean over seeds) and, in brackets, its "
              f"percentile among the {weights_NxTxD.shape[0]} trajectories of `{trajectories_path}` at the sweep step "
              "covering the same fraction of training; *outside*: below the sweep's 5th or above its 95th "
              "percentile, where the agent's offline data has few or no such mixtures.", "",
              "| policy | " + " | ".join(f"step {t}" for t in range(n_cols)) + " | outside |",
              "|---|" + "---:|" * (n_cols + 1)]
    for policy, share_T in shares.items():
        target = groups[policy][0].target_field
        pct_T = traj.share_percentiles(weights_NxTxD, domain_fields, target, share_T)
        if pct_T is None:
            lines.append(f"| {policy} | the sweep has no {target} domain |" + " |" * n_cols)
            continue
        out_T = (pct_T < 5.0) | (pct_T > 95.0)
        cells = [f"{x:.3f} (p{p:.0f}{', *outside*' if o else ''})" for x, p, o in zip(share_T, pct_T, out_T)]
        lines.append(f"| {policy} | " + " | ".join(cells + [""] * (n_cols - len(cells)))
                     + f" | {int(out_T.sum())} of {out_T.size} |")
    return lines + [""]


def _table_markdown(table: list[dict], columns: list[str]) -> list[str]:
    lines = ["| policy | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for row in table:
        cells = []
        for c in columns:
            cell = f"{row['mean'][c]:.4f} ± {row['se'][c]:.4f}"
            cells.append(f"**{cell}**" if c in row["tied_best"] else cell)
        lines.append(f"| {row['policy']} | {row['n']} | " + " | ".join(cells) + " |")
    return lines


def _raw_markdown(groups: dict[str, list[RunHistory]]) -> list[str]:
    """The raw metrics of the final models (mean over seeds), per field: gold bits per byte, held-out loss,
    accuracy, length-normalised accuracy and centred accuracy (acc - chance) / (1 - chance)."""
    first = next(iter(groups.values()))[0]
    raw_keys = ("answer_bpb_T1xF", "field_loss_T1xF", "acc_norm_T1xF", "chance_F")
    if any(getattr(r, k) is None for g in groups.values() for r in g for k in raw_keys):
        return []  # histories without the optional raw metrics
    lines = ["### Raw metrics of the final models (mean over seeds)", "",
             "| policy | field | bits/byte | held-out loss | acc | acc_norm | centred acc |", "|---|---|" + "---:|" * 5]
    base = first
    for policy, group in [("base model", [base]), *groups.items()]:
        row = 0 if policy == "base model" else -1
        for i, f in enumerate(first.fields):
            mean = lambda name: float(np.mean([getattr(r, name)[row][i] for r in group]))  # noqa: E731
            chance = float(base.chance_F[i])
            acc = mean("accuracy_T1xF")
            lines.append(f"| {policy} | {f} | {mean('answer_bpb_T1xF'):.4f} | {mean('field_loss_T1xF'):.4f} | "
                         f"{acc:.3f} | {mean('acc_norm_T1xF'):.3f} | {(acc - chance) / (1 - chance):+.3f} |")
    return lines


def write_report(cpt_dir: str | Path, out_dir: str | Path, title: str = "Continual pre-training report",
                 focus: str = "agent-cql", trajectories_path: str | Path | None = None,
                 offline_dir: str | Path | None = None) -> Path:
    """Writes report.md, mixtures.png and scores.png into out_dir; returns the path of report.md.

    With `trajectories_path` (the sweep's trajectories.npz) a section places each policy in the sweep's
    envelope; with `offline_dir` (the sweep's offline data, if it exists) `response_surface.png` is drawn too.
    """
    runs = collect(cpt_dir)
    groups = dict(sorted(_by_policy(runs).items()))
    if not groups:
        raise DmaError(f"{cpt_dir}: no complete CPT run (no <policy>/seed<k>/history.json with complete: true)")
    out_dir = upath(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_mixtures(groups, out_dir / "mixtures.png")
    plot_scores(groups, out_dir / "scores.png")
    table = summary_table(runs)
    first = runs[[r.complete for r in runs].index(True)]
    steps = sorted({(g[0].n_steps, g[0].steps_per_stage) for g in groups.values()})
    lines = [f"# {title}", "",
             f"{sum(len(g) for g in groups.values())} complete runs of {len(groups)} policies from `{cpt_dir}`; "
             + ", ".join(f"{t} re-weighting steps of {s} optimizer steps" for t, s in steps)
             + f"; target field: {first.target_field}.", "",
             "## Final scores", "", *_table_markdown(table, [*first.fields, "balanced"]), "",
             "Ranked by the balanced mean; **bold** marks, in each column, the best mean and every policy tied "
             "with it (within two combined standard errors).", "",
             *_raw_markdown(groups), "",
             "## How to read this", "",
             "Each cell is the mean over seeds of the score after the last re-weighting step ± its standard error: "
             "sqrt(s²/n + mean(se)²), s the standard deviation over the n seeds (0 for one seed) and se each "
             "run's evaluation standard error (delta method over benchmark items and held-out windows; all runs "
             "share the items, so these errors are not divided by n). Differences smaller than two combined "
             "standard errors are ties. Field scores are normalised so that the base model, before continual "
             "pre-training, scores 1.000 in every field: above 1 is better than the base model, below 1 is worse "
             "(forgetting, for the source field). A field score is 1 + the weighted relative drop of the gold "
             "answers' bits per byte on the field's benchmark items and of the held-out loss on the field's "
             "domains (`eval.bpb_weight`, `eval.loss_weight`; `eval.acc_weight` for centred accuracy). "
             f"The balanced score is the {first.balanced_how} of the field scores (`balanced_how` in the "
             "histories): it rewards gaining the target field without losing the source field.", ""]
    paired = paired_comparison(runs, focus)
    if paired:
        verdict = ("tie (within two standard errors)" if paired["tie"] else
                   f"{paired['policy']} is {'ahead' if paired['mean_diff'] > 0 else 'behind'} "
                   "(beyond two standard errors)")
        lines += ["## Paired comparison", "",
                  f"{paired['policy']} − {paired['other']} (the best other policy), final balanced score paired "
                  f"by seed over seeds {paired['seeds']}: {paired['mean_diff']:+.4f} ± {paired['se_diff']:.4f} (SE; "
                  "seed std " + (f"{paired['std_diff']:.4f}" if len(paired["seeds"]) > 1 else "–")
                  + f"): {verdict}; {paired['policy']} is ahead on {paired['wins']} of {len(paired['seeds'])} seeds.",
                  ""]
    items = first.eval_items
    if items:
        lines += ["## Items scored in the loop", "",
                  "Every score above is over these benchmark items (a fixed subset stratified over each field's "
                  "domains, `evaluation.select_items`) and the held-out windows of every domain:", "",
                  *[f"- {f}: " + ", ".join(f"{d} {n}" for d, n in items[f].items()) for f in items], ""]
    lines += ["## Plots", "", "Domain weights chosen by each policy (lowest seed), coloured by field:", "",
              "![Domain mixtures](mixtures.png)", "",
              "Balanced and field scores over training, mean over seeds with ± std shaded:", "",
              "![Scores](scores.png)", ""]
    if offline_dir is not None and upath(offline_dir).is_dir():
        plot_response_surface(offline_data.load(offline_dir), out_dir / "response_surface.png")
        lines += ["The sweep's response surface (its offline data): balanced score after each re-weighting step vs "
                  "that step's target share, coloured by step, and each trajectory's return vs its mean target "
                  "share:", "", "![Response surface](response_surface.png)", ""]
    if trajectories_path is not None:
        lines += _placement_markdown(groups, trajectories_path)
    running = [r for r in runs if not r.complete]
    if running:
        lines += ["## Note: runs in progress", "", "Not in the table or the plots (complete: false):", "",
                  *[f"- {r.policy} seed {r.seed}: {r.n_steps} re-weighting steps so far" for r in running], ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

"""How concentrated each policy's mixtures are (issue 18.6): per re-weighting step, the largest domain weight and
the entropy of the mixture, averaged over a policy's seeds, and the most concentrated single run. An agent with a
run that puts more than `COLLAPSE` of the mixture on one domain at some step, where no baseline run does, is
flagged: a defect to explain, not a data point. (Per run, not on the mean over seeds: one seed's collapse
averaged with three spread seeds reads as a moderate 0.4.)"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dma_jax.history import RunHistory

COLLAPSE = 0.8  # a mixture with a domain weight above this is "collapsed" onto that domain


def per_step(runs: Sequence[RunHistory]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{policy: (largest weight per step, entropy per step in nats)}, each averaged over the policy's runs."""
    out: dict[str, list] = {}
    for r in runs:
        w = np.clip(np.asarray(r.weights_TxD, np.float64), 0.0, None)
        ent = -(w * np.log(np.where(w > 0, w, 1.0))).sum(-1)
        out.setdefault(r.policy, []).append((w.max(-1), ent))
    return {p: (np.mean([m for m, _ in v], 0), np.mean([e for _, e in v], 0)) for p, v in out.items()}


def _peak(r: RunHistory) -> tuple[float, int, str]:
    """(largest weight, its step, its domain) of one run."""
    w = np.asarray(r.weights_TxD, np.float64)
    t = int(np.argmax(w.max(-1)))
    d = int(np.argmax(w[t]))
    return float(w[t, d]), t, (r.domain_names[d] if getattr(r, "domain_names", None) else f"domain {d}")


def lines(runs: Sequence[RunHistory]) -> list[str]:
    """A table (largest weight and entropy: their extremes over the steps; the most concentrated run) and the
    collapse flags."""
    stats = per_step(runs)
    peaks: dict[str, list] = {}
    for r in runs:
        peaks.setdefault(r.policy, []).append((*_peak(r), r.seed))
    out = ["Mixture concentration per step (mean over seeds): the largest domain weight (its maximum over the steps) "
           "and the entropy in nats (its minimum over the steps); then the most concentrated single run and how many "
           f"runs put more than {COLLAPSE:g} on one domain at some step.", "",
           "| policy | largest weight, max over steps | entropy, min over steps | most concentrated run "
           f"| runs above {COLLAPSE:g} |", "|---|---:|---:|---|---:|"]
    for p, (m, e) in sorted(stats.items()):
        w, t, name, seed = max(peaks[p])
        above = sum(x[0] > COLLAPSE for x in peaks[p])
        out.append(f"| {p} | {m.max():.3f} | {e.min():.3f} | {w:.3f} ({name}, seed {seed}, step {t}) | "
                   f"{above} of {len(peaks[p])} |")
    base_collapsed = any(x[0] > COLLAPSE for p, v in peaks.items() if not p.startswith("agent-") for x in v)
    for p, v in sorted(peaks.items()):
        above = [x for x in v if x[0] > COLLAPSE]
        if p.startswith("agent-") and above and not base_collapsed:
            w, t, name, seed = max(above)
            out += ["", f"**{p} collapses onto one domain in {len(above)} of {len(v)} runs** (largest weight "
                    f"{w:.3f} on {name}, seed {seed}, step {t}) where no baseline run does: a defect to explain "
                    "and fix."]
    return out + [""]

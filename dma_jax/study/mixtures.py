"""How concentrated each policy's mixtures are (issue 18.6): per re-weighting step, the largest domain weight and
the entropy of the mixture, averaged over a policy's seeds. An agent that puts more than `COLLAPSE` of the mixture
on one domain at some step where no baseline does is flagged: a defect to explain, not a data point."""

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


def lines(runs: Sequence[RunHistory]) -> list[str]:
    """A table (largest weight and entropy: their extremes over the steps) and the collapse flags."""
    stats = per_step(runs)
    out = ["Mixture concentration per step (mean over seeds): the largest domain weight (its maximum over the steps) "
           "and the entropy in nats (its minimum over the steps).", "",
           "| policy | largest weight, max over steps | entropy, min over steps |", "|---|---:|---:|"]
    out += [f"| {p} | {m.max():.3f} | {e.min():.3f} |" for p, (m, e) in sorted(stats.items())]
    base_collapsed = any(m.max() > COLLAPSE for p, (m, _) in stats.items() if not p.startswith("agent-"))
    for p, (m, _) in sorted(stats.items()):
        if p.startswith("agent-") and m.max() > COLLAPSE and not base_collapsed:
            out += ["", f"**{p} collapses onto one domain** (largest weight {m.max():.3f} at step "
                    f"{int(np.argmax(m))}) where no baseline does: a defect to explain and fix."]
    return out + [""]

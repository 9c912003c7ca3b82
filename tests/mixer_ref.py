"""An independent reference for the CPT mixer's per-batch domain counts (pure Python, no numpy rounding)."""

from fractions import Fraction


def carried_counts(weights_per_step, batch_size):
    """Counts per step for a list of weight vectors: each domain is owed weight * B plus what it was still owed
    after the previous batch (reset when its weight is 0); the B examples go by Hamilton's method (floors,
    then the largest remainders, ties to the lower index). Exact rational arithmetic."""
    owed_prev = None
    out = []
    for weights in weights_per_step:
        w = [Fraction(float(x)) for x in weights]
        total_w = sum(w)
        w = [x / total_w for x in w]
        if owed_prev is None:
            owed_prev = [Fraction(0)] * len(w)
        owed = [x * batch_size + c if x > 0 else Fraction(0) for x, c in zip(w, owed_prev)]
        quota = [max(o, Fraction(0)) for o in owed]
        scale = Fraction(batch_size) / sum(quota)
        quota = [q * scale for q in quota]
        counts = [int(q) for q in quota]  # floor: quotas are >= 0
        left = batch_size - sum(counts)
        order = sorted(range(len(w)), key=lambda d: (-(quota[d] - counts[d]), d))
        for d in order[:left]:
            counts[d] += 1
        owed_prev = [o - k if x > 0 else Fraction(0) for o, k, x in zip(owed, counts, w)]
        out.append(counts)
    return out

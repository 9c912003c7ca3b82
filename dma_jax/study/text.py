"""How RESULTS.md writes a cell, a paired comparison and its reading (one definition for every section)."""

from __future__ import annotations

AGENT = "agent-cql"  # the agent every section compares


def verdict(p: dict) -> str:
    return "ahead" if p["lo"] > 0 else "behind" if p["hi"] < 0 else "not distinguishable from zero"


def paired_line(p: dict | None) -> str:
    if p is None:
        return "no paired comparison (no common seeds)."
    return (f"{p['a']} − {p['b']}: {p['mean']:+.4f} (paired t 95% CI [{p['lo']:+.4f}, {p['hi']:+.4f}], "
            f"p = {p['p']:.3g}; seeds {p['seeds']}, ahead on "
            f"{p['wins']} of {len(p['seeds'])}): {verdict(p)}.")


def cell(m: float, s: float, n: int) -> str:
    return f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"

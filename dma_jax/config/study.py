"""The pre-registration of `dma study` (section `study` of the config): fixed before any test run.

`dma study` freezes this section into `<root>/preregistration.json` before its first test-seed run and refuses to
go on under a different one (`dma_jax.study.protocol`). RESULTS.md opens with it.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from dma_jax.config.base import NonNegInt, PosFloat, Section


class StudyConfig(Section):
    """What the study compares, on which seeds, and the rules its verdicts follow (issue 18).

    Primary metric: the return of a CPT run, final balanced score - base (`evaluation.balanced_score`, the mean of
    the field scores, each with its standard error). Comparators are chosen on `tuning_seeds` only: the best fixed
    share and the best hand schedule from `dma headroom`, the best learned baseline of `learned_baselines` from
    their tuning runs; the test seeds then compare, paired by seed: agent-cql and agent-sft against them. The agent
    used on the i-th seed (tuning or test) is the one of agent seed `agent_seeds[i % len(agent_seeds)]`, so the
    intervals over test seeds hold agent-training variance. Verdicts (95% paired t upper bound U of a difference):
    - *the method fails at this scale* if agent-cql - best learned baseline has U < `fail_fraction` * H on the
      proxies; *transfer fails* if it is ahead on the proxies (lower bound > 0) but not on the target;
    - *CQL adds nothing* if agent-cql - agent-sft has U < `cql_fraction` * H (target).
    H: the headroom measured by the gate (best clean or scheduled policy - best fixed share, both chosen on the
    tuning seeds, measured on the test seeds). The gate (`gate: enforce`) stops the study before the agents are
    trained when H < `min_headroom_se` standard errors on the target or on the proxies.
    """

    tuning_seeds: tuple[NonNegInt, ...] = (0, 1, 2, 3)
    test_seeds: tuple[NonNegInt, ...] = tuple(range(100, 112))
    proxy_test_seeds: tuple[NonNegInt, ...] = tuple(range(100, 116))
    agent_seeds: tuple[NonNegInt, ...] = (0, 1, 2, 3)
    learned_baselines: tuple[str, ...] = ("regmix", "replay-best")
    anchors: tuple[str, ...] = ("source-only", "target-only", "curriculum")
    min_headroom_se: PosFloat = 5.0
    fail_fraction: PosFloat = 0.25
    cql_fraction: PosFloat = 0.1
    gate: Literal["enforce", "report"] = "enforce"  # report: record a failed gate and go on (the --quick pulse)

    @pydantic.model_validator(mode="after")
    def _check(self) -> StudyConfig:
        for name in ("tuning_seeds", "test_seeds", "proxy_test_seeds", "agent_seeds", "learned_baselines"):
            v = getattr(self, name)
            if not v or len(set(v)) != len(v):
                raise ValueError(f"{name}: must be a non-empty list without repeats (got {list(v)})")
        for name in ("test_seeds", "proxy_test_seeds"):
            both = sorted(set(self.tuning_seeds) & set(getattr(self, name)))
            if both:
                raise ValueError(f"{name}: seed {both[0]} is also a tuning seed (test seeds must be fresh)")
        for name in ("test_seeds", "proxy_test_seeds"):
            if len(getattr(self, name)) < 2:
                raise ValueError(f"{name}: at least 2 seeds are needed for a paired t interval")
        agents = [p for p in (*self.learned_baselines, *self.anchors) if p.startswith("agent-")]
        if agents:
            raise ValueError(f"learned_baselines/anchors: {agents[0]} is an agent (the agents are always compared)")
        return self

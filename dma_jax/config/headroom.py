"""Configuration of `dma headroom` (section `headroom` of the config)."""

from __future__ import annotations

from typing import Literal

import pydantic

from dma_jax.config.base import NonNegInt, Section


class HeadroomConfig(Section):
    """`dma headroom`: how much a domain choice or a schedule can beat the best size-spread fixed share.

    On the target (CPT, `cpt.*` settings) and on proxies (the sweep's environment), over `seeds`: fixed target
    shares spread by size, the same shares on the scored domains only (`eval.unscored_domains` left out), the
    hand schedules `high_low` (start share -> end share, linear) and `low_high`, source-only and target-only.
    H = best(clean or scheduled) - best(size-spread fixed share), per seed paired.
    """

    shares: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.7)
    high_low: tuple[float, float] = (0.7, 0.1)
    low_high: tuple[float, float] = (0.1, 0.7)
    seeds: tuple[NonNegInt, ...] = (0, 1, 2)
    proxy_seeds: tuple[NonNegInt, ...] = (0, 1, 2, 3)
    on: tuple[Literal["target", "proxy"], ...] = ("target", "proxy")

    @pydantic.field_validator("shares")
    @classmethod
    def _check_shares(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or not all(0.0 < x < 1.0 for x in v):
            raise ValueError(f"{list(v)} must be a non-empty list of shares in (0, 1)")
        return v

    @pydantic.field_validator("high_low", "low_high")
    @classmethod
    def _check_ramp(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"{list(v)} must be two target shares (start, end) in [0, 1]")
        return v

    @pydantic.model_validator(mode="after")
    def _seeds_for_each_side(self) -> "HeadroomConfig":
        for side, key in (("target", "seeds"), ("proxy", "proxy_seeds")):
            if side in self.on and not getattr(self, key):
                raise ValueError(f"{key} is empty, but headroom runs on the {side} (on: {list(self.on)})")
        return self

"""Configuration of the mixing agent: model, SFT warm-up and CQL (section `agent` of the config)."""

from __future__ import annotations

from typing import Literal

import pydantic

from dma_jax.config.base import Section

PosInt = pydantic.PositiveInt
NonNegInt = pydantic.NonNegativeInt
PosFloat = pydantic.PositiveFloat
NonNegFloat = pydantic.NonNegativeFloat


class AgentModelConfig(Section):
    """The causal Transformer over re-weighting steps; everything an exported agent needs to be rebuilt.

    `concentration_range` bounds kappa, the policy's per-domain Dirichlet
    concentration: alpha_d = 1 + kappa * D * mean_d.
    `use_feedback: false` is an ablation: the feedback features (losses, scores and
    their changes) are zeroed, so the agent sees only its mixture history (see `features`).
    """

    d_model: PosInt = 64
    n_layers: PosInt = 2
    n_heads: PosInt = 4
    d_ff: PosInt = 128
    concentration_range: tuple[PosFloat, PosFloat] = (1.0, 1000.0)
    use_feedback: bool = True

    @pydantic.model_validator(mode="after")
    def _check(self) -> AgentModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        lo, hi = self.concentration_range
        if not lo < hi:
            raise ValueError(f"concentration_range={self.concentration_range} must be (low, high) with low < high")
        return self


class SftConfig(Section):
    """Behaviour cloning on the `top_percent` % of trajectories by return (at least one)."""

    top_percent: float = pydantic.Field(25.0, gt=0.0, le=100.0)
    steps: PosInt = 500
    batch_size: PosInt = 32
    lr: PosFloat = 1e-3


class CqlConfig(Section):
    """SAC-style actor-critic with twin Q, Polyak targets and the CQL(H) penalty.

    alpha: weight of the CQL penalty, in units of Q (with the default reward scale,
      returns have std 1); the initial value when `lagrange` tunes it.
    target_gap: with `lagrange`, the penalty (cql_gap: a soft maximum of Q over the
      simplex minus Q on the data) the tuned weight holds.
    temperature: tau in tau * logsumexp(Q / tau - log importance ratio).
    n_actions: samples per proposal (uniform on the simplex, policy at s, policy at s').
    reward_scale: rewards are multiplied by it; None: 1 / std of the dataset's returns.
    target_concentration: target entropy = entropy of a symmetric Dirichlet whose
      per-domain concentration is 1 + target_concentration (the policy at uniform mean).
    entropy_alpha: the initial (or, without auto_entropy, fixed) entropy temperature.
    backup_entropy: subtract entropy_alpha * log pi(a'|s') in the Bellman target (plain SAC).
    bc_weight: weight of -log pi(a_data | s) in the actor loss.
    """

    steps: PosInt = 2000
    batch_size: PosInt = 32
    actor_lr: PosFloat = 1e-4
    critic_lr: PosFloat = 3e-4
    alpha_lr: PosFloat = 3e-4
    discount: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    polyak: float = pydantic.Field(0.005, gt=0.0, le=1.0)
    reward_scale: PosFloat | None = None
    alpha: NonNegFloat = 0.3
    temperature: PosFloat = 1.0
    n_actions: PosInt = 5
    lagrange: bool = False
    target_gap: float = 1.0
    bc_weight: NonNegFloat = 0.0
    auto_entropy: bool = True
    entropy_alpha: PosFloat = 0.01
    target_concentration: PosFloat = 50.0
    backup_entropy: bool = False

    @pydantic.model_validator(mode="after")
    def _check(self) -> CqlConfig:
        if self.lagrange and self.alpha <= 0.0:
            raise ValueError("lagrange=true needs alpha > 0 (the initial penalty weight)")
        return self


class AgentConfig(Section):
    """The agent: model, both training stages, and how the loops dispatch, log and checkpoint.

    Updates run `updates_per_dispatch` at a time under `lax.scan`; one metrics
    record (the mean over the dispatch) is logged per dispatch. `seeds`: the agents `dma train-agent` trains, one
    per agent seed K, each with training seed `run.seed + K` (its parameter init, minibatch order and CQL's action
    samples); seed 0 is the agent in `agent/`, seed K > 0 the one in `agent/seed<K>/` (`runs.RunDir.agent_dir`).
    """

    model: AgentModelConfig = AgentModelConfig()
    sft: SftConfig = SftConfig()
    cql: CqlConfig = CqlConfig()
    grad_clip: PosFloat = 1.0
    updates_per_dispatch: PosInt = 50
    checkpoint_every: PosInt = 500
    keep_checkpoints: PosInt = 2
    on_nonfinite: Literal["stop", "skip"] = "stop"  # as optim.on_nonfinite (dma_jax.numerics), per update
    max_loss_spike: float | None = pydantic.Field(None, gt=1.0)  # on bc_nll (SFT) / critic_loss (CQL)
    # Left out of the dumped config at its default, so the run folders and config hashes of one agent stay as they were
    seeds: tuple[NonNegInt, ...] = (0,)

    @pydantic.model_serializer(mode="wrap")
    def _drop_default_seeds(self, handler):
        out = handler(self)
        if self.seeds == type(self).model_fields["seeds"].default:
            out.pop("seeds", None)
        return out

    @pydantic.field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct agent seeds")
        return v

    @pydantic.model_validator(mode="after")
    def _check(self) -> AgentConfig:
        k = self.updates_per_dispatch
        for name, value in (("sft.steps", self.sft.steps), ("cql.steps", self.cql.steps),
                            ("checkpoint_every", self.checkpoint_every)):
            if value % k:
                raise ValueError(f"{name}={value} must be a multiple of updates_per_dispatch={k}")
        return self

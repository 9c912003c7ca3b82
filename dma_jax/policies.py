"""Mixing policies: what decides the next mixture during target CPT (agent and baselines).

A policy is called once per re-weighting step with the history so far and returns
the mixture [D] for the next S optimizer steps. Every policy runs through the same
CPT loop. `SafePolicy` guards the loader: a NaN or off-simplex output never
reaches it (the last valid mixture is kept and a warning logged).

Names (`make_policy`): `source-only`, `target-only`, `fixed-P` (target share P,
spread over the field's domains by size or uniformly), `curriculum` (target share
rising linearly from 0 to `curriculum_end`), `ramp-A-B` (target share linear from A
at the first re-weighting step to B at the last), `fixed-P-scored` and
`ramp-A-B-scored` (the same, spread over the domains not in `exclude` only:
`eval.unscored_domains`, which the caller passes; a policy never judges a domain's
quality by its name), `regmix` (RegMix as its authors built it: a LightGBM regressor fitted on
the sweep, average mixture -> return, then the mean of its 100 best predicted candidate mixtures, a static
mixture; `dma_jax.regmix`), `regmix-linear` (the same with a ridge regression),
`replay-best` (the sweep's best trajectory), `replay-K` (the sweep's trajectory K, e.g. for
proxy-fidelity checks), `agent-sft`, `agent-cql` (exported agents; `agent-sft@K`, `agent-cql@K`: those of agent seed
K > 0, `runs.agent_policy`), `schedule:FILE` (the mixtures of a schedule
file, `schedule_file`, e.g. from `dma export schedule`: one per re-weighting step; its runs' folder and recorded
name is `runs.policy_folder`'s `schedule-<stem>-<sha>`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from dma_jax import regmix, schedule_file
from dma_jax.errors import DmaError
from dma_jax.io_utils import upath
from dma_jax.runs import AGENT_SPEC_FILE, SCHEDULE_POLICY, agent_policy, policy_folder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PolicyInput:
    """What a policy sees: the mixtures used so far and the feedback after each step (row 0: base)."""

    weights: list[np.ndarray]  # t entries of [D]
    feedback: list[np.ndarray]  # t + 1 entries of [M]
    num_stages: int

    @property
    def stage(self) -> int:
        return len(self.weights)


@dataclasses.dataclass(frozen=True)
class SpaceInfo:
    domain_names: tuple[str, ...]
    domain_fields: tuple[str, ...]
    target_field: str
    sizes: tuple[float, ...]  # train tokens per domain
    part_of: tuple[str, ...] = ()  # per domain, the prepared domain it is part of (`DomainSpace.split`; () = itself)

    @classmethod
    def of(cls, space, target_field: str) -> SpaceInfo:
        """The policies' view of a `data.domains.DomainSpace`."""
        return cls(tuple(space.names), tuple(space.fields_of_domain), target_field,
                   tuple(float(x) for x in space.train_tokens), tuple(space.part_of))

    def field_mask(self, field: str) -> np.ndarray:
        return np.array([f == field for f in self.domain_fields])

    def spread(self, field: str, how: str = "size", exclude: Sequence[str] = ()) -> np.ndarray:
        """A distribution over the domains of `field` not in `exclude` (by size or uniform), zero elsewhere."""
        mask = self.field_mask(field)
        if not mask.any():
            raise DmaError(f"policy: no domain of field '{field}' in the domain space")
        mask &= ~np.isin(np.array(self.domain_names), list(exclude))
        mask &= ~np.isin(np.array(self.part_of or self.domain_names), list(exclude))
        if not mask.any():
            raise DmaError(f"policy: every domain of field '{field}' is in eval.unscored_domains "
                           f"({', '.join(exclude)}); a '-scored' policy needs a scored domain in each field")
        w = np.where(mask, np.asarray(self.sizes, np.float64) if how == "size" else 1.0, 0.0)
        return w / w.sum()

    def target_share(self, p: float, how: str = "size", exclude: Sequence[str] = ()) -> np.ndarray:
        return (1.0 - p) * self.spread("source", how, exclude) + p * self.spread(self.target_field, how, exclude)


class Policy(Protocol):
    name: str

    def __call__(self, history: PolicyInput) -> np.ndarray: ...


@dataclasses.dataclass
class Static:
    name: str
    weights: np.ndarray

    def __call__(self, history: PolicyInput) -> np.ndarray:
        return self.weights


@dataclasses.dataclass
class Curriculum:
    """Target share moving linearly from `start` at the first step to `end` at the last (spread over the
    domains not in `exclude`)."""

    name: str
    info: SpaceInfo
    start: float = 0.0
    end: float = 1.0
    how: str = "size"
    exclude: tuple[str, ...] = ()

    def __call__(self, history: PolicyInput) -> np.ndarray:
        frac = history.stage / max(history.num_stages - 1, 1)
        return self.info.target_share(self.start + (self.end - self.start) * frac, self.how, self.exclude)


@dataclasses.dataclass
class Schedule:
    """A fixed sequence of mixtures (e.g. the sweep's best trajectory), stretched to the CPT's length."""

    name: str
    weights_TxD: np.ndarray

    def __call__(self, history: PolicyInput) -> np.ndarray:
        T = len(self.weights_TxD)
        i = round(history.stage * (T - 1) / max(history.num_stages - 1, 1)) if history.num_stages > 1 else 0
        return self.weights_TxD[min(i, T - 1)]


@dataclasses.dataclass
class SafePolicy:
    """Validates each output; a NaN / negative / wrong-length / unnormalised mixture is replaced by the last valid one."""

    inner: Policy
    num_domains: int
    fallback: np.ndarray
    rejected: int = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def __call__(self, history: PolicyInput) -> np.ndarray:
        try:
            w = np.asarray(self.inner(history), np.float64)
        except Exception as e:  # noqa: BLE001 - a failing policy must not stop the run
            log.warning("policy %s raised %s at step %d: keeping the last valid mixture", self.name, e, history.stage)
            w = None
        ok = (w is not None and w.shape == (self.num_domains,) and np.all(np.isfinite(w)) and np.all(w >= 0)
              and abs(w.sum() - 1.0) <= 1e-6)
        if not ok:
            self.rejected += 1
            last = history.weights[-1] if history.weights else self.fallback
            log.warning("policy %s gave an invalid mixture at step %d (%s): keeping the last valid one",
                        self.name, history.stage, None if w is None else np.array2string(w, precision=3))
            return np.asarray(last, np.float64)
        return w


def make_policy(name: str, info: SpaceInfo, *, sweep_dir: Path | None = None, agent_dirs: dict | None = None,
                spread: str = "size", curriculum_end: float = 1.0, seed: int = 0,
                exclude: Sequence[str] = (), num_stages: int | None = None,
                steps_per_stage: int | None = None) -> Policy:
    """Build a policy by name (see the module docstring); `exclude`: the domains `-scored` policies leave out;
    `num_stages`, `steps_per_stage`: the CPT's, which a schedule file must match; `seed`: the CPT's, which no
    policy draws from (RegMix's candidates have their own fixed seed, `regmix.CANDIDATE_SEED`)."""
    if name.startswith(SCHEDULE_POLICY):
        return _schedule_policy(name, info, num_stages, steps_per_stage)
    if name == "source-only":
        return Static(name, info.spread("source", spread))
    if name == "target-only":
        return Static(name, info.spread(info.target_field, spread))
    stem = name.removesuffix("-scored")
    drop = tuple(exclude) if stem != name else ()
    if stem.startswith("fixed-"):
        return Static(name, info.target_share(_share(name, stem.removeprefix("fixed-")), spread, drop))
    if stem.startswith("ramp-"):
        ends = stem.removeprefix("ramp-").split("-")
        if len(ends) != 2:
            raise DmaError(f"policy '{name}': write ramp-A-B, A and B the target shares at the first and last step")
        return Curriculum(name, info, _share(name, ends[0]), _share(name, ends[1]), spread, drop)
    if stem != name:
        raise DmaError(f"policy '{name}': '-scored' goes with fixed-P and ramp-A-B only")
    if name == "curriculum":
        return Curriculum(name, info, 0.0, curriculum_end, spread)
    if name in ("regmix", "regmix-linear", "replay-best") or name.removeprefix("replay-").isdigit():
        from dma_jax import offline_data

        if sweep_dir is None:
            raise DmaError(f"policy '{name}' needs the sweep's offline dataset")
        ds = offline_data.load(sweep_dir)
        _check_domains(ds.meta["domain_names"], info.domain_names, f"{sweep_dir}/meta.json")
        if name.startswith("regmix"):  # its candidates have their own fixed seed, not the CPT's
            fit = regmix.fit_lightgbm if name == "regmix" else regmix.fit_linear
            best, _ = fit(ds.actions, ds.returns, where=f"policy '{name}' on {sweep_dir}")
            return Static(name, best)
        k = int(np.argmax(ds.returns)) if name == "replay-best" else int(name.removeprefix("replay-"))
        if k >= ds.n:
            raise DmaError(f"policy '{name}': the sweep in {sweep_dir} has trajectories 0..{ds.n - 1} only")
        return Schedule(name, ds.actions[k])
    if name.startswith("agent-"):
        from dma_jax.agent.runner import load_exported_agent

        path = (agent_dirs or {}).get(name)
        if path is None:
            raise DmaError(f"policy '{name}': no exported agent (run `dma train-agent` and `dma export agent`)")
        if agent_policy(name) is not None:  # a run's agent (`runs.AgentExports`), not a named folder (`api`)
            _check_exported(name, path)
        from dma_jax import evaluation as ev

        fields = list(dict.fromkeys(["source"] + list(info.domain_fields)))
        layout = {"fields": fields, "target_field": info.target_field, "domain_fields": list(info.domain_fields),
                  "domain_loss_index": ev.domain_loss_index(info.domain_names, fields),
                  "field_score_index": ev.field_score_index(info.domain_names, fields),
                  "initial_weights": info.spread("source", "size").tolist()}
        return AgentPolicy(name, load_exported_agent(path), info, layout)
    raise DmaError(f"unknown policy '{name}' (source-only, target-only, fixed-P, ramp-A-B, fixed-P-scored, "
                   f"ramp-A-B-scored, curriculum, regmix, regmix-linear, replay-best, replay-K, agent-sft, agent-cql, "
                   f"agent-sft@K, agent-cql@K, schedule:FILE)")


def _check_exported(name: str, path) -> None:
    """An agent seed's export that is not there (or did not finish): one line naming its folder and the command."""
    spec = upath(path) / AGENT_SPEC_FILE
    if not spec.is_file():
        _, seed = agent_policy(name)
        make = "dma train-agent" + (f" --agent-seed {seed}" if seed else "")
        raise DmaError(f"{spec}: missing, so policy '{name}' (agent seed {seed}) has no finished export in "
                       f"{upath(path)} (run `{make}`)")


def _schedule_policy(name: str, info: SpaceInfo, num_stages: int | None, steps_per_stage: int | None) -> Schedule:
    """`schedule:FILE`: the file's mixtures, checked against the run's domain space and re-weighting steps."""
    if num_stages is None or steps_per_stage is None:
        raise DmaError(f"policy '{name}': a schedule file is replayed by `dma cpt` only")
    path = name.removeprefix(SCHEDULE_POLICY)
    sched = schedule_file.read(path)
    schedule_file.check_stages(sched, num_stages, steps_per_stage, path)
    return Schedule(policy_folder(name), sched.for_domains(info.domain_names, path))


def _share(name: str, text: str) -> float:
    """A target share written in a policy name: a number in [0, 1]."""
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise DmaError(f"policy '{name}': target share {text!r} must be a number in [0, 1]")
    return p


@dataclasses.dataclass
class AgentPolicy:
    """An exported agent in the loop: builds its per-domain features from the CPT's feedback layout."""

    name: str
    agent: object
    info: SpaceInfo
    layout_meta: dict

    def __call__(self, history: PolicyInput) -> np.ndarray:
        from dma_jax.agent.features import FeedbackLayout, History as AgentHistory

        D = len(self.info.domain_names)
        acts = np.asarray(history.weights, np.float32).reshape(len(history.weights), D)
        h = AgentHistory(acts, np.asarray(history.feedback, np.float32), FeedbackLayout.from_meta(self.layout_meta),
                         history.num_stages)
        return np.asarray(self.agent.act(h), np.float64)


def _check_domains(have: Sequence[str], want: Sequence[str], where: str) -> None:
    if list(have) != list(want):
        only_have = sorted(set(have) - set(want))
        only_want = sorted(set(want) - set(have))
        raise DmaError(f"{where}: built for another domain space (only there: {only_have}; only here: {only_want}"
                       + ("; same domains in another order" if not only_have and not only_want else "") + ")")

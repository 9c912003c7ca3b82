"""The public API: an exported mixing agent driving your own trainer's domain mixture.

    agent = MixingAgent.load("runs/demo/agent/export-cql")   # a `dma export agent` folder
    weights = agent.initial_mixture()                         # {domain: weight} for the first re-weighting step
    for step in range(1, agent.num_steps):
        ...train on `weights` for a while, evaluate...
        weights = agent.next_mixture(Feedback(domain_losses={...}, field_scores={...}))

The agent keeps the history (mixtures given, feedback received) and builds its features from it exactly as
`dma cpt` does: `MixingAgent` drives the same `policies.AgentPolicy` that `make_policy` builds for the CPT loop.
Feedback is relative to the base model (the model before CPT, which step 0 is decided from):
- `domain_losses[d]`: domain d's held-out loss / the base model's (1.0 = as the base);
- `field_scores[f]`: field f's score, 1.0 = as the base, higher is better; `dma` uses
  s_f = 1 + 0.5 (1 - bpb_f / bpb0_f) + 0.5 (1 - loss_f / loss0_f) (`evaluation`'s module doc); with held-out
  losses alone, 1 + (1 - loss_f / loss0_f) (loss_f: the held-out loss pooled over the field's domains).
The agent reads the target field's score and the mean of the other fields' (features.py).

A trainer without JAX (PyTorch, Megatron, ...) runs the agent as a child process speaking JSON lines:

    python -m dma_jax.api serve --agent DIR [--num-steps T] [--pretraining-mixture JSON] [--domains JSON]
                                [--target-field F]

stdout carries protocol lines only (anything else the process prints goes to stderr); one JSON object per line:
- first, unasked: {"domains": [...], "domain_fields": {domain: field}, "fields": [...], "target_field": F,
  "num_steps": T}, or {"error": "..."} and exit status 2 when the agent does not load;
- request {"op": "initial"} -> {"step": 0, "mixture": {domain: weight}};
- request {"op": "next", "domain_losses": {...}, "field_scores": {...}} -> {"step": t, "mixture": {...}};
- a bad request -> {"error": "<one line>"}, nothing changed, the next request is served; end of input: exit 0.
The agent runs on the CPU there (JAX_PLATFORMS=cpu unless set), so it takes no accelerator memory from the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dma_jax.errors import DmaError
from dma_jax.io_utils import read_json_file, upath
from dma_jax.policies import AgentPolicy, PolicyInput, SpaceInfo, make_policy


def _values(obj: Mapping, what: str) -> dict[str, float]:
    """{name: finite float} from a mapping of names to numbers; one-line DmaError naming `what` otherwise."""
    if not isinstance(obj, Mapping):
        raise DmaError(f"{what} must be a mapping of names to numbers, got {type(obj).__name__}")
    out = {}
    for name, v in obj.items():
        if not isinstance(name, str) or isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise DmaError(f"{what}[{name!r}] = {v!r}: need a domain or field name and a number")
        if not math.isfinite(float(v)):
            raise DmaError(f"{what}[{name!r}] is {float(v)}: need a finite number")
        out[name] = float(v)
    return out


@dataclasses.dataclass(frozen=True)
class Feedback:
    """The evaluation after one re-weighting step, relative to the base model (module doc)."""

    domain_losses: Mapping[str, float]  # {domain: held-out loss / base model's}
    field_scores: Mapping[str, float]  # {field: score, 1.0 = base, higher is better}

    def __post_init__(self):
        losses = _values(self.domain_losses, "Feedback.domain_losses")
        bad = {d: v for d, v in losses.items() if v <= 0}
        if bad:
            raise DmaError(f"Feedback.domain_losses: {bad} must be positive (a held-out loss over the base model's)")
        object.__setattr__(self, "domain_losses", losses)
        object.__setattr__(self, "field_scores", _values(self.field_scores, "Feedback.field_scores"))


def _check_names(have, want, what: str) -> None:
    """One-line DmaError naming the missing and the unknown names when `have` and `want` differ as sets."""
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = [f"{label} {', '.join(names)}" for label, names in (("missing", missing), ("unknown", extra)) if names]
        raise DmaError(f"{what}: {'; '.join(parts)} (this agent's: {', '.join(want)})")


def _trained_on(path) -> dict:
    """The `trained_on` block of an export's spec: the domain space and horizon the agent was trained on."""
    from dma_jax.agent.runner import SPEC_FILE

    spec_path = upath(path) / SPEC_FILE
    spec = read_json_file(spec_path, "missing (not an exported agent, or the export did not finish)")
    trained = spec.get("trained_on") if isinstance(spec, dict) else None
    keys = {"domain_names", "domain_fields", "target_field", "horizon"}
    if not isinstance(trained, dict) or not keys <= set(trained):
        raise DmaError(f"{spec_path}: trained_on must give domain_names, domain_fields, target_field and horizon")
    return trained


def _space(trained: dict, domains: Mapping[str, str] | None, target: str) -> SpaceInfo:
    """The domain space to mix: `domains` {domain: field}, or the trained one's source and target domains."""
    if domains is None:
        domains = {d: f for d, f in zip(trained["domain_names"], trained["domain_fields"]) if f in ("source", target)}
    if not isinstance(domains, Mapping) or not all(isinstance(x, str) for x in (*domains, *domains.values())):
        raise DmaError(f"domains must map each domain name to its field, got {domains!r}")
    fields = set(domains.values())
    if target == "source" or not {"source", target} <= fields:
        raise DmaError(f"domains: need domains of field 'source' and of the target field '{target}' "
                       f"(target_field), got fields {sorted(fields)}")
    return SpaceInfo(tuple(domains), tuple(domains.values()), target, tuple(1.0 for _ in domains))


def _mixture(weights: Mapping[str, float], info: SpaceInfo) -> np.ndarray:
    """A pre-training mixture {domain: weight} as a normalised [D]."""
    w = _values(weights, "pretraining_mixture")
    _check_names(w, info.domain_names, "pretraining_mixture")
    w_D = np.array([w[d] for d in info.domain_names])
    if (w_D < 0).any() or w_D.sum() <= 0:
        raise DmaError(f"pretraining_mixture: {w} must be non-negative with a positive sum")
    return w_D / w_D.sum()


class MixingAgent:
    """An exported agent choosing the mixture of each re-weighting step from the feedback so far."""

    def __init__(self, policy: AgentPolicy, num_steps: int, pretraining_w_D: np.ndarray, feedback_size: int):
        self._policy, self.num_steps, self._m = policy, num_steps, feedback_size
        info = policy.info
        self.domains: tuple[str, ...] = info.domain_names
        self.domain_fields: dict[str, str] = dict(zip(info.domain_names, info.domain_fields))
        self.fields: tuple[str, ...] = tuple(policy.layout_meta["fields"])
        self.target_field: str = info.target_field
        self.pretraining_mixture = dict(zip(self.domains, pretraining_w_D.tolist()))
        self._history: PolicyInput | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_steps: int | None = None,
             pretraining_mixture: Mapping[str, float] | None = None, domains: Mapping[str, str] | None = None,
             target_field: str | None = None) -> MixingAgent:
        """Load a `dma export agent` folder.

        `domains` {domain: field} and `target_field`: the domain space to mix (default: the one the agent was
        trained on, its source and target fields only, as `dma cpt` does); the agent runs on any number of
        domains. `num_steps`: re-weighting steps in the run (default: the training horizon). `pretraining_mixture`
        {domain: weight}: what the base model was trained on, normalised (default: uniform over the source
        domains; `dma` uses them by train tokens).
        """
        from dma_jax import evaluation as ev

        trained = _trained_on(path)
        info = _space(trained, domains, target_field or trained["target_field"])
        steps = trained["horizon"] if num_steps is None else num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DmaError(f"num_steps must be a whole number >= 1, got {steps!r}")
        w0_D = info.spread("source", "uniform") if pretraining_mixture is None else _mixture(pretraining_mixture, info)
        policy = make_policy("agent-exported", info, agent_dirs={"agent-exported": path})  # checks the export
        # the layout `make_policy` built for `dma cpt`, with this run's mixture before step 0
        policy = dataclasses.replace(policy, layout_meta=dict(policy.layout_meta, initial_weights=w0_D.tolist()))
        return cls(policy, steps, w0_D, len(ev.feedback_names(info.domain_names, policy.layout_meta["fields"])))

    @property
    def step(self) -> int:
        """Mixtures given so far in this run (0 before `initial_mixture`)."""
        return 0 if self._history is None else self._history.stage

    def initial_mixture(self) -> dict[str, float]:
        """Start a run (again, if one was going): the mixture of re-weighting step 0, chosen from the base model
        (its feedback relative to itself: every loss and score 1.0)."""
        base = Feedback({d: 1.0 for d in self.domains}, {f: 1.0 for f in self.fields})
        self._history = PolicyInput([], [self._vector(base)], self.num_steps)
        try:
            return self._act()
        except DmaError:
            self._history = None
            raise

    def next_mixture(self, feedback: Feedback) -> dict[str, float]:
        """The mixture of the next re-weighting step, given the evaluation after the step just trained."""
        if self._history is None:
            raise DmaError("next_mixture: call initial_mixture() first (it starts the run)")
        if self.step >= self.num_steps:
            raise DmaError(f"next_mixture: all {self.num_steps} mixtures of this run were given (num_steps="
                           f"{self.num_steps}); load with a larger num_steps for a longer run")
        if not isinstance(feedback, Feedback):
            raise DmaError(f"next_mixture: need a Feedback, got {type(feedback).__name__}")
        self._history.feedback.append(self._vector(feedback))
        try:
            return self._act()
        except DmaError:
            self._history.feedback.pop()
            raise

    def _vector(self, fb: Feedback) -> np.ndarray:
        """The CPT feedback vector [M] (`evaluation.feedback_names` order) of `fb`: losses and scores at the
        layout's indices; the entries the agent does not read (standard errors, ratios) are NaN."""
        _check_names(fb.domain_losses, self.domains, "Feedback.domain_losses")
        _check_names(fb.field_scores, self.fields, "Feedback.field_scores")
        meta = self._policy.layout_meta
        fb_M = np.full(self._m, np.nan, np.float32)
        fb_M[meta["domain_loss_index"]] = [fb.domain_losses[d] for d in self.domains]
        fb_M[meta["field_score_index"]] = [fb.field_scores[f] for f in meta["fields"]]
        return fb_M

    def _act(self) -> dict[str, float]:
        w_D = np.asarray(self._policy(self._history), np.float64)
        if not (np.isfinite(w_D).all() and (w_D >= 0).all() and abs(w_D.sum() - 1.0) <= 1e-6):
            raise DmaError(f"the agent gave an invalid mixture at step {self.step}: {w_D.tolist()}")
        self._history.weights.append(w_D)
        return dict(zip(self.domains, w_D.tolist()))


# ------------------------------------------------------------------ `python -m dma_jax.api serve`


def _json_arg(text: str | None, flag: str):
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError as e:
        raise DmaError(f"{flag}: not valid JSON ({e})") from None


def _serve_one(agent: MixingAgent, line: str) -> dict:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise DmaError(f"request is not valid JSON ({e})") from None
    op = req.get("op") if isinstance(req, dict) else None
    if op == "initial":
        mixture = agent.initial_mixture()
    elif op == "next":
        mixture = agent.next_mixture(Feedback(req.get("domain_losses"), req.get("field_scores")))
    else:
        raise DmaError(f"request: op must be 'initial' or 'next', got {op!r}")
    return {"step": agent.step - 1, "mixture": mixture}


def serve(argv: list[str]) -> int:
    """The JSON-lines agent process of the module doc; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m dma_jax.api serve")
    p.add_argument("--agent", required=True)
    p.add_argument("--num-steps", type=int)
    p.add_argument("--pretraining-mixture", help="JSON object {domain: weight}")
    p.add_argument("--domains", help="JSON object {domain: field}")
    p.add_argument("--target-field")
    args = p.parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol's stream; fd 1 now goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if "JAX_PLATFORMS" not in os.environ:  # before any computation: the backends start on first use
        import jax

        jax.config.update("jax_platforms", "cpu")

    def send(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        agent = MixingAgent.load(Path(args.agent), num_steps=args.num_steps, target_field=args.target_field,
                                 pretraining_mixture=_json_arg(args.pretraining_mixture, "--pretraining-mixture"),
                                 domains=_json_arg(args.domains, "--domains"))
    except DmaError as e:
        send({"error": str(e)})
        return 2
    send({"domains": list(agent.domains), "domain_fields": agent.domain_fields, "fields": list(agent.fields),
          "target_field": agent.target_field, "num_steps": agent.num_steps})
    for line in sys.stdin:
        if line.strip():
            try:
                send(_serve_one(agent, line))
            except DmaError as e:
                send({"error": str(e)})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        sys.exit("usage: python -m dma_jax.api serve --agent DIR [options]; see the module doc")
    sys.exit(serve(sys.argv[2:]))

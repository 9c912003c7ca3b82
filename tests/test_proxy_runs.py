"""Policies on the proxies (`proxy_runs.run_seed`): closed loop equals open loop where the mixtures are the same,
a closed-loop policy acts on its own proxy's feedback, and a killed run resumes to the same result."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dma_jax import proxy_runs
from dma_jax import sweep as sweep_mod
from dma_jax.config import load_config
from dma_jax.errors import DmaError
from dma_jax.policies import PolicyInput
from dma_jax.data.domains import DomainSpace
from tests.crash import crash_on_call
from tests.paths import DEMO


@dataclasses.dataclass
class _Reactive:
    """A toy closed-loop policy: its target share follows the change of one feedback entry since the base."""

    name: str
    info: proxy_runs.SpaceInfo
    k: int

    def __call__(self, history: PolicyInput) -> np.ndarray:
        change = float(history.feedback[-1][self.k] - history.feedback[0][self.k])
        share = 0.1 + 0.8 / (1.0 + np.exp(-50.0 * change))
        return self.info.target_share(share)


def _setup(prepared_world, tmp_path):
    prepared_world.link_base(tmp_path, ("proxy",))
    cfg = load_config(DEMO, prepared_world.run_overrides(tmp_path, "sweep.num_stages=3"), variant="tiny")
    return cfg, DomainSpace.for_sweep(cfg), proxy_runs.base_loader(cfg)


def test_closed_loop_equals_open_loop_for_fixed_mixtures(prepared_world, tmp_path):
    cfg, space, base = _setup(prepared_world, tmp_path)
    names = ["fixed-0.5", "source-only", "ramp-0.1-0.7"]
    W = proxy_runs.trajectories(cfg, space, names)
    opened = proxy_runs.run_seed(cfg, space, names, 4, base, tmp_path / "open", weights_NxTxD=W, progress=False)
    closed = proxy_runs.run_seed(cfg, space, names, 4, base, tmp_path / "closed", progress=False)
    np.testing.assert_array_equal(np.array(closed["weights"]), W)
    assert closed["returns"] == opened["returns"] and closed["feedback"] == opened["feedback"]
    assert closed["key"] != opened["key"]  # the closed loop's numbers depend on the agents and the sweep, not on W
    again = proxy_runs.run_seed(cfg, space, names, 4, base, tmp_path / "closed", progress=False)
    assert again == closed  # read back, not run again
    with pytest.raises(DmaError, match="another config or policy list"):
        proxy_runs.run_seed(cfg, space, names[:2], 4, base, tmp_path / "closed", progress=False)


def test_closed_loop_acts_on_its_own_feedback_and_resumes(prepared_world, tmp_path, monkeypatch):
    cfg, space, base = _setup(prepared_world, tmp_path)
    info = proxy_runs.space_info(cfg, space)
    k = 0  # the first feedback entry (a domain loss: it moves with every step)
    policies = [_Reactive("r1", info, k), _Reactive("r2", info, k)]
    monkeypatch.setattr(proxy_runs, "make_policies", lambda cfg, space, names: list(policies))
    T = cfg.sweep.num_stages
    with monkeypatch.context() as m:
        crash_on_call(m, sweep_mod.Sweep, "stage", T)  # the last step of the first run
        with pytest.raises(RuntimeError, match="simulated crash"):
            proxy_runs.run_seed(cfg, space, ["r1", "r2"], 1, base, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "checkpoints").is_dir() and not (tmp_path / "c" / proxy_runs.RESULT).exists()
    resumed = proxy_runs.run_seed(cfg, space, ["r1", "r2"], 1, base, tmp_path / "c", progress=False)
    straight = proxy_runs.run_seed(cfg, space, ["r1", "r2"], 1, base, tmp_path / "d", progress=False)
    assert resumed["returns"] == straight["returns"] and resumed["weights"] == straight["weights"]
    W, F = np.array(resumed["weights"]), np.array(resumed["feedback"], np.float32)
    for n in range(2):
        for t in range(T):  # each mixture is the policy applied to the feedback its own proxy had given so far
            expect = policies[n](PolicyInput([], list(F[n, : t + 1]), T))
            np.testing.assert_allclose(W[n, t], expect, atol=1e-6)
    shares = W[0][:, [f == cfg.sweep.target_field for f in space.fields_of_domain]].sum(-1)
    assert shares[0] == pytest.approx(0.5, abs=1e-6) and np.ptp(shares) > 1e-3  # the feedback moved the policy
    assert json.loads((tmp_path / "c" / proxy_runs.RESULT).read_text())["policies"] == ["r1", "r2"]

"""Tests for the trajectory sampler, checked against Dirichlet moments and the drift recursion."""


import numpy as np
import pydantic
import pytest

from dma_jax.errors import DmaError
from dma_jax.config import SamplerConfig
from dma_jax.trajectories import plot_trajectories, sample_trajectories

FIELDS = ["general"] * 4 + ["math"] * 3
SIZES = [4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 2.0]
IS_MATH = np.array([f == "math" for f in FIELDS])
# Independent reference distributions: source by size, target by size.
SOURCE = np.array([0.4, 0.3, 0.2, 0.1, 0, 0, 0])
TARGET = np.array([0, 0, 0, 0, 0.25, 0.25, 0.5])


def _sample(n, t, seed=0, **overrides):
    params = SamplerConfig(**overrides)
    return sample_trajectories(n, t, FIELDS, SIZES, "math", params, seed).astype(np.float64)


def _l1_steps(traj_NxTxD):
    return np.abs(np.diff(traj_NxTxD, axis=1)).sum(axis=2)


def test_shape_and_simplex():
    traj = sample_trajectories(50, 12, FIELDS, SIZES, "math", SamplerConfig(), seed=0)
    assert traj.shape == (50, 12, 7) and traj.dtype == np.float32
    assert np.all(traj >= SamplerConfig().min_weight * 0.99)
    np.testing.assert_allclose(traj.sum(axis=2), 1.0, atol=1e-6)


def test_deterministic_per_seed():
    np.testing.assert_array_equal(_sample(20, 8, seed=3), _sample(20, 8, seed=3))
    assert not np.allclose(_sample(20, 8, seed=3), _sample(20, 8, seed=4))


def test_start_mean_is_source_distribution_with_small_target_share():
    traj = _sample(4000, 1, seed=1, min_weight=0.0, init_target_share=0.02)
    expected_D = 0.98 * SOURCE + 0.02 * TARGET  # the Dirichlet mean
    np.testing.assert_allclose(traj[:, 0].mean(axis=0), expected_D, atol=3e-3)


def test_default_drift_increases_target_share():
    share_NxT = _sample(200, 30, seed=2)[:, :, IS_MATH].sum(axis=2)
    assert share_NxT[:, 0].mean() < 0.1
    assert share_NxT[:, -1].mean() > share_NxT[:, 0].mean() + 0.2
    assert np.all(np.diff(share_NxT.mean(axis=0)) > -0.01)


def test_drift_follows_geometric_recursion_when_steps_are_nearly_deterministic():
    # With c -> inf each step equals its mean: w_t = 0.9^t w_0 + (1 - 0.9^t) * target.
    traj = _sample(30, 40, seed=5, min_weight=0.0, wide_share=0.0,
                   step_concentration=1e8, drift_rate_range=(0.1, 0.1))
    decay_T = 0.9 ** np.arange(40)
    expected = decay_T[None, :, None] * traj[:, :1] + (1 - decay_T)[None, :, None] * TARGET
    np.testing.assert_allclose(traj, expected, atol=2e-3)


def test_step_variance_matches_dirichlet():
    # Without drift or floor, E||w_{t+1} - w_t||^2 = (1 - ||w_t||^2) / (c + 1).
    c = 100.0
    traj = _sample(400, 10, seed=6, min_weight=0.0, wide_share=0.0,
                   step_concentration=c, drift_rate_range=(0.0, 0.0))
    sq_step = (np.diff(traj, axis=1) ** 2).sum(axis=2)
    predicted = (1 - (traj[:, :-1] ** 2).sum(axis=2)) / (c + 1)
    np.testing.assert_allclose(sq_step.mean(), predicted.mean(), rtol=0.1)


def test_higher_concentration_gives_smaller_steps():
    smooth = _l1_steps(_sample(100, 10, seed=7, wide_share=0.0, step_concentration=1000.0))
    rough = _l1_steps(_sample(100, 10, seed=7, wide_share=0.0, step_concentration=30.0))
    assert smooth.mean() < 0.5 * rough.mean()


def test_wide_trajectories_take_larger_steps():
    # All start at nearly the same point, so early step sizes depend only on the concentration.
    kw = dict(step_concentration=1000.0, wide_concentration=20.0, drift_rate_range=(0.0, 0.0),
              init_concentration=1e4)
    narrow = _l1_steps(_sample(100, 6, seed=8, wide_share=0.0, **kw)).mean()
    wide = _l1_steps(_sample(100, 6, seed=8, wide_share=1.0, **kw)).mean()
    assert wide > 4.0 * narrow
    # A mixed sweep splits cleanly: exactly round(0.3 * 100) trajectories step wide.
    per_traj = _l1_steps(_sample(100, 6, seed=9, wide_share=0.3, **kw)).mean(axis=1)
    assert np.sum(per_traj > np.sqrt(narrow * wide)) == 30


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(step_concentration=0.0), "step_concentration"),
        (dict(init_concentration=-1.0), "init_concentration"),
        (dict(wide_concentration=float("nan")), "wide_concentration"),
        (dict(wide_share=1.5), "wide_share"),
        (dict(min_weight=1.0), "min_weight"),
        (dict(init_target_share=1.0), "init_target_share"),
        (dict(drift_rate_range=(0.2, 0.1)), "drift_rate_range"),
        (dict(drift_rate_range=(0.1,)), "drift_rate_range"),
    ],
)
def test_params_validation(overrides, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        SamplerConfig(**overrides)


@pytest.mark.parametrize(
    "fields, sizes, target, params, match",
    [
        (FIELDS, SIZES[:-1], "math", SamplerConfig(), "domain_sizes has 6"),
        (FIELDS, [0.0] + SIZES[1:], "math", SamplerConfig(), "domain_sizes must be"),
        (FIELDS, SIZES, "code", SamplerConfig(), "target_field='code'"),
        (["math"] * 7, SIZES, "math", SamplerConfig(), "no source domain"),
        (FIELDS, SIZES, "math", SamplerConfig(min_weight=0.2), "min_weight"),
    ],
)
def test_sampler_input_validation(fields, sizes, target, params, match):
    with pytest.raises(DmaError, match=match):
        sample_trajectories(4, 3, fields, sizes, target, params, seed=0)


def test_plot_writes_png(tmp_path):
    traj = sample_trajectories(10, 12, FIELDS, SIZES, "math", SamplerConfig(), seed=0)
    path = tmp_path / "plots" / "trajectories.png"
    names = [f"{f}_{i}" for i, f in enumerate(FIELDS)]
    plot_trajectories(traj, names, FIELDS, str(path), n_show=4)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["trajectories.png"]
    with pytest.raises(DmaError, match="3 names"):
        plot_trajectories(traj, names[:3], FIELDS, str(path))

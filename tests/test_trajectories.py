"""Tests for the trajectory sampler, checked against Dirichlet moments, the uniform start shares and the
drift recursions (rise, fall, turn, emphasis) with near-deterministic steps."""


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


# Steps equal to their means (c -> inf), no floor, no wide steps, no turns or emphasis unless asked.
EXACT = dict(init_concentration=1e10, step_concentration=1e10, min_weight=0.0, wide_share=0.0, turn_share=0.0,
             emphasis_share=0.0)


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


def test_start_mean_is_the_start_share_split_by_size():
    traj = _sample(4000, 1, seed=1, min_weight=0.0, emphasis_share=0.0, init_target_share_range=(0.3, 0.3))
    expected_D = 0.7 * SOURCE + 0.3 * TARGET  # the Dirichlet mean
    np.testing.assert_allclose(traj[:, 0].mean(axis=0), expected_D, atol=3e-3)


@pytest.mark.parametrize("lo, hi", [(0.0, 0.6), (0.2, 0.9)])
def test_start_shares_are_uniform_over_the_range(lo, hi):
    share_N = _sample(4000, 1, seed=11, **EXACT, init_target_share_range=(lo, hi))[:, 0, IS_MATH].sum(axis=1)
    q = np.array([5.0, 25.0, 50.0, 75.0, 95.0])
    # U(lo, hi) quantiles; a sample quantile's SE is sqrt(p(1-p)/n) * (hi - lo) <= 0.005 here
    np.testing.assert_allclose(np.percentile(share_N, q), lo + q / 100 * (hi - lo), atol=0.015)
    assert lo - 1e-6 <= share_N.min() and share_N.max() <= hi + 1e-6


def test_default_sweep_starts_high_and_low_and_both_rises_and_falls():
    share_NxT = _sample(2000, 8, seed=2)[:, :, IS_MATH].sum(axis=2)
    assert np.percentile(share_NxT[:, 0], 5) < 0.07 and np.percentile(share_NxT[:, 0], 95) > 0.5
    falling = np.mean(share_NxT[:, -1] < share_NxT[:, 0] - 0.05)
    rising = np.mean(share_NxT[:, -1] > share_NxT[:, 0] + 0.05)
    assert falling > 0.15 and rising > 0.3


def test_drift_follows_geometric_recursion_when_steps_are_nearly_deterministic():
    # With c -> inf each step equals its mean: w_t = 0.9^t w_0 + (1 - 0.9^t) * target.
    traj = _sample(30, 40, seed=5, min_weight=0.0, wide_share=0.0, turn_share=0.0, emphasis_share=0.0,
                   step_concentration=1e8, drift_rate_range=(0.1, 0.1))
    decay_T = 0.9 ** np.arange(40)
    expected = decay_T[None, :, None] * traj[:, :1] + (1 - decay_T)[None, :, None] * TARGET
    np.testing.assert_allclose(traj, expected, atol=2e-3)


def test_negative_drift_falls_toward_the_source_distribution():
    # r = -0.2 from a 0.5 start: w_t = 0.8^t w_0 + (1 - 0.8^t) * source, so the target share is 0.5 * 0.8^t.
    traj = _sample(20, 12, seed=12, **EXACT, init_target_share_range=(0.5, 0.5), drift_rate_range=(-0.2, -0.2))
    decay_T = 0.8 ** np.arange(12)
    w0_D = 0.5 * SOURCE + 0.5 * TARGET
    expected_TxD = decay_T[:, None] * w0_D + (1 - decay_T)[:, None] * SOURCE
    np.testing.assert_allclose(traj, np.broadcast_to(expected_TxD, traj.shape), atol=1e-4)
    np.testing.assert_allclose(traj[:, :, IS_MATH].sum(axis=2), np.broadcast_to(0.5 * decay_T, (20, 12)), atol=1e-4)


def _turn_path(k: int, t: int, s0: float, r: float) -> np.ndarray:
    """Target share of a turn trajectory: rises at rate r on steps 1..k-1, falls at rate r from step k on."""
    s_T = [s0]
    for step in range(1, t):
        s_T.append(s_T[-1] + r * (1 - s_T[-1]) if step < k else (1 - r) * s_T[-1])
    return np.array(s_T)


def test_turn_trajectories_rise_then_fall():
    t = 10
    share_NxT = _sample(300, t, seed=13, **{**EXACT, "turn_share": 1.0}, init_target_share_range=(0.1, 0.1),
                        drift_rate_range=(0.2, 0.2))[:, :, IS_MATH].sum(axis=2)
    turn_at_N = share_NxT.argmax(axis=1) + 1  # the last rising step's mixture is the peak
    assert set(turn_at_N.tolist()) == set(range(1, t))  # every turn step in [1, T-1] is drawn
    for share_T, k in zip(share_NxT, turn_at_N):
        np.testing.assert_allclose(share_T, _turn_path(k, t, 0.1, 0.2), atol=1e-4)
    # turn_share 0.25: exactly 25 of 100 rising trajectories stop rising at some step
    share_NxT = _sample(100, t, seed=14, **{**EXACT, "turn_share": 0.25},
                        drift_rate_range=(0.05, 0.2))[:, :, IS_MATH].sum(axis=2)
    assert np.sum((np.diff(share_NxT, axis=1) < 0).any(axis=1)) == 25


def _ratios(traj_NxTxD, fields, sizes):
    """Each domain's weight over (its field's share x its size share within the field): 1 = spread by size."""
    fields, sizes = np.array(fields), np.array(sizes, np.float64)
    out = np.empty_like(traj_NxTxD)
    for f in set(fields.tolist()):
        m = fields == f
        out[..., m] = traj_NxTxD[..., m] / traj_NxTxD[..., m].sum(-1, keepdims=True) / (sizes[m] / sizes[m].sum())
    return out


def _picked(ratio_NxD, fields):
    """Down-weighted domains: far below the largest ratio of their field (a field keeps one domain unpicked)."""
    fields = np.array(fields)
    field_max_NxD = np.stack([ratio_NxD[:, fields == f].max(axis=1) for f in fields], axis=1)
    return ratio_NxD < 0.5 * field_max_NxD


def test_emphasis_down_weights_domains_within_fields_and_keeps_field_shares():
    factor, t = 0.1, 6
    traj = _sample(400, t, seed=15, **{**EXACT, "emphasis_share": 1.0}, emphasis_factor=factor,
                   init_target_share_range=(0.3, 0.3), drift_rate_range=(0.2, 0.2))
    # field shares are those of the plain drift: 1 - 0.8^t * 0.7
    np.testing.assert_allclose(traj[:, :, IS_MATH].sum(axis=2),
                               np.broadcast_to(1 - 0.8 ** np.arange(t) * 0.7, (400, t)), atol=1e-4)
    ratio_NxTxD = _ratios(traj, FIELDS, SIZES)
    picked_NxD = _picked(ratio_NxTxD[:, 0], FIELDS)
    sizes = np.array(SIZES)
    for f in ("general", "math"):  # within a field: picked domains at factor x the others, by size
        m = np.array(FIELDS) == f
        assert not picked_NxD[:, m].all(axis=1).any()  # never a field's last domain
        mult_NxD = np.where(picked_NxD[:, m], factor, 1.0) * sizes[m]
        expected_NxD = mult_NxD / mult_NxD.sum(axis=1, keepdims=True) / (sizes[m] / sizes[m].sum())
        for step in (0, t - 1):  # the same at the start and at the end: the down-weighting does not compound
            np.testing.assert_allclose(ratio_NxTxD[:, step][:, m], expected_NxD, rtol=1e-3)
    assert picked_NxD.any(axis=1).all()
    assert (ratio_NxTxD[:, -1][picked_NxD] < 0.6).all()  # far below the size share (0.1 x, renormalised)
    assert (0.3 < picked_NxD.mean(axis=0)).all() and (picked_NxD.mean(axis=0) < 0.7).all()
    # emphasis_share 0.3: exactly 30 of 100 trajectories are not spread by size
    plain = _ratios(_sample(100, 2, seed=16, **{**EXACT, "emphasis_share": 0.3}), FIELDS, SIZES)
    assert np.sum((np.abs(plain - 1) > 0.01).any(axis=(1, 2))) == 30


def test_emphasis_leaves_single_domain_fields_alone():
    fields, sizes = ["general", "general", "math"], [2.0, 1.0, 1.0]
    traj = sample_trajectories(200, 2, fields, sizes, "math", SamplerConfig(**{**EXACT, "emphasis_share": 1.0},
                               init_target_share_range=(0.2, 0.2)), seed=0).astype(np.float64)
    picked_NxD = _picked(_ratios(traj, fields, sizes)[:, 0], fields)
    assert not picked_NxD[:, 2].any()
    np.testing.assert_array_equal(picked_NxD[:, :2].sum(axis=1), 1)  # at least one, never both


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
        (dict(init_target_share_range=(0.5, 0.2)), "init_target_share_range"),
        (dict(init_target_share_range=(0.2, 1.0)), "init_target_share_range"),
        (dict(drift_rate_range=(-1.5, 0.1)), "drift_rate_range"),
        (dict(turn_share=1.5), "turn_share"),
        (dict(emphasis_share=-0.1), "emphasis_share"),
        (dict(emphasis_factor=1.5), "emphasis_factor"),
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

"""Coverage of a sweep (trajectories.py): the markdown table against np.percentile on independently summed
shares, the PNG, percentile ranks against scipy, the step mapping, and the trajectories.npz format."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats

from dma_jax import trajectories as traj
from dma_jax.errors import DmaError

NAMES = ["web", "books", "code_src", "arith", "algebra", "geometry"]
FIELDS = ["source", "source", "source", "math", "math", "math"]
IS_MATH = np.array([f == "math" for f in FIELDS])


def _weights(n=300, t=5, seed=0):
    """Random mixtures whose math share drifts over the steps (so every step's percentiles differ)."""
    rng = np.random.default_rng(seed)
    alpha_TxD = np.where(IS_MATH, 1.0 + np.arange(5)[:, None], 3.0)
    return np.stack([rng.dirichlet(a, size=n) for a in alpha_TxD], axis=1).astype(np.float32)


def _rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table that follows `header`."""
    block = text.split(header, 1)[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_table_percentiles_equal_numpy():
    w = _weights()
    text = traj.coverage_markdown(w, NAMES, FIELDS)
    w64 = w.astype(np.float64)
    share_NxT = {"source": w64[:, :, ~IS_MATH].sum(-1), "math": w64[:, :, IS_MATH].sum(-1)}
    rows = _rows(text, "## Field shares")
    assert [r[0] for r in rows] == [str(s) for s in range(5)]
    for s, row in enumerate(rows):
        for field, cell in zip(("source", "math"), row[1:]):
            got = [float(x) for x in cell.split("/")]
            np.testing.assert_allclose(got, np.percentile(share_NxT[field][:, s], [5, 50, 95]), atol=6e-5)
    rows = _rows(text, "## Domain weights")
    assert [(r[0], r[1]) for r in rows] == list(zip(NAMES, FIELDS))
    for d, row in enumerate(rows):
        lo = min(np.percentile(w[:, s, d].astype(np.float64), 5) for s in range(5))
        hi = max(np.percentile(w[:, s, d].astype(np.float64), 95) for s in range(5))
        np.testing.assert_allclose([float(row[2]), float(row[3])], [lo, hi], atol=6e-5)
    assert "300 trajectories, 5 re-weighting steps, 6 domains" in text


def test_write_coverage_writes_a_png_and_the_table_atomically(tmp_path):
    w = _weights(n=50)
    plot, table = tmp_path / "sweep" / "coverage.png", tmp_path / "sweep" / "coverage.md"
    plot.parent.mkdir()
    traj.write_coverage(w, NAMES, FIELDS, plot, table)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(plot)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # something is drawn
    assert table.read_text() == traj.coverage_markdown(w, NAMES, FIELDS)
    assert sorted(p.name for p in plot.parent.iterdir()) == ["coverage.md", "coverage.png"]


def test_coverage_rejects_mismatched_inputs(tmp_path):
    w = _weights(n=10)
    with pytest.raises(DmaError, match="6 domains in trajectories but 5 names"):
        traj.coverage_markdown(w, NAMES[:5], FIELDS)
    with pytest.raises(DmaError, match=r"\[N, T, D\]"):
        traj.plot_coverage(w[0], NAMES, FIELDS, tmp_path / "c.png")


def test_percentile_rank_matches_scipy():
    rng = np.random.default_rng(1)
    values = np.round(rng.uniform(size=200), 2)  # ties included
    for x in (-1.0, 0.0, 0.37, float(values[17]), 0.5, 1.0, 2.0):
        assert traj.percentile_rank(values, x) == pytest.approx(stats.percentileofscore(values, x, kind="mean"))


def test_share_percentiles_compare_with_the_sweep_step_covering_the_same_fraction():
    w = _weights(n=200, t=5)
    math_NxT = w[:, :, IS_MATH].astype(np.float64).sum(-1)
    share_T = np.array([0.1, 0.3, 0.5, 0.9])
    expected = [100 * (np.mean(math_NxT[:, s] < x) + 0.5 * np.mean(math_NxT[:, s] == x))
                for s, x in zip([0, 1, 2, 3], share_T)]  # floor(t * 5 / 4)
    np.testing.assert_allclose(traj.share_percentiles(w, FIELDS, "math", share_T), expected)
    share_T = np.array([0.2, 0.4])  # two steps over five sweep steps: sweep steps 0 and 2
    expected = [100 * np.mean(math_NxT[:, s] < x) for s, x in zip([0, 2], share_T)]
    np.testing.assert_allclose(traj.share_percentiles(w, FIELDS, "math", share_T), expected)
    assert traj.share_percentiles(w, FIELDS, "code", share_T) is None


def test_trajectories_file_round_trip_and_bad_files(tmp_path):
    w = _weights(n=7)
    path = tmp_path / "trajectories.npz"
    traj.save(path, w, NAMES, FIELDS, "math")
    got, names, fields, target = traj.load(path)
    np.testing.assert_array_equal(got, w)
    assert (names, fields, target) == (NAMES, FIELDS, "math")
    np.savez(path, weights_NxTxD=w, domain_names=np.array(NAMES), domain_fields=np.array(FIELDS))  # older file
    assert traj.load(path)[3] is None
    path.write_bytes(b"garbage")
    with pytest.raises(DmaError, match=re.escape(f"{path}: not a trajectories file")):
        traj.load(path)
    bad = w.copy()
    bad[0, 0, 0] = np.nan
    traj.save(path, bad, NAMES, FIELDS, "math")
    with pytest.raises(DmaError, match="finite"):
        traj.load(path)
    traj.save(path, w, NAMES[:5], FIELDS[:5], "math")
    with pytest.raises(DmaError, match="shape"):
        traj.load(path)

"""report.py set against the sweep, on a small fake run folder: each policy's target share and its percentile
among the sweep's trajectories (checked with numpy), the missing cases, and the response-surface plot."""

from __future__ import annotations

import numpy as np
import pytest

from dma_jax import offline_data
from dma_jax import report_plots as plots_mod
from dma_jax import trajectories as traj
from dma_jax.report import write_report
from tests.test_report import DOMAINS, FINAL, _history, _write

NAMES, FIELDS = [n for n, _ in DOMAINS], [f for _, f in DOMAINS]
IS_MATH = np.array([f == "math" for f in FIELDS])
N_SWEEP = 40


@pytest.fixture()
def run(tmp_path):
    """cpt/ with three policies (3, 3, 2 seeds, T=4) and sweep/ with 40 trajectories of `t_sweep` steps."""
    for (policy, seed), final in FINAL.items():
        _write(tmp_path / "cpt", _history(policy, seed, final))
    (tmp_path / "sweep").mkdir()
    return tmp_path


def _sweep(run, t_sweep: int, fields=FIELDS):
    """Math shares in a narrow band (U(0.3, 0.5)) so that some of the policies' shares fall outside it."""
    rng = np.random.default_rng(7)
    share_NxTx1 = rng.uniform(0.3, 0.5, size=(N_SWEEP, t_sweep, 1))
    w = np.zeros((N_SWEEP, t_sweep, len(NAMES)))
    w[..., IS_MATH] = share_NxTx1 * rng.dirichlet(np.ones(IS_MATH.sum()), size=(N_SWEEP, t_sweep))
    w[..., ~IS_MATH] = (1 - share_NxTx1) * rng.dirichlet(np.ones((~IS_MATH).sum()), size=(N_SWEEP, t_sweep))
    w = w.astype(np.float32)
    traj.save(run / "sweep" / "trajectories.npz", w, NAMES, fields, "math")
    return w


def _section_rows(text: str) -> dict[str, list[str]]:
    block = text.split("## Policies inside the sweep's envelope", 1)[1].split("\n\n")[2]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    assert rows[0][0] == "policy" and rows[0][-1] == "outside"
    return {r[0]: r[1:] for r in rows[2:]}


@pytest.mark.parametrize("t_sweep", [4, 8])
def test_policy_shares_and_their_percentiles_among_the_sweep(run, t_sweep):
    w = _sweep(run, t_sweep)
    path = write_report(run / "cpt", run / "report", trajectories_path=run / "sweep" / "trajectories.npz")
    rows = _section_rows(path.read_text())
    assert sorted(rows) == sorted({p for p, _ in FINAL})
    sweep_NxT = w[:, :, IS_MATH].astype(np.float64).sum(-1)
    n_outside = 0
    for policy, cells in rows.items():
        weights = [_history(p, s, FINAL[(p, s)])["weights"] for p, s in sorted(FINAL) if p == policy]
        share_T = np.mean([np.asarray(x)[:, IS_MATH].sum(axis=1) for x in weights], axis=0)
        outside = 0
        for t, (cell, x) in enumerate(zip(cells[:-1], share_T)):
            s = t * t_sweep // 4
            pct = 100 * (np.mean(sweep_NxT[:, s] < x) + 0.5 * np.mean(sweep_NxT[:, s] == x))
            flagged = pct < 5 or pct > 95
            assert cell == f"{x:.3f} (p{pct:.0f}{', *outside*' if flagged else ''})", (policy, t)
            outside += flagged
        assert cells[-1] == f"{outside} of 4"
        n_outside += outside
    # some of the 12 cells land outside the band, some inside: both branches are checked
    assert 0 < n_outside < 12


def test_missing_trajectories_and_a_sweep_without_the_target_field(run):
    text = write_report(run / "cpt", run / "report", trajectories_path=run / "sweep" / "nothing.npz").read_text()
    assert "The sweep has no trajectories" in text and "nothing.npz" in text
    _sweep(run, 4, fields=["source", "source", "source", "code", "code"])
    rows = _section_rows(write_report(run / "cpt", run / "report",
                                      trajectories_path=run / "sweep" / "trajectories.npz").read_text())
    assert all(cells[0] == "the sweep has no math domain" for cells in rows.values())
    text = write_report(run / "cpt", run / "report").read_text()
    assert "sweep's envelope" not in text and "response_surface" not in text


def _offline(w_NxTxD: np.ndarray) -> offline_data.OfflineDataset:
    """Offline data whose field scores follow the math share: score_math = 1 + share, score_source = 1 - share/2."""
    n, t, d = w_NxTxD.shape
    share_NxT = w_NxTxD[:, :, IS_MATH].sum(-1)
    scores_NxT1x2 = np.ones((n, t + 1, 2), np.float32)
    scores_NxT1x2[:, 1:, 0] = 1 - share_NxT / 2
    scores_NxT1x2[:, 1:, 1] = 1 + share_NxT
    feedback = np.concatenate([np.full((n, t + 1, d), 1.0, np.float32), scores_NxT1x2], axis=2)
    rewards = np.diff(scores_NxT1x2.mean(-1), axis=1).astype(np.float32)
    meta = {"format": offline_data.FORMAT, "domain_names": NAMES, "domain_fields": FIELDS,
            "fields": ["source", "math"], "target_field": "math",
            "feedback_names": [f"loss/{x}" for x in NAMES] + ["score/source", "score/math"],
            "domain_loss_index": list(range(d)), "field_score_index": [d, d + 1], "balanced": "mean",
            "config": {}, "config_hash": "x"}
    return offline_data.OfflineDataset(actions=w_NxTxD, feedback=feedback, rewards=rewards,
                                       returns=rewards.sum(1), meta=meta)


def test_response_surface_plots_the_sweep(run, monkeypatch):
    w = _sweep(run, 4)
    offline_data.save(_offline(w), run / "sweep" / "offline")
    figures = {}
    save_png = plots_mod._save_png
    monkeypatch.setattr(plots_mod, "_save_png", lambda fig, path: (figures.__setitem__(path.name, fig),
                                                                    save_png(fig, path)))
    path = write_report(run / "cpt", run / "report", offline_dir=run / "sweep" / "offline")
    assert "![Response surface](response_surface.png)" in path.read_text()
    assert (run / "report" / "response_surface.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_s, ax_r = [ax for ax in figures["response_surface.png"].axes if ax.get_visible()]
    share_NxT = w[:, :, IS_MATH].astype(np.float64).sum(-1)
    for t, points in enumerate(ax_s.collections):  # one scatter per step: (share of step t, B after it)
        balanced_N = ((1 - share_NxT[:, t] / 2) + (1 + share_NxT[:, t])) / 2
        np.testing.assert_allclose(points.get_offsets(), np.column_stack([share_NxT[:, t], balanced_N]), atol=1e-5)
    returns_N = ((1 - share_NxT[:, -1] / 2) + (1 + share_NxT[:, -1])) / 2 - 1
    np.testing.assert_allclose(ax_r.collections[0].get_offsets(),
                               np.column_stack([share_NxT.mean(1), returns_N]), atol=1e-5)
    assert len(ax_s.collections) == 4

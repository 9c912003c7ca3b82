"""Target CPT under mixing policies: the loop, the baselines, guard rails, resume, export/import."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from dma_jax import cpt as cpt_mod
from dma_jax import export, offline_data, policies
from dma_jax import regmix as regmix_mod
from dma_jax.config import load_config
from dma_jax.data.demo_corpora import LOW_QUALITY_DOMAINS
from dma_jax.errors import DmaError
from dma_jax.models import hf
from dma_jax.runs import RunDir
from dma_jax.checkpoint import Checkpointer
from dma_jax.train import Trainer, load_base_params, load_cpt_params
from tests.crash import crash_on_call
from tests.mixer_ref import carried_counts
from tests.paths import DEMO

INFO = policies.SpaceInfo(("s1", "s2", "m1", "m2", "m3"), ("source", "source", "math", "math", "math"), "math",
                          (100.0, 300.0, 10.0, 30.0, 60.0))


def _hist(t, T=5):
    return policies.PolicyInput([np.ones(5) / 5] * t, [np.ones(3)] * (t + 1), T)


def test_static_baselines_match_their_definitions():
    src = policies.make_policy("source-only", INFO)(_hist(0))
    np.testing.assert_allclose(src, [0.25, 0.75, 0, 0, 0])
    tgt = policies.make_policy("target-only", INFO, spread="uniform")(_hist(0))
    np.testing.assert_allclose(tgt, [0, 0, 1 / 3, 1 / 3, 1 / 3])
    w = policies.make_policy("fixed-0.3", INFO)(_hist(2))
    np.testing.assert_allclose(w, [0.175, 0.525, 0.03, 0.09, 0.18])
    cur = policies.make_policy("curriculum", INFO)
    shares = [cur(_hist(t))[2:].sum() for t in range(5)]
    np.testing.assert_allclose(shares, [0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(DmaError, match="fixed-1.5"):
        policies.make_policy("fixed-1.5", INFO)
    with pytest.raises(DmaError, match="unknown policy 'magic'"):
        policies.make_policy("magic", INFO)


def test_safe_policy_never_lets_a_bad_mixture_through():
    outs = iter([np.array([0.5, 0.5, 0, 0, 0]), np.array([np.nan, 1, 0, 0, 0]), np.array([0.2] * 4),
                 np.array([-0.1, 0.6, 0.5, 0, 0]), np.array([0.3] * 5)])
    safe = policies.SafePolicy(type("P", (), {"name": "bad", "__call__": lambda self, h: next(outs)})(), 5,
                               np.array([0.25, 0.75, 0, 0, 0]))
    h = _hist(0)
    first = safe(h)
    h.weights.append(first)
    for _ in range(4):
        assert np.array_equal(safe(h), first)  # NaN, wrong length, negative, sum 1.5: all replaced
    assert safe.rejected == 4


@pytest.fixture(scope="module")
def run(swept_world, tmp_path_factory):
    """A run folder of its own, the session's base models and sweep linked in (tests/conftest.py); CPT runs 3
    re-weighting steps."""
    root = swept_world.link_sweep(swept_world.link_base(tmp_path_factory.mktemp("cpt")))
    over = swept_world.run_overrides(root, "cpt.num_stages=3", "mesh.data=1")
    cfg = load_config(DEMO, over, variant="tiny")
    return cfg, over


def test_cpt_follows_the_policy_batch_by_batch(run):
    cfg, _ = run
    doc = cpt_mod.run_cpt(cfg, "curriculum", 0, devices=jax.devices()[:1], progress=False)
    assert doc.complete and doc.weights_TxD.shape[0] == 3 and doc.field_scores_T1xF.shape[0] == 4
    np.testing.assert_allclose(doc.field_scores_T1xF[0], 1.0)
    out = RunDir(cfg).cpt_run("curriculum", 0)
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    S, B = cfg.cpt.steps_per_stage, cfg.cpt.batch_size
    assert [r["step"] for r in recs] == list(range(1, 3 * S + 1))
    want = carried_counts([doc.weights_TxD[(r["step"] - 1) // S] for r in recs], B)
    for r, want_counts in zip(recs, want):
        np.testing.assert_array_equal(np.bincount(r["domain"], minlength=len(want_counts)), want_counts)
    assert doc.weights_TxD[0][doc.domain_fields.index("math")] == 0.0  # the curriculum starts on source
    # The in-loop items, recorded per domain: every domain of a field, as evenly as the item count allows.
    n = cfg.eval.benchmark_items_per_field
    for field in doc.fields:
        doms = [d for d, f in zip(doc.domain_names, doc.domain_fields)
                if f == field and d not in LOW_QUALITY_DOMAINS]  # low-quality domains have no benchmark items
        counts = doc.eval_items[field]
        assert sorted(counts) == sorted(doms) and sum(counts.values()) == n
        assert max(counts.values()) - min(counts.values()) <= 1


def test_cpt_resumes_after_a_crash_without_repeating_records(run, tmp_path, monkeypatch):
    cfg, over = run
    ref = cpt_mod.run_cpt(cfg, "fixed-0.5", 0, devices=jax.devices()[:1], progress=False)
    ref_recs = (RunDir(cfg).cpt_run("fixed-0.5", 0) / "records.jsonl").read_text()
    cfg2 = load_config(DEMO, over + [f"run.out_dir={tmp_path}"], variant="tiny")
    for sub in ("pretrain-target", "sweep"):
        (tmp_path / sub).symlink_to(Path(cfg.run.out_dir) / sub)
    crash_on_call(monkeypatch, Trainer, "step", cfg.cpt.steps_per_stage + 1)  # step 1 of re-weighting step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        cpt_mod.run_cpt(cfg2, "fixed-0.5", 0, devices=jax.devices()[:1], progress=False)
    monkeypatch.undo()
    doc = cpt_mod.run_cpt(cfg2, "fixed-0.5", 0, devices=jax.devices()[:1], progress=False)
    assert (tmp_path / "cpt" / "fixed-0.5" / "seed0" / "records.jsonl").read_text() == ref_recs
    np.testing.assert_allclose(doc.field_scores_T1xF, ref.field_scores_T1xF, atol=1e-6)


@pytest.mark.parametrize("crash_at", [1, 2])  # in re-weighting step 2 or 3, after 1 or 2 checkpoints
def test_a_resumed_cpt_checks_spikes_against_the_same_running_mean(run, tmp_path, monkeypatch, crash_at):
    # optim.max_loss_spike with skip: a loss above 1.0001 x the running mean of the good losses is skipped. The
    # running mean is kept in the checkpoint, so a crashed-and-resumed run skips the same steps as an
    # uninterrupted one and ends with the same scores (a fresh mean would accept every loss until its first one).
    cfg, over = run
    spike = ["optim.max_loss_spike=1.0001", "optim.on_nonfinite=skip"]
    def finished(out):
        with Checkpointer(Path(out) / "cpt" / "curriculum" / "seed0" / "checkpoints", create=False) as ck:
            return ck.read_meta()["loss_guard"]

    cfg_a = load_config(DEMO, over + spike + [f"run.out_dir={tmp_path / 'a'}"], variant="tiny")
    cfg_b = load_config(DEMO, over + spike + [f"run.out_dir={tmp_path / 'b'}"], variant="tiny")
    for c in (cfg_a, cfg_b):
        for sub in ("pretrain-target", "sweep"):
            (Path(c.run.out_dir)).mkdir(parents=True, exist_ok=True)
            (Path(c.run.out_dir) / sub).symlink_to(Path(cfg.run.out_dir) / sub)
    ref = cpt_mod.run_cpt(cfg_a, "curriculum", 0, devices=jax.devices()[:1], progress=False)
    guard = finished(cfg_a.run.out_dir)
    assert guard["skipped"] >= 1 and guard["mean"] > 0  # the setting bites: some step was skipped
    crash_on_call(monkeypatch, Trainer, "step", crash_at * cfg.cpt.steps_per_stage + 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cpt_mod.run_cpt(cfg_b, "curriculum", 0, devices=jax.devices()[:1], progress=False)
    monkeypatch.undo()
    doc = cpt_mod.run_cpt(cfg_b, "curriculum", 0, devices=jax.devices()[:1], progress=False)
    assert finished(cfg_b.run.out_dir) == guard
    np.testing.assert_array_equal(doc.field_scores_T1xF, ref.field_scores_T1xF)


def test_sweep_based_baselines_run_and_foreign_data_is_refused(run):
    cfg, _ = run
    sweep = offline_data.load(RunDir(cfg).offline)
    T = cfg.cpt.num_stages
    regmix = cpt_mod.run_cpt(cfg, "regmix", 0, devices=jax.devices()[:1], progress=False)
    # RegMix: the static mixture LightGBM RegMix finds on the sweep's offline data (its candidate draw has a
    # fixed seed, not the CPT seed), at every re-weighting step
    best_D, _ = regmix_mod.fit_lightgbm(sweep.actions, sweep.returns)
    assert regmix.complete and regmix.weights_TxD.shape == (T, sweep.n_domains)
    np.testing.assert_array_equal(regmix.weights_TxD, np.tile(best_D, (T, 1)))
    # replay-best: the sweep's highest-return trajectory (Ts steps), stretched to CPT's T steps: CPT step t
    # replays the sweep step nearest to t * (Ts - 1) / (T - 1) (a tie to the even one), first and last kept
    replay = cpt_mod.run_cpt(cfg, "replay-best", 0, devices=jax.devices()[:1], progress=False)
    k = max(range(sweep.n), key=lambda i: sweep.returns[i])
    Ts = sweep.horizon
    rows = np.rint(np.linspace(0, Ts - 1, T)).astype(int)
    assert rows[0] == 0 and rows[-1] == Ts - 1 and T != Ts  # a real stretch (tiny: 2 sweep steps, 3 CPT steps)
    assert replay.complete
    np.testing.assert_array_equal(replay.weights_TxD, sweep.actions[k][rows])
    other = policies.SpaceInfo(("a", "b"), ("source", "math"), "math", (1.0, 1.0))
    with pytest.raises(DmaError, match=r"built for another domain space \(only there: .*only here: \['a', 'b'\]"):
        policies.make_policy("regmix", other, sweep_dir=Path(cfg.run.out_dir) / "sweep" / "offline")


def test_export_target_round_trips_through_the_hf_layout(run, tmp_path):
    cfg, _ = run
    cpt_mod.run_cpt(cfg, "source-only", 0, devices=jax.devices()[:1], progress=False)
    out = export.export_target(cfg, "source-only", 0, str(tmp_path / "exp"))
    model_cfg, params = hf.import_hf(out / "hf")
    assert model_cfg.d_model == cfg.target.d_model
    want = load_cpt_params(cfg, "source-only", 0, RunDir(cfg).cpt_checkpoints("source-only", 0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_import_hf_as_base_target(run, tmp_path):
    cfg, over = run
    params = load_base_params(cfg, "target", RunDir(cfg).pretrain_checkpoints("target"))
    hf.export_hf(cfg.target, jax.tree.map(np.asarray, params), tmp_path / "hf")
    cfg2 = load_config(DEMO, over + [f"run.out_dir={tmp_path / 'run'}"], variant="tiny")
    export.import_target(cfg2, str(tmp_path / "hf"))
    got = load_base_params(cfg2, "target", RunDir(cfg2).pretrain_checkpoints("target"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = load_config(DEMO, over + [f"run.out_dir={tmp_path / 'run2'}", "target.d_ff=96"], variant="tiny")
    with pytest.raises(DmaError, match=r"set target.d_ff=128"):
        export.import_target(bad, str(tmp_path / "hf"))


def test_rescore_at_cpt_settings_gives_the_history_scores(run):
    """Second code path: re-scoring a finished run's final checkpoint on CPT's own eval settings reproduces the
    final field scores CPT computed in its loop; a larger set is recorded and read back without re-evaluating."""
    from dma_jax.study.rescore import rescore_runs

    cfg, _ = run
    doc = cpt_mod.run_cpt(cfg, "fixed-0.3", 0, devices=jax.devices()[:1], progress=False)
    out = RunDir(cfg).cpt_run("fixed-0.3", 0)
    ec = cfg.eval
    (same,) = rescore_runs(cfg, [out], ec.benchmark_items_per_field, ec.heldout_windows_per_domain)
    np.testing.assert_allclose([same["field_scores"][f] for f in same["fields"]], doc.field_scores_T1xF[-1],
                               rtol=0, atol=1e-6)
    assert same["balanced"] == pytest.approx(doc.balanced_T1[-1], abs=1e-6)
    (more,) = rescore_runs(cfg, [out], 100, 2 * ec.heldout_windows_per_domain)
    path = out / f"rescore-100x{2 * ec.heldout_windows_per_domain}.json"
    assert path.is_file() and more["items"] == {"source": 8, "math": 8}  # tiny: all 8 per field (nothing skipped)
    stamp = path.stat().st_mtime_ns
    assert rescore_runs(cfg, [out], 100, 2 * ec.heldout_windows_per_domain) == [more]
    assert path.stat().st_mtime_ns == stamp


def test_reading_a_missing_checkpoint_is_one_error_and_makes_no_folder(tmp_path):
    # the readers open checkpoints with create=False: a wrong --policy leaves no empty cpt/<policy>/seed0/ behind
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}"], variant="tiny")
    with pytest.raises(DmaError, match="no CPT checkpoint"):
        load_cpt_params(cfg, "nope", 0, tmp_path / "cpt" / "nope" / "seed0" / "checkpoints")
    with pytest.raises(DmaError, match="no base target checkpoint"):
        load_base_params(cfg, "target", tmp_path / "pretrain-target" / "checkpoints")
    assert list(tmp_path.iterdir()) == []

"""`dma headroom`: the policy list, the scored and ramp policies, the statistics of H against numpy, the target
side's bookkeeping, and an end-to-end proxy run on the tiny world checked against a direct Sweep run and resumed."""

import json
import math
import re
import types

import jax
import numpy as np
import pytest

from dma_jax import evaluation as ev
from dma_jax import headroom as hr
from dma_jax import policies, proxy_runs
from dma_jax import sweep as sweep_mod
from dma_jax.cli import main
from dma_jax.config import load_config
from dma_jax.config.headroom import HeadroomConfig
from dma_jax.errors import DmaError
from dma_jax.runs import RunDir
from dma_jax.train import load_base_params
from dma_jax.data.domains import DomainSpace
from tests.crash import crash_on_call
from tests.paths import DEMO

NAMES = ("s1", "s2", "s3", "m1", "m2")
INFO = policies.SpaceInfo(NAMES, ("source", "source", "source", "math", "math"), "math",
                          (100.0, 300.0, 600.0, 10.0, 30.0))


def _hist(t, T):
    return policies.PolicyInput([np.ones(5) / 5] * t, [], T)


# ------------------------------------------------------------------------------------------------ policies


def test_the_policy_list():
    names = hr.policy_names(HeadroomConfig())
    assert names == ["fixed-0.1", "fixed-0.2", "fixed-0.35", "fixed-0.5", "fixed-0.7",
                     "fixed-0.1-scored", "fixed-0.2-scored", "fixed-0.35-scored", "fixed-0.5-scored",
                     "fixed-0.7-scored", "ramp-0.7-0.1", "ramp-0.1-0.7", "ramp-0.7-0.1-scored",
                     "ramp-0.1-0.7-scored", "source-only", "target-only"]
    assert [n for n in names if hr.is_fixed(n)] == names[:5]
    assert [n for n in names if hr.is_alt(n)] == names[5:14]


def test_fixed_scored_leaves_the_excluded_domains_out():
    w = policies.make_policy("fixed-0.3-scored", INFO, exclude=("s3", "m1"))(_hist(0, 4))
    src = np.array([100.0, 300.0, 0, 0, 0]) / 400.0  # s3 left out: s1, s2 by size
    tgt = np.array([0, 0, 0, 0, 1.0])  # m1 left out: all on m2
    np.testing.assert_allclose(w, 0.7 * src + 0.3 * tgt, atol=1e-12)
    plain = policies.make_policy("fixed-0.3", INFO, exclude=("s3", "m1"))(_hist(0, 4))  # not scored: ignored
    np.testing.assert_allclose(plain, 0.7 * np.array([100, 300, 600, 0, 0]) / 1000
                               + 0.3 * np.array([0, 0, 0, 10, 30]) / 40)
    uni = policies.make_policy("fixed-0.5-scored", INFO, spread="uniform", exclude=("s1",))(_hist(0, 4))
    np.testing.assert_allclose(uni, [0, 0.25, 0.25, 0.25, 0.25])


@pytest.mark.parametrize("name,exclude,a,b", [("ramp-0.7-0.1", (), 0.7, 0.1),
                                               ("ramp-0.1-0.7-scored", ("s2",), 0.1, 0.7)])
def test_ramp_moves_the_target_share_linearly(name, exclude, a, b):
    T = 5
    pol = policies.make_policy(name, INFO, exclude=exclude)
    sizes = np.array(INFO.sizes)
    keep = ~np.isin(NAMES, exclude)
    src = np.where((np.arange(5) < 3) & keep, sizes, 0)
    tgt = np.where((np.arange(5) >= 3) & keep, sizes, 0)
    for t in range(T):
        p = a + (b - a) * t / (T - 1)
        np.testing.assert_allclose(pol(_hist(t, T)), (1 - p) * src / src.sum() + p * tgt / tgt.sum(), atol=1e-12)


@pytest.mark.parametrize("name,exclude,match", [
    ("fixed-0.3-scored", ("m1", "m2"), "every domain of field 'math'"),
    ("ramp-0.5", (), "ramp-A-B"), ("ramp-0.5-1.5", (), "'1.5'"), ("source-only-scored", (), "fixed-P and ramp"),
    ("fixed-x-scored", (), "'x'")])
def test_bad_scored_and_ramp_policies_are_one_line_errors(name, exclude, match):
    with pytest.raises(DmaError, match=match):
        policies.make_policy(name, INFO, exclude=exclude)(_hist(0, 3))


# ------------------------------------------------------------------------------------------------ statistics


def _numpy_headroom(names, R):
    """The reference: mean/SE per policy, the best of each family by mean, H paired over seeds."""
    K = R.shape[1]
    mean = R.mean(1)
    se = np.sqrt(((R - mean[:, None]) ** 2).sum(1) / (K - 1)) / np.sqrt(K)
    fixed = [i for i, n in enumerate(names) if re.fullmatch(r"fixed-[0-9.]+", n)]
    alt = [i for i, n in enumerate(names) if n.endswith("-scored") or n.startswith("ramp-")]
    bf = max(fixed, key=lambda i: mean[i])
    ba = max(alt, key=lambda i: mean[i])
    d = R[ba] - R[bf]
    h_se = np.sqrt(((d - d.mean()) ** 2).sum() / (K - 1)) / np.sqrt(K)
    return mean, se, names[bf], names[ba], d.mean(), h_se


def test_statistics_match_numpy():
    names = hr.policy_names(HeadroomConfig(shares=(0.2, 0.5)))
    rng = np.random.default_rng(3)
    R = rng.normal(0.0, 0.01, (len(names), 4))
    offsets = {"fixed-0.5": 0.05, "ramp-0.1-0.7-scored": 0.08, "source-only": 1.0}  # source-only is in no family
    for n, off in offsets.items():
        R[names.index(n)] += off
    s = hr.side_stats("proxy", names, (0, 1, 2, 3), R)
    mean, se, bf, ba, h, h_se = _numpy_headroom(names, R)
    assert (s.best_fixed, s.best_alt) == (bf, ba) == ("fixed-0.5", "ramp-0.1-0.7-scored")
    np.testing.assert_allclose(s.mean_P, mean, atol=1e-15)
    np.testing.assert_allclose(s.se_P, se, atol=1e-15)
    assert s.h == pytest.approx(h, abs=1e-15) and s.h_se == pytest.approx(h_se, abs=1e-15)
    assert s.h_over_se == pytest.approx(h / h_se)
    doc = hr.to_json({"proxy": s})["sides"]["proxy"]
    assert doc["H"] == pytest.approx(h) and doc["best_alt"] == ba
    assert doc["returns"]["fixed-0.5"] == R[names.index("fixed-0.5")].tolist()
    md = hr.to_markdown({"proxy": s})
    assert "selection bias" in md and f"**H = {h:+.4f} ± {h_se:.4f}**" in md
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "policy" not in line]
    assert rows == [names[i] for i in np.argsort(-mean)]  # sorted by mean


def test_one_seed_has_no_standard_error():
    names = hr.policy_names(HeadroomConfig(shares=(0.3,)))
    R = np.arange(len(names), dtype=float)[:, None] / 100
    s = hr.side_stats("target", names, (7,), R)
    assert math.isnan(s.h_se) and math.isnan(s.h_over_se) and np.isnan(s.se_P).all()
    assert s.h == pytest.approx(R[names.index(s.best_alt), 0] - R[names.index("fixed-0.3"), 0])
    doc = hr.to_json({"target": s})["sides"]["target"]
    assert doc["H_se"] is None and doc["H_over_se"] is None
    assert "± n/a" in hr.to_markdown({"target": s}) and "H/SE = n/a" in hr.to_markdown({"target": s})


def test_target_side_collects_every_cpt_run(monkeypatch, tmp_path):
    """Every (policy, seed) goes through cpt.run_cpt; the return is final - base balanced, the SE the final one."""
    calls = []

    def fake_run_cpt(cfg, name, seed, progress=True):
        calls.append((name, seed))
        b = 1.0 + 0.01 * len(name) + 0.001 * seed
        return types.SimpleNamespace(balanced_T1=np.array([1.0, 1.5, b]), balanced_se_T1=np.array([0, 0, 0.002 * seed]))

    monkeypatch.setattr(hr.cpt, "run_cpt", fake_run_cpt)
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}", "headroom.seeds=[1, 2]", "headroom.shares=[0.25]"])
    names = hr.policy_names(cfg.headroom)
    R, E = hr.target_returns(cfg, names, progress=False)
    assert calls == [(n, s) for n in names for s in (1, 2)]
    np.testing.assert_allclose(R, [[0.01 * len(n) + 0.001 * s for s in (1, 2)] for n in names], atol=1e-12)
    np.testing.assert_allclose(E, [[0.002, 0.004]] * len(names))
    r = hr.run_headroom(cfg, on=["target"], progress=False)
    assert set(r.sides) == {"target"} and json.loads(r.json_path.read_text())["sides"]["target"]["seeds"] == [1, 2]
    assert r.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DmaError, match="on="):
        hr.run_headroom(cfg, on=["moon"], progress=False)


# ------------------------------------------------------------------------------------------------ end to end


def _unscored(cfg):
    """The last domain of each field that has more than one (so the scored policies differ from the plain ones)."""
    space = DomainSpace.for_sweep(cfg)
    out = []
    for field in space.fields:
        members = [n for n, f in zip(space.names, space.fields_of_domain) if f == field]
        out += members[-1:] if len(members) > 1 else []
    return out


def _direct_source_only_return(cfg, seed):
    """The second code path: one proxy trained alone on the source-only mixture (numpy), trajectory id 0, scored
    by the field scores' plain mean (eval.balanced = mean)."""
    cfg1 = proxy_runs.seed_config(cfg, seed, 1).model_copy(
        update={"sweep": cfg.sweep.model_copy(update={"num_trajectories": 1, "chunk_size": 1})})
    space = DomainSpace.for_sweep(cfg1)
    sizes = space.train_tokens.astype(np.float64)
    w_D = np.where(np.array(space.fields_of_domain) == "source", sizes, 0.0)
    w_D /= w_D.sum()
    sw = sweep_mod.Sweep(cfg1, space, jax.devices()[:1])
    p0 = load_base_params(cfg1, "proxy", RunDir(cfg1).pretrain_checkpoints("proxy"))
    base_raw = ev.summary(jax.device_get(sw.eval_single(p0, sw.eval_set)))
    state = sw.init_chunk(p0)
    for t in range(cfg1.sweep.num_stages):
        state, _ = sw.stage(state, w_D[None], np.zeros(1, np.int32), t)
    raw = jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(sw.evaluate(state.params)))
    score_F = np.asarray(ev.normalise(raw, base_raw, cfg1.eval)["field_score"], np.float64)
    return score_F.mean() - 1.0  # the base's field scores are 1 by construction


def test_proxy_headroom_end_to_end_and_resume(prepared_world, tmp_path, monkeypatch, capsys):
    prepared_world.link_base(tmp_path, ("proxy",))
    over = prepared_world.run_overrides(tmp_path, "headroom.on=[proxy]", "headroom.proxy_seeds=[0, 1]",
                                        "headroom.shares=[0.2, 0.5]")
    cfg0 = load_config(DEMO, over, variant="tiny")
    over.append(f"eval.unscored_domains=[{', '.join(_unscored(cfg0))}]")
    cfg = load_config(DEMO, over, variant="tiny")
    assert cfg.eval.unscored_domains and cfg.eval.balanced == "mean"
    # killed at seed 0's last re-weighting step, then resumed from the checkpoint before it, mid-chunk:
    # source-only (the last policy, in the last chunk) is checked below
    N, T = len(hr.policy_names(cfg.headroom)), cfg.sweep.num_stages
    units = -(-N // min(cfg.sweep.chunk_size or N, N)) * T
    assert T > 1 and units > T  # a mid-chunk restore, after a finished chunk
    with monkeypatch.context() as m:
        crash_on_call(m, sweep_mod.Sweep, "stage", units)
        with pytest.raises(RuntimeError, match="simulated crash"):
            hr.run_headroom(cfg, progress=False)
    run = RunDir(cfg)
    assert (run.headroom_proxy(0) / "checkpoints" / str(units - 1)).is_dir()
    assert not (run.headroom_proxy(0) / proxy_runs.RESULT).exists()
    r = hr.run_headroom(cfg, progress=False)
    assert set(r.sides) == {"proxy"} and r.json_path == run.headroom_json and r.table_path == run.headroom_table
    doc = json.loads(run.headroom_json.read_text())["sides"]["proxy"]
    names = hr.policy_names(cfg.headroom)
    assert doc["policies"] == names and doc["seeds"] == [0, 1] and len(names) == 10
    md = run.headroom_table.read_text()
    assert "## proxy" in md and "selection bias" in md and "**H = " in md
    results = [run.headroom_proxy(s) / proxy_runs.RESULT for s in (0, 1)]
    per_seed = [json.loads(p.read_text()) for p in results]
    assert not (run.headroom_proxy(0) / "checkpoints").exists()
    w = np.array(per_seed[0]["weights"])
    assert not np.allclose(w[names.index("fixed-0.2")], w[names.index("fixed-0.2-scored")])
    for k, d in enumerate(per_seed):
        np.testing.assert_allclose([doc["returns"][n][k] for n in names], d["returns"])
    assert per_seed[0]["returns"] != per_seed[1]["returns"]  # the seed changes the data order

    # the second code path: source-only trained alone (seed 0: resumed mid-chunk; seed 1: uninterrupted)
    for seed in (0, 1):
        assert doc["returns"]["source-only"][seed] == pytest.approx(_direct_source_only_return(cfg, seed), abs=2e-5)

    # resume: the same command through the CLI recomputes nothing
    mtimes = [p.stat().st_mtime_ns for p in results]
    monkeypatch.setattr(sweep_mod, "Sweep", lambda *a, **k: pytest.fail("a finished proxy seed was recomputed"))
    assert main(["--no-progress", "headroom", "--config", str(DEMO), "--variant", "tiny", "--on", "proxy", *over]) == 0
    assert [p.stat().st_mtime_ns for p in results] == mtimes
    out = capsys.readouterr().out
    assert f"headroom proxy: best fixed {doc['best_fixed']}" in out and str(run.headroom_table) in out
    assert json.loads(run.headroom_json.read_text())["sides"]["proxy"]["H"] == pytest.approx(doc["H"], abs=1e-12)

    # another policy list: one line saying the seed's folder is stale
    cfg2 = load_config(DEMO, [*over, "headroom.shares=[0.3]"], variant="tiny")
    with pytest.raises(DmaError, match="another config or policy list"):
        hr.run_headroom(cfg2, progress=False)

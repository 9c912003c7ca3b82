import io
import json
import math

import numpy as np
import pytest

from dma_jax import offline_data as od
from dma_jax.errors import DmaError
from tests.toy_env import ToyEnv

BEST_TxD = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])


def _env(balanced_how: str = "mean") -> ToyEnv:
    return ToyEnv(["source", "source", "math"], "math", BEST_TxD, penalty=2.0, loss_rate=0.5,
                  balanced_how=balanced_how)


def _dataset(n: int = 5, seed: int = 0) -> od.OfflineDataset:
    actions = np.random.default_rng(seed).dirichlet(np.ones(3), size=(n, 2)).astype(np.float32)
    return _env().dataset(actions)


def test_toy_env_matches_hand_computation():
    a = np.array([[[0.6, 0.2, 0.2], [0.1, 0.2, 0.7]]], np.float32)
    fb = _env().feedback(a)[0]
    # Losses: exp(-0.5 * cumulative weight) per domain.
    np.testing.assert_allclose(fb[0, :3], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(fb[1, :3], np.exp(-0.5 * np.array([0.6, 0.2, 0.2])), rtol=1e-6)
    np.testing.assert_allclose(fb[2, :3], np.exp(-0.5 * np.array([0.7, 0.4, 0.9])), rtol=1e-6)
    # Scores: exp(-2 * cumulative sq. error), source on domains 0 and 1, math on domain 2.
    src1, tgt1 = math.exp(-2 * (0.1**2 + 0.1**2)), 1.0
    src2, tgt2 = math.exp(-2 * (0.1**2 + 0.1**2 + 0.1**2)), math.exp(-2 * 0.1**2)
    np.testing.assert_allclose(fb[:, 3:], [[1, 1], [src1, tgt1], [src2, tgt2]], atol=1e-6)
    ds = _env().dataset(a)
    np.testing.assert_allclose(ds.rewards[0], [(src1 + tgt1) / 2 - 1, (src2 + tgt2 - src1 - tgt1) / 2], atol=1e-6)
    np.testing.assert_allclose(ds.returns, [(src2 + tgt2) / 2 - 1], atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    ds = _dataset()
    np.testing.assert_array_equal(ds.field_score_se, np.zeros((5, 3, 2), np.float32))  # ToyEnv: exact scores
    se = np.random.default_rng(3).uniform(0.0, 0.05, (5, 3, 2)).astype(np.float32)
    ds = _replace(ds, field_score_se=se)
    od.save(ds, tmp_path / "d")
    back = od.load(tmp_path / "d")
    np.testing.assert_array_equal(back.field_score_se, se)
    assert od.FORMAT == "dma-offline-v2" and back.meta["format"] == od.FORMAT
    for name in ("actions", "feedback", "rewards", "returns", "field_score_se"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
        assert getattr(back, name).dtype == np.float32
    assert {k: v for k, v in back.meta.items() if k != "data_sha256"} == ds.meta
    assert len(back.meta["data_sha256"]) == 64
    assert (back.n, back.horizon, back.n_domains) == (5, 2, 3)


def _one_line_error(fn, *fragments):
    with pytest.raises(DmaError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_files_and_swapped_data_are_detected(tmp_path):
    _one_line_error(lambda: od.load(tmp_path / "nothing"), "meta.json", "missing")
    od.save(_dataset(seed=0), tmp_path / "a")
    od.save(_dataset(seed=1), tmp_path / "b")
    (tmp_path / "a" / "data.npz").write_bytes((tmp_path / "b" / "data.npz").read_bytes())
    _one_line_error(lambda: od.load(tmp_path / "a"), "data.npz", "sha256")
    (tmp_path / "b" / "data.npz").unlink()
    _one_line_error(lambda: od.load(tmp_path / "b"), "data.npz", "missing")


def test_pickled_arrays_are_refused(tmp_path):
    import hashlib

    ds = _dataset()
    od.save(ds, tmp_path / "d")
    buf = io.BytesIO()
    np.savez(buf, actions=np.array([object()], dtype=object), feedback=ds.feedback, rewards=ds.rewards,
             returns=ds.returns, field_score_se=ds.field_score_se)
    data = buf.getvalue()
    (tmp_path / "d" / "data.npz").write_bytes(data)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta["data_sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    _one_line_error(lambda: od.load(tmp_path / "d"), "data.npz", "cannot read")


def _replace(ds, **changes):
    import dataclasses

    return dataclasses.replace(ds, **changes)


@pytest.mark.parametrize("change, fragments", [
    (lambda ds: _replace(ds, actions=ds.actions.astype(np.float64)), ("actions", "float32")),
    (lambda ds: _replace(ds, actions=ds.actions * 1.01), ("off the simplex",)),
    (lambda ds: _replace(ds, feedback=np.where(np.arange(5)[:, None, None] == 2, np.nan, ds.feedback)
                         .astype(np.float32)), ("feedback", "NaN")),
    (lambda ds: _replace(ds, feedback=ds.feedback[:, :, :4]), ("feedback", "shape")),
    (lambda ds: _replace(ds, rewards=ds.rewards[:, :1]), ("rewards", "shape")),
    (lambda ds: _replace(ds, returns=ds.returns + 1.0), ("returns", "sum of rewards")),
    (lambda ds: _replace(ds, meta=dict(ds.meta, domain_loss_index=[0, 1, 9])), ("domain_loss_index", "9")),
    (lambda ds: _replace(ds, meta=dict(ds.meta, domain_names=["a", "b"])), ("domain_names", "D=3")),
    (lambda ds: _replace(ds, meta=dict(ds.meta, target_field="code")), ("target_field", "code")),
    (lambda ds: _replace(ds, meta=dict(ds.meta, balanced="max")), ("balanced",)),
    (lambda ds: _replace(ds, meta=dict(ds.meta, format="dma-offline-v0")), ("format",)),
    (lambda ds: _replace(ds, field_score_se=ds.field_score_se[:, :, :1]), ("field_score_se", "shape")),
    (lambda ds: _replace(ds, field_score_se=ds.field_score_se - 0.1), ("field_score_se", "negative")),
    (lambda ds: _replace(ds, field_score_se=ds.field_score_se + np.float32(np.inf)), ("field_score_se", "Inf")),
    (lambda ds: _replace(ds, meta={k: v for k, v in ds.meta.items() if k != "fields"}), ("missing", "fields")),
])
def test_invalid_datasets_are_refused_on_save_and_load(tmp_path, change, fragments):
    bad = change(_dataset())
    _one_line_error(lambda: od.save(bad, tmp_path / "d"), str(tmp_path / "d"), *fragments)
    assert not (tmp_path / "d" / "meta.json").exists()
    # The same problem written by another tool is caught on load.
    good = _dataset()
    od.save(good, tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    if bad.meta != good.meta:
        (tmp_path / "e" / "meta.json").write_text(json.dumps(dict(bad.meta, data_sha256=meta["data_sha256"])))
        _one_line_error(lambda: od.load(tmp_path / "e"), *fragments)


def test_meta_is_written_after_data(tmp_path, monkeypatch):
    """A save killed between the two files leaves no meta.json: the directory reads as unfinished."""
    calls = []
    real = od.atomic_write_bytes

    def record(path, data):
        calls.append(path.name)
        real(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(od, "atomic_write_bytes", record)
    with pytest.raises(KeyboardInterrupt):
        od.save(_dataset(), tmp_path / "d")
    assert calls == ["data.npz"] and not (tmp_path / "d" / "meta.json").exists()


def test_v1_datasets_are_refused_naming_the_version(tmp_path):
    """A v1 dataset (no standard errors, the old field score) is refused by a one-line error naming both versions."""
    import hashlib

    ds = _dataset()
    buf = io.BytesIO()
    np.savez(buf, actions=ds.actions, feedback=ds.feedback, rewards=ds.rewards, returns=ds.returns)  # v1: no SEs
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.npz").write_bytes(buf.getvalue())
    meta = dict(ds.meta, format="dma-offline-v1", data_sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    _one_line_error(lambda: od.load(tmp_path / "d"), str(tmp_path / "d"), "'dma-offline-v1'", "'dma-offline-v2'",
                    "dma sweep")

"""Determinism: the same config and seed give byte-identical sweep files (trajectories, offline dataset, plots),
CPT histories (but for wall-clock timings), records and report across two runs of the CLI, on 1 device and
on 8 fake devices; and the sweep's offline arrays on 1 device equal those on 8 up to float32 rounding.

The data dir and the base proxy/target are the session's prepared world (tests/conftest.py); every run links
them in. The first of the two runs on one device is the session's (also test_gcs's local reference).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dma_jax import offline_data
from dma_jax.config import load_config
from dma_jax.sweep import run_sweep
from tests.base_world import OUTPUTS, PIPELINE_OVERRIDES, World, output_files, run_pipeline
from tests.paths import DEMO


def _cli_run(world: World, out: Path, n_devices: int) -> dict[str, bytes]:
    """One pipeline run (sample, sweep, cpt regmix, report: tests/base_world.py) in a fresh process; returns its
    output files' bytes and removes them (the next run in `out` starts as this one did)."""
    run_pipeline(world, out, n_devices)
    files = output_files(out)
    for sub in OUTPUTS:
        shutil.rmtree(out / sub)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("n_devices", [1, 8])
def test_two_runs_give_identical_files(prepared_world, tmp_path, request, n_devices):
    # the same out_dir both times: the configs are identical
    if n_devices == 1:  # the first run is the session's (tests/conftest.py), made in the folder the second reuses
        session_run = request.getfixturevalue("local_pipeline")
        out, first = session_run.out, session_run.files()
    else:
        out = prepared_world.link_base(tmp_path / "run")
        first = _cli_run(prepared_world, out, n_devices)
    second = _cli_run(prepared_world, out, n_devices)
    assert sorted(first) == sorted(second)
    expected = {"sweep/trajectories.npz", "sweep/offline/data.npz", "sweep/offline/meta.json", "report/report.md",
                "cpt/regmix/seed0/history.json", "cpt/regmix/seed0/records.jsonl"}
    assert expected <= set(first)
    for name in sorted(first):
        if name.endswith("history.json"):  # wall-clock timings are the one thing allowed to differ
            a, b = json.loads(first[name]), json.loads(second[name])
            assert a.pop("timings") and b.pop("timings")
            assert a == b, name
        else:
            assert first[name] == second[name], f"{name} differs between two runs on {n_devices} device(s)"


@pytest.mark.slow
def test_sweep_on_one_device_equals_eight_devices(prepared_world, tmp_path):
    """8 proxies in one chunk: all on one device vs one per device (sweep.devices) -> the same arrays.

    Same batches, same trajectories; not bitwise: XLA compiles other kernels for 8 proxies on one device than
    for 1 per device (and splits matmuls over another number of threads), so float32 sums are added in
    another order. Measured: up to 9.5e-7 on feedback of order 1 (also with chunk 1 on 1 device vs 8 devices).
    """
    results = {}
    for n_dev in (1, 8):
        out = prepared_world.link_base(tmp_path / f"devices-{n_dev}")
        cfg = load_config(DEMO, prepared_world.run_overrides(out, *PIPELINE_OVERRIDES, "sweep.chunk_size=8",
                                                             f"sweep.devices={n_dev}"), variant="tiny")
        results[n_dev] = offline_data.load(run_sweep(cfg, progress=False).out_dir)
    one, eight = results[1], results[8]
    np.testing.assert_array_equal(one.actions, eight.actions)
    assert not np.allclose(one.feedback[:, 1:], 1.0)  # the proxies trained
    for name in ("feedback", "rewards", "returns"):
        np.testing.assert_allclose(getattr(one, name), getattr(eight, name), rtol=0, atol=5e-6, err_msg=name)

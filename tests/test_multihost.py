"""Multi-host: two processes on this machine (CPU backend, gloo collectives over localhost) run `dma sweep`
and `dma cpt` through the CLI and get the numbers of one process on the same number of devices (4).

The data dir and the base proxy/target are the session's prepared world (tests/conftest.py); this process
runs the single-process reference on 4 of its 8 fake devices; each run links (or copies) the base models in.
Process i gets DMA_COORDINATOR/DMA_NUM_PROCESSES/DMA_PROCESS_ID (the CLI's `jax.distributed.initialize`)
and 2 fake CPU devices, so the sweep's `traj` mesh and CPT's `data` mesh span both processes.
The two processes write to `run.out_dir=gs://bkt/multi`, a fake bucket (tests/fake_gcs.py) both reach
as hosts of a pod slice reach a real one: checkpoints, logs and outputs all go through it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dma_jax import offline_data
from dma_jax.config import load_config
from dma_jax.cpt import run_cpt
from dma_jax.sweep import run_sweep
from tests import fake_gcs
from tests.base_world import World
from tests.paths import DEMO, REPO

POLICY = "fixed-0.3"

# sweep: 8 trajectories in chunks of 4 (one mesh of 4 devices); cpt: batch 4 over a data axis of 4 devices
OVER = ["sweep.chunk_size=4", "cpt.batch_size=4", "mesh.data=-1"]

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[4])  # the repository: tests/ is a package
from tests import fake_gcs
from dma_jax.cli import main
config, over = sys.argv[1], json.loads(sys.argv[2])
common = ["--no-progress"]
with fake_gcs.install(sys.argv[3]):
    rc = main(common + ["sweep", "--config", config, "--variant", "tiny", *over])
    rc = rc or main(common + ["cpt", "--config", config, "--variant", "tiny", "--policy", "%s", "--seed", "0", *over])
sys.exit(rc)
""" % POLICY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_dir(world: World, root: Path, name: str) -> tuple[Path, list[str]]:
    out = world.link_base(root / name)
    return out, world.run_overrides(out, *OVER)


def _launch(world: World, root: Path, name: str, n_proc: int, devices_per_proc: int) -> Path:
    """Run the driver in `n_proc` processes (working folder `root`) on `gs://bkt/<name>` (a fake bucket under
    `root`); returns its local folder."""
    gcs = root / "gcs"
    out = world.copy_base(gcs / "bkt" / name)  # objects, not links
    over = world.run_overrides(f"gs://bkt/{name}", *OVER)
    port = _free_port()
    procs = []
    for i in range(n_proc):
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
                   DMA_JAX_CACHE=os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"))
        for k in ("DMA_COORDINATOR", "DMA_NUM_PROCESSES", "DMA_PROCESS_ID", "DMA_DISTRIBUTED"):
            env.pop(k, None)
        if n_proc > 1:
            env.update(DMA_COORDINATOR=f"localhost:{port}", DMA_NUM_PROCESSES=str(n_proc), DMA_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, str(DEMO), json.dumps(over), str(gcs), str(REPO)],
                                      env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"{name} process {i} exited {p.returncode}:\n{text[-3000:]}"
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(prepared_world, tmp_path):
    single, over = _run_dir(prepared_world, tmp_path, "single")
    cfg = load_config(DEMO, over, variant="tiny")
    run_sweep(cfg, devices=jax.devices()[:4], progress=False)
    run_cpt(cfg, POLICY, 0, devices=jax.devices()[:4], progress=False)
    multi = _launch(prepared_world, tmp_path, "multi", 2, 2)
    assert fake_gcs.stray_local_paths(tmp_path) == []  # nothing took gs://... for a local path

    a = offline_data.load(single / "sweep" / "offline")
    b = offline_data.load(multi / "sweep" / "offline")
    np.testing.assert_array_equal(b.actions, a.actions)
    assert not np.allclose(a.feedback[:, 1:], 1.0)  # the proxies trained
    # The proxies never talk to each other (no collective on the `traj` axis) and each device runs the same
    # program in both runs, so the offline dataset is bitwise the same.
    for key in ("feedback", "rewards", "returns"):
        np.testing.assert_array_equal(getattr(b, key), getattr(a, key), err_msg=key)

    ha = json.loads((single / "cpt" / POLICY / "seed0" / "history.json").read_text())
    hb = json.loads((multi / "cpt" / POLICY / "seed0" / "history.json").read_text())
    assert hb["complete"] and hb["weights"] == ha["weights"]
    # the same records, in the same order, reached the model (read by every process, each placing its rows)
    assert (multi / "cpt" / POLICY / "seed0" / "records.jsonl").read_text() == \
        (single / "cpt" / POLICY / "seed0" / "records.jsonl").read_text()
    # CPT's gradients are summed over the `data` axis: in one process by XLA's in-process all-reduce, across
    # processes by gloo, which may add in another order: float32 rounding (~6e-8 relative) that 4 AdamW steps
    # and an evaluation can grow; measured: held-out losses differ by up to 5e-7, scores are equal.
    for key in ("field_scores", "balanced", "domain_loss", "accuracy"):
        np.testing.assert_allclose(np.asarray(hb[key]), np.asarray(ha[key]), rtol=0, atol=1e-5, err_msg=key)

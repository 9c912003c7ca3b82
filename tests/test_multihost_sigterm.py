"""Multi-host SIGTERM: a preemption notice that reaches one process of `dma pretrain` stops every process
after the same step, with one checkpoint (issue 15: SIGTERM goes through `faults.stop_requested()`).

Two processes on this machine (CPU backend, gloo collectives over localhost, 2 fake devices each, as in
tests/test_multihost.py) train the tiny demo proxy on one `data` mesh of 4 devices (batch 8: 2 rows per
device), writing to a local out_dir (every process saves its shards through Orbax; process 0 writes the
other files). Only process 0 gets `DMA_FAULT_AT=pretrain.step:3:TERM`: it sends itself SIGTERM right after
step 3 is dispatched. Expected: both processes finish step 3, save checkpoint 3 together, print the one
`dma: ... stopped by SIGTERM at step 3 ...` line and exit with 143. If each process reads only its own
flag, process 0 saves alone (and waits in Orbax's cross-process barrier) while process 1 goes on to step 4
(and waits in its collective): both hang, which this test turns into a failure after TIMEOUT_S with each
process's Python stack, never a stuck CI job.
Then the same command without the fault resumes both processes from step 3 to the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dma_jax.config import load_config
from dma_jax.faults import PREEMPTED_EXIT_CODE
from dma_jax.prepare import run_prepare
from tests.fault_harness import DEMO, steps, uncommitted

STEPS = 8
STOP_STEP = 3  # SIGTERM arrives after step 3 is dispatched; the loop finishes that step, saves it, stops
# checkpoint_every / eval_every past the end: before the stop no periodic checkpoint (nor evaluation) runs,
# so the only checkpoint of the interrupted run is the SIGTERM one; batch 8 over a data axis of 4 devices.
OVER = ["data.demo_fields=[source, math]", f"pretrain.steps={STEPS}", "pretrain.checkpoint_every=100",
        "pretrain.eval_every=100", "mesh.data=-1"]
N_PROC, DEVICES_PER_PROC = 2, 2
TIMEOUT_S = 180  # the whole launch; passing, it takes a fraction of this
GRACE_S = 60  # once one process has exited, the others must follow within this (else: hung in a collective)
# `dma` with a Python stack dump on SIGUSR1: a process still running at the deadline shows where it waits
DRIVER = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
          "from dma_jax.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multihost_sigterm")
    run_prepare(load_config(DEMO, OVER + [f"data.dir={root}/data"], variant="tiny"), progress=False)
    return root / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(none)"


def _launch(out: Path, data: Path, tag: str, fault_in_0: str | None) -> list[tuple[int, str, str]]:
    """`dma pretrain --model proxy` in N_PROC processes (DMA_FAULT_AT only in process 0's environment);
    returns (exit status, stdout, stderr) per process. A process still running at the deadline dumps its
    Python stack, is killed, and the test fails, showing every process's stderr."""
    port = _free_port()
    cmd = [sys.executable, "-c", DRIVER, "--no-progress", "pretrain", "--model", "proxy",
           "--config", str(DEMO), "--variant", "tiny", *OVER, f"data.dir={data}", f"run.out_dir={out}"]
    logs = out.parent / f"logs-{tag}"
    logs.mkdir()
    procs, files = [], []
    for i in range(N_PROC):
        env = {k: v for k, v in os.environ.items()
               if k not in ("DMA_FAULT_AT", "DMA_COORDINATOR", "DMA_NUM_PROCESSES", "DMA_PROCESS_ID", "DMA_DISTRIBUTED")}
        env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_DEFAULT_MATMUL_PRECISION="highest",
                   JAX_NUMPY_RANK_PROMOTION="raise",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROC}",
                   DMA_JAX_CACHE=os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"),
                   DMA_COORDINATOR=f"localhost:{port}", DMA_NUM_PROCESSES=str(N_PROC), DMA_PROCESS_ID=str(i))
        if i == 0 and fault_in_0:
            env["DMA_FAULT_AT"] = fault_in_0
        o, e = logs / f"p{i}.out", logs / f"p{i}.err"  # files, not pipes: a chatty process never blocks
        files.append((o, e))
        with open(o, "w") as fo, open(e, "w") as fe:
            procs.append(subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=fo, stderr=fe))

    start = time.monotonic()
    deadline, first_exit = start + TIMEOUT_S, None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if first_exit is None and any(p.poll() is not None for p in procs):
                first_exit = now
                deadline = min(deadline, now + GRACE_S)
            if now > deadline:
                break
            time.sleep(0.2)
    finally:
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in hung:
            procs[i].send_signal(signal.SIGUSR1)  # stack dump into its stderr (DRIVER)
        if hung:
            time.sleep(2)
        for i in hung:
            procs[i].kill()
            procs[i].wait()
    if hung:
        waited = time.monotonic() - start
        since = f"{waited - (first_exit - start):.0f} s after the first exit" if first_exit else "none exited"
        report = "\n".join(
            f"--- process {i}: {'still running, killed' if i in hung else f'exited {p.returncode}'}; "
            f"stderr tail (a stack dump if killed):\n{_tail(files[i][1])}" for i, p in enumerate(procs))
        pytest.fail(f"{tag}: process(es) {hung} still running after {waited:.0f} s ({since}); processes that "
                    f"stop after different steps wait for each other in a collective\n{report}")
    return [(p.returncode, o.read_text(), e.read_text()) for p, (o, e) in zip(procs, files)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ck = out / "pretrain-proxy" / "checkpoints"

    results = _launch(out, data_dir, "sigterm", f"pretrain.step:{STOP_STEP}:TERM")
    for i, (rc, _, err) in enumerate(results):
        assert rc == PREEMPTED_EXIT_CODE, \
            f"process {i} exited {rc}, wanted {PREEMPTED_EXIT_CODE} (every process stops)\n{err[-3000:]}"
        lines = [ln for ln in err.splitlines() if ln.startswith("dma: ")]
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "re-run the same command" in lines[0], \
            f"process {i}: wanted one 'dma: ... stopped by SIGTERM ...' line\n{err[-3000:]}"
        assert f"at step {STOP_STEP} " in lines[0], f"process {i}: {lines[0]}"
    assert steps(ck) == [STOP_STEP], f"committed checkpoints {steps(ck)}, wanted only the SIGTERM one"
    assert uncommitted(ck) == []

    # the same command, no fault: both processes resume from the SIGTERM checkpoint and finish
    results = _launch(out, data_dir, "resume", None)
    for i, (rc, stdout, err) in enumerate(results):
        assert rc == 0, f"resume: process {i} exited {rc}\n{err[-3000:]}"
        assert f"pretrain proxy: {STEPS} steps" in stdout, f"resume: process {i}\n{stdout[-2000:]}"
    assert steps(ck) == [STOP_STEP, STEPS]
    assert uncommitted(ck) == []

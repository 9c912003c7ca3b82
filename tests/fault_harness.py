"""Helpers for tests/test_faults.py: run a `dma` stage as a subprocess, stopped at a fault point, and read outputs.

A fault point is `DMA_FAULT_AT="<event>:<n>[:TERM]"` (see dma_jax/faults.py): the
stage sends itself SIGKILL (or SIGTERM) at the n-th occurrence of the event, so
every kill lands at the same place on every run, on any machine speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from dma_jax.faults import PREEMPTED_EXIT_CODE
from tests.paths import DEMO

SIGKILLED = -signal.SIGKILL


def dma(command: list[str], overrides: list[str], fault: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`dma --no-progress <command> --variant tiny <overrides>` in a fresh process (jax settings as in conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "DMA_FAULT_AT"}
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_NUMPY_RANK_PROMOTION="raise",
               DMA_JAX_CACHE=os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"))
    if fault:
        env["DMA_FAULT_AT"] = fault
    cmd = [sys.executable, "-m", "dma_jax.cli", "--no-progress", *command, "--config", str(DEMO), "--variant", "tiny",
           *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def expect(proc: subprocess.CompletedProcess, rc: int) -> subprocess.CompletedProcess:
    """Assert the exit status (SIGKILLED, PREEMPTED_EXIT_CODE or 0), showing stderr when it differs."""
    assert proc.returncode == rc, f"exit {proc.returncode}, wanted {rc}\n--- stderr:\n{proc.stderr[-3000:]}"
    if rc == PREEMPTED_EXIT_CODE:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dma: ")]
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "re-run the same command" in lines[0], \
            proc.stderr[-3000:]
    return proc


def steps(ckpt_dir: Path) -> list[int]:
    """Committed checkpoint steps (Orbax renames a step's temporary directory to `<step>` when it is complete)."""
    return sorted(int(p.name) for p in Path(ckpt_dir).iterdir() if p.name.isdigit()) if Path(ckpt_dir).is_dir() else []


def uncommitted(ckpt_dir: Path) -> list[str]:
    """Temporary directories of saves that never committed (what a kill during a save leaves)."""
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if ".orbax-checkpoint-tmp" in p.name)


def arrays(ckpt_dir: Path, step: int, item: str = "state") -> dict[str, np.ndarray]:
    """Every array of a checkpoint item, restored as saved, keyed by its path in the tree."""
    import jax

    mgr = ocp.CheckpointManager(Path(ckpt_dir).absolute())
    try:
        tree = mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]
    finally:
        mgr.close()

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k}: differs (max abs {np.abs(a[k] - b[k]).max()})"


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def jsonl(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in Path(path).read_text().splitlines() if line.strip()]

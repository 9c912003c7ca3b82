"""Test set-up: 8 fake CPU devices, strict rank promotion, no network; the shared prepared world."""

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from dma_jax.xla_cpu import apply_defaults  # noqa: E402

apply_defaults()  # the XLA:CPU options `dma` runs with, so in-process tests compute what the CLI computes

import jax  # noqa: E402

from tests.base_world import (PipelineRun, World, add_sweep, build_world, run_pipeline_once,  # noqa: E402
                              world_at)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs compile once per session (and across sessions on the same machine), in this process, in
# in-process `dma` commands and in `dma` subprocesses (the CLI reads DMA_JAX_CACHE).
_JAX_CACHE = os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache")
os.environ["DMA_JAX_CACHE"] = _JAX_CACHE
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@contextlib.contextmanager
def _file_lock(path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shared(tmp_path_factory, name: str, make) -> Path:
    """Runs `make(root)` once per test run (`<name>.done` records it) and returns `root`, the prepared world's
    folder: under pytest-xdist the first worker to ask does it in the run's shared temporary folder while the
    others wait for it (only for it: one lock per `name`), then reuse it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a sub-folder of the run's
        shared = shared.parent
    root, done = shared / "prepared-world", shared / f"{name}.done"
    if not done.is_file():
        with _file_lock(shared / f"{name}.lock"):
            if not done.is_file():
                make(root)
                done.touch()
    return root


@pytest.fixture(scope="session")
def prepared_world(tmp_path_factory) -> World:
    """The tiny demo data and base proxy/target (tests/base_world.py), made once per test run. Tests link or copy
    its base models into their own run.out_dir and never write in it."""

    def make(root):
        shutil.rmtree(root, ignore_errors=True)  # what a worker that failed half-way left
        build_world(root)

    return world_at(_shared(tmp_path_factory, "prepared-world", make))


@pytest.fixture(scope="session")
def swept_world(prepared_world, tmp_path_factory) -> World:
    """The prepared world with a sweep of its base proxy (`World.sweep_dir`, tests/base_world.py), made once per
    test run; tests link it into their own run.out_dir and never write in it."""
    _shared(tmp_path_factory, "swept-world", lambda root: add_sweep(prepared_world))
    return prepared_world


@pytest.fixture(scope="session")
def local_pipeline(prepared_world, tmp_path_factory) -> PipelineRun:
    """The prepared world's CLI pipeline (`run_pipeline`, tests/base_world.py) run once per test run on one device:
    the first of test_determinism's two runs (the second runs in `.out`), test_gcs's local reference."""
    root = _shared(tmp_path_factory, "local-pipeline",
                   lambda root: run_pipeline_once(prepared_world, root / "pipeline-1dev", 1))
    return PipelineRun(root / "pipeline-1dev" / "run", root / "pipeline-1dev" / "files")

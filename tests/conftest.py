"""Test set-up: 8 fake CPU devices, strict rank promotion, no network; the shared prepared world."""

import contextlib
import fcntl
import os
import shutil

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from tests.base_world import World, build_world, world_at  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs compile once per session (and across sessions on the same machine).
jax.config.update("jax_compilation_cache_dir", os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@contextlib.contextmanager
def _file_lock(path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def prepared_world(tmp_path_factory) -> World:
    """The tiny demo data and base proxy/target (tests/base_world.py), made once per test run: under
    pytest-xdist the first worker to ask builds it in the run's shared temporary folder while the others
    wait, then reuse it. Tests link or copy its base models into their own run.out_dir, never write in it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a sub-folder of the run's
        shared = shared.parent
    root = shared / "prepared-world"
    with _file_lock(shared / "prepared-world.lock"):
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)  # what a worker that failed half-way left
            build_world(root)
            (root / "done").touch()
    return world_at(root)

"""Test set-up: 8 fake CPU devices, strict rank promotion, no network."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs compile once per session (and across sessions on the same machine).
jax.config.update("jax_compilation_cache_dir", os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

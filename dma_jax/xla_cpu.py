"""The XLA:CPU options `dma` runs with (issue 19, point 3), chosen by measurement: `bench/xla_cpu_options.py`,
BENCHMARKS.md "XLA:CPU options".

`--xla_cpu_experimental_ynn_fusion_type=dot` sends the matmuls through YNNPACK instead of XLA's Eigen kernels: the
small, transposed matmuls of the backward pass are where XLA:CPU lost to a PyTorch eager loop. It changes the last
bits of float32 results (another summation order), not their precision; same flags, same numbers.

XLA reads XLA_FLAGS once, when the first backend starts, and an unknown flag aborts the process, so
`apply_defaults` runs before anything touches a device (the CLI and the tests call it first) and does nothing
once a backend has started (XLA would not read the flags, while JAX's compilation cache would key programs by
them), adds only what the environment does not already set, and only on jaxlib versions where the flags were measured (`VERIFIED`).
`DMA_XLA_CPU_DEFAULTS=0` turns it off. Only CPU-only processes get them (`JAX_PLATFORMS=cpu`, or no GPU/TPU
plugin installed): an accelerator plugin carries its own XLA, which would parse XLA_FLAGS too. Code that imports
`dma_jax` in its own process (the public API, `examples/`, `bench/`) runs with jaxlib's defaults unless it calls
`apply_defaults()` before touching a device.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
VERIFIED = ((0, 10),)  # jaxlib (major, minor) versions where DEFAULT_FLAGS exist and were measured
OFF_VAR = "DMA_XLA_CPU_DEFAULTS"
ACCELERATOR_PLUGINS = ("libtpu", "jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")  # distributions' name prefixes


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _cpu_only(environ) -> bool:
    """Whether this process can only run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().startswith(ACCELERATOR_PLUGINS) for n in names)


def _backends_started() -> bool:
    import sys

    if "jax" not in sys.modules:  # nothing can have started a backend
        return False
    from jax._src import xla_bridge  # no public API says whether XLA has read its flags

    return xla_bridge.backends_are_initialized()


def apply_defaults(environ: MutableMapping[str, str] | None = None, jaxlib_version=None) -> list[str]:
    """Add DEFAULT_FLAGS to XLA_FLAGS in `environ` (default: this process's) unless turned off, already set (any
    value of the same flag), the jaxlib version is not VERIFIED, an accelerator may be used, or a backend has
    started; returns the flags added."""
    environ = os.environ if environ is None else environ
    if environ.get(OFF_VAR, "1") == "0" or (environ is os.environ and _backends_started()):
        return []
    version = _jaxlib_version() if jaxlib_version is None else tuple(jaxlib_version)
    if version is None or version[:2] not in VERIFIED or not _cpu_only(environ):
        return []
    present = environ.get("XLA_FLAGS", "")
    names = {f.split("=", 1)[0] for f in present.split()}
    added = [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in names]
    if added:
        environ["XLA_FLAGS"] = " ".join([*present.split(), *added])
    return added

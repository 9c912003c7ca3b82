"""The XLA:CPU options dma runs with (`dma_jax.xla_cpu`): when they are added, and that under them XLA's CPU
matmuls (forward and the transposed products of a backward pass) still agree with float64 numpy."""

import json
import os
import subprocess
import sys

import pytest

from dma_jax import xla_cpu
from tests.paths import REPO

FLAG = xla_cpu.DEFAULT_FLAGS[0]


def test_added_only_where_verified_and_not_set():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    assert xla_cpu.apply_defaults(env, (0, 10)) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert xla_cpu.apply_defaults(env, (0, 10)) == [] and env["XLA_FLAGS"].count("ynn") == 1  # no duplicate
    mine = {"XLA_FLAGS": FLAG.split("=")[0] + "=dot,eltwise", "JAX_PLATFORMS": "cpu"}  # the user's value wins
    assert xla_cpu.apply_defaults(mine, (0, 10)) == [] and mine["XLA_FLAGS"].endswith("=dot,eltwise")
    for version in ((0, 9), (0, 11), (1, 0)):  # a flag XLA does not know aborts the process: never guess
        env = {"JAX_PLATFORMS": "cpu"}
        assert xla_cpu.apply_defaults(env, version) == [] and "XLA_FLAGS" not in env
    off = {xla_cpu.OFF_VAR: "0", "JAX_PLATFORMS": "cpu"}
    assert xla_cpu.apply_defaults(off, (0, 10)) == [] and "XLA_FLAGS" not in off
    env = {"JAX_PLATFORMS": "cpu"}
    assert xla_cpu.apply_defaults(env, (0, 10)) == [FLAG] and env["XLA_FLAGS"] == FLAG  # no leading blank
    for platforms in ("tpu", "cuda,cpu", "gpu"):  # an accelerator's own XLA parses XLA_FLAGS too: CPU only
        env = {"JAX_PLATFORMS": platforms}
        assert xla_cpu.apply_defaults(env, (0, 10)) == [] and "XLA_FLAGS" not in env


def test_plugins_decide_when_platforms_are_not_given(monkeypatch):
    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    for names, applies in ((["numpy", "jax"], True), (["jax", "libtpu"], False), (["jax-cuda12-plugin"], False)):
        monkeypatch.setattr(xla_cpu.importlib.metadata, "distributions", lambda n=names: [Dist(x) for x in n])
        assert (xla_cpu.apply_defaults({}, (0, 10)) == [FLAG]) == applies, names


def test_nothing_once_a_backend_has_started(monkeypatch):
    import jax

    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_cpu.apply_defaults() == [] and os.environ["XLA_FLAGS"] == ""


_CHILD = r"""
import json, os, sys
from dma_jax.xla_cpu import apply_defaults
added = apply_defaults()
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
rng = np.random.default_rng(0)
out = {"added": added, "flags": os.environ.get("XLA_FLAGS", ""), "err": []}
for m, k, n in ((512, 96, 288), (96, 512, 288), (7, 33, 5), (128, 128, 128)):
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    y = np.asarray(jax.jit(jnp.dot)(a, b), np.float64)
    g = rng.standard_normal((m, n), np.float32)  # the backward pass's products: a^T g and g b^T
    ga, gb = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.dot(a, b) * g), argnums=(0, 1)))(a, b)
    for got, want in ((y, ref), (ga, g.astype(np.float64) @ b.T.astype(np.float64)),
                      (gb, a.T.astype(np.float64) @ g.astype(np.float64))):
        got = np.asarray(got, np.float64)
        out["err"].append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
print(json.dumps(out))
"""


@pytest.mark.parametrize("defaults", ["1", "0"])
def test_cpu_matmuls_under_the_defaults_match_float64(defaults):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {xla_cpu.OFF_VAR: defaults,
                                                                      "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    applies = defaults == "1" and xla_cpu._jaxlib_version() in xla_cpu.VERIFIED and xla_cpu._cpu_only(env)
    assert out["added"] == ([FLAG] if applies else []) and (FLAG in out["flags"]) == applies
    assert max(out["err"]) < 2e-6, out["err"]  # float32 accuracy relative to the largest entry

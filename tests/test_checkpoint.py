import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dma_jax.checkpoint import Checkpointer
from dma_jax.config import MeshConfig, ModelConfig, OptimConfig
from dma_jax.errors import DmaError
from dma_jax.train import Trainer

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)


def test_save_restore_roundtrip_with_meta_and_data(tmp_path):
    tr = Trainer(MODEL, OptimConfig(), MeshConfig(data=1), 4, 8, 16, devices=jax.devices()[:1])
    state = tr.init(3)
    ck = Checkpointer(tmp_path / "ck", keep=2)
    ck.save(1, state, meta={"model": "x"}, data={"cursor": [1, 2, 3]})
    ck.close()
    restored, meta, data = Checkpointer(tmp_path / "ck").restore(tr.abstract_state)
    assert meta == {"model": "x"} and data == {"cursor": [1, 2, 3]}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved from a 1-device mesh, restored onto a (data=4, model=2) mesh: same values, new shardings."""
    tr1 = Trainer(MODEL, OptimConfig(), MeshConfig(data=1), 4, 8, 16, devices=jax.devices()[:1])
    tr8 = Trainer(MODEL, OptimConfig(), MeshConfig(data=-1, model=2), 4, 8, 16)
    state = tr1.init(0)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(5, state)
    restored, _, _ = ck.restore(tr8.abstract_state)
    w = restored.params["blocks"][1]["mlp"]["w_up_DxF"]
    assert w.sharding == NamedSharding(tr8.mesh, P(None, "model"))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(state.params["blocks"][1]["mlp"]["w_up_DxF"]))
    # And it trains on the new mesh.
    batch = tr8.put_batch(np.random.default_rng(0).integers(0, 64, (8, 17)))
    new_state, m = tr8.step(restored, batch)
    assert np.isfinite(float(m["loss"])) and int(new_state.step) == 1


def test_keep_last_n(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2)
    for s in range(1, 5):
        ck.save(s, {"x": jnp.full((3,), float(s))})
    ck.wait()
    assert ck.all_steps() == [3, 4]


def test_nan_state_is_never_saved(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, {"x": jnp.ones(3)})
    with pytest.raises(DmaError, match="NaN"):
        ck.save(2, {"x": jnp.array([1.0, jnp.nan, 0.0])})
    assert ck.latest_step() == 1


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DmaError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})


_SAVER = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from dma_jax.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep=10)
    for step in range(1, 1000):
        print("saving", step, flush=True)
        ck.save(step, {"w": jnp.full((4_000_000,), float(step)), "b": jnp.full((1000,), float(step))})
        print("saved", step, flush=True)
""")


def test_sigkill_during_save_leaves_previous_checkpoint_restorable(tmp_path):
    d = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(d)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    killed_during = None
    for line in proc.stdout:
        if line.startswith("saving 3"):
            time.sleep(0.05)  # inside the third save
            proc.send_signal(signal.SIGKILL)
            killed_during = 3
            break
    proc.wait(timeout=60)
    assert killed_during == 3
    ck = Checkpointer(d)
    latest = ck.latest_step()
    assert latest in (2, 3)  # 3 only if that save had already been committed atomically
    abstract = {"w": jax.ShapeDtypeStruct((4_000_000,), jnp.float32), "b": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    state, _, _ = ck.restore(abstract)
    assert float(state["w"][0]) == float(latest) and float(state["w"][-1]) == float(latest)
    assert float(state["b"][-1]) == float(latest)

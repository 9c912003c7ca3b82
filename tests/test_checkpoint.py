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


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_array_files_are_a_one_line_error_naming_the_step(tmp_path, damage):
    ck = Checkpointer(tmp_path / "ck", keep=3)
    for step in (1, 2):
        ck.save(step, {"x": jnp.arange(50_000, dtype=jnp.float32) + step})
    ck.close()
    damaged = 0
    for path in sorted((tmp_path / "ck" / "2" / "state").rglob("*")):
        if path.is_file() and path.stat().st_size > 0 and "d" in path.parent.name:  # the array chunk files
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3] if damage == "truncate" else bytes(255 - b for b in data))
            damaged += 1
    assert damaged
    with pytest.raises(DmaError) as e:
        Checkpointer(tmp_path / "ck").restore({"x": jax.ShapeDtypeStruct((50_000,), jnp.float32)})
    msg = str(e.value)
    assert "\n" not in msg and "/2:" in msg and "resume from step 1" in msg, msg
    restored, _, _ = Checkpointer(tmp_path / "ck").restore({"x": jax.ShapeDtypeStruct((50_000,), jnp.float32)}, 1)
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(50_000, dtype=np.float32) + 1)


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


def test_directories_are_epaths_and_urls_survive(tmp_path, monkeypatch):
    """A relative epath.Path is made absolute; a gs:// URL keeps its '//' (pathlib would make it 'gs:/')."""
    from pathlib import Path

    from etils import epath

    from dma_jax.checkpoint import checkpoint_path

    assert str(Path("gs://bucket/run/ck")) == "gs:/bucket/run/ck"  # why pathlib cannot be used
    assert str(checkpoint_path("gs://bucket/run/ck")) == "gs://bucket/run/ck"
    assert isinstance(checkpoint_path("gs://bucket/run/ck"), epath.Path)
    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(epath.Path("rel") / "ck", keep=2)
    assert str(ck.directory) == str(tmp_path / "rel" / "ck")
    ck.save(7, {"x": jnp.arange(5.0)}, meta={"k": 1})
    ck.close()
    assert (tmp_path / "rel" / "ck" / "7").is_dir()  # on disk where pathlib expects it
    restored, meta, _ = Checkpointer(str(tmp_path / "rel" / "ck")).restore({"x": jax.ShapeDtypeStruct((5,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(5.0, dtype=np.float32))
    assert meta == {"k": 1}


def test_async_save_then_read_on_the_same_checkpointer(tmp_path):
    """Async saving (the default on accelerators), forced on CPU: reads wait for the save in flight."""
    ck = Checkpointer(tmp_path / "ck", async_save=True)
    for step in (1, 2):
        ck.save(step, {"w": jnp.full((200_000,), float(step))}, meta={"step": step})
    assert ck.read_meta() == {"step": 2}
    state, _, _ = ck.restore({"w": jax.ShapeDtypeStruct((200_000,), jnp.float32)})
    assert float(state["w"][0]) == 2.0 and float(state["w"][-1]) == 2.0
    ck.close()
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == [1, 2]


def test_async_only_on_accelerators_and_with_a_distributed_client(monkeypatch):
    from dma_jax import checkpoint

    assert checkpoint._async_by_default() is False  # tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert checkpoint._async_by_default() is True  # one process
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert checkpoint._async_by_default() is False  # Orbax's async barriers would need the client
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert checkpoint._async_by_default() is True


def test_a_reader_leaves_a_writers_temporary_folder_alone(tmp_path):
    # A reader (create=False: `dma export`, `dma eval`, the study's re-scoring, CPT reading the base) may open a
    # folder another process is saving into; Orbax's clean-up of temporary folders would delete that save's
    # work in progress (it did, and its clean-up thread also printed a traceback at exit after one-line errors).
    with Checkpointer(tmp_path) as writer:
        writer.save(1, {"a": jnp.ones(3)})
    in_progress = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    in_progress.mkdir()
    with Checkpointer(tmp_path, create=False) as reader:
        assert reader.latest_step() == 1
    assert in_progress.is_dir()
    with Checkpointer(tmp_path / "missing", create=False) as reader:
        assert reader.latest_step() is None
    assert not (tmp_path / "missing").exists()

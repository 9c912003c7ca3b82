"""The tiny demo's outputs as digests: what a refactor must leave byte-identical.

`digests(run_dir)` reads a finished `dma demo --variant tiny` run folder with numpy, JSON and
Orbax only (no dma_jax code, so a refactor of the package cannot change how it is read) and
returns {name: sha256} for: the offline dataset's arrays and meta (minus the paths and the
sha256 of the npz bytes, into which np.savez writes the time), the exported agents' actor
parameters and specs (minus that sha256), every CPT history (minus its wall-clock `timings`),
every `records.jsonl`, and `report.md` (with the run folder's path replaced).

XLA:CPU compiles for the host's instruction set (and its matmul kernels dispatch on it), so the same code gives
other low-order bits on another CPU. The golden file also holds the recording machine's `platform` and a few
`values` (every CPT run's balanced scores, the sweep's returns, the agents' parameter norms): on the recording
platform the digests must match exactly; on another one the data order (records.jsonl, which no float decides for
the fixed policies) must, and the values must agree to `RTOL` (`compare` says which check ran).

Record anew (only when a change of behaviour is intended, and say so in the commit):
    .venv/bin/python -m tests.golden --record
"""

from __future__ import annotations

import hashlib
import io
import json
import platform as _platform
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).with_name("golden_tiny_demo.json")
# The run `tests/test_pulse.py` makes; the digests are of exactly this command.
DEMO_ARGS = ["--no-progress", "demo", "--variant", "tiny", "data.demo_fields=[source, math]", "pretrain.steps=2",
             "mesh.data=1"]
_PATH_KEYS = ("out_dir", "dir", "data_dir")
RTOL = 1e-3  # values on another platform (see the module docstring)
_FLOAT_FREE = ("fixed-", "source-only", "target-only", "curriculum")  # policies whose data order no float decides


def platform() -> str:
    """The CPU and the jax build the numbers depend on (describing the machine is not reading the run: the study's
    record of it is reused)."""
    import jax
    import jaxlib

    from dma_jax.study.fingerprint import cpu

    return f"{_platform.machine()} | {cpu()} | jax {jax.__version__} jaxlib {jaxlib.__version__}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _arrays_digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _drop(obj, keys: tuple[str, ...]):
    """`obj` without the given keys at any depth."""
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def _orbax_arrays(step_dir: Path) -> dict:
    """Every array of an Orbax item folder, flattened to {path: array}, restored as numpy."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        meta = ck.metadata(step_dir)
        tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree.tree if hasattr(tree, "tree") else tree)
        restored = ck.restore(step_dir, target)
    flat, _ = jax.tree_util.tree_flatten_with_path(restored)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def digests(run_dir: str | Path) -> dict[str, str]:
    run = Path(run_dir)
    out: dict[str, str] = {}
    off = run / "sweep" / "offline"
    with np.load(io.BytesIO((off / "data.npz").read_bytes()), allow_pickle=False) as z:
        out["sweep/offline/data.npz"] = _arrays_digest({k: z[k] for k in z.files})
    meta = json.loads((off / "meta.json").read_text())
    out["sweep/offline/meta.json"] = _sha(_canonical(_drop(meta, _PATH_KEYS + ("data_sha256",))))
    for stage in ("sft", "cql"):
        exp = run / "agent" / f"export-{stage}"
        spec = json.loads((exp / "agent_spec.json").read_text())
        out[f"agent/export-{stage}/agent_spec.json"] = _sha(_canonical(_drop(spec, ("dataset_sha256",))))
        steps = sorted((p for p in (exp / "checkpoint").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        out[f"agent/export-{stage}/actor"] = _arrays_digest(_orbax_arrays(steps[-1] / "state"))
    for hist in sorted((run / "cpt").glob("*/seed*/history.json")):
        rel = hist.relative_to(run).as_posix()
        out[rel] = _sha(_canonical(_drop(json.loads(hist.read_text()), ("timings",))))
        out[rel.replace("history.json", "records.jsonl")] = _sha((hist.parent / "records.jsonl").read_bytes())
    report = (run / "report" / "report.md").read_text().replace(str(run), "<run>")  # the report names its folder
    out["report/report.md"] = _sha(report.encode())
    return out


def values(run_dir: str | Path) -> dict[str, list[float]]:
    """The numbers the other-platform check compares: balanced scores per CPT run, the sweep's returns, the norm
    of each exported actor's parameters."""
    run = Path(run_dir)
    with np.load(io.BytesIO((run / "sweep" / "offline" / "data.npz").read_bytes()), allow_pickle=False) as z:
        out = {"sweep/offline/returns": np.asarray(z["returns"], np.float64).tolist()}
    for stage in ("sft", "cql"):
        exp = run / "agent" / f"export-{stage}" / "checkpoint"
        step = max((p for p in exp.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        arrays = _orbax_arrays(step / "state")
        out[f"agent/export-{stage}/actor"] = [float(np.sqrt(sum(float((np.asarray(a, np.float64) ** 2).sum())
                                                               for a in arrays.values())))]
    for hist in sorted((run / "cpt").glob("*/seed*/history.json")):
        out[hist.relative_to(run).as_posix()] = [float(x) for x in json.loads(hist.read_text())["balanced"]]
    return out


def compare(run_dir: str | Path, golden: Path = GOLDEN, on: str | None = None) -> list[str]:
    """What differs from the recording (empty: nothing). On its platform (`on`, default this machine's): the names
    whose digest differs (missing or extra names included). On another: the data order of the runs no float
    decides, and every value beyond RTOL."""
    doc = json.loads(golden.read_text())
    want, got = doc["digests"], digests(run_dir)
    if (on or platform()) == doc.get("platform"):
        return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    bad = [k for k in want if k.endswith("records.jsonl") and k.split("/")[1].startswith(_FLOAT_FREE)
           and want[k] != got.get(k)]
    mine = values(run_dir)
    for k, ref in doc["values"].items():
        v = mine.get(k)
        if v is None or len(v) != len(ref) or not np.allclose(v, ref, rtol=RTOL, atol=0.0):
            bad.append(k)
    return sorted(bad)


def record(tmp: Path) -> None:
    from dma_jax.cli import main

    assert main([*DEMO_ARGS, f"run.out_dir={tmp}"]) == 0
    import jax

    doc = {"command": "dma " + " ".join(DEMO_ARGS), "jax": jax.__version__, "platform": platform(),
           "digests": digests(tmp), "values": values(tmp)}
    GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(doc['digests'])} digests in {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    import os
    import tempfile

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dma_jax.xla_cpu import apply_defaults

    apply_defaults()
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    with tempfile.TemporaryDirectory() as d:
        record(Path(d))

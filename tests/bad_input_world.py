"""The small finished run that the bad-input suite (tests/test_bad_inputs.py) breaks, and the ways it breaks files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import yaml

from dma_jax.cli import main
from dma_jax.config import dump_config, load_config
from tests.paths import DEMO

OVERRIDES = [
    "run.out_dir=run", "data.demo_fields=[source, math]", "data.demo_max_docs_per_domain=6", "mesh.data=1",
    "pretrain.steps=2", "pretrain.checkpoint_every=2", "pretrain.eval_every=2",
    "sweep.num_trajectories=4", "sweep.num_stages=2", "sweep.steps_per_stage=1", "sweep.chunk_size=4",
    "sweep.devices=1", "cpt.num_stages=1", "cpt.steps_per_stage=1",
    "agent.updates_per_dispatch=5", "agent.checkpoint_every=5", "agent.sft.steps=5", "agent.cql.steps=5",
    "agent.model.d_model=16", "agent.model.n_layers=1", "agent.model.n_heads=2", "agent.model.d_ff=32",
]
DOCS = [f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (3 + i) for i in range(8)]
BENCH = [{"context": f"{i} + {i} =", "choices": [f" {2 * i}", f" {2 * i + 1}"], "gold": 0, "domain": "sums"}
         for i in range(4)]


def write_ar(path: Path, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    path.unlink(missing_ok=True)  # a new file, not the hard-linked one
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def _user_config(world: Path) -> dict:
    """A user domain space (text, JSONL, ArrayRecord inputs + a benchmark file) over files under `in/`."""
    return {
        "run": {"out_dir": "run"},
        "data": {"demo": False, "dir": "userdata", "record_len": 33, "records_per_shard": 64,
                 "domains": [
                     {"name": "prose", "field": "source", "kind": "text", "paths": ["in/prose/*.txt"]},
                     {"name": "notes", "field": "source", "kind": "array_record", "paths": ["in/notes.ar"]},
                     {"name": "sums", "field": "math", "kind": "jsonl", "paths": ["in/sums.jsonl"]}],
                 "benchmarks": [{"field": "math", "path": "in/bench.jsonl"}]},
        "proxy": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
        "target": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
        "eval": {"max_len": 64}, "sweep": {"seq_len": 32},
    }


def build_world(root: Path) -> Path:
    """A finished tiny run under `<root>/run` (config `<root>/cfg.yaml`; every path relative to `<root>`)."""
    from dma_jax import offline_data as od
    from dma_jax.agent.runner import export_agent, run_train_agent
    from dma_jax.models import hf
    from dma_jax.prepare import run_prepare
    from dma_jax.sample import run_sample
    from tests.toy_env import ToyEnv

    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(DEMO, OVERRIDES, variant="tiny")
        Path("cfg.yaml").write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
        run_prepare(cfg, progress=False)
        _base_checkpoint(cfg, "proxy")  # untrained base models: their files are what the cases break
        target_params = _base_checkpoint(cfg, "target")
        run_sample(cfg)
        # An analytic offline dataset in place of a sweep (same format): the agent's input.
        env = ToyEnv(["source", "source", "math", "math"], "math", np.tile([0.4, 0.3, 0.2, 0.1], (2, 1)))
        od.save(env.dataset(np.random.default_rng(0).dirichlet(np.ones(4), size=(8, 2)).astype(np.float32)),
                Path("run/sweep/offline"))
        run_train_agent(cfg.agent, Path("run/sweep/offline"), Path("run/agent"), "sft", 0, progress=False)
        export_agent(Path("run/agent/sft"), Path("run/agent/export-sft"))
        hf.export_hf(cfg.target, jax.tree.map(np.asarray, target_params), Path("hf"))
        inp = Path("in")
        (inp / "prose").mkdir(parents=True)
        for i, d in enumerate(DOCS):
            (inp / "prose" / f"{i}.txt").write_text(d)
        (inp / "sums.jsonl").write_text("".join(json.dumps({"text": d.replace("fox", "sum")}) + "\n" for d in DOCS))
        write_ar(inp / "notes.ar", [d.encode() for d in DOCS])
        (inp / "bench.jsonl").write_text("".join(json.dumps(b) + "\n" for b in BENCH))
        Path("user.yaml").write_text(yaml.safe_dump(_user_config(root)))
        assert main(["--no-progress", "prepare", "--config", "user.yaml"]) == 0  # the valid user inputs work
        shutil.rmtree("userdata")
    finally:
        os.chdir(cwd)
    return root


def _base_checkpoint(cfg, which: str):
    """A base-model checkpoint as `dma pretrain` writes it, of the initial parameters (no training)."""
    from dma_jax.checkpoint import Checkpointer
    from dma_jax.runs import RunDir
    from dma_jax.models.lm import LMDef
    from dma_jax.train import init_state, make_optimizer

    state = init_state(LMDef.build(getattr(cfg, which)), make_optimizer(cfg.optim, cfg.pretrain.steps), 0)
    ck = Checkpointer(RunDir(cfg).pretrain_checkpoints(which))
    ck.save(cfg.pretrain.steps, state, meta={"model": dump_config(cfg)[which], "which": which})
    ck.close()
    return state.params


# ------------------------------------------------------------------------------------------ corruption helpers
# Case directories are hard-linked copies of the world: a file is changed by replacing it (new inode), never
# in place, so the world stays intact.


def put(path: Path, data: str | bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    put(path, data[: int(len(data) * keep)])


def garble(path: Path) -> None:
    """Overwrite bytes in the middle (and the first bytes) with junk that is not valid UTF-8."""
    data = bytearray(path.read_bytes())
    n = len(data)
    junk = bytes([0xFF, 0xFE, 0x00, 0x9C] * 16)
    data[:16] = junk[:16]
    mid = n // 2
    data[mid:mid + 64] = junk[: max(0, min(64, n - mid))]
    put(path, bytes(data))


def empty(path: Path) -> None:
    put(path, b"")


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    put(path, json.dumps(obj))


def edit_yaml(path: Path, fn: Callable[[dict], None]) -> None:
    obj = yaml.safe_load(path.read_text())
    fn(obj)
    put(path, yaml.safe_dump(obj))


def rewrite_npz(path: Path, fn: Callable[[dict], None], fix_sha: Path | None = None) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    put(path, buf.getvalue())
    if fix_sha is not None:  # keep meta.json consistent so the content check (not the sha check) must fire
        edit_json(fix_sha, lambda m: m.update(data_sha256=hashlib.sha256(buf.getvalue()).hexdigest()))


def first_shard(data_dir: Path) -> Path:
    return sorted((data_dir / "domains").glob("*/train/*.array_record"))[0]


def ckpt_files(ckpt_dir: Path, item: str) -> list[Path]:
    step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    return sorted(p for p in (ckpt_dir / str(step) / item).rglob("*") if p.is_file() and p.stat().st_size > 0)


def corrupt_ckpt(ckpt_dir: Path, how: Callable[[Path], None]) -> None:
    for p in ckpt_files(ckpt_dir, "state"):
        how(p)


def nan_checkpoint(ckpt_dir: Path) -> None:
    """Rewrite the latest checkpoint's state with NaN parameters (bypassing the save-time check)."""
    from dma_jax.checkpoint import Checkpointer

    ck = Checkpointer(ckpt_dir)
    step = ck.latest_step()
    meta = ck.read_meta(step)
    import orbax.checkpoint as ocp

    raw = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan) if np.asarray(x).dtype.kind == "f"
                         else np.asarray(x), raw.state)
    ck.manager.delete(step)
    ck.save(step, state, meta=meta, check_finite=False)
    ck.close()

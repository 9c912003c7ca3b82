"""Where a reproduction of a study departs: the numerical environment of every invocation, and digests of the
artefacts whose bits the later numbers depend on.

Agent training amplifies last-bit differences (RESULTS.md: the same offline data under another XLA configuration
gives other agents), so "same seed, same result" holds per CPU type, jax build, XLA flags and device count. The
runner records `environment()` per sub-run in study.json (`ENV_KEY`); RESULTS.md lists it with `digests()`: of the
offline data's arrays (not of data.npz's bytes, into which np.savez writes the time) and of every exported agent's
actor parameters, per sub-run that made them. Two runs whose digests agree up to some artefact agree bit for bit
up to there; the first one that differs is where to look.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from dma_jax.io_utils import atomic_write_json, read_json_file
from dma_jax.runs import AGENT_STAGES, RunDir

ENV_KEY = "environments"  # study.json: {sub-run: [environment(), ...]}, each distinct one once
CACHE_FILE = "fingerprints.json"  # under the study's root: {artefact: {"stamp": ..., "sha256": ...}}
ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "neon", "asimd")


def cpu() -> str:
    """The CPU's model and the instruction-set extensions XLA:CPU's kernels dispatch on."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                model = val.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(val.split())
    except OSError:
        pass
    return " | ".join([model, " ".join(f for f in ISA if f in flags)])


def environment() -> dict:
    """What the numbers of this process depend on besides the code and the config (call after the backend is up
    or let this start it: XLA has read XLA_FLAGS by then)."""
    import jax
    import jaxlib

    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "backend": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "processes": jax.process_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu": cpu(), "machine": platform.machine()}


def record_environment(doc: dict, sub_run: str, env: dict) -> dict:
    """`doc` (study.json's) with `env` added to the sub-run's environments unless already there."""
    envs = dict(doc.get(ENV_KEY, {}))
    seen = list(envs.get(sub_run, []))
    if env not in seen:
        seen.append(env)
    envs[sub_run] = seen
    return {**doc, ENV_KEY: envs}


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _offline(path: Path) -> str:
    from dma_jax import offline_data

    ds = offline_data.load(path)
    return arrays_digest({name: getattr(ds, name) for name in offline_data.ARRAYS})


def _actor(path: Path) -> str:
    import jax

    from dma_jax.agent.runner import load_exported_agent

    flat, _ = jax.tree_util.tree_flatten_with_path({"actor": load_exported_agent(path).actor})  # as exported
    # names without quotes: a list index and a dict key "0" read the same whichever way the tree was restored
    return arrays_digest({jax.tree_util.keystr(p).replace("'", ""): np.asarray(v) for p, v in flat})


def _artefacts(name: str, run: RunDir) -> Iterable[tuple[str, Path, Callable[[Path], str]]]:
    """The sub-run's own artefacts (not main's it links to): (label, folder, digest function)."""
    offline = Path(run.offline)
    if (offline / "meta.json").is_file() and not Path(run.sweep).is_symlink():
        yield f"{name}: offline data", offline, _offline
    if Path(run.agent).is_symlink():
        return
    for k in run.cfg.agent.seeds:
        for stage in AGENT_STAGES:
            if run.agent_exported(stage, k) and not Path(run.agent_stage(stage, k)).is_symlink():
                yield f"{name}: {stage} agent seed {k}", Path(run.agent_export(stage, k)), _actor


def _stamp(folder: Path) -> list[int]:
    """Changes whenever the folder's files are rewritten (an artefact is written once, atomically)."""
    return sorted(p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file())[-1:]


def digests(root: Path, dirs: Mapping[str, RunDir]) -> dict[str, str]:
    """{artefact: sha256} of every sub-run's own offline data and exported agents, cached in `CACHE_FILE`."""
    cache_path = Path(root) / CACHE_FILE
    cache = read_json_file(cache_path, "") if cache_path.is_file() else {}
    out, fresh = {}, {}
    for name, run in dirs.items():
        for label, folder, digest in _artefacts(name, run):
            stamp = _stamp(folder)
            hit = cache.get(label)
            sha = hit["sha256"] if hit and hit.get("stamp") == stamp else digest(folder)
            out[label], fresh[label] = sha, {"stamp": stamp, "sha256": sha}
    if fresh != cache:
        atomic_write_json(cache_path, fresh)
    return out


def section(environments: Mapping[str, list[dict]], digests_: Mapping[str, str]) -> list[str]:
    """RESULTS.md's "Reproducing this run": the environments and the digests (first 16 hex digits)."""
    lines = ["## Reproducing this run", "",
             "Agent training amplifies last-bit differences, so the study's numbers after the sweep reproduce bit for "
             "bit only under the same CPU type, jax build, XLA flags and device count. A reproduction compares "
             f"these first (the full digests: `{CACHE_FILE}`; the environments: `study.json`); the first artefact "
             "whose digest differs is where the two runs depart.", ""]
    distinct: list[dict] = []
    for envs in environments.values():
        distinct += [e for e in envs if e not in distinct]
    for i, env in enumerate(distinct, 1):
        subs = [s for s, envs in environments.items() if env in envs]
        shown = ", ".join(f"{k} {v!r}" if k == "xla_flags" else f"{k} {v}" for k, v in env.items())
        lines.append(f"- Environment {i} ({', '.join(subs)}): {shown}.")
    if not distinct:
        lines.append("- Environments: not recorded (sub-runs made before study.json recorded them).")
    lines += ["", "| artefact | sha256 (first 16) |", "|---|---|"]
    lines += [f"| {label} | `{sha[:16]}` |" for label, sha in digests_.items()]
    return lines + [""]


"""Device meshes and partition rules.

The LM's parameters carry logical axis names (`vocab`, `embed`, `heads`, ...);
`MeshConfig.rules` maps each to a mesh axis or to None (replicated). A logical
axis whose size the mesh axis does not divide is replicated, with a warning, so
any model runs on any mesh. Multi-host: call `maybe_initialize_distributed()`
before the first JAX call (`dma` does); the same code then sees every host's devices.
Every process holds the same host data (configs, trajectories, batches): `put_global`
places it on a mesh that spans all hosts, `to_host` gathers results back, and only
the primary process (`is_primary`) writes files.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dma_jax.config import MeshConfig
from dma_jax.errors import DmaError

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> bool:
    """Initialise multi-host JAX when the environment says so; True if this is a multi-process run.

    - `DMA_COORDINATOR=host:port`, `DMA_NUM_PROCESSES`, `DMA_PROCESS_ID`: explicit (any platform; on
      CPU the processes talk through gloo collectives, JAX's default).
    - `DMA_DISTRIBUTED=auto`, or a multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` lists more than one
      worker): `jax.distributed.initialize()` with JAX's own cluster detection.
    - `DMA_DISTRIBUTED=off`: never. Otherwise a single process: nothing to do.
    Call it once, before anything touches a device; a second call is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    mode = os.environ.get("DMA_DISTRIBUTED", "").strip().lower()
    coord = os.environ.get("DMA_COORDINATOR", "").strip()
    if mode == "off":
        return False
    if coord:
        try:
            num, pid = int(os.environ["DMA_NUM_PROCESSES"]), int(os.environ["DMA_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise DmaError(f"DMA_COORDINATOR={coord} needs integer DMA_NUM_PROCESSES and DMA_PROCESS_ID ({e})") from None
        if not 0 <= pid < num:
            raise DmaError(f"DMA_PROCESS_ID={pid} must be in [0, DMA_NUM_PROCESSES={num})")
        jax.distributed.initialize(coordinator_address=coord, num_processes=num, process_id=pid)
    elif mode == "auto" or len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()
    elif mode not in ("", "0", "false"):
        raise DmaError(f"DMA_DISTRIBUTED={mode!r}: expected auto or off (or set DMA_COORDINATOR)")
    else:
        return False
    log.info("process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Process 0 writes the files every process computes (offline data, JSON, plots); Orbax saves need all."""
    return jax.process_index() == 0


_barriers = 0


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here (no-op with one process).

    A barrier of the coordination service (what `jax.distributed.initialize` started), not a device
    collective: on CPU, XLA's gloo collectives give up when the processes arrive more than 30 s apart,
    e.g. while process 0 alone writes files and plots.
    """
    global _barriers
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        _barriers += 1  # a barrier name may be used once; every process counts the same way
        multihost.get_barrier_sync_fn()(key=f"dma-{name}-{_barriers}", timeout_ms=timeout_s * 1000)


def spread_devices(devices: Sequence[jax.Device], n: int) -> list[jax.Device]:
    """`n` of `devices`, the same number from every process that owns some, so a mesh over them spans all hosts."""
    by_process: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    if len(by_process) == 1:
        return list(devices)[:n]
    if n % len(by_process) or n // len(by_process) > min(len(v) for v in by_process.values()):
        raise DmaError(f"{n} devices cannot be spread evenly over {len(by_process)} processes "
                       f"(with {[len(v) for v in by_process.values()]} devices each)")
    k = n // len(by_process)
    return [d for p in sorted(by_process) for d in by_process[p][:k]]


def put_global(tree: Any, sharding: Any) -> Any:
    """Place host values that every process holds in full onto `sharding` (one Sharding, or a pytree of them
    shaped like `tree`), which may span processes.

    Each process copies only its addressable shards (`jax.make_array_from_callback`); unlike
    `jax.device_put` this runs no cross-process equality check, which would cost one all-gather per call.
    """

    def put(x, s):
        x = np.asarray(x)
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, sharding), tree)
    return jax.tree.map(put, tree, sharding)


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree of arrays; arrays spread over other processes' devices are all-gathered.

    Every process must call it with the same tree (the all-gather is a collective). The processes meet at
    a `barrier` first: each compiled the programs that produced `tree` on its own, and on CPU a collective
    fails when they reach it more than 30 s apart.
    """
    spread = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated  # noqa: E731
    if any(spread(x) for x in jax.tree.leaves(tree)):
        barrier("to-host")

    def get(x):
        if spread(x):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def mesh_shape(cfg: MeshConfig, n: int) -> tuple[int, int]:
    """(data, model) sizes of the mesh `make_mesh` builds over `n` devices."""
    if n % cfg.model:
        raise DmaError(f"mesh.model={cfg.model} does not divide the {n} available devices")
    data = n // cfg.model if cfg.data == -1 else cfg.data
    if data * cfg.model > n:
        raise DmaError(f"mesh.data={data} x mesh.model={cfg.model} needs {data * cfg.model} devices, have {n}")
    return data, cfg.model


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    data, _ = mesh_shape(cfg, len(devices))
    grid = np.array(spread_devices(devices, data * cfg.model)).reshape(data, cfg.model)
    return Mesh(grid, ("data", "model"))


def logical_to_spec(
    logical_axes: tuple[str | None, ...], shape: tuple[int, ...], rules: dict[str, str | None], mesh: Mesh
) -> P:
    """Map logical axis names to a PartitionSpec; replicate dims the mesh axis does not divide."""
    spec: list[Any] = []
    used: set[str] = set()
    for name, size in zip(logical_axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is not None and (mesh_axis in used or mesh.shape[mesh_axis] == 1):
            mesh_axis = None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            log.warning(
                "logical axis %r (size %d) not divisible by mesh axis %r (size %d): replicated",
                name, size, mesh_axis, mesh.shape[mesh_axis],
            )
            mesh_axis = None
        if mesh_axis is not None:
            used.add(mesh_axis)
        spec.append(mesh_axis)
    return P(*spec)


def tree_shardings(logical_axes_tree: Any, abstract_tree: Any, rules: Sequence[tuple[str, str | None]], mesh: Mesh):
    """NamedShardings for a pytree of arrays given a same-structured pytree of logical-axis tuples."""
    rule_map = dict(rules)
    flat_axes, _ = jax.tree.flatten(logical_axes_tree, is_leaf=lambda x: isinstance(x, tuple))
    flat_abs, treedef = jax.tree.flatten(abstract_tree)
    if len(flat_axes) != len(flat_abs):
        raise ValueError(f"logical axes tree has {len(flat_axes)} leaves, arrays tree {len(flat_abs)}")
    shardings = [
        NamedSharding(mesh, logical_to_spec(axes, a.shape, rule_map, mesh)) for axes, a in zip(flat_axes, flat_abs)
    ]
    return jax.tree.unflatten(treedef, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

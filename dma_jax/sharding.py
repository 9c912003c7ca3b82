"""Device meshes and partition rules.

The LM's parameters carry logical axis names (`vocab`, `embed`, `heads`, ...);
`MeshConfig.rules` maps each to a mesh axis or to None (replicated). A logical
axis whose size the mesh axis does not divide is replicated, with a warning, so
any model runs on any mesh. Multi-host: call `maybe_initialize_distributed()`
before the first JAX call; the same code then sees every host's devices.
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
    """Initialise multi-host JAX when the environment says so (DMA_COORDINATOR or a TPU pod)."""
    coord = os.environ.get("DMA_COORDINATOR")
    if coord:
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["DMA_NUM_PROCESSES"]),
            process_id=int(os.environ["DMA_PROCESS_ID"]),
        )
        return True
    return False


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if n % cfg.model:
        raise DmaError(f"mesh.model={cfg.model} does not divide the {n} available devices")
    data = n // cfg.model if cfg.data == -1 else cfg.data
    if data * cfg.model > n:
        raise DmaError(f"mesh.data={data} x mesh.model={cfg.model} needs {data * cfg.model} devices, have {n}")
    grid = np.array(devices[: data * cfg.model]).reshape(data, cfg.model)
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

"""Device mesh from the config, FSDP parameter shardings and data-parallel batch shardings.

Mesh axes are ``("data", "fsdp")``. A batch is split over both axes on its leading dim;
each parameter (and each optimizer moment of the same shape) is split over ``fsdp`` along
its largest dimension divisible by the ``fsdp`` size, and replicated if none is. The rule is
applied here, in the train code, and not as sharding metadata inside the layers: Flax NNX
shards eagerly, so annotated layers could not be built without a mesh by other projects.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (mesh.data, mesh.fsdp) over ``devices`` (default: all devices).

    One of the two sizes may be -1: it takes all devices the other leaves.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = int(mesh_config["data"]), int(mesh_config["fsdp"])
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    for name, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if size == 0 or size < -1:
            raise ValueError(f"{name} must be a positive size or -1, got {size}")
        if size != -1 and len(devices) % size:
            raise ValueError(f"{name}={size} does not divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if fsdp == -1:
        fsdp = len(devices) // data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} != {len(devices)} devices")
    return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """PartitionSpec splitting the largest dim divisible by ``fsdp_size`` over "fsdp"."""
    if fsdp_size == 1:
        return PartitionSpec()
    candidates = [(size, i) for i, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)  # ties go to the later dim
    spec: list[str | None] = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf of a pytree of arrays / ShapeDtypeStructs, by the FSDP rule."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)),
                        abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def check_batch_size(global_batch: int, mesh: Mesh, process_count: int) -> int:
    """Per-process batch size; clear error if ``train.batch_size`` does not split evenly."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the mesh's "
                         f"data*fsdp = {shards} devices")
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the "
                         f"{process_count} processes")
    return global_batch // process_count


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each process's local numpy rows into global arrays split by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}

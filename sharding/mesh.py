"""Device meshes with three named axes: data (replicas), stage (pipeline) and tensor.

Devices are ordered by (process, id) and the tensor axis varies fastest, so a
tensor-parallel group is a run of consecutive devices of one process (one
host): its all-reduces, one or two per layer and step, stay on NVLink or the
host's ICI links. Stages and replicas are the slower axes, whose traffic is
one activation per micro-batch or nothing at all.
"""

import collections
import dataclasses

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from sharding.errors import ShardingError

DATA, STAGE, TENSOR = "data", "stage", "tensor"
AXES = (DATA, STAGE, TENSOR)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
  """Degrees of data, pipeline and tensor parallelism; the mesh holds `size` devices."""

  data: int = 1
  stage: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in AXES:
      if getattr(self, name) < 1:
        raise ShardingError(f"{name}={getattr(self, name)}: a parallelism degree must be at least 1")

  @property
  def size(self) -> int:
    return self.data * self.stage * self.tensor

  def __str__(self):
    return f"data={self.data} stage={self.stage} tensor={self.tensor}"


def default_shape(devices) -> MeshShape:
  """All devices of a host in one tensor group and one replica per host."""
  per_host = collections.Counter(d.process_index for d in devices)
  return MeshShape(data=len(per_host), tensor=min(per_host.values()))


def make_mesh(shape: MeshShape | None = None, devices=None, *, allow_cross_host_tensor: bool = False) -> Mesh:
  """A `Mesh` with axes (data, stage, tensor) over `devices` (default: all devices of all processes).

  With fewer devices requested than present, the first ones are used. A tensor
  group larger than a host must span whole hosts and needs
  `allow_cross_host_tensor`, since its all-reduces then cross the slower
  inter-host network (the planner prices that; only it should ask for it).
  """
  devices = devices if devices is not None else jax.devices()
  grid = device_grid(shape or default_shape(devices), devices, allow_cross_host_tensor=allow_cross_host_tensor)
  mesh = Mesh(grid, AXES)
  logging.info("mesh %s over %d devices of %d host(s)", mesh_shape(mesh), grid.size,
               len({d.process_index for d in grid.flat}))
  return mesh


def device_grid(shape: MeshShape, devices, *, allow_cross_host_tensor: bool = False) -> np.ndarray:
  """The [data, stage, tensor] array of devices `make_mesh` builds its mesh from."""
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  if shape.size > len(devices):
    raise ShardingError(f"mesh {shape} needs {shape.size} devices, only {len(devices)} present")
  devices = devices[:shape.size]
  per_host = collections.Counter(d.process_index for d in devices)
  host_size = min(per_host.values())
  if len(set(per_host.values())) > 1:
    raise ShardingError(f"hosts contribute unequal device counts {dict(per_host)}; a mesh needs the same on each")
  if shape.tensor <= host_size:
    if host_size % shape.tensor:
      raise ShardingError(f"tensor={shape.tensor} does not divide the {host_size} devices of a host, so some "
                          f"tensor group would span two hosts; use a divisor of {host_size}")
  else:
    if shape.tensor % host_size:
      raise ShardingError(f"tensor={shape.tensor} is larger than a host ({host_size} devices) and not a "
                          f"multiple of it")
    if not allow_cross_host_tensor:
      raise ShardingError(f"tensor={shape.tensor} spans {shape.tensor // host_size} hosts of {host_size} "
                          f"devices; pass allow_cross_host_tensor=True or use stage/data across hosts")
  grid = np.empty(shape.size, dtype=object)
  grid[:] = devices
  return grid.reshape(shape.data, shape.stage, shape.tensor)


def mesh_shape(mesh: Mesh) -> MeshShape:
  return MeshShape(**{name: mesh.shape.get(name, 1) for name in AXES})


def sub_meshes(mesh: Mesh, axis: str) -> list[Mesh]:
  """One mesh per index of `axis`, each keeping all three axis names (with `axis` of size 1)."""
  dim = mesh.axis_names.index(axis)
  return [Mesh(np.take(mesh.devices, [i], axis=dim), mesh.axis_names) for i in range(mesh.devices.shape[dim])]


def replica_meshes(mesh: Mesh) -> list[Mesh]:
  """The disjoint sub-meshes of the data axis: one per independent engine replica."""
  return sub_meshes(mesh, DATA)


def stage_meshes(mesh: Mesh) -> list[Mesh]:
  """The sub-meshes of the stage axis of a replica's mesh: one per pipeline stage."""
  return sub_meshes(mesh, STAGE)

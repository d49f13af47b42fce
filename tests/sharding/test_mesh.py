"""Mesh layout: tensor groups stay inside a host, replicas and stages are the slow axes."""

import pytest

from sharding.errors import ShardingError
from sharding.mesh import MeshShape, default_shape, device_grid


class FakeDevice:
  def __init__(self, id, process_index):
    self.id, self.process_index = id, process_index

  def __repr__(self):
    return f"d{self.id}@{self.process_index}"


def hosts(num_hosts, per_host):
  # Listed out of order on purpose: the grid must not depend on the order jax.devices() gives.
  return [FakeDevice(h * per_host + i, h) for i in range(per_host) for h in range(num_hosts)]


def processes(grid):
  return [[sorted({d.process_index for d in group}) for group in stage] for stage in grid]


def test_tensor_groups_are_consecutive_devices_of_one_host():
  grid = device_grid(MeshShape(data=2, tensor=4), hosts(2, 4))
  assert grid.shape == (2, 1, 4)
  assert [[d.id for d in g] for g in grid[:, 0]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert processes(grid) == [[[0]], [[1]]]


def test_stages_split_a_host_into_tensor_groups():
  grid = device_grid(MeshShape(stage=2, tensor=2), hosts(1, 4))
  assert [[d.id for d in g] for g in grid[0]] == [[0, 1], [2, 3]]


def test_default_shape_is_one_replica_per_host_with_tensor_over_the_host():
  assert default_shape(hosts(2, 8)) == MeshShape(data=2, tensor=8)
  assert default_shape(hosts(1, 8)) == MeshShape(tensor=8)


def test_tensor_group_across_hosts_needs_to_be_asked_for():
  with pytest.raises(ShardingError, match=r"tensor=8 spans 2 hosts of 4 devices"):
    device_grid(MeshShape(tensor=8), hosts(2, 4))
  grid = device_grid(MeshShape(tensor=8), hosts(2, 4), allow_cross_host_tensor=True)
  assert [d.id for d in grid[0, 0]] == list(range(8))


def test_tensor_degree_that_would_straddle_hosts_is_refused():
  with pytest.raises(ShardingError, match=r"tensor=4 does not divide the 6 devices of a host"):
    device_grid(MeshShape(data=3, tensor=4), hosts(2, 6))


def test_mesh_larger_than_the_devices_present_is_refused():
  with pytest.raises(ShardingError, match=r"needs 16 devices, only 8 present"):
    device_grid(MeshShape(data=2, tensor=8), hosts(1, 8))


def test_degrees_below_one_are_refused():
  with pytest.raises(ShardingError, match=r"stage=0"):
    MeshShape(stage=0)

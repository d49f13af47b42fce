"""Multi-host runs: one process per host, joined by `jax.distributed`, all running the same program.

Every process builds the same global mesh and calls the same jitted steps
(JAX's multi-controller model); collectives cross hosts over NCCL on GPUs,
ICI/DCN on TPUs and gloo on CPUs. Only the leader (process 0) talks to
clients: it schedules, and each step it broadcasts the step inputs to the
followers, which run the step and discard what it returns.
"""

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sharding.errors import ShardingError


def initialize(coordinator_address: str | None, num_processes: int, process_id: int):
  """Joins this process to the run; call it before anything else touches JAX. Nothing to do for one process."""
  if num_processes <= 1:
    return
  if not 0 <= process_id < num_processes:
    raise ShardingError(f"process_id={process_id}: need 0 <= process_id < num_processes={num_processes}")
  if not coordinator_address:
    raise ShardingError(f"num_processes={num_processes} needs a coordinator address (host:port of process 0)")
  # CPU processes have no cross-process collectives unless told to use gloo; other platforms ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info("process %d of %d joined %s: %d local and %d global devices", process_id, num_processes,
               coordinator_address, jax.local_device_count(), jax.device_count())


def is_leader() -> bool:
  return jax.process_index() == 0


def broadcast_from_leader(tree):
  """The leader's value of a pytree of host arrays, on every process (the followers' values are ignored)."""
  return multihost_utils.broadcast_one_to_all(tree)


def put_global(tree, shardings):
  """Host numpy arrays (the same on every process) into global arrays; each process fills its own devices."""
  def put(a, sharding):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  return jax.tree.map(put, tree, shardings)


def fetch(x: jax.Array) -> np.ndarray:
  """The whole value of a possibly multi-host array, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

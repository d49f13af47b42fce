"""Data-parallel replicas on one host: independent engines on disjoint devices.

With `tensor_parallel_size=1` an engine puts its params and KV pool on JAX's default device.
Each replica is therefore built (and later run, see feeder.py) inside
`jax.default_device(its first device)`, in its own thread, since that setting is thread-local.
With tensor or pipeline parallelism a replica is given its group of devices and builds its mesh
over them.
"""

import dataclasses
import threading

import jax
from absl import logging

from jserve.engine.engine import EngineConfig, LLMEngine
from jserve.errors import ConfigError


@dataclasses.dataclass
class Replica:
  """One engine and the device it runs on (None: JAX's default device, for a single replica)."""

  engine: LLMEngine
  device: object = None


def replica_device_groups(num_replicas: int, per_replica: int = 1, devices=None) -> list[list]:
  """Each replica's devices: `per_replica` (pipeline x tensor degree) consecutive ones of `devices`
  (default: this host's)."""
  devices = list(devices if devices is not None else jax.local_devices())
  if num_replicas < 1:
    raise ConfigError(f"num_replicas={num_replicas}: need at least 1")
  need = num_replicas * per_replica
  if need > len(devices):
    raise ConfigError(f"num_replicas={num_replicas} x {per_replica} device(s) per replica needs {need} devices; "
                      f"this host has only {len(devices)} {devices[0].platform} device(s)")
  if need != len(devices):
    logging.warning("%d devices for %d replicas of %d: %d stay idle", len(devices), num_replicas, per_replica,
                    len(devices) - need)
  return [devices[i * per_replica:(i + 1) * per_replica] for i in range(num_replicas)]


def replica_devices(num_replicas: int, devices=None) -> list:
  """The device of each replica of one device."""
  return [group[0] for group in replica_device_groups(num_replicas, 1, devices)]


def build_replicas(config: EngineConfig, num_replicas: int = 1, devices=None) -> list[Replica]:
  """Builds `num_replicas` engines, each on its own pipeline x tensor devices; all at once, in threads."""
  if num_replicas == 1 and devices is None:
    return [Replica(LLMEngine(config))]
  per_replica = config.tensor_parallel_size * config.pipeline_parallel_size
  groups = replica_device_groups(num_replicas, per_replica, devices)
  targets = [group[0] for group in groups]
  engines: list = [None] * num_replicas
  errors: list = []

  def build(i: int):
    try:
      with jax.default_device(targets[i]):
        engines[i] = LLMEngine(config, devices=groups[i] if per_replica > 1 else None)
      logging.info("replica %d of %d ready on %s", i + 1, num_replicas, ", ".join(map(str, groups[i])))
    except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
      errors.append(e)

  threads = [threading.Thread(target=build, args=(i,), name=f"replica-{i}") for i in range(num_replicas)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return [Replica(e, d) for e, d in zip(engines, targets)]

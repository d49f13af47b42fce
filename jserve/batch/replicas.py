"""Data-parallel replicas on one host: independent engines on disjoint devices.

The engine has no device argument: it puts its params and KV pool on JAX's default device.
Each replica is therefore built (and later run, see feeder.py) inside
`jax.default_device(its device)`, in its own thread, since that setting is thread-local.
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


def replica_devices(num_replicas: int, devices=None) -> list:
  """The first device of each replica's share of `devices` (default: this host's devices)."""
  devices = list(devices if devices is not None else jax.local_devices())
  if num_replicas < 1:
    raise ConfigError(f"num_replicas={num_replicas}: need at least 1")
  if num_replicas > len(devices):
    raise ConfigError(f"num_replicas={num_replicas}: this host has only {len(devices)} "
                      f"{devices[0].platform} device(s)")
  per_replica = len(devices) // num_replicas
  if per_replica * num_replicas != len(devices):
    logging.warning("%d devices for %d replicas: %d stay idle", len(devices), num_replicas,
                    len(devices) - per_replica * num_replicas)
  # The engine runs on one device for now; with tensor parallelism a replica would take its whole share.
  return [devices[i * per_replica] for i in range(num_replicas)]


def build_replicas(config: EngineConfig, num_replicas: int = 1, devices=None) -> list[Replica]:
  """Builds `num_replicas` engines, each on its own device; all at once, in threads."""
  if num_replicas == 1 and devices is None:
    return [Replica(LLMEngine(config))]
  targets = replica_devices(num_replicas, devices)
  engines: list = [None] * num_replicas
  errors: list = []

  def build(i: int):
    try:
      with jax.default_device(targets[i]):
        engines[i] = LLMEngine(config)
      logging.info("replica %d of %d ready on %s", i + 1, num_replicas, targets[i])
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

"""Where one engine replica runs: its device mesh, and its weights put straight into their shards.

With `tensor_parallel_size=1` and no devices given, the engine keeps the plain
single-device path (arrays on JAX's default device, no mesh). Otherwise the
replica gets a mesh of `tensor_parallel_size` devices (`sharding.mesh`), every
weight is loaded into its shards by `sharding.rules.make_place` (no device
holds a full copy of a split tensor), and the runner makes the KV pool with
`sharding.rules.make_kv_caches`. `sharding` raises `ShardingError` (a
`ValueError` that knows nothing of jserve); here it becomes a `ConfigError`.
"""

import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.convert import ORBAX_SUBDIR, has_orbax_params
from jserve.errors import ConfigError
from jserve.models.llama import param_specs
from jserve.weights import load_params, resolve_dtype
from sharding import rules
from sharding.errors import ShardingError
from sharding.mesh import TENSOR, MeshShape, make_mesh


def engine_mesh(cfg: ModelConfig, tensor_parallel_size: int, devices=None) -> Mesh | None:
  """The replica's mesh (data=1, stage=1, tensor=tp) over the first tp of `devices` (default: this
  host's devices); None for one device with no devices given."""
  tp = tensor_parallel_size
  if tp < 1:
    raise ConfigError(f"tensor_parallel_size={tp}: need at least 1")
  if tp == 1 and devices is None:
    return None
  try:
    rules.check_tensor_degree(cfg, tp)
    devices = list(devices if devices is not None else jax.local_devices())
    if tp > len(devices):
      raise ConfigError(f"tensor_parallel_size={tp}: only {len(devices)} {devices[0].platform} device(s) "
                        f"available")
    return make_mesh(MeshShape(tensor=tp), devices[:tp])
  except ShardingError as e:
    raise ConfigError(f"tensor_parallel_size={tp}: {e}") from None


def load_engine_params(model_dir: str, cfg: ModelConfig, dtype: str, mesh: Mesh | None) -> dict:
  """The checkpoint's weights, each tensor placed straight into its shards on `mesh` (if any).

  A directory written by `jserve convert` has its weights in `orbax/`; they are restored into the
  shards directly (without a mesh, onto a one-device mesh of the default device).
  """
  if has_orbax_params(model_dir):
    from sharding import checkpoint
    target = mesh or make_mesh(MeshShape(), [default_device()])
    return checkpoint.restore(os.path.join(model_dir, ORBAX_SUBDIR), param_specs(cfg), target,
                              resolve_dtype(dtype))
  if mesh is None:
    return load_params(model_dir, cfg, dtype)
  return load_params(model_dir, cfg, dtype, place=rules.make_place(param_specs(cfg), mesh))


def default_device():
  """The device uncommitted arrays go to: a data-parallel replica's, inside its `jax.default_device`."""
  return next(iter(jnp.zeros((), jnp.int32).devices()))


def tensor_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[TENSOR]

"""Where one engine replica runs: its device mesh, and its weights put straight into their shards.

With `tensor_parallel_size=1` and no devices given, the engine keeps the plain
single-device path (arrays on JAX's default device, no mesh). Otherwise the
replica gets a mesh of `tensor_parallel_size` devices (`sharding.mesh`), every
weight is loaded into its shards by `sharding.rules.make_place` (no device
holds a full copy of a split tensor), and the runner makes the KV pool with
`sharding.rules.make_kv_caches`. `sharding` raises `ShardingError` (a
`ValueError` that knows nothing of jserve); here it becomes a `ConfigError`.
"""

import jax
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.errors import ConfigError
from jserve.models.llama import param_specs
from jserve.weights import load_params
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
  """The checkpoint's weights, each tensor placed straight into its shards on `mesh` (if any)."""
  if mesh is None:
    return load_params(model_dir, cfg, dtype)
  return load_params(model_dir, cfg, dtype, place=rules.make_place(param_specs(cfg), mesh))


def tensor_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[TENSOR]

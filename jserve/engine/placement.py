"""Where one engine replica runs: its device mesh, and its weights put straight into their shards.

With one device and no devices given, the engine keeps the plain
single-device path (arrays on JAX's default device, no mesh). Otherwise the
replica gets a mesh of `pipeline_parallel_size` stages of
`tensor_parallel_size` devices (`sharding.mesh`), every weight is loaded into
its shards on its stage by `sharding.rules.make_place` (no device holds a full
copy of a split tensor), and the runner makes the KV pool with
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
from sharding.mesh import STAGE, TENSOR, MeshShape, make_mesh


def engine_mesh(cfg: ModelConfig, tensor_parallel_size: int, devices=None, pipeline_parallel_size: int = 1
                ) -> Mesh | None:
  """The replica's mesh (data=1, stage=pp, tensor=tp) over the first pp * tp of `devices` (default:
  this host's devices); None for one device with no devices given."""
  tp, pp = tensor_parallel_size, pipeline_parallel_size
  if tp < 1 or pp < 1:
    raise ConfigError(f"tensor_parallel_size={tp}, pipeline_parallel_size={pp}: need at least 1 each")
  if tp == 1 and pp == 1 and devices is None:
    return None
  what = f"tensor_parallel_size={tp}" + (f" x pipeline_parallel_size={pp}" if pp > 1 else "")
  try:
    rules.check_tensor_degree(cfg, tp)
    rules.layer_stages(cfg.num_layers, pp)
    devices = list(devices if devices is not None else jax.local_devices())
    if tp * pp > len(devices):
      raise ConfigError(f"{what} needs {tp * pp} devices; only {len(devices)} {devices[0].platform} device(s) "
                        f"available")
    return make_mesh(MeshShape(stage=pp, tensor=tp), devices[:tp * pp])
  except ShardingError as e:
    raise ConfigError(f"{what}: {e}") from None


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


def stage_count(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[STAGE]

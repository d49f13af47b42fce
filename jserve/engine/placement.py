"""Where one engine replica runs: its device mesh, and its weights put straight into their shards.

With one device and no devices given, the engine keeps the plain
single-device path (arrays on JAX's default device, no mesh). Otherwise the
replica gets a mesh of `pipeline_parallel_size` stages of
`tensor_parallel_size` devices (`sharding.mesh`), every weight is loaded into
its shards on its stage by `sharding.rules.make_place` (no device holds a full
copy of a split tensor), and the runner makes the KV pool with
`sharding.rules.make_kv_caches`. `sharding` raises `ShardingError` (a
`ValueError` that knows nothing of jserve); here it becomes a `ConfigError`.

`load_format="dummy"` (vLLM's name) reads no weights: `random_engine_params`
makes random ones on the devices, each in its shards, so a benchmark can serve
a 70B shape that has no checkpoint on disk.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.convert import ORBAX_SUBDIR, has_orbax_params
from jserve.errors import CheckpointError, ConfigError
from jserve.models.llama import is_spec, param_specs
from jserve.models.quant import activation_layout, kernel_layout, quantize_params
from jserve.prequantized import CheckpointQuantization, checkpoint_quantization
from jserve.weights import load_params, resolve_dtype
from sharding import rules
from sharding.errors import ShardingError
from sharding.mesh import STAGE, TENSOR, MeshShape, make_mesh


def replica_devices(config, devices, num_processes: int):
  """The replica's devices: those given, or with several processes all of them, for one engine over every
  process's devices, tensor parallel only (see jserve/engine/multihost.py). `config`: the `EngineConfig`."""
  if num_processes == 1:
    return devices
  if config.pipeline_parallel_size > 1:
    raise ConfigError("pipeline_parallel_size > 1 across processes is not supported; use tensor parallelism")
  if config.tensor_parallel_size != jax.device_count():
    raise ConfigError(f"with {num_processes} processes the engine spans all {jax.device_count()} devices: "
                      f"set tensor_parallel_size={jax.device_count()}")
  return jax.devices()


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
    devices = devices[:tp * pp]
    # Across processes (multi-host serving) the tensor group may span hosts: the user asked for it.
    cross_host = len({d.process_index for d in devices}) > 1
    return make_mesh(MeshShape(stage=pp, tensor=tp), devices, allow_cross_host_tensor=cross_host)
  except ShardingError as e:
    raise ConfigError(f"{what}: {e}") from None


LOAD_FORMATS = ("auto", "dummy")


def load_engine_params(model_dir: str, cfg: ModelConfig, dtype: str, mesh: Mesh | None,
                       load_format: str = "auto") -> dict:
  """The checkpoint's weights, each tensor placed straight into its shards on `mesh` (if any).

  A directory written by `jserve convert` has its weights in `orbax/`; they are restored into the
  shards directly (without a mesh, onto a one-device mesh of the default device). With
  `load_format="dummy"` no weights are read: see `random_engine_params`. A pre-quantized checkpoint's
  fp8 projections come as `Fp8Weight`s, each scale in the shards of its weight's output axes.
  """
  if load_format not in LOAD_FORMATS:
    raise ConfigError(f"load_format={load_format!r}: use one of {', '.join(LOAD_FORMATS)}")
  if load_format == "dummy":
    return random_engine_params(cfg, dtype, mesh)
  if has_orbax_params(model_dir):
    if checkpoint_quantization(model_dir) is not None:
      # `jserve convert` refuses quantized checkpoints; a config.json that says so beside orbax weights
      # was edited by hand, and the weights would load as full-precision numbers of unknown meaning.
      raise CheckpointError(f"{model_dir!r} holds orbax weights and a quantization_config: orbax checkpoints of "
                            "quantized models are not supported; serve the Hugging Face checkpoint")
    from sharding import checkpoint
    target = mesh or make_mesh(MeshShape(), [default_device()])
    params = checkpoint.restore(os.path.join(model_dir, ORBAX_SUBDIR), param_specs(cfg), target,
                                resolve_dtype(dtype))
    return params if mesh is not None else on_default_device(params)
  if mesh is None:
    return load_params(model_dir, cfg, dtype)
  return load_params(model_dir, cfg, dtype, place=rules.make_place(param_specs(cfg), mesh))


def random_engine_params(cfg: ModelConfig, dtype: str, mesh: Mesh | None, seed: int = 0) -> dict:
  """Random weights made on the devices in their shards, drawn as `init_params(cfg, key(seed))` draws them.

  Each tensor is drawn by a jit straight into its sharding. JAX's partitionable threefry gives
  every device its slice of the same values whatever the layout, so no device ever holds a whole
  split tensor and every layout serves exactly the same model (the values match `init_params` up
  to float rounding: the scaling fuses differently under jit). Without a mesh the weights are plain
  arrays of the default device, like the KV pool and the step inputs beside them.
  """
  specs = param_specs(cfg)
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
  if mesh is None:
    shardings, tp = [jax.sharding.SingleDeviceSharding(default_device())] * len(leaves), 1
  else:
    shardings, tp = jax.tree_util.tree_leaves(rules.param_shardings(specs, mesh)), mesh.shape[TENSOR]
  # One program per distinct (shape, init, axes, sharding), shared by all layers: 80 layers of a 70B
  # shape compile a dozen programs, not 720. The tensor's index is a host int (not a key array on
  # one device) so that the same call works when the mesh spans several processes.
  makers = {}
  out = []
  for i, (spec, sharding) in enumerate(zip(leaves, shardings)):
    what = (spec.shape, spec.init, spec.axes, sharding)
    if what not in makers:
      fn = functools.partial(_random_tensor, seed=seed, count=len(leaves), shape=spec.shape, init=spec.init,
                             axes=spec.axes, tp=tp, dtype=resolve_dtype(dtype))
      makers[what] = jax.jit(fn, out_shardings=sharding)
    out.append(makers[what](np.int32(i)))
  return jax.tree_util.tree_unflatten(treedef, out)


def on_default_device(params: dict) -> dict:
  """Weights restored onto a one-device mesh, as arrays of the default device.

  Without a mesh the KV pool, the sampler's state and the step's inputs are plain arrays of the
  default device; weights with a one-device-mesh sharding beside them would make the step's first
  real call compile again, for a different layout than start-up compiled.
  """
  device = jax.sharding.SingleDeviceSharding(default_device())
  return jax.tree.map(lambda a: jax.device_put(a, device), params)


def _random_tensor(index, *, seed, count, shape, init, axes, tp, dtype):
  """Parameter `index` as `init_params` draws it, its KV heads widened as `rules.make_place` widens them."""
  if init == "ones":
    a = jnp.ones(shape, dtype=dtype)
  else:
    key = jax.random.split(jax.random.key(seed), count)[index]
    a = (0.02 * jax.random.normal(key, shape, dtype=jnp.float32)).astype(dtype)
  if "kv_heads" in axes:
    dim = axes.index("kv_heads")
    a = jnp.repeat(a, rules.kv_head_replicas(shape[dim], tp), axis=dim)
  return a


def default_device():
  """The device uncommitted arrays go to: a data-parallel replica's, inside its `jax.default_device`."""
  return next(iter(jnp.zeros((), jnp.int32).devices()))


def tensor_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[TENSOR]


def stage_count(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[STAGE]


def quantize_engine_params(params: dict, config, stored: CheckpointQuantization | None, mesh: Mesh | None) -> dict:
  """`quantize_params` for a full-precision checkpoint, logged with the weights' bytes before and after
  and the seconds it took; a pre-quantized checkpoint's weights are used as stored, and the log says so.
  `config`: the engine's `EngineConfig`. On one device (`mesh` None) with the decode matmul kernel
  (`matmul_impl` "gpu"), the fp8 weights are then stored [N, K] for it (`quant.kernel_layout`); "auto"
  keeps them [K, N], since it multiplies fp8 weights through XLA on every measured shape. With
  `activation_quantization="fp8"` they are stored [N, K] as `Fp8WeightA8`s instead, on any layout (each
  device transposes its own shards), whose products quantize the activations too."""
  if stored is not None:
    # quantization="fp8" agrees with the checkpoint: what its quantizer left unquantized stays so.
    why = ("quantization=None takes the checkpoint's" if config.quantization is None
           else f"quantization={config.quantization!r}: the checkpoint is quantized already")
    logging.info("quantization=fp8 from the checkpoint (%s; %s): weights %.1f MB", stored.describe(), why,
                 sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 1e6)
  else:
    start = time.monotonic()
    before = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    params = quantize_params(params)
    after = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    logging.info("quantization=%s: weights %.1f MB -> %.1f MB in %.1f s", config.quantization, before / 1e6,
                 after / 1e6, time.monotonic() - start)
  if config.activation_quantization == "fp8":
    params = activation_layout(params)
    logging.info("activation_quantization=fp8: projections multiply fp8 activations (a scale per token) by "
                 "fp8 weights stored [N, K]")
  elif mesh is None and config.matmul_impl == "gpu":
    params = kernel_layout(params)
  if config.matmul_impl == "hopper":
    logging.warning("quantization=fp8: the fp8 projections multiply through XLA with matmul_impl='hopper' (the "
                    "Hopper matmul kernel takes no fp8 weights; 'gpu' or 'auto' takes them through the Triton "
                    "kernel); on one device the LM head still uses it")
  return params

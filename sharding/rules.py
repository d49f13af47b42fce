"""Where every parameter and KV page lives: logical axes -> mesh axes.

The model names the logical axes of each parameter (`ParamSpec.axes`:
`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`); `RULES` maps them
to mesh axes and `flax.linen.logical_to_mesh_axes` applies the map. The rules
are Megatron's: QKV and the MLP gate/up projections are split by heads and
columns, the output and down projections by rows (one all-reduce each per
layer), the embedding and LM head by vocabulary. Norms are replicated.

Fewer KV heads than tensor devices (Llama-3-70B's 8 KV heads on 16 devices,
Qwen3's 1 on 2): as vLLM does, each KV head is replicated `tp // K` times so
that every device holds exactly the KV head its own query heads read. The
replication is done on the weights (wk, wv and their biases get `tp` heads,
head j a copy of head `j // (tp // K)`), so the model runs unchanged with
`tp` KV heads of which device d holds head d, and the KV pool has `2 * tp`
combined slots. Since query head n reads KV head `n // (N / K)` and
`n // (N / tp) // (tp / K)` is the same number, outputs do not change.

This module knows nothing of `jserve`: a parameter spec is anything with
`shape` and `axes`, a model config anything with `num_heads`,
`num_kv_heads`, `head_dim` and `num_layers`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.errors import ShardingError
from sharding.mesh import STAGE, TENSOR, stage_meshes

RULES = (
    ("vocab", TENSOR),
    ("embed", None),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),
    ("layers", STAGE),  # documentation only: layers are a list, split by `layer_stages`
    # The KV pool [pages, page slots, 2 * kv heads, head dim]: split by heads, K and V of a head
    # staying together because they are interleaved (K of head k at 2k, V at 2k + 1).
    ("kv_pages", None),
    ("kv_slots", None),
    ("kv_combined", TENSOR),
)
KV_POOL_AXES = ("kv_pages", "kv_slots", "kv_combined", "head_dim")
# Axes that must divide by the tensor degree; `vocab` need not (it falls back to replication).
_SPLIT_AXES = ("heads", "kv_heads", "mlp")


def is_param_spec(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "axes")


def kv_head_replicas(num_kv_heads: int, tp: int) -> int:
  """How many copies of each KV head a tensor degree of `tp` needs (1 when K % tp == 0)."""
  if num_kv_heads % tp == 0:
    return 1
  if tp % num_kv_heads == 0:
    return tp // num_kv_heads
  raise ShardingError(f"tensor={tp} and num_kv_heads={num_kv_heads}: one must divide the other "
                      f"(KV heads are split when there are more of them, replicated when fewer)")


def sharded_kv_heads(num_kv_heads: int, tp: int) -> int:
  """KV heads the sharded model runs with (and the KV pool holds): K, or tp when K < tp."""
  return num_kv_heads * kv_head_replicas(num_kv_heads, tp)


def valid_tensor_degrees(cfg, limit: int = 1024) -> list[int]:
  return [tp for tp in range(1, limit + 1) if check_tensor_degree(cfg, tp, raise_error=False)]


def check_tensor_degree(cfg, tp: int, *, raise_error: bool = True) -> bool:
  """Whether `tp` splits the heads and KV heads of `cfg` (raises with the valid degrees if not)."""
  problem = None
  if cfg.num_heads % tp:
    problem = f"tensor={tp} does not divide num_heads={cfg.num_heads}"
  elif cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
    problem = f"tensor={tp} and num_kv_heads={cfg.num_kv_heads}: neither divides the other"
  elif cfg.intermediate_size % tp:
    problem = f"tensor={tp} does not divide intermediate_size={cfg.intermediate_size}"
  if problem is None:
    return True
  if raise_error:
    valid = valid_tensor_degrees(cfg, limit=cfg.num_heads)
    raise ShardingError(f"{problem}; tensor degrees that work: {', '.join(map(str, valid))}")
  return False


def placed_shape(spec, tp: int) -> tuple[int, ...]:
  """The global shape of a parameter as placed: its KV-head axis replicated when K < tp."""
  shape = list(spec.shape)
  if "kv_heads" in spec.axes:
    dim = spec.axes.index("kv_heads")
    shape[dim] *= kv_head_replicas(shape[dim], tp)
  return tuple(shape)


def partition_spec(axes, shape, tp: int) -> P:
  """The `PartitionSpec` of an array with logical `axes` and (placed) `shape` on a tensor degree `tp`."""
  rules = RULES
  for name, size in zip(axes, shape):
    if size % tp == 0:
      continue
    if name == "vocab":
      # A vocabulary that does not divide (32001 tokens, say) is replicated: costs memory, not correctness.
      rules = tuple((n, None if n == "vocab" else m) for n, m in rules)
    elif name in _SPLIT_AXES or name == "kv_combined":
      raise ShardingError(f"axis {name!r} of size {size} does not divide by tensor={tp}")
  return nn.logical_to_mesh_axes(axes, rules)


def layer_stages(num_layers: int, num_stages: int) -> list[range]:
  """The layers of each pipeline stage; when they do not divide, the first stages get one more."""
  if not 1 <= num_stages <= num_layers:
    raise ShardingError(f"stage={num_stages} with {num_layers} layers: need 1 <= stage <= num_layers")
  base, extra = divmod(num_layers, num_stages)
  out, start = [], 0
  for s in range(num_stages):
    stop = start + base + (s < extra)
    out.append(range(start, stop))
    start = stop
  return out


def _stage_of_layers(num_layers: int, num_stages: int) -> list[int]:
  return [s for s, r in enumerate(layer_stages(num_layers, num_stages)) for _ in r]


def param_shardings(specs, mesh: Mesh):
  """A `NamedSharding` for every parameter of a spec tree (the model's `param_specs(cfg)`).

  With stages, layer i lives on its stage's sub-mesh, the embedding on the
  first stage, the final norm and LM head on the last (a tied embedding stays
  on the first; the pipeline runner copies it to the last for the head).
  """
  tp = mesh.shape[TENSOR]

  def on(m):
    return lambda spec: NamedSharding(m, partition_spec(spec.axes, placed_shape(spec, tp), tp))

  stages = stage_meshes(mesh)
  if len(stages) == 1:
    return jax.tree.map(on(mesh), specs, is_leaf=is_param_spec)
  stage_of = _stage_of_layers(len(specs["layers"]), len(stages))
  out = {k: jax.tree.map(on(stages[-1] if k in ("final_norm", "lm_head") else stages[0]), v, is_leaf=is_param_spec)
         for k, v in specs.items() if k != "layers"}
  out["layers"] = [jax.tree.map(on(stages[stage_of[i]]), layer, is_leaf=is_param_spec)
                   for i, layer in enumerate(specs["layers"])]
  return out


def _replicate_kv_heads(spec, a, tp: int, repeat):
  if "kv_heads" not in spec.axes:
    return a
  dim = spec.axes.index("kv_heads")
  r = kv_head_replicas(spec.shape[dim], tp)
  return a if r == 1 else repeat(a, r, axis=dim)


def shard_params(params, specs, mesh: Mesh):
  """Moves (and, when K < tp, widens) an unsharded params tree onto `mesh` by the rules."""
  tp = mesh.shape[TENSOR]
  shardings = param_shardings(specs, mesh)

  def put(spec, a, sharding):
    return jax.device_put(_replicate_kv_heads(spec, a, tp, jnp.repeat), sharding)

  return jax.tree.map(put, specs, params, shardings, is_leaf=is_param_spec)


def make_place(specs, mesh: Mesh):
  """A `place(spec, np_array)` for `jserve.weights.load_params` that puts each tensor into its shards.

  Each device receives only its slice (`jax.make_array_from_callback`), so no
  device holds a full copy of a split tensor; with several processes each
  places only its own devices' slices. `specs` is the same spec tree the
  loader walks (its leaves are looked up by their checkpoint name).
  """
  tp = mesh.shape[TENSOR]
  leaves = jax.tree.leaves(specs, is_leaf=is_param_spec)
  by_name = dict(zip((s.hf_name for s in leaves), jax.tree.leaves(param_shardings(specs, mesh))))

  def place(spec, a: np.ndarray) -> jax.Array:
    a = _replicate_kv_heads(spec, a, tp, np.repeat)
    return jax.make_array_from_callback(a.shape, by_name[spec.hf_name], lambda index: a[index])

  return place


def kv_pool_shape(cfg, tp: int, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
  """Global shape of one layer's KV pool under tensor degree `tp`: [P, S, 2 * sharded KV heads, H]."""
  return (num_pages, page_size, 2 * sharded_kv_heads(cfg.num_kv_heads, tp), cfg.head_dim)


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of one layer's KV pool: split by KV heads (the combined K/V axis) over `tensor`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(KV_POOL_AXES, RULES))


def kv_cache_shardings(cfg, mesh: Mesh) -> list[NamedSharding]:
  """One KV pool sharding per layer, each on the sub-mesh of the layer's pipeline stage."""
  stages = stage_meshes(mesh)
  return [kv_cache_sharding(stages[s]) for s in _stage_of_layers(cfg.num_layers, len(stages))]


def make_kv_caches(cfg, mesh: Mesh, num_pages: int, page_size: int, dtype) -> list[jax.Array]:
  """Zeroed KV pools, one per layer, created directly in their shards."""
  shape = kv_pool_shape(cfg, mesh.shape[TENSOR], num_pages, page_size)
  return [jnp.zeros(shape, dtype=dtype, device=sharding) for sharding in kv_cache_shardings(cfg, mesh)]


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of step inputs and other small arrays every device reads whole."""
  return NamedSharding(mesh, P())

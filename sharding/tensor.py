"""Tensor parallelism of attention: each device runs the attention kernel on its own heads.

Everything else of a layer is plain `jit` with sharded weights: XLA's
partitioner follows the weights' shardings (QKV split by heads, out and down
projections by rows, so one all-reduce after each). Attention is a kernel
call (Pallas on GPU and TPU) that the partitioner cannot split, so it runs
under `shard_map`: each device gets its query heads, its new K/V heads and its
slice of the KV pool, which by the rules in `rules.py` hold exactly the KV
heads its query heads read. No communication happens inside.
"""

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import TENSOR

# Replication checking is off: every output here is split over `tensor` (nothing is claimed to be
# replicated), and the check would otherwise have to see through the Pallas kernels.
if hasattr(jax, "shard_map"):
  _shard_map = functools.partial(jax.shard_map, check_vma=False)
else:  # older JAX only has the experimental entry point
  from jax.experimental.shard_map import shard_map as _experimental_shard_map
  _shard_map = functools.partial(_experimental_shard_map, check_rep=False)

_HEADS = P(None, TENSOR, None)  # [T, N or K, H]
_POOL = P(None, None, TENSOR, None)  # [P, S, C, H]


def head_parallel(attend, mesh: Mesh):
  """Wraps `attend(q_TNH, k_TKH, v_TKH, kv_pages_PSCH, meta) -> (o_TNH, kv_pages_PSCH)` to run per device.

  `meta` (a pytree of step metadata: lengths, page tables, slots) is
  replicated: every device reads the whole of it.
  """
  return _shard_map(attend, mesh=mesh, in_specs=(_HEADS, _HEADS, _HEADS, _POOL, P()),
                    out_specs=(_HEADS, _POOL))

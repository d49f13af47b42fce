"""Orbax checkpoints for pods: every host restores straight into its own devices' shards.

A Hugging Face checkpoint is read whole tensor by tensor on every host; an
orbax checkpoint is stored in chunks, and `restore` asks each host for only
the slices its devices hold under the target mesh, so no host reads what it
does not keep. The checkpoint holds the model's own layout (K KV heads, not
the widened copies of `rules`), so one checkpoint restores onto any mesh.
"""

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding

from sharding.mesh import TENSOR
from sharding.rules import is_param_spec, kv_head_replicas, param_shardings, placed_shape


def _kv_replicas(spec, tp: int) -> int:
  return kv_head_replicas(spec.shape[spec.axes.index("kv_heads")], tp) if "kv_heads" in spec.axes else 1


def save(params, specs, path: str, tp: int = 1):
  """Writes `params` (placed for tensor degree `tp`, any mesh) to a new orbax checkpoint directory `path`."""

  def canonical(spec, a):
    r = _kv_replicas(spec, tp)
    if r == 1:
      return a
    dim = spec.axes.index("kv_heads")  # widened head j copies head j // r: keep every r-th
    return jax.lax.slice_in_dim(a, 0, a.shape[dim], r, axis=dim)

  tree = jax.tree.map(canonical, specs, params, is_leaf=is_param_spec)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree)
  checkpointer.wait_until_finished()
  logging.info("wrote orbax checkpoint %s", path)


def restore(path: str, specs, mesh, dtype) -> dict:
  """Reads the checkpoint at `path` into the shardings `rules` gives on `mesh`, each host its own slices."""
  tp = mesh.shape[TENSOR]
  targets = param_shardings(specs, mesh)

  def abstract(spec, target):
    sharding = target
    if _kv_replicas(spec, tp) > 1:
      # Stored with fewer KV heads than devices: read them whole (they are small), widen below.
      sharding = NamedSharding(target.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(spec.shape, jnp.dtype(dtype), sharding=sharding)

  tree = ocp.StandardCheckpointer().restore(
      os.path.abspath(path), jax.tree.map(abstract, specs, targets, is_leaf=is_param_spec))

  def widen(spec, a, target):
    r = _kv_replicas(spec, tp)
    if r == 1:
      return a
    dim = spec.axes.index("kv_heads")
    out = jax.jit(lambda x: jnp.repeat(x, r, axis=dim), out_shardings=target)(a)
    assert out.shape == placed_shape(spec, tp)
    return out

  return jax.tree.map(widen, specs, tree, targets, is_leaf=is_param_spec)

"""Loading and writing Hugging Face safetensors checkpoints.

Only safetensors are read, never pickles: a checkpoint is untrusted input.
Tensors are read one at a time and handed to `place` (by default
`jax.device_put`; the sharding code passes one that puts each tensor straight
into its shards), so the host never holds a second full copy of the model.
"""

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jserve.config import ModelConfig
from jserve.errors import CheckpointError
from jserve.models.llama import ParamSpec, is_spec, param_specs

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise CheckpointError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return jnp.dtype(_DTYPES[dtype])
  return jnp.dtype(dtype)


def _tensor_index(model_dir: str) -> dict[str, str]:
  """Maps every tensor name to the safetensors file that holds it."""
  index_path = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path} has no 'weight_map'")
    return {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{model_dir!r} has no *.safetensors files (only safetensors checkpoints are read)")
  index = {}
  for fname in files:
    path = os.path.join(model_dir, fname)
    with _open(path) as f:
      for name in f.keys():
        index[name] = path
  return index


def _open(path: str):
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file {path!r} is missing")
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path!r}: {e} (truncated or not a safetensors file?)") from None


def load_params(model_dir: str, cfg: ModelConfig, dtype="bfloat16",
                place: Callable[[ParamSpec, np.ndarray], jax.Array] | None = None) -> dict:
  """Reads every parameter of `cfg` from `model_dir`, converted to jserve's layout and `dtype`."""
  dtype = resolve_dtype(dtype)
  place = place or (lambda spec, a: jax.device_put(a))
  index = _tensor_index(model_dir)
  specs = param_specs(cfg)
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
  handles = {}
  out = []
  start = time.monotonic()
  try:
    for i, spec in enumerate(leaves):
      path = index.get(spec.hf_name)
      if path is None:
        raise CheckpointError(f"checkpoint {model_dir!r} lacks tensor {spec.hf_name!r}")
      if path not in handles:
        handles[path] = _open(path).__enter__()
      try:
        a = handles[path].get_tensor(spec.hf_name)
      except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read tensor {spec.hf_name!r} from {path!r}: {e}") from None
      expected = int(np.prod(spec.shape))
      if a.size != expected:
        raise CheckpointError(f"tensor {spec.hf_name!r} has shape {list(a.shape)}, "
                              f"expected {expected} elements for {list(spec.shape)} (from config.json)")
      a = spec.from_hf(a).astype(np.dtype(dtype.name) if dtype.name != "bfloat16" else ml_dtypes.bfloat16)
      out.append(place(spec, a))
      logging.log_every_n_seconds(logging.INFO, "loading weights: %d/%d tensors", 5, i + 1, len(leaves))
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)
  logging.info("loaded %d tensors (%.2f GB) in %.1f s", len(leaves),
               sum(x.nbytes for x in out) / 1e9, time.monotonic() - start)
  return jax.tree_util.tree_unflatten(treedef, out)


def save_hf_checkpoint(params: dict, cfg: ModelConfig, out_dir: str, max_shard_bytes: int = 4 << 30):
  """Writes params as a Hugging Face checkpoint (`config.json` and safetensors, sharded if large)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
  specs = jax.tree_util.tree_leaves(param_specs(cfg), is_leaf=is_spec)
  arrays = jax.tree_util.tree_leaves(params)
  shards, current, size = [], {}, 0
  for spec, a in zip(specs, arrays):
    t = np.ascontiguousarray(spec.to_hf(np.asarray(a)))
    if current and size + t.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[spec.hf_name] = t
    size += t.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)

"""Loading and writing Hugging Face safetensors checkpoints.

Only safetensors are read, never pickles: a checkpoint is untrusted input.
Tensors are read one at a time and handed to `place` (by default
`jax.device_put`; the sharding code passes one that puts each tensor straight
into its shards), so the host never holds a second full copy of the model.
"""

import json
import os
import struct
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
from jserve.models.quant import CONTRACTED_AXES, Fp8Weight, scale_sharding
from jserve.prequantized import checkpoint_quantization, fp8_tensors, scale_from_hf, scale_name

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise CheckpointError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return jnp.dtype(_DTYPES[dtype])
  return jnp.dtype(dtype)


def _tensor_index(model_dir: str) -> tuple[dict[str, str], dict[str, tuple[dict, int]]]:
  """Maps every tensor name to the safetensors file that holds it; and each file to its `_header`
  (read once here: without an index file the headers are what names the tensors)."""
  index_path = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path} has no 'weight_map'")
    index = {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
    return index, {path: _header(path) for path in sorted(set(index.values()))}
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{model_dir!r} has no *.safetensors files (only safetensors checkpoints are read)")
  headers = {path: _header(path) for path in (os.path.join(model_dir, fname) for fname in files)}
  return {name: path for path, (header, _) in headers.items() for name in header}, headers


def _open(path: str):
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file {path!r} is missing")
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path!r}: {e} (truncated or not a safetensors file?)") from None


def _header(path: str) -> tuple[dict, int]:
  """The safetensors header of `path` (tensor name -> dtype, shape, data_offsets) and where its data starts.

  Read by hand because safetensors' numpy reader has no float8 type (it looks for `numpy.float8_e4m3fn`);
  the format is 8 bytes of little-endian header length, the JSON header, then the tensors' bytes.
  """
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file {path!r} is missing")
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > _MAX_HEADER_BYTES:
        raise ValueError(f"a header of {n} bytes")
      header = json.loads(f.read(n))
  except (struct.error, ValueError, OSError) as e:
    raise CheckpointError(f"cannot read {path!r}: {e} (truncated or not a safetensors file?)") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"cannot read {path!r}: its header is not a JSON object")
  header.pop("__metadata__", None)
  for name, info in header.items():
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
      raise CheckpointError(f"cannot read {path!r}: its header's entry for {name!r} is malformed ({info!r})")
  return header, 8 + n


def _read_fp8(path: str, name: str, info: dict, data_start: int) -> np.ndarray:
  """Tensor `name` of dtype F8_E4M3 as a float8_e4m3fn array, its bytes read straight from the file."""
  shape = [int(d) for d in info["shape"]]
  begin, end = info["data_offsets"]
  count = int(np.prod(shape))
  a = np.fromfile(path, dtype=np.uint8, count=count, offset=data_start + begin)
  if end - begin != count or a.size != count:
    raise CheckpointError(f"cannot read tensor {name!r} from {path!r}: {a.size} of {count} bytes (truncated?)")
  return a.view(ml_dtypes.float8_e4m3fn).reshape(shape)


def _place_fp8(spec: ParamSpec, w8: np.ndarray, scale: np.ndarray, place) -> Fp8Weight:
  """The weight where `place` puts it (its shards, KV heads widened), its scale where `quantize_params`
  would put the scale of that weight: the same shards of its output axes."""
  w = place(spec, w8)
  n = w.ndim - scale.ndim
  for axis, (have, want) in enumerate(zip(scale.shape, w.shape[n:])):
    if have != want:  # KV heads widened for tp > num_kv_heads: head j copies head j // r, as in `rules`
      assert want % have == 0, (spec.hf_name, scale.shape, w.shape)
      scale = np.repeat(scale, want // have, axis=axis)
  sharding = scale_sharding(w.sharding, w.ndim, n)
  return Fp8Weight(w, jax.make_array_from_callback(scale.shape, sharding, lambda index: scale[index]))


def load_params(model_dir: str, cfg: ModelConfig, dtype="bfloat16",
                place: Callable[[ParamSpec, np.ndarray], jax.Array] | None = None) -> dict:
  """Reads every parameter of `cfg` from `model_dir`, converted to jserve's layout and `dtype`.

  A pre-quantized fp8 checkpoint (jserve/prequantized.py) gives an `Fp8Weight` for each projection it
  stores in fp8: the float8 values as stored, never cast to `dtype`, so they reach the devices at one
  byte each, and a float32 scale per output channel placed beside the weight's shards. An unsupported
  quantization, or a quantized tensor where jserve expects none, is a `CheckpointError` raised before
  any tensor is read.
  """
  dtype = resolve_dtype(dtype)
  quant = checkpoint_quantization(model_dir)
  place = place or (lambda spec, a: jax.device_put(a))
  index, headers = _tensor_index(model_dir)
  tensors = {name: headers[path][0][name] for name, path in index.items() if name in headers[path][0]}
  specs = param_specs(cfg)
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
  contracted = {layer[name].hf_name: n for layer in specs["layers"] for name, n in CONTRACTED_AXES.items()}
  fp8 = fp8_tensors(leaves, {name: info["dtype"] for name, info in tensors.items()}, contracted, quant, model_dir)
  if quant is not None:
    logging.info("fp8 checkpoint (%s): %d of %d projections read in fp8 as stored; ignored, as jserve runs them "
                 "weight-only (w8a16: activations and unquantized weights in %s): %s", quant.describe(), len(fp8),
                 len(contracted), dtype.name, ", ".join(quant.ignored) or "nothing")
  handles = {}

  def read(name: str) -> np.ndarray:
    path = index[name]
    if path not in handles:
      handles[path] = _open(path).__enter__()
    try:
      return handles[path].get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"cannot read tensor {name!r} from {path!r}: {e}") from None

  out = []
  start = time.monotonic()
  try:
    for i, spec in enumerate(leaves):
      name = spec.hf_name
      shape = tensors[name]["shape"]
      if int(np.prod(shape)) != int(np.prod(spec.shape)):
        raise CheckpointError(f"tensor {name!r} has shape {list(shape)}, "
                              f"expected {int(np.prod(spec.shape))} elements for {list(spec.shape)} (from config.json)")
      if name in fp8:
        w8 = spec.from_hf(_read_fp8(index[name], name, tensors[name], headers[index[name]][1]))
        scale = scale_from_hf(spec, read(scale_name(name)), contracted[name])
        out.append(_place_fp8(spec, w8, scale, place))
      else:
        a = spec.from_hf(read(name)).astype(np.dtype(dtype.name) if dtype.name != "bfloat16" else ml_dtypes.bfloat16)
        out.append(place(spec, a))
      logging.log_every_n_seconds(logging.INFO, "loading weights: %d/%d tensors", 5, i + 1, len(leaves))
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)
  logging.info("loaded %d tensors (%.2f GB) in %.1f s", len(leaves),
               sum(x.nbytes for x in jax.tree_util.tree_leaves(out)) / 1e9, time.monotonic() - start)
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

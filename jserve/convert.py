"""`jserve convert`: a Hugging Face checkpoint as a jserve model directory whose weights are an orbax checkpoint.

The output directory keeps every file of the input except the safetensors
(config.json, tokenizer files, chat template, generation config) and holds the
weights in `orbax/`, written by `sharding.checkpoint.save` in the model's own
layout. Every engine replica, on any mesh, restores it straight into its own
shards; on a pod each host reads only the slices its devices hold, where a
safetensors checkpoint is read whole by every host.
"""

import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from jserve.config import load_model_config
from jserve.errors import CheckpointError
from jserve.models.llama import param_specs
from jserve.prequantized import checkpoint_quantization
from jserve.weights import load_params, resolve_dtype

ORBAX_SUBDIR = "orbax"
_WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")


def has_orbax_params(model_dir: str) -> bool:
  return os.path.isdir(os.path.join(model_dir, ORBAX_SUBDIR))


def convert_to_orbax(model_dir: str, out_dir: str, dtype: str = "bfloat16") -> float:
  """Writes `model_dir` (Hugging Face) as `out_dir` with orbax weights in `dtype`; returns the seconds taken.

  The weights pass through host memory (JAX's CPU device), one tensor at a
  time as they are read, so no accelerator needs to hold the model.
  """
  from sharding import checkpoint
  cfg = load_model_config(model_dir)
  resolve_dtype(dtype)
  quant = checkpoint_quantization(model_dir)
  if quant is not None:
    raise CheckpointError(f"{model_dir!r} is a pre-quantized checkpoint ({quant.describe()}): converting it to "
                          "orbax is not supported; serve its safetensors directly (jserve serve --model=DIR)")
  if os.path.abspath(out_dir) == os.path.abspath(model_dir):
    raise CheckpointError(f"output directory {out_dir!r} is the input; choose a new directory")
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise CheckpointError(f"output directory {out_dir!r} exists and is not empty")
  start = time.monotonic()
  cpu = jax.devices("cpu")[0]
  params = load_params(model_dir, cfg, dtype, place=lambda spec, a: jax.device_put(a, cpu))
  os.makedirs(out_dir, exist_ok=True)
  for name in sorted(os.listdir(model_dir)):
    src = os.path.join(model_dir, name)
    if os.path.isfile(src) and not name.endswith(_WEIGHT_FILES):
      shutil.copy2(src, os.path.join(out_dir, name))
  checkpoint.save(params, param_specs(cfg), os.path.join(out_dir, ORBAX_SUBDIR))
  seconds = time.monotonic() - start
  nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))
  logging.info("converted %s to %s: %.2f GB of %s weights in %.1f s", model_dir, out_dir, nbytes / 1e9, dtype, seconds)
  return seconds

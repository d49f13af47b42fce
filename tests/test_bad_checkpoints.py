"""A broken checkpoint is refused with an error that names what is wrong."""

import json
import os
import shutil

import pytest

from jserve.config import load_model_config
from jserve.errors import CheckpointError, ConfigError
from jserve.tokenizer import Tokenizer
from jserve.weights import load_params


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return str(dst)


def test_missing_directory_is_named():
  with pytest.raises(CheckpointError, match=r"'/no/such/dir' does not exist"):
    load_model_config("/no/such/dir")


def test_unknown_architecture_is_named(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path)
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["architectures"] = ["GPTBigCodeForCausalLM"]
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ConfigError, match="architecture 'GPTBigCodeForCausalLM' is not supported"):
    load_model_config(d)


def test_unsupported_rope_type_is_named(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path)
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ConfigError, match="rope_type='yarn' is not supported"):
    load_model_config(d)


def test_transformers4_rope_scaling_layout_is_read(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path)
  cfg = json.load(open(os.path.join(d, "config.json")))
  params = cfg.pop("rope_parameters")
  cfg["rope_theta"] = params["rope_theta"]
  cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  assert load_model_config(d) == load_model_config(tiny_model_dir)


def test_truncated_safetensors_is_refused(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path)
  path = os.path.join(d, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  cfg = load_model_config(d)
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_params(d, cfg, "float32")


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _copy(tiny_model_dir, tmp_path)
  path = os.path.join(d, "model.safetensors")
  tensors = load_file(path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path)
  with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
    load_params(d, load_model_config(d), "float32")


def test_misshaped_tensor_is_named(tiny_model_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _copy(tiny_model_dir, tmp_path)
  path = os.path.join(d, "model.safetensors")
  tensors = load_file(path)
  tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]
  save_file(tensors, path)
  with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[63\]"):
    load_params(d, load_model_config(d), "float32")


def test_sharded_checkpoint_loads_like_single_file(tiny_model_dir, tmp_path):
  import jax
  import numpy as np
  from jserve.weights import save_hf_checkpoint
  cfg = load_model_config(tiny_model_dir)
  params = load_params(tiny_model_dir, cfg, "float32")
  out = str(tmp_path / "sharded")
  save_hf_checkpoint(params, cfg, out, max_shard_bytes=50_000)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  again = load_params(out, cfg, "float32")
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_tokenizer_is_named(tmp_path):
  with pytest.raises(CheckpointError, match="has no tokenizer.json"):
    Tokenizer(str(tmp_path))

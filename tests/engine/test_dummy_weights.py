"""`load_format="dummy"`: random weights made on the devices in their shards, no checkpoint read.

Benchmarks serve shapes nobody has weights for (a 70B model on two GPUs)
this way; every layout must still serve the same model, so tensor and
pipeline layouts are checked against one device on 4 simulated CPU devices
(worker dummy_weights_worker.py).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import get_model_preset
from jserve.engine.engine import EngineConfig
from jserve.engine.placement import random_engine_params
from jserve.errors import ConfigError
from jserve.models.llama import init_params
from tests.sharding.subprocess_util import run_worker
from tools.make_random_checkpoint import write_tokenizer

CFG = get_model_preset("tiny-llama")  # 4 query heads, 2 KV heads: tensor 4 widens the KV heads


@pytest.fixture(scope="module")
def report(tmp_path_factory, bpe_tokenizer):
  model_dir = str(tmp_path_factory.mktemp("dummy_model"))
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    json.dump(CFG.to_hf_dict(), f)
  write_tokenizer(bpe_tokenizer, model_dir)
  return run_worker("tests.engine.dummy_weights_worker", 4, model_dir)


def test_dummy_weights_are_drawn_as_init_params_draws_them():
  got = jax.tree_util.tree_leaves(random_engine_params(CFG, "float32", None))
  want = jax.tree_util.tree_leaves(init_params(CFG, jax.random.key(0), dtype=jnp.float32))
  # Same keys and distribution; the scaling fuses differently under jit, so equal up to rounding.
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_unknown_load_format_is_a_config_error():
  with pytest.raises(ConfigError, match="load_format='pt': use one of auto, dummy"):
    EngineConfig(load_format="pt")


@pytest.mark.parametrize("layout", ["tensor 4", "pipeline 2 x tensor 2"])
def test_every_layout_makes_the_same_weights_and_serves_the_same_tokens(report, layout):
  assert report[layout]["weights_equal_one_device"]
  assert report[layout]["greedy"] == report["1"]["greedy"]


def test_dummy_weights_are_made_in_their_shards(report):
  assert report["tensor 4"]["wq_shard_shape"] == [64, 1, 16]
  assert report["tensor 4"]["wq_devices"] == [0, 1, 2, 3]
  assert report["tensor 4"]["wk_shape"] == [64, 4, 16]  # 2 KV heads widened to one per device
  assert report["pipeline 2 x tensor 2"]["wq_devices"] == [0, 1]


def test_one_device_dummy_weights_compile_nothing_after_start(tmp_path, bpe_tokenizer):
  # Without a mesh the weights must have the layout of the KV pool and the step inputs (plain
  # arrays of the default device): otherwise the first request compiles its bucket again.
  from jserve import LLM, SamplingParams
  with open(tmp_path / "config.json", "w") as f:
    json.dump(CFG.to_hf_dict(), f)
  write_tokenizer(bpe_tokenizer, str(tmp_path))
  llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=4,
            max_num_batched_tokens=32, kv_cache_gib=0.01, compilation_cache_dir=None)
  assert all(isinstance(a.sharding, jax.sharding.SingleDeviceSharding) for a in jax.tree.leaves(llm.engine.params))
  compiled = llm.engine.runner.num_compiled()
  llm.generate([[5, 6, 7, 8, 9]] * 3, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
  assert llm.engine.runner.num_compiled() == compiled

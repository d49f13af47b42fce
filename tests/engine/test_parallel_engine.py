"""`LLM(tensor_parallel_size=N)`: the whole engine on N of 8 simulated CPU devices gives one device's outputs.

One worker process (tp_engine_worker.py) builds the engine at every degree on
a float32 checkpoint written by transformers with 8 query and 2 KV heads, so
tensor 2 splits the KV heads and tensor 4 and 8 replicate them; the tests
check its report; it also serves the `jserve convert` (orbax) copy of the
checkpoint at tensor 4. The rest runs in this process, on one device.
"""

import pytest

from jserve.config import ModelConfig
from jserve.convert import convert_to_orbax
from jserve.engine.engine import EngineConfig
from jserve.engine.memory import page_bytes_per_device, size_kv_pool
from jserve.engine.placement import engine_mesh
from jserve.errors import ConfigError
from tests.hf_models import write_hf_model
from tests.sharding.subprocess_util import run_worker

# "2@6": tensor 2 on devices 6 and 7, built by `jserve batch`'s replica builder with its devices given.
DEGREES = ("1", "2@6", "4", "8")
PARALLEL = DEGREES[1:]


def degree(key: str) -> int:
  return int(key.split("@")[0])


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory, bpe_tokenizer):
  # The "mistral" variant: 8 query heads, 2 KV heads, head_dim 8, vocabulary 1024.
  return write_hf_model(str(tmp_path_factory.mktemp("tp_gqa")), bpe_tokenizer, "mistral")


@pytest.fixture(scope="module")
def orbax_model_dir(tmp_path_factory, gqa_model_dir):
  """The same model after `jserve convert`: weights in orbax/."""
  out = str(tmp_path_factory.mktemp("tp_gqa_orbax") / "model")
  convert_to_orbax(gqa_model_dir, out, "float32")
  return out


@pytest.fixture(scope="module")
def reports(gqa_model_dir, orbax_model_dir):
  # The orbax copy at tensor 4, where restoring must also widen the 2 KV heads to 4.
  return run_worker("tests.engine.tp_engine_worker", 8, gqa_model_dir, ",".join(DEGREES), orbax_model_dir, "4")


@pytest.fixture(scope="module")
def report(reports, gqa_model_dir):
  return reports[gqa_model_dir]


@pytest.mark.parametrize("tp", PARALLEL)
def test_greedy_batch_equals_one_device(report, tp):
  assert report[tp]["greedy"] == report["1"]["greedy"]


@pytest.mark.parametrize("tp", PARALLEL)
def test_seeded_sample_with_repetition_penalty_equals_one_device(report, tp):
  assert report[tp]["sampled"] == report["1"]["sampled"]


@pytest.mark.parametrize("tp", PARALLEL)
def test_regex_constrained_output_equals_one_device(report, tp):
  assert report[tp]["constrained"] == report["1"]["constrained"]
  assert report[tp]["constrained"].endswith(")")


def test_orbax_copy_restored_into_four_shards_gives_the_same_tokens(reports, report, orbax_model_dir):
  got = reports[orbax_model_dir]["4"]
  assert got["greedy"] == report["1"]["greedy"]
  assert got["sampled"] == report["1"]["sampled"]
  assert got["kv_shard_shape"] == [48, 16, 2, 8]


@pytest.mark.parametrize("tp", DEGREES)
def test_serving_compiles_nothing_after_start(report, tp):
  # With a mesh the pool and slot state come back with the shardings they went in with.
  assert report[tp]["compiles_while_serving"] == 0


@pytest.mark.parametrize("tp", PARALLEL)
def test_kv_pool_is_split_by_kv_heads_and_widened_when_fewer_than_devices(report, tp):
  got = report[tp]
  # 2 KV heads: tensor 2 splits them; tensor 4 and 8 hold tp copies, one head (K and V) per device.
  assert got["kv_pool_shape"] == [48, 16, 2 * max(2, degree(tp)), 8]
  assert got["kv_shard_shape"] == [48, 16, 2, 8]
  assert got["kv_devices"] == ([6, 7] if tp == "2@6" else list(range(degree(tp))))


@pytest.mark.parametrize("tp", PARALLEL)
def test_weights_are_split_by_the_rules(report, tp):
  got = report[tp]
  assert got["wq_spec"] == [None, "tensor", None]
  assert got["wq_shard_shape"] == [64, 8 // degree(tp), 8]
  assert got["w_down_spec"] == ["tensor", None]


@pytest.mark.parametrize("tp", DEGREES)
def test_sampler_slot_state_is_replicated(report, tp):
  assert report[tp]["slots_replicated"]


CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=8)


def test_tensor_degree_that_does_not_divide_the_heads_names_the_ones_that_do():
  with pytest.raises(ConfigError, match=r"tensor_parallel_size=3: tensor=3 does not divide num_heads=8; "
                                        r"tensor degrees that work: 1, 2, 4, 8"):
    engine_mesh(CFG, 3)


def test_more_tensor_devices_than_present_is_a_config_error():
  with pytest.raises(ConfigError, match=r"tensor_parallel_size=2: only 1 cpu device\(s\) available"):
    engine_mesh(CFG, 2)


def test_one_device_without_devices_keeps_the_plain_path():
  assert engine_mesh(CFG, 1) is None


def test_engine_config_refuses_zero_tensor_degree_and_pipeline_stages():
  with pytest.raises(ConfigError, match="tensor_parallel_size=0: need at least 1"):
    EngineConfig(tensor_parallel_size=0)
  with pytest.raises(ConfigError, match="pipeline_parallel_size=2: the engine does not run pipeline stages yet"):
    EngineConfig(pipeline_parallel_size=2)


@pytest.mark.parametrize("tp,heads_per_device", [(1, 2), (2, 1), (4, 1), (8, 1)])
def test_kv_page_bytes_are_per_device_and_count_replicated_heads(tp, heads_per_device):
  # page 16 x K and V x 2 layers x heads x head_dim 8 x 4 bytes
  assert page_bytes_per_device(CFG, 16, "float32", tp) == 16 * 2 * 2 * heads_per_device * 8 * 4


def test_kv_cache_gib_is_a_per_device_budget():
  pages = size_kv_pool(CFG, params=None, page_size=16, kv_dtype="float32", gpu_memory_utilization=0.9,
                       kv_cache_gib=1 / 1024, max_num_batched_tokens=16, tp=8)
  assert pages == (1 << 20) // (16 * 2 * 2 * 1 * 8 * 4)


class _Device:
  platform = "cpu"

  def __init__(self, i):
    self.id = i


def test_batch_replicas_take_consecutive_groups_of_tensor_parallel_devices():
  from jserve.batch.replicas import replica_device_groups
  devices = [_Device(i) for i in range(8)]
  groups = replica_device_groups(2, 4, devices)
  assert [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  with pytest.raises(ConfigError, match=r"num_replicas=3 x tensor_parallel_size=4 needs 12 devices; this host has "
                                        r"only 8 cpu device\(s\)"):
    replica_device_groups(3, 4, devices)

"""`LLM(tensor_parallel_size=T, pipeline_parallel_size=P)`: the whole engine on 8 simulated CPU devices
gives one device's outputs.

One worker process (parallel_engine_worker.py) builds every layout on float32
checkpoints written by transformers and the tests check its report:

- GQA, 8 query and 2 KV heads ("mistral"): tensor 2 (splits the KV heads; built
  by `jserve batch`'s replica builder on devices 6 and 7), tensor 4 (from the
  `jserve convert` orbax copy, restored with the 2 KV heads widened to 4),
  tensor 8 (KV heads replicated 4 times), pipeline 2 x tensor 2;
- tied embedding and q/k norms ("qwen3"), pipeline 2 x tensor 2, where the last
  stage needs its own copy of the embedding for the LM head.

Each engine serves a batch of greedy prompts (one prefilled in chunks), a
seeded sample with a repetition penalty (the sampler's per-slot state) and a
regex-constrained sample (the grammar mask). The rest runs in this process.
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

# layout -> (checkpoint, worker degree): "2@6" is tensor 2 on devices 6 and 7, "2x2" pipeline 2 x tensor 2.
LAYOUTS = {"1": ("hf", "1"), "tensor 2": ("hf", "2@6"), "tensor 4": ("orbax", "4"), "tensor 8": ("hf", "8"),
           "pipeline 2 x tensor 2": ("hf", "2x2")}
PARALLEL = [name for name in LAYOUTS if name != "1"]
TENSOR = {"tensor 2": 2, "tensor 4": 4, "tensor 8": 8, "pipeline 2 x tensor 2": 2}
DEVICES = {"tensor 2": [6, 7], "tensor 4": [0, 1, 2, 3], "tensor 8": list(range(8)),
           "pipeline 2 x tensor 2": [0, 1]}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, bpe_tokenizer):
  hf = write_hf_model(str(tmp_path_factory.mktemp("gqa")), bpe_tokenizer, "mistral")  # 8 / 2 heads, head_dim 8
  orbax = str(tmp_path_factory.mktemp("gqa_orbax") / "model")
  convert_to_orbax(hf, orbax, "float32")
  tied = write_hf_model(str(tmp_path_factory.mktemp("tied")), bpe_tokenizer, "qwen3", num_attention_heads=8,
                        num_key_value_heads=2, head_dim=8)
  return {"hf": hf, "orbax": orbax, "tied": tied}


@pytest.fixture(scope="module")
def reports(model_dirs):
  degrees = {}
  for kind, degree in LAYOUTS.values():
    degrees.setdefault(kind, []).append(degree)
  degrees["tied"] = ["1", "2x2"]
  args = [a for kind, ds in degrees.items() for a in (model_dirs[kind], ",".join(ds))]
  out = run_worker("tests.engine.parallel_engine_worker", 8, *args)
  return {kind: out[model_dirs[kind]] for kind in degrees}


@pytest.fixture(scope="module")
def report(reports):
  return {name: reports[kind][degree] for name, (kind, degree) in LAYOUTS.items()}


@pytest.mark.parametrize("layout", PARALLEL)
def test_greedy_batch_equals_one_device(report, layout):
  assert report[layout]["greedy"] == report["1"]["greedy"]


@pytest.mark.parametrize("layout", PARALLEL)
def test_seeded_sample_with_repetition_penalty_equals_one_device(report, layout):
  assert report[layout]["sampled"] == report["1"]["sampled"]


@pytest.mark.parametrize("layout", PARALLEL)
def test_regex_constrained_output_equals_one_device(report, layout):
  assert report[layout]["constrained"] == report["1"]["constrained"]
  assert report[layout]["constrained"].endswith(")")


def test_tied_embedding_pipeline_equals_one_device(reports):
  one, piped = reports["tied"]["1"], reports["tied"]["2x2"]
  assert (piped["greedy"], piped["sampled"], piped["constrained"]) == (
      one["greedy"], one["sampled"], one["constrained"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_serving_compiles_nothing_after_start(report, layout):
  # The pool and slot state come back from each step with the shardings they went in with.
  assert report[layout]["compiles_while_serving"] == 0


@pytest.mark.parametrize("layout", PARALLEL)
def test_kv_pool_is_split_by_kv_heads_and_widened_when_fewer_than_devices(report, layout):
  got, tp = report[layout], TENSOR[layout]
  # 2 KV heads: tensor 2 splits them; tensor 4 and 8 hold tp copies, one head (K and V) per device.
  assert got["kv_pool_shape"] == [48, 16, 2 * max(2, tp), 8]
  assert got["kv_shard_shape"] == [48, 16, 2, 8]
  assert got["kv_devices"] == DEVICES[layout]


def test_pipeline_stages_hold_their_layers_and_the_last_the_sampler_state(report):
  got = report["pipeline 2 x tensor 2"]
  assert got["kv_layer_devices"] == [[0, 1], [2, 3]]
  assert got["slot_devices"] == [2, 3]


@pytest.mark.parametrize("layout", PARALLEL)
def test_weights_are_split_by_the_rules(report, layout):
  got = report[layout]
  assert got["wq_spec"] == [None, "tensor", None]
  assert got["wq_shard_shape"] == [64, 8 // TENSOR[layout], 8]
  assert got["w_down_spec"] == ["tensor", None]


@pytest.mark.parametrize("layout", PARALLEL)
def test_sampler_slot_state_is_replicated(report, layout):
  assert report[layout]["slots_replicated"]


CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=8)


def test_tensor_degree_that_does_not_divide_the_heads_names_the_ones_that_do():
  with pytest.raises(ConfigError, match=r"tensor_parallel_size=3: tensor=3 does not divide num_heads=8; "
                                        r"tensor degrees that work: 1, 2, 4, 8"):
    engine_mesh(CFG, 3)


def test_more_devices_than_present_is_a_config_error():
  with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs 2 devices; only 1 cpu device\(s\) available"):
    engine_mesh(CFG, 2)


def test_more_stages_than_layers_is_a_config_error():
  with pytest.raises(ConfigError, match=r"tensor_parallel_size=1 x pipeline_parallel_size=3: stage=3 with 2 layers: "
                                        r"need 1 <= stage <= num_layers"):
    engine_mesh(CFG, 1, pipeline_parallel_size=3)


def test_one_device_without_devices_keeps_the_plain_path():
  assert engine_mesh(CFG, 1) is None


def test_engine_config_refuses_zero_degrees():
  with pytest.raises(ConfigError, match="tensor_parallel_size=0: need at least 1"):
    EngineConfig(tensor_parallel_size=0)
  with pytest.raises(ConfigError, match="pipeline_parallel_size=0: need at least 1"):
    EngineConfig(pipeline_parallel_size=0)


@pytest.mark.parametrize("tp,pp,heads_per_device,layers_per_device", [(1, 1, 2, 2), (2, 1, 1, 2), (4, 1, 1, 2),
                                                                      (8, 1, 1, 2), (2, 2, 1, 1)])
def test_kv_page_bytes_are_per_device_and_count_replicated_heads(tp, pp, heads_per_device, layers_per_device):
  # page 16 x K and V x layers x heads x head_dim 8 x 4 bytes
  assert page_bytes_per_device(CFG, 16, "float32", tp, pp) == 16 * 2 * layers_per_device * heads_per_device * 8 * 4


def test_kv_cache_gib_is_a_per_device_budget():
  pages = size_kv_pool(CFG, params=None, page_size=16, kv_dtype="float32", gpu_memory_utilization=0.9,
                       kv_cache_gib=1 / 1024, max_num_batched_tokens=16, tp=8)
  assert pages == (1 << 20) // (16 * 2 * 2 * 1 * 8 * 4)


class _Device:
  platform = "cpu"

  def __init__(self, i):
    self.id = i


def test_batch_replicas_take_consecutive_groups_of_devices():
  from jserve.batch.replicas import replica_device_groups
  devices = [_Device(i) for i in range(8)]
  groups = replica_device_groups(2, 4, devices)
  assert [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  with pytest.raises(ConfigError, match=r"num_replicas=3 x 4 device\(s\) per replica needs 12 devices; this host "
                                        r"has only 8 cpu device\(s\)"):
    replica_device_groups(3, 4, devices)

"""Tensor parallelism 1/2/4/8 on 8 simulated CPU devices gives the outputs of one device.

One worker process (tp_worker.py) runs every variant and degree; the tests
check its report.
"""

import pytest

from sharding.costs import Layout, stage_params_per_device
from tests.sharding.subprocess_util import run_worker
from tests.sharding.test_rules import EXPECTED
from tests.sharding.tp_worker import DEGREES, VARIANTS

CASES = [(name, tp) for name in VARIANTS for tp in DEGREES]


@pytest.fixture(scope="module")
def report():
  return run_worker("tests.sharding.tp_worker", 8)


def leaf_name(path: str) -> str:
  return path.rsplit("['", 1)[1].rstrip("']")


@pytest.mark.parametrize("variant,tp", CASES)
def test_greedy_tokens_equal_one_device(report, variant, tp):
  assert report[variant]["degrees"][str(tp)]["tokens"] == report[variant]["reference_tokens"]


@pytest.mark.parametrize("variant,tp", CASES)
def test_logits_close_to_one_device(report, variant, tp):
  # float32; the only difference is the order of the all-reduced partial sums.
  assert report[variant]["degrees"][str(tp)]["max_logit_diff"] < 1e-5


@pytest.mark.parametrize("variant,tp", CASES)
def test_every_parameter_sharded_by_the_rules(report, variant, tp):
  cfg = VARIANTS[variant]
  for path, spec in report[variant]["degrees"][str(tp)]["specs"].items():
    expected = list(EXPECTED[leaf_name(path)])
    expected += [None] * (len(spec) - len(expected))
    if "vocab" in path or leaf_name(path) in ("embed", "lm_head"):
      if cfg.vocab_size % tp:
        expected = [None] * len(spec)  # a vocabulary that does not divide is replicated
    if tp == 1:
      expected = [None if a == "tensor" else a for a in expected]
      spec = [None if a == "tensor" else a for a in spec]
    assert spec == expected, path


def expected_weight_bytes_per_device(cfg, tp: int, dtype_bytes: int = 4) -> int:
  d, f, h, n, k, v = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                      cfg.vocab_size)
  kv_per_device = max(k // tp, 1)  # a replicated KV head still costs one head per device
  layer = d * n * h // tp + 2 * d * kv_per_device * h + n * h * d // tp + 3 * d * f // tp + 2 * d
  if cfg.attention_bias:
    layer += n * h // tp + 2 * kv_per_device * h
  if cfg.qk_norm:
    layer += 2 * h
  vocab_split = tp if v % tp == 0 else 1
  head = 0 if cfg.tie_word_embeddings else d * v // vocab_split
  return (cfg.num_layers * layer + v * d // vocab_split + head + d) * dtype_bytes


@pytest.mark.parametrize("variant,tp", CASES)
def test_weight_memory_per_device_is_the_expected_fraction(report, variant, tp):
  per_device = report[variant]["degrees"][str(tp)]["device_weight_bytes"]
  assert len(per_device) == tp
  expected = expected_weight_bytes_per_device(VARIANTS[variant], tp)
  assert set(per_device.values()) == {expected}
  assert expected == 4 * stage_params_per_device(VARIANTS[variant], Layout(1, 1, tp))[0]  # the planner agrees
  if tp == 8 and variant == "llama_gqa":
    total = expected_weight_bytes_per_device(VARIANTS[variant], 1)
    assert 0.125 < expected / total < 0.15  # 1/8 plus the norms and the replicated KV heads


@pytest.mark.parametrize("variant,tp", CASES)
def test_kv_pool_split_by_kv_heads_one_head_per_device_when_fewer(report, variant, tp):
  cfg = VARIANTS[variant]
  got = report[variant]["degrees"][str(tp)]
  heads_per_device = max(cfg.num_kv_heads // tp, 1)
  assert got["kv_shard_shapes"] == [[16, 8, 2 * heads_per_device, cfg.head_dim]] * tp
  assert got["kv_spec"] == [None, None, "tensor" if tp > 1 else got["kv_spec"][2], None]


@pytest.mark.parametrize("variant,tp", CASES)
def test_checkpoint_loads_straight_into_shards(report, variant, tp):
  got = report[variant]["degrees"][str(tp)]
  assert got["loaded_equals_sharded"]
  shards = got["loaded_shard_shapes"]["['layers'][0]['w_gate']"]
  assert shards == [[VARIANTS[variant].hidden_size, VARIANTS[variant].intermediate_size // tp]] * tp


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensor_8_step_communicates_only_the_megatron_all_reduces(report, variant):
  # One after each attention output projection, one after each MLP down projection, one for the
  # vocabulary-parallel embedding (none when the vocabulary is replicated); no weight is ever gathered.
  cfg = VARIANTS[variant]
  expected = 2 * cfg.num_layers + (cfg.vocab_size % 8 == 0)
  assert report[variant]["degrees"]["8"]["collectives"] == {"all-reduce": expected}


@pytest.mark.parametrize("variant,tp", CASES)
def test_orbax_copy_written_at_tensor_8_restores_into_the_shards_of_any_degree(report, variant, tp):
  assert report[variant]["degrees"][str(tp)]["orbax_restored_equals_sharded"]

"""Logical-axis rules: the Megatron split of every parameter, and KV-head replication."""

import pytest
from jax.sharding import PartitionSpec as P

from configs.models import get_model_preset
from jserve.models.llama import param_specs
from sharding.errors import ShardingError
from sharding.rules import (check_tensor_degree, kv_head_replicas, layer_stages, partition_spec, placed_shape,
                            sharded_kv_heads)

# The Megatron pattern, written out by hand: the rules must produce exactly this.
EXPECTED = {
    "embed": P("tensor", None), "lm_head": P(None, "tensor"), "final_norm": P(None),
    "attn_norm": P(None), "mlp_norm": P(None), "q_norm": P(None), "k_norm": P(None),
    "wq": P(None, "tensor", None), "wk": P(None, "tensor", None), "wv": P(None, "tensor", None),
    "wo": P("tensor", None, None), "bq": P("tensor", None), "bk": P("tensor", None), "bv": P("tensor", None),
    "w_gate": P(None, "tensor"), "w_up": P(None, "tensor"), "w_down": P("tensor", None),
}


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "llama-3.2-1b"])
def test_every_parameter_follows_the_megatron_pattern(preset):
  cfg = get_model_preset(preset)
  specs = param_specs(cfg)
  named = dict(specs, **{f"{k}": v for k, v in specs["layers"][0].items()})
  del named["layers"]
  for name, spec in named.items():
    assert partition_spec(spec.axes, placed_shape(spec, 4), 4) == EXPECTED[name], name


def test_kv_heads_are_split_when_there_are_more_than_devices_and_replicated_when_fewer():
  assert [kv_head_replicas(8, tp) for tp in (1, 2, 4, 8, 16, 32)] == [1, 1, 1, 1, 2, 4]
  assert [sharded_kv_heads(2, tp) for tp in (1, 2, 4, 8)] == [2, 2, 4, 8]
  with pytest.raises(ShardingError, match=r"tensor=3 and num_kv_heads=2: one must divide the other"):
    kv_head_replicas(2, 3)


def test_replicated_kv_weights_get_one_head_per_device():
  spec = param_specs(get_model_preset("llama-3.1-70b"))["layers"][0]["wk"]
  assert placed_shape(spec, 16) == (8192, 16, 128)
  assert placed_shape(spec, 8) == (8192, 8, 128)


def test_vocabulary_that_does_not_divide_is_replicated():
  assert partition_spec(("vocab", "embed"), (32001, 4096), 2) == P(None, None)
  with pytest.raises(ShardingError, match=r"axis 'mlp' of size 100 does not divide by tensor=8"):
    partition_spec(("embed", "mlp"), (64, 100), 8)


def test_tensor_degree_that_does_not_divide_the_heads_names_the_degrees_that_do():
  cfg = get_model_preset("qwen2.5-7b")  # 28 heads, 4 KV heads
  with pytest.raises(ShardingError, match=r"tensor=8 does not divide num_heads=28; tensor degrees that work: "
                                          r"1, 2, 4$"):
    check_tensor_degree(cfg, 8)
  assert check_tensor_degree(cfg, 4)


def test_uneven_layer_counts_give_the_first_stages_one_more_layer():
  assert [len(r) for r in layer_stages(126, 4)] == [32, 32, 31, 31]
  assert [list(r) for r in layer_stages(5, 2)] == [[0, 1, 2], [3, 4]]
  with pytest.raises(ShardingError, match=r"stage=3 with 2 layers"):
    layer_stages(2, 3)

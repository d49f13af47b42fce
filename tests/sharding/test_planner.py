"""The planner on real model shapes: what fits where, the ranking, and the messages when nothing fits."""

import os

import pytest

from configs.models import get_model_preset
from sharding.costs import Workload
from sharding.errors import ShardingError
from sharding.planner import GIB, format_plans, get_device, plan
from tests.sharding import planner_doc

H100 = get_device("H100-80GB")
H200 = get_device("H200-141GB")


def test_70b_in_bf16_is_never_placed_on_one_80gb_device():
  cfg = get_model_preset("llama-3.1-70b")
  with pytest.raises(ShardingError, match=r"llama-3.1-70b does not fit on 1 x H100-80GB .* weights alone are "
                                          r"131.4 GiB .* it would fit on 2 x H100-80GB \(data=1 stage=1 tensor=2\)"):
    plan(cfg, 1, H100, model_name="llama-3.1-70b")
  for count in (2, 8, 16, 64):
    for p in plan(cfg, count, H100):
      assert p.data * p.stage * p.tensor == count
      assert p.stage * p.tensor >= 2, p.describe()
      assert p.weights_bytes <= 80 * GIB


@pytest.mark.parametrize("count", [16, 64])
def test_405b_on_80gb_devices_needs_pipeline_or_tensor_across_hosts(count):
  plans = plan(get_model_preset("llama-3.1-405b"), count, H100)
  assert plans
  for p in plans:
    assert p.stage > 1 or p.tensor > 8, p.describe()


def test_405b_on_one_host_of_80gb_devices_says_what_would_fit():
  with pytest.raises(ShardingError, match=r"does not fit on 8 x H100-80GB .* it would fit on 16 x H100-80GB "
                                          r"\(data=1 stage=2 tensor=8\), or 8 x H200-141GB"):
    plan(get_model_preset("llama-3.1-405b"), 8, H100)


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b"])
@pytest.mark.parametrize("device", ["H100-80GB", "H200-141GB", "TPU-v5e", "TPU-v6e"])
def test_every_plan_fits_its_memory_budget_and_splits_the_heads(preset, device):
  cfg, dev, workload = get_model_preset(preset), get_device(device), Workload()
  try:
    plans = plan(cfg, 8, dev, workload)
  except ShardingError as e:
    assert "would fit on" in str(e)
    return
  for p in plans:
    assert cfg.num_heads % p.tensor == 0
    assert p.weights_bytes + p.kv_bytes + p.activation_bytes <= dev.memory_bytes * workload.memory_utilization + 1
    assert p.kv_tokens >= workload.max_model_len
  assert [p.tokens_per_s for p in plans] == sorted((p.tokens_per_s for p in plans), reverse=True)


def test_tensor_parallelism_shortens_the_token_latency_of_a_large_model():
  cfg = get_model_preset("llama-3.1-70b")
  latency = {p.tensor: p.decode_round_s for p in plan(cfg, 8, H200, stage=1)}
  assert latency[8] < latency[4] < latency[2]


def test_pipeline_stages_buy_memory_not_faster_weight_reads():
  # Short contexts, so reading weights dominates: each stage re-reads its weights per micro-batch.
  # (With long contexts stages do help: each reads only its own layers' KV.)
  cfg, workload = get_model_preset("llama-3.1-8b"), Workload(concurrency=8, avg_context=128)
  one = plan(cfg, 1, H200, workload)[0]
  two_stages = plan(cfg, 2, H200, workload, stage=2)[0]
  assert two_stages.weights_bytes < 0.6 * one.weights_bytes
  assert two_stages.decode_round_s >= 0.95 * one.decode_round_s


def test_pinned_tensor_degree_that_does_not_divide_the_heads_names_the_ones_that_do():
  with pytest.raises(ShardingError, match=r"tensor=8 does not divide num_heads=28; tensor degrees that work: 1, 2, 4$"):
    plan(get_model_preset("qwen2.5-7b"), 8, H100, tensor=8)


def test_device_memory_override_changes_what_fits():
  cfg = get_model_preset("llama-3.1-70b")
  assert plan(cfg, 2, get_device("H200-141GB", memory_gib=141))
  with pytest.raises(ShardingError, match=r"does not fit on 2 x H200-141GB"):
    plan(cfg, 2, get_device("H200-141GB", memory_gib=40))


def test_table_shows_the_memory_split_and_explains_the_winner():
  text = format_plans(plan(get_model_preset("llama-3.1-8b"), 8, H100), limit=3)
  header = text.splitlines()[0]
  for column in ("weights GiB", "KV GiB", "act GiB", "ms/token", "decode tok/s", "TTFT ms"):
    assert column in header
  assert "more feasible plans not shown" in text
  assert "wins at" in text and "Runner-up" in text


def test_docs_planner_table_is_up_to_date():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "planner.md")
  with open(path) as f:
    committed = f.read()
  assert committed == planner_doc.render(), "regenerate: python -m tests.sharding.planner_doc > docs/planner.md"

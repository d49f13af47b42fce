"""The planner on real model shapes: what fits where, the ranking, and the messages when nothing fits."""

import os

import pytest

from configs.models import get_model_preset
from sharding.costs import Workload
from sharding.errors import ShardingError
from sharding.planner import GIB, format_plans, get_device, plan, plan_report
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


def _fp8_weight_bytes_per_device(cfg, tp: int) -> int:
  """From the shapes: each projection's share at one byte per element plus a 4-byte scale per output
  channel it holds; biases, norms, the embedding and the LM head at two bytes."""
  d, f, h, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.vocab_size
  k = max(cfg.num_kv_heads // tp, 1)  # KV heads on a device (replicated when fewer than tp)
  # name: (elements on the device, output channels on the device)
  projections = {"wq": (d * n * h // tp, n * h // tp), "wk": (d * k * h, k * h), "wv": (d * k * h, k * h),
                 "wo": (n * h * d // tp, d), "w_gate": (d * f // tp, f // tp), "w_up": (d * f // tp, f // tp),
                 "w_down": (f * d // tp, d)}
  layer = sum(elements + 4 * channels for elements, channels in projections.values())
  layer += 2 * (2 * d + (n * h // tp + 2 * k * h if cfg.attention_bias else 0))
  vocab = 2 * v * d // tp
  return cfg.num_layers * layer + vocab * (1 if cfg.tie_word_embeddings else 2) + 2 * d


@pytest.mark.parametrize("preset,tensor", [("llama-3.1-8b", 1), ("llama-3.1-8b", 8), ("qwen2.5-7b", 4)])
def test_fp8_plan_counts_projections_at_one_byte_plus_scales_and_gives_the_rest_to_kv(preset, tensor):
  cfg = get_model_preset(preset)
  # A batch that fits either way, so that the decode steps compare at the same batch.
  fp8 = plan(cfg, tensor, H100, Workload(quantization="fp8", concurrency=8), tensor=tensor)[0]
  bf16 = plan(cfg, tensor, H100, Workload(concurrency=8), tensor=tensor)[0]
  assert fp8.weights_bytes == _fp8_weight_bytes_per_device(cfg, tensor)
  assert 0.5 < fp8.weights_bytes / bf16.weights_bytes < 0.6
  assert fp8.kv_bytes - bf16.kv_bytes == bf16.weights_bytes - fp8.weights_bytes
  assert fp8.batch == bf16.batch == 8
  saved_s = (bf16.weights_bytes - fp8.weights_bytes) / (H100.hbm_gbps * 1e9)  # a decode step reads fewer bytes
  assert bf16.step.hbm_s - fp8.step.hbm_s == pytest.approx(saved_s, rel=1e-9)


@pytest.mark.parametrize("preset,device,bf16_count,fp8_count,fp8_tensor", [
    ("llama-3.1-70b", H200, 2, 1, 1), ("llama-3.1-405b", H100, 16, 8, 8)])
def test_fp8_weights_fit_a_model_on_fewer_devices(preset, device, bf16_count, fp8_count, fp8_tensor):
  cfg = get_model_preset(preset)
  best = plan(cfg, fp8_count, device, Workload(quantization="fp8"))[0]
  assert (best.data, best.stage, best.tensor) == (1, 1, fp8_tensor)
  with pytest.raises(ShardingError, match=rf"weights alone are .* in 16-bit, .* it would fit on {bf16_count} x "
                                          rf"{device.name}"):
    plan(cfg, fp8_count, device, Workload())


def test_quantizing_at_load_needs_the_full_precision_weights_to_fit_first():
  cfg = get_model_preset("llama-3.1-70b")
  assert plan(cfg, 1, H200, Workload(quantization="fp8"))  # fp8 as stored: 67.7 GiB
  with pytest.raises(ShardingError, match=r"its weights alone are 67.7 GiB in fp8 .*, loaded as 131.4 GiB in 16-bit "
                                          r"before they are quantized .* it would fit on 2 x H200-141GB"):
    plan(cfg, 1, H200, Workload(quantization="fp8", quantize_at_load=True))


def test_unknown_quantization_is_refused():
  with pytest.raises(ShardingError, match=r"quantization='int4': use None or one of fp8"):
    Workload(quantization="int4")


def _kv_bytes_per_token(cfg, tensor: int, element_bytes: int) -> int:
  """From the shapes: K and V of every layer, this device's KV heads (one replicated head when fewer than the
  tensor degree), head_dim elements each."""
  return 2 * cfg.num_layers * max(cfg.num_kv_heads // tensor, 1) * cfg.head_dim * element_bytes


@pytest.mark.parametrize("preset,tensor", [("llama-3.1-8b", 1), ("llama-3.1-70b", 8), ("qwen2.5-7b", 4)])
def test_fp8_kv_cache_plan_holds_twice_the_tokens_and_a_step_reads_half_the_kv(preset, tensor):
  cfg = get_model_preset(preset)
  # A batch that fits either way, so that the decode steps compare at the same batch.
  bf16 = plan(cfg, tensor, H100, Workload(concurrency=8), tensor=tensor)[0]
  fp8 = plan(cfg, tensor, H100, Workload(concurrency=8, kv_bytes=1, kv_cache_dtype="fp8"), tensor=tensor)[0]
  assert fp8.kv_bytes == bf16.kv_bytes and fp8.weights_bytes == bf16.weights_bytes  # the same free memory
  assert bf16.kv_tokens == bf16.kv_bytes // _kv_bytes_per_token(cfg, tensor, 2)
  assert fp8.kv_tokens == fp8.kv_bytes // _kv_bytes_per_token(cfg, tensor, 1)
  assert fp8.kv_tokens - 2 * bf16.kv_tokens in (0, 1)  # twice, up to the rounding of the bf16 pool
  assert fp8.batch == bf16.batch == 8
  # A decode step reads the batch's context from the KV pool: half the bytes in fp8.
  kv_read = 8 * Workload().context * _kv_bytes_per_token(cfg, tensor, 2)
  assert bf16.step.hbm_s - fp8.step.hbm_s == pytest.approx(kv_read / 2 / (H100.hbm_gbps * 1e9), rel=1e-9)


@pytest.mark.parametrize("name", ["auto", "bfloat16", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("tensor", [1, 8])
def test_planner_counts_kv_bytes_per_token_as_the_engine_sizes_its_pages(name, tensor):
  from jserve.engine.engine import resolve_kv_cache_dtype
  from jserve.engine.memory import page_bytes_per_device
  from sharding.costs import Layout, kv_bytes_per_token
  cfg = get_model_preset("llama-3.1-8b")
  kv_dtype = resolve_kv_cache_dtype(name, "bfloat16")
  workload = Workload(kv_bytes=kv_dtype.itemsize)
  assert 16 * kv_bytes_per_token(cfg, Layout(1, 1, tensor), workload) == page_bytes_per_device(cfg, 16, kv_dtype,
                                                                                               tensor)


def test_plan_title_names_the_kv_cache_dtype():
  cfg = get_model_preset("llama-3.1-8b")
  title = plan_report(cfg, model_name="llama-3.1-8b", num_devices=1,
                      workload=Workload(quantization="fp8", kv_bytes=1, kv_cache_dtype="fp8")).splitlines()[0]
  assert title.endswith("concurrency=256, fp8 weights, fp8 KV cache: 1 feasible plan(s)")
  assert "KV cache" not in plan_report(cfg, model_name="llama-3.1-8b", num_devices=1).splitlines()[0]

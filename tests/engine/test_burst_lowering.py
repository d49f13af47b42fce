"""A decode burst's attention runs the GPU kernel's decode launch only; a step that may carry prompt
chunks runs both launches. Checked on the programs the runner builds, lowered for CUDA on the CPU."""

import jax

from configs.models import get_model_preset
from jserve.engine.runner import ModelRunner, RunnerConfig
from jserve.engine.step import pack_host_inputs
from jserve.models.llama import init_params


def test_burst_program_has_no_prefill_launch_and_the_step_program_has_one():
  cfg = get_model_preset("tiny-llama")
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  rc = RunnerConfig(num_pages=32, page_size=16, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128,
                    attn_impl="gpu", num_decode_steps=4, sampler_paths="host")
  runner = ModelRunner(cfg, params, rc)
  assert runner.burst_buckets == [16]
  inputs, sampling, tokens = runner._empty_inputs(16)
  buf_N, layout = pack_host_inputs((inputs, sampling, tokens))
  args = (runner.params, runner.kv_caches, runner.slots, runner._mask_SW, runner._last_S, buf_N)
  texts = {name: fn.trace(*args, layout=layout, path=runner._path(sampling)).lower(
      lowering_platforms=("cuda",)).as_text() for name, fn in (("step", runner._step), ("burst", runner._burst))}
  # The layer is one callee, lowered once per program: its launches appear once each.
  assert texts["step"].count("__gpu$xla.gpu.triton") == 2
  assert texts["burst"].count("__gpu$xla.gpu.triton") == 1


def test_only_large_step_buckets_lower_the_hopper_prefill_kernel(monkeypatch):
  """On a Hopper GPU each Mosaic GPU kernel is built while lowering, every start: the step programs of
  buckets under `hopper_min_tokens` take the Triton prefill launch instead."""
  from pallas_kernels.ragged_paged_attention import hopper, tuning
  monkeypatch.setattr(hopper, "device_supports", lambda: None)  # lower as on an H100 / H200
  cfg = get_model_preset("llama-3.1-8b")  # head dim 128: shapes the Hopper kernel takes
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  rc = RunnerConfig(num_pages=8, page_size=16, max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=128,
                    attn_impl="gpu", sampler_paths="host")
  runner = ModelRunner(cfg, params, rc)
  threshold = tuning.gpu_config(128, 16, 4).hopper_min_tokens
  launches = {}
  for bucket in (threshold // 2, threshold):
    inputs, sampling, tokens = runner._empty_inputs(bucket)
    buf_N, layout = pack_host_inputs((inputs, sampling, tokens))
    args = (runner.params, runner.kv_caches, runner.slots, runner._mask_SW, runner._last_S, buf_N)
    text = runner._step.trace(*args, layout=layout, path=runner._path(sampling)).lower(
        lowering_platforms=("cuda",)).as_text()
    launches[bucket] = (text.count("custom_call @mosaic_gpu"), text.count("__gpu$xla.gpu.triton"))
  assert launches == {threshold // 2: (0, 2), threshold: (1, 1)}

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

"""Seconds tracing and lowering each step program of a preset, without compiling: where a warm start's
"tracing and lowering" goes.

    PYTHONPATH=. python -m tools.time_lowering --preset=llama-3.1-8b               # on a GPU
    PYTHONPATH=. python -m tools.time_lowering --preset=llama-3.1-8b --platform=cuda --hopper  # on a CPU

Builds the runner the engine would (host-chosen sampler paths, decode bursts of 8, the GPU attention
kernel) over abstract weights and a small pool, then traces and lowers the program of every step
bucket and burst bucket, as a warm start does before it reads the compiled program from the cache.
`--prefill_kernel=triton` forces the Triton prefill launch where a Hopper GPU would run the Mosaic
GPU one; `--hopper` makes a CPU lower the Hopper kernel as a Hopper GPU would.
"""

import time

import jax
from absl import app, flags

from configs.models import get_model_preset
from jserve.engine.runner import ModelRunner, RunnerConfig
from jserve.engine.step import pack_host_inputs
from jserve.models.llama import init_params
from pallas_kernels.ragged_paged_attention import gpu, hopper

flags.DEFINE_string("preset", "llama-3.1-8b", "model preset")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "token budget (the step buckets)")
flags.DEFINE_string("platform", None, "lower for this platform (default: the backend's)")
flags.DEFINE_enum("prefill_kernel", "auto", ["auto", "triton"], "the prefill launch's kernel")
flags.DEFINE_bool("hopper", False, "take the Hopper kernel where no Hopper GPU is present (lowering only)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.hopper:
    hopper.device_supports = lambda: None
  if FLAGS.prefill_kernel == "triton":
    gpu._use_hopper = lambda *args: False
  cfg = get_model_preset(FLAGS.preset)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  rc = RunnerConfig(num_pages=64, page_size=16, max_num_seqs=256, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                    max_model_len=2016, attn_impl="gpu", num_decode_steps=8, sampler_paths="host")
  runner = ModelRunner(cfg, params, rc)
  platforms = (FLAGS.platform,) if FLAGS.platform else None
  totals = [0.0, 0.0]
  for name, fn, buckets in (("step", runner._step, runner.buckets), ("burst", runner._burst, runner.burst_buckets)):
    for b in buckets:
      inputs, sampling, tokens = runner._empty_inputs(b)
      args, static = runner._step_args(*pack_host_inputs((inputs, sampling, tokens)), sampling)
      t0 = time.perf_counter()
      traced = fn.trace(*args, **static)
      t1 = time.perf_counter()
      text = traced.lower(lowering_platforms=platforms).as_text()
      t2 = time.perf_counter()
      totals[0] += t1 - t0
      totals[1] += t2 - t1
      print(f"{name} {b:5d} tokens: trace {t1 - t0:.2f} s, lower {t2 - t1:.2f} s, "
            f"Triton launches {text.count('xla.gpu.triton')}, "
            f"Mosaic GPU launches {text.count('custom_call @mosaic_gpu')}", flush=True)
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, prefill {FLAGS.prefill_kernel}: "
        f"trace {totals[0]:.2f} s, lower {totals[1]:.2f} s in all")


if __name__ == "__main__":
  app.run(main)

"""Offline throughput of `LLM.generate`, and the engine's host overhead per step.

    python -m tools.bench_offline --model=DIR --num_prompts=256 --input_len=128 --output_len=128
    python -m tools.bench_offline --preset=llama-3.2-1b --num_prompts=1000 ...   # random weights

Prompts are random token ids (or `--dataset=file.jsonl` with a "prompt" field);
every request runs to `output_len` tokens (`ignore_eos`). Reports requests/s,
input and output tokens/s, and the host time per step spent in scheduling and
batch building (measured around those calls, over every step of the run), with
the device step time beside it. `--json_out` writes the numbers.
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags

from tools.step_timer import StepTimer

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint directory")
flags.DEFINE_string("preset", None, "write a random checkpoint of this preset instead of --model")
flags.DEFINE_integer("num_layers", None, "with --preset: override the layer count")
flags.DEFINE_integer("num_prompts", 256, "requests")
flags.DEFINE_integer("input_len", 128, "prompt tokens per request")
flags.DEFINE_integer("output_len", 128, "generated tokens per request")
flags.DEFINE_string("dataset", None, "JSONL with a 'prompt' field per line, instead of random prompts")
flags.DEFINE_string("dtype", "bfloat16", "weights and KV dtype")
flags.DEFINE_integer("max_num_seqs", 256, "engine max_num_seqs")
flags.DEFINE_integer("max_num_batched_tokens", 8192, "engine token budget per step")
flags.DEFINE_integer("max_model_len", None, "engine max_model_len (default input_len + output_len)")
flags.DEFINE_float("kv_cache_gib", None, "KV pool size (default: from device memory)")
flags.DEFINE_string("json_out", None, "write results as JSON here")


def main(argv):
  del argv
  import numpy as np

  from jserve import LLM, SamplingParams
  model = FLAGS.model
  if FLAGS.preset:
    from tools.make_random_checkpoint import make_checkpoint
    model = os.path.join(tempfile.mkdtemp(), FLAGS.preset)
    make_checkpoint(FLAGS.preset, model, num_layers=FLAGS.num_layers, dtype=FLAGS.dtype)
  rng = np.random.default_rng(0)
  if FLAGS.dataset:
    with open(FLAGS.dataset) as f:
      prompts = [json.loads(line)["prompt"] for line in f if line.strip()][:FLAGS.num_prompts]
  else:
    prompts = [rng.integers(10, 1000, size=FLAGS.input_len).tolist() for _ in range(FLAGS.num_prompts)]
  llm = LLM(model, dtype=FLAGS.dtype, max_num_seqs=FLAGS.max_num_seqs,
            max_num_batched_tokens=FLAGS.max_num_batched_tokens,
            max_model_len=FLAGS.max_model_len or FLAGS.input_len + FLAGS.output_len + 16,
            kv_cache_gib=FLAGS.kv_cache_gib)
  params = SamplingParams(max_tokens=FLAGS.output_len, temperature=0, ignore_eos=True)
  llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
  timer = StepTimer(llm.engine)
  start = time.perf_counter()
  outs = llm.generate(prompts, params)
  elapsed = time.perf_counter() - start
  in_tokens = sum(len(o.prompt_token_ids) for o in outs)
  out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
  result = {
      "model": model, "num_prompts": len(prompts), "input_len": FLAGS.input_len, "output_len": FLAGS.output_len,
      "elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed, "input_tokens_per_s": in_tokens / elapsed,
      "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
      "steps": llm.engine.num_steps, "host_overhead_at_max_seqs": timer.summary(min(FLAGS.max_num_seqs,
                                                                                    len(prompts))),
  }
  import jax
  result["device"] = str(jax.devices()[0].device_kind)
  result["jax"] = jax.__version__
  print(json.dumps(result, indent=2))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(result, f, indent=2)
  host = result["host_overhead_at_max_seqs"]
  print(f"\n{len(prompts)} requests {FLAGS.input_len}/{FLAGS.output_len}: {result['requests_per_s']:.2f} req/s, "
        f"{result['output_tokens_per_s']:.1f} output tok/s, {result['total_tokens_per_s']:.1f} total tok/s",
        file=sys.stderr)
  if host:
    print(f"steps with >= {min(FLAGS.max_num_seqs, len(prompts))} sequences: host {host['host_ms']:.3f} ms "
          f"(schedule {host['schedule_ms']:.3f}, build {host['build_ms']:.3f}), device {host['device_ms']:.3f} ms",
          file=sys.stderr)


if __name__ == "__main__":
  app.run(main)

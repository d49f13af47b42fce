"""Throughput of `jserve batch` against `LLM.generate` on the same prompts, in the same process.

    python -m tools.bench_batch --preset=tiny-llama --num_prompts=256 --input_len=64 --output_len=64
    python -m tools.bench_batch --preset=llama-3.2-1b --num_prompts=1024 --input_len=128 --output_len=128
    python -m tools.bench_batch --model=DIR ...

Both run on one engine (built once, so both use the same compiled steps), with prefix caching
off so that the second run cannot reuse the first one's KV pages. Prompts are random token ids
(written to a JSONL file as `prompt_token_ids`); every request is greedy and runs to
`output_len` tokens (`ignore_eos`), so both do exactly the same work. The runs alternate
(generate, batch, generate, batch, ...) and the median of each is reported, in wall time and
in CPU time of the process (the fairer measure on a CPU shared with other work). The batch time is
the whole `run_batch` call: reading the input, scanning the output, writing every record and
verifying the file at the end; only the model load (shared) is outside it.
"""

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint directory")
flags.DEFINE_string("preset", None, "write a random checkpoint of this preset (configs/models.py) instead of --model")
flags.DEFINE_integer("num_layers", None, "with --preset: override the layer count")
flags.DEFINE_integer("num_prompts", 256, "requests per run")
flags.DEFINE_integer("input_len", 64, "prompt tokens per request")
flags.DEFINE_integer("output_len", 64, "generated tokens per request")
flags.DEFINE_integer("rounds", 3, "runs of each method (alternating); the median is reported")
flags.DEFINE_string("dtype", "bfloat16", "weights and KV dtype")
flags.DEFINE_integer("max_num_seqs", 256, "engine max_num_seqs")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "engine token budget per step")
flags.DEFINE_float("kv_cache_gib", None, "KV pool size (default: from device memory)")
flags.DEFINE_string("compilation_cache_dir", None, "JAX persistent compilation cache (default: none)")
flags.DEFINE_string("json_out", None, "write the results as JSON here")


def _write_prompts(path: str, prompts: list[list[int]], max_tokens: int):
  with open(path, "w") as f:
    f.writelines(json.dumps({"id": f"p{i}", "prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": 0,
                             "ignore_eos": True}) + "\n" for i, ids in enumerate(prompts))


def main(argv):
  del argv
  import jax
  import numpy as np

  from jserve import LLM, SamplingParams
  from jserve.batch import BatchConfig, Replica, run_batch

  workdir = tempfile.mkdtemp(prefix="bench_batch_")
  model = FLAGS.model
  if FLAGS.preset:
    # In a subprocess: that tool's absl flags (--preset, a required --out) would clash with these.
    model = os.path.join(workdir, FLAGS.preset)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "tools.make_random_checkpoint", f"--preset={FLAGS.preset}", f"--out={model}",
           f"--dtype={FLAGS.dtype}"] + ([f"--num_layers={FLAGS.num_layers}"] if FLAGS.num_layers else [])
    subprocess.run(cmd, check=True)
    print(f"random {FLAGS.preset} checkpoint written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  start = time.perf_counter()
  llm = LLM(model, dtype=FLAGS.dtype, max_num_seqs=FLAGS.max_num_seqs,
            max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_model_len=FLAGS.input_len + FLAGS.output_len + 16,
            kv_cache_gib=FLAGS.kv_cache_gib, enable_prefix_caching=False,
            compilation_cache_dir=FLAGS.compilation_cache_dir)
  load_s = time.perf_counter() - start
  vocab = llm.engine.model_config.vocab_size
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, min(vocab, 1000), size=FLAGS.input_len).tolist() for _ in range(FLAGS.num_prompts)]
  input_path = os.path.join(workdir, "in.jsonl")
  _write_prompts(input_path, prompts, FLAGS.output_len)
  params = SamplingParams(max_tokens=FLAGS.output_len, temperature=0, ignore_eos=True)
  llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up: first-call costs outside the timings

  generate_s, batch_s, batch_gen_s, out_tokens = [], [], [], FLAGS.num_prompts * FLAGS.output_len
  # CPU seconds of this process (every thread): on a shared CPU, wall time also measures the neighbours.
  generate_cpu_s, batch_cpu_s = [], []
  for r in range(FLAGS.rounds):
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    generate_s.append(time.perf_counter() - start)
    generate_cpu_s.append(time.process_time() - cpu)
    assert sum(len(o.outputs[0].token_ids) for o in outs) == out_tokens
    config = BatchConfig(input_path=input_path, output_path=os.path.join(workdir, f"out{r}.jsonl"), progress="none")
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_batch(config, lambda: [Replica(llm.engine)])
    batch_s.append(time.perf_counter() - start)
    batch_cpu_s.append(time.process_time() - cpu)
    batch_gen_s.append(summary.elapsed_s)
    assert summary.output_tokens == out_tokens and summary.verified
    print(f"round {r + 1}/{FLAGS.rounds}: LLM.generate {out_tokens / generate_s[-1]:.1f} tok/s, "
          f"jserve batch {out_tokens / batch_s[-1]:.1f} tok/s", file=sys.stderr)

  gen, bat = statistics.median(generate_s), statistics.median(batch_s)
  result = {
      "date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform, "jax": jax.__version__, "model": FLAGS.preset or model,
      "num_layers": llm.engine.model_config.num_layers, "dtype": FLAGS.dtype, "num_prompts": FLAGS.num_prompts,
      "input_len": FLAGS.input_len, "output_len": FLAGS.output_len, "max_num_seqs": FLAGS.max_num_seqs,
      "max_num_batched_tokens": FLAGS.max_num_batched_tokens, "rounds": FLAGS.rounds, "load_s": load_s,
      "generate_s": generate_s, "batch_s": batch_s, "batch_generation_s": batch_gen_s,
      "generate_output_tok_s": out_tokens / gen, "batch_output_tok_s": out_tokens / bat,
      "batch_vs_generate": gen / bat,
      "generate_cpu_s": generate_cpu_s, "batch_cpu_s": batch_cpu_s,
      "batch_vs_generate_cpu": statistics.median(generate_cpu_s) / statistics.median(batch_cpu_s),
  }
  print(json.dumps(result, indent=2))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(result, f, indent=2)
  print(f"\n| {result['device']} | {result['model']} | {FLAGS.num_prompts} x {FLAGS.input_len}/{FLAGS.output_len} | "
        f"{result['generate_output_tok_s']:.1f} | {result['batch_output_tok_s']:.1f} | "
        f"{100 * (result['batch_vs_generate'] - 1):+.1f}% | {100 * (result['batch_vs_generate_cpu'] - 1):+.1f}% |",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)

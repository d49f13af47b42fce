"""End-to-end offline throughput on the device, against the memory roofline measured in the same run.

    PYTHONPATH=. python -m tools.bench_e2e --preset=llama-3.2-1b --out_dir=$OUT

One process: measures the copy bandwidth (PyTorch device-to-device copy and
a JAX copy, bytes read plus written), writes a random-weight checkpoint of the
preset, starts one `LLM`, and runs each workload (`--workloads=in/out/count,...`)
through `LLM.generate` with `ignore_eos`, steps overlapping as in production.
For each workload it reports output and total tokens/s beside the workload's
roofline (every step's weight bytes plus the KV bytes its batch reads, over the
measured copy bandwidth), and, for the decode steps that had the full batch,
the median wall time per step against that step's roofline, and the host time
per step (scheduling plus batch building). With `--hf_batch=B` it also runs
Hugging Face transformers `generate` (PyTorch, same checkpoint, same device)
on B prompts of 128/128 and jserve on the same prompts: the same-run anchor.
Writes e2e.json and e2e.md to --out_dir; prints a short table last.
"""

import datetime
import json
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-3.2-1b", "model preset (random weights)")
flags.DEFINE_string("workloads", "128/128/512,1024/128/256", "input/output/requests, comma separated")
flags.DEFINE_integer("max_num_seqs", 256, "engine max_num_seqs")
flags.DEFINE_integer("max_num_batched_tokens", 8192, "engine token budget")
flags.DEFINE_string("out_dir", "/tmp/bench_e2e", "results directory")
flags.DEFINE_float("copy_gib", 4.0, "size of the copy that measures the bandwidth ceiling")
flags.DEFINE_integer("hf_batch", 0, "if > 0: transformers generate against jserve at this batch, 128/128")
flags.DEFINE_bool("dummy", False, "random weights made on the device (load_format=dummy): no checkpoint written "
                  "(saves 96 s for the 8B shape); the transformers anchor needs a checkpoint")
flags.DEFINE_string("engine_args", "{}", "extra EngineConfig fields, as a JSON object")


def hf_anchor(model_dir, llm, batch, vocab):
  """Output tokens/s of transformers `generate` and of jserve on the same `batch` prompts of 128/128."""
  import numpy as np
  import torch
  import transformers

  from jserve import SamplingParams
  rng = np.random.default_rng(1)
  ids = rng.integers(10, min(vocab, 4000), size=(batch, 128))
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
  x = torch.tensor(ids, device="cuda")
  model.generate(x[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
  torch.cuda.synchronize()
  t = time.perf_counter()
  out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=128, min_new_tokens=128,
                       do_sample=False)
  torch.cuda.synchronize()
  hf_s = time.perf_counter() - t
  hf_tokens = (out.shape[1] - 128) * batch
  del model, out
  torch.cuda.empty_cache()
  t = time.perf_counter()
  outs = llm.generate(ids.tolist(), SamplingParams(max_tokens=128, temperature=0, ignore_eos=True), use_tqdm=False)
  js_s = time.perf_counter() - t
  js_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
  return {"batch": batch, "hf_output_tok_s": hf_tokens / hf_s, "jserve_output_tok_s": js_tokens / js_s,
          "speedup": (js_tokens / js_s) / (hf_tokens / hf_s)}


def copy_bandwidth():
  """Best of a JAX copy and a PyTorch device copy of 4 GiB, in bytes/s counting read plus write."""
  import jax
  import jax.numpy as jnp
  n = int(FLAGS.copy_gib * (1 << 30)) // 2  # bf16 elements
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 1)
  f(x).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  jax_bw = 2 * 2 * n / min(times)
  del x
  torch_bw = 0.0
  try:
    import torch
    a = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
      b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    torch_bw = 2 * 2 * n * 5 / (start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
  except Exception as e:  # no CUDA torch here: the JAX figure stands alone
    print(f"torch copy unavailable: {e}")
  return {"jax_copy_GBps": jax_bw / 1e9, "torch_copy_GBps": torch_bw / 1e9, "best_GBps": max(jax_bw, torch_bw) / 1e9}


def main(argv):
  del argv
  import jax
  import numpy as np

  from jserve import LLM, SamplingParams
  from tools.step_timer import StepTimer
  from tools.make_random_checkpoint import make_checkpoint
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  results = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
             "device": jax.devices()[0].device_kind, "preset": FLAGS.preset}
  results["ceiling"] = bw = copy_bandwidth()
  print(f"copy bandwidth: {bw}", flush=True)
  model = os.path.join(tempfile.mkdtemp(), FLAGS.preset)
  t = time.perf_counter()
  cfg = make_checkpoint(FLAGS.preset, model, weights=not FLAGS.dummy)
  results["checkpoint_s"] = time.perf_counter() - t
  extra = json.loads(FLAGS.engine_args)
  if FLAGS.dummy:
    extra["load_format"] = "dummy"
  results["engine_args"] = extra
  workloads = [tuple(int(x) for x in w.split("/")) for w in FLAGS.workloads.split(",")]
  max_len = max(i + o for i, o, _ in workloads) + 16
  t = time.perf_counter()
  llm = LLM(model, max_model_len=max_len, max_num_seqs=FLAGS.max_num_seqs,
            max_num_batched_tokens=FLAGS.max_num_batched_tokens, **extra)
  results["engine_start_s"] = time.perf_counter() - t
  weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(llm.engine.params))
  kv_per_token = cfg.kv_bytes_per_token(2)
  rng = np.random.default_rng(0)
  results["workloads"] = []
  for in_len, out_len, count in workloads:
    prompts = [rng.integers(10, min(cfg.vocab_size, 4000), size=in_len).tolist() for _ in range(count)]
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    timer = StepTimer(llm.engine, block=False)  # not blocking: steps overlap as in production
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    full = min(FLAGS.max_num_seqs, count)
    row = {"input_len": in_len, "output_len": out_len, "requests": count, "elapsed_s": elapsed,
           "output_tok_s": out_tokens / elapsed, "total_tok_s": (out_tokens + in_len * count) / elapsed,
           "steps": len(timer.seqs)}
    # The roofline of the whole workload: every decode step reads all weights and the KV of its batch;
    # prefill reads the weights once per step of max_num_batched_tokens and is compute-light at these
    # lengths (counted as weight reads only). Tokens/s at that bound is what the device allows.
    decode_steps = out_len * -(-count // FLAGS.max_num_seqs)
    kv_read = count * out_len * (in_len + out_len / 2) * kv_per_token
    prefill_steps = -(-count * in_len // FLAGS.max_num_batched_tokens)
    bound_s = ((decode_steps + prefill_steps) * weight_bytes + kv_read) / (bw["best_GBps"] * 1e9)
    row.update(roofline_output_tok_s=count * out_len / bound_s, roofline_fraction_workload=bound_s / elapsed)
    summary = timer.summary(full)
    if summary:
      context = in_len + out_len / 2  # the mean context of a decode step over the run
      roofline = (weight_bytes + full * context * kv_per_token) / (bw["best_GBps"] * 1e9)
      row.update(decode_batch=full, decode_wall_ms=summary["wall_ms"], host_ms=summary["host_ms"],
                 roofline_step_ms=roofline * 1e3, roofline_fraction=roofline * 1e3 / summary["wall_ms"],
                 decode_steps_timed=summary["steps"], wall_per_step_ms=elapsed / len(timer.seqs) * 1e3)
    results["workloads"].append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(FLAGS.out_dir, "e2e.json"), "w") as f:
      json.dump(results, f, indent=1)
  if FLAGS.hf_batch and not FLAGS.dummy:
    try:
      results["hf_anchor"] = hf_anchor(model, llm, FLAGS.hf_batch, cfg.vocab_size)
    except Exception as e:  # noqa: BLE001 - the anchor is optional where torch has no GPU
      results["hf_anchor"] = {"error": repr(e)}
    print(json.dumps(results["hf_anchor"]), flush=True)
    with open(os.path.join(FLAGS.out_dir, "e2e.json"), "w") as f:
      json.dump(results, f, indent=1)
  lines = [f"{results['device']}, JAX {results['jax']}, {results['date']}, {FLAGS.preset} random weights bf16; "
           f"copy ceiling {bw['best_GBps']:.0f} GB/s; engine start {results['engine_start_s']:.0f} s; "
           f"engine args {extra}", "",
           "| in/out x requests | output tok/s | roofline output tok/s | fraction | total tok/s | "
           "decode step wall ms (batch) | roofline step ms | fraction | host ms |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  nan = float("nan")
  for r in results["workloads"]:
    lines.append(f"| {r['input_len']}/{r['output_len']} x {r['requests']} | {r['output_tok_s']:.0f} | "
                 f"{r['roofline_output_tok_s']:.0f} | {r['roofline_fraction_workload']:.2f} | {r['total_tok_s']:.0f} | "
                 f"{r.get('decode_wall_ms', nan):.2f} ({r.get('decode_batch', '-')}) | "
                 f"{r.get('roofline_step_ms', nan):.2f} | {r.get('roofline_fraction', nan):.2f} | "
                 f"{r.get('host_ms', nan):.3f} |")
  if "hf_anchor" in results:
    lines += ["", f"transformers generate anchor: {json.dumps(results['hf_anchor'])}"]
  with open(os.path.join(FLAGS.out_dir, "e2e.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)

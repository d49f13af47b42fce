"""End-to-end offline throughput on the device, against the memory roofline measured in the same run.

    PYTHONPATH=. python -m tools.bench_e2e --preset=llama-3.2-1b --out_dir=$OUT
    PYTHONPATH=. python -m tools.bench_e2e --preset=llama-3.1-8b --dummy --max_num_batched_tokens=2048 \
        --engine_args='{"num_decode_steps": 8, "precompile_staged_sampler": false}' \
        --workloads=longtail/1000,1024/128/1000 --step_sweep=1,16,64,256x1024,4096 --out_dir=$OUT
    PYTHONPATH=. python -m tools.plot_e2e $OUT/e2e.json --out_dir=$OUT   # the PNGs

and as a smoke run on a CPU (tiny shapes; a small pool, since a CPU step copies the whole pool):

    PYTHONPATH=. python -m tools.bench_e2e --preset=tiny-llama --dummy --workloads=16/16/8,longtail/16 \
        --step_sweep=1,4x32,64 --copy_gib=0.01 --max_num_seqs=8 --max_num_batched_tokens=64 \
        --engine_args='{"kv_cache_gib": 0.01}' --out_dir=/tmp/e2e

One process: measures the ceilings (the copy bandwidth: a PyTorch device-to-device copy and a JAX
copy, bytes read plus written; the matmul rate: a bfloat16 8192^3 `jnp.dot`, 512^3 under a CPU),
writes a random-weight checkpoint of the preset (none with `--dummy`), starts one `LLM`, then:

- `--step_sweep=B1,B2,..xC1,C2,..`: times the engine's own decode step (its runner, its compiled
  programs, its KV pool filled with random values) for B sequences each at context C, for every
  pair: the single step (`execute`, dispatched back to back) and, when the engine runs several
  decode steps per call (`num_decode_steps` > 1), the burst per step (the path the engine takes for
  decode-only batches). Each beside its bounds: the memory roofline (weight bytes + B * C * KV bytes
  per token, over the copy bandwidth) and the FLOP bound (2 * matmul parameters * B, over the matmul
  rate: bf16's, or fp8's for an engine with `activation_quantization="fp8"`; matmul parameters leave out
  an untied input embedding, which is gathered, not multiplied);
  `fraction` is the larger bound over the step time. A pair whose KV does not fit the engine's pool
  runs at the largest halved batch that fits (`capped_from` says so); a batch over `max_num_seqs`
  or a context over the model's length is skipped with the reason.
- each workload of `--workloads` through `LLM.generate` with `ignore_eos`, steps overlapping as in production.
  `in/out/count` is `count` requests of `in` prompt and `out` output tokens; `longtail/count` is `count`
  requests whose lengths follow chat-like long-tailed distributions (LONGTAIL in tools/workload_bounds.py:
  lognormal, input median 250 tokens, output median 200; written into the JSON and the markdown with the drawn
  lengths' statistics). For each workload: output and total tokens/s beside the workload's roofline (the
  larger of every step's weight bytes plus the KV bytes its batch reads, over the copy bandwidth, and every
  token's matmul FLOPs over the matmul rate; from the per-request lengths, see tools/workload_bounds.py), the
  serial bound (decode attention at its memory bound, each decode step's matmuls at the larger of their weight
  reads and FLOPs, prefill at its compute bound: what a one-kernel-at-a-time executor can reach), and, for the
  decode steps that had the full batch, the median wall time per step against that step's roofline and serial
  bound, and the host time per step (scheduling plus batch building). Also where the run's wall time went, by
  kind of step (steps with prompt tokens, full and partial decode batches; `StepTimer.breakdown`), how many
  requests were preempted and how many tokens the KV pool held.
- with `--hf_batch=B1,B2`, Hugging Face transformers `generate` (PyTorch, same checkpoint, same device)
  on B prompts of 128/128 and jserve on the same prompts: the same-run anchor.

An engine with fp8 activations stacks each layer's gate and up, and k and v (`quant.stack_pairs`); with
`--nostack_pairs` it keeps them apart, so two runs give the stacking's effect on one machine. The JSON's
`layer_params` names the first layer's weights and their types, and `program_memory` gives XLA's memory analysis of the
largest burst program (`LLMEngine.runner.program_memory`): temporary bytes near the weights' size would show XLA
holding a copy of them.

The engine's `max_model_len` covers the longest request, the sweep's longest context and the anchor's 256. Writes
e2e.json and e2e.md to --out_dir after every stage (a run cut short keeps what it finished);
prints a short table last.
"""

import datetime
import json
import os
import tempfile
import time

from absl import app, flags

from tools.workload_bounds import (decode_steps, longtail_lengths, longtail_text, matmul_params_of,
                                   matmul_step_s, step_serial_s, workload_bounds)

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-3.2-1b", "model preset (random weights)")
flags.DEFINE_string("workloads", "128/128/512,1024/128/256",
                    "comma separated: input/output/requests, or longtail/requests (lengths drawn from LONGTAIL)")
flags.DEFINE_string("step_sweep", "", "decode step sweep, batches x contexts, e.g. 1,16,64,256x1024,4096 "
                    "(empty: none)")
flags.DEFINE_integer("step_iters", 16, "steps per timed round of the step sweep (3 rounds)")
flags.DEFINE_integer("max_num_seqs", 256, "engine max_num_seqs")
flags.DEFINE_integer("max_num_batched_tokens", 8192, "engine token budget")
flags.DEFINE_string("out_dir", "/tmp/bench_e2e", "results directory")
flags.DEFINE_float("copy_gib", 4.0, "size of the copy that measures the bandwidth ceiling")
flags.DEFINE_integer("matmul_n", 8192, "size of the square bf16 matmul that measures the matmul rate (512 on CPU)")
flags.DEFINE_list("hf_batch", [], "batches at which transformers generate runs against jserve, 128/128 "
                  "(e.g. 1,32; empty: none)")
flags.DEFINE_bool("dummy", False, "random weights made on the device (load_format=dummy): no checkpoint written "
                  "(saves 96 s for the 8B shape); the transformers anchor needs a checkpoint")
flags.DEFINE_string("engine_args", "{}", "extra EngineConfig fields, as a JSON object")
flags.DEFINE_bool("stack_pairs", True, "an engine with fp8 activations stacks each layer's gate and up, and k and "
                  "v (quant.stack_pairs); --nostack_pairs keeps them apart, as before: the A/B of the stacking")

def anchor_prompts(batches: list[int], vocab: int) -> dict:
  """The anchor's prompts: `b` random prompts of 128 tokens per batch `b`, the same for both runtimes."""
  import numpy as np
  rng = np.random.default_rng(1)
  return {b: rng.integers(10, min(vocab, 4000), size=(b, 128)) for b in batches}


def hf_generate_rates(model_dir, batches: list[int], vocab) -> dict:
  """Output tokens/s of transformers `generate` per batch on the anchor's prompts (128/128, greedy,
  128 new tokens forced by min_new_tokens). Runs before jserve's engine holds the GPU's memory, and
  gives it back (the engine sizes its KV pool from what is free)."""
  import torch
  import transformers

  prompts = anchor_prompts(batches, vocab)
  device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: smoke runs only)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
  x = torch.tensor(prompts[batches[0]], device=device)
  model.generate(x[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
  hf = {}
  for b in batches:
    x = torch.tensor(prompts[b], device=device)
    sync()
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=128, min_new_tokens=128,
                         do_sample=False)
    sync()
    hf[b] = (out.shape[1] - 128) * b / (time.perf_counter() - t)
    print(f"transformers generate, batch {b}: {hf[b]:.0f} output tok/s", flush=True)
  del model, out, x
  if device == "cuda":
    torch.cuda.empty_cache()
  return hf


def hf_anchor(llm, hf: dict, vocab) -> list[dict]:
  """jserve on the anchor's prompts, one row per batch beside transformers' rate `hf` [batch]."""
  from jserve import SamplingParams
  prompts = anchor_prompts(list(hf), vocab)
  rows = []
  for b, hf_rate in hf.items():
    t = time.perf_counter()
    outs = llm.generate(prompts[b].tolist(), SamplingParams(max_tokens=128, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    js = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    rows.append({"batch": b, "hf_output_tok_s": hf_rate, "jserve_output_tok_s": js, "speedup": js / hf_rate})
  return rows


def copy_bandwidth():
  """The copy ceiling (`tools.ceilings.copy_ceilings` over --copy_gib) in GB/s, read plus written."""
  from tools.ceilings import copy_ceilings
  c = copy_ceilings(int(FLAGS.copy_gib * (1 << 30)))
  return {"jax_copy_GBps": c["jax_elementwise_TBps"] * 1e3, "torch_copy_GBps": c.get("torch_copy_TBps", 0.0) * 1e3,
          "best_GBps": c["ceiling_TBps"] * 1e3}


def parse_workloads(spec: str, max_total: int) -> list[dict]:
  """`--workloads` as dicts: label, per-request input and output lengths, the long tail's spec; empty: none."""
  out = []
  for w in filter(None, (x.strip() for x in spec.split(","))):
    parts = w.split("/")
    if parts[0] == "longtail":
      if len(parts) != 2:
        raise app.UsageError(f"workload {w!r}: use longtail/requests")
      ins, outs, dist = longtail_lengths(int(parts[1]), max_total)
      out.append({"label": f"longtail x {len(ins)}", "in_lens": ins, "out_lens": outs, "longtail": dist})
    else:
      if len(parts) != 3:
        raise app.UsageError(f"workload {w!r}: use input/output/requests or longtail/requests")
      in_len, out_len, count = (int(x) for x in parts)
      out.append({"label": f"{in_len}/{out_len} x {count}", "in_lens": [in_len] * count,
                  "out_lens": [out_len] * count})
  return out


def parse_sweep(spec: str) -> tuple[list[int], list[int]]:
  """`--step_sweep=1,16,64,256x1024,4096` as ([1, 16, 64, 256], [1024, 4096]); empty: none."""
  if not spec:
    return [], []
  batches, sep, contexts = spec.partition("x")
  if not sep:
    raise app.UsageError(f"--step_sweep={spec!r}: use batches x contexts, e.g. 1,16,64,256x1024,4096")
  return [int(b) for b in batches.split(",")], [int(c) for c in contexts.split(",")]


def breakdown_text(row: dict) -> str:
  """One line: a workload's wall time by kind of step (StepTimer.breakdown)."""
  b = row["breakdown"]
  parts = []
  for kind, name in (("prefill", "steps with prompt tokens"), ("decode_full", "full decode batches"),
                     ("decode_partial", "partial decode batches")):
    k = b[kind]
    per = k["wall_s"] / max(k["decode_steps"], 1) * 1e3
    parts.append(f"{name} {k['wall_s']:.1f} s ({k['steps']} calls, {k['decode_steps']} steps, {per:.1f} ms each)")
  label = row.get("label") or f"{row['input_len']}/{row['output_len']}"
  pool = ""
  if "kv_pool_tokens" in row:
    pool = f"; KV pool {row['kv_pool_tokens']} tokens, {row['preemptions']} preemptions"
  return f"{label}, time by step kind: " + "; ".join(parts) + pool


class _BurstRunner:
  """Lets `multi_gpu_timing._time_steps` time the runner's decode burst: `execute` runs the
  `num_decode_steps` steps of one device call (the engine's path for decode-only batches)."""

  def __init__(self, runner):
    self.runner = runner

  def execute(self, inputs, sampling, tokens):
    return self.runner.execute_burst(inputs, sampling, tokens), None


def step_sweep(llm, batches: list[int], contexts: list[int], *, weight_bytes: int, kv_per_token: int,
               matmul_params: int, ceiling: dict, iters: int, save) -> dict:
  """Times the engine's decode step at each (batch, context) against its memory roofline and FLOP
  bound (see the module docstring); calls `save(partial)` after each pair."""
  import numpy as np

  from tools.multi_gpu_parts import PAGE_SIZE
  from tools.multi_gpu_timing import _decode_batch, _time_steps, fill_pool
  runner = llm.engine.runner
  rc = runner.rc
  out = {"batches": batches, "contexts": contexts, "iters": iters, "rows": []}
  if rc.page_size != PAGE_SIZE:
    out["skipped"] = f"page_size {rc.page_size}: the sweep builds batches of {PAGE_SIZE}-token pages"
    return out
  burst_k = rc.num_decode_steps if runner.burst_buckets else 1
  bandwidth, flop_rate = ceiling["best_GBps"] * 1e9, ceiling["matmul_TFLOPs"] * 1e12
  out.update(num_decode_steps=burst_k, kv_pool_tokens=(rc.num_pages - 1) * rc.page_size,
             kv_pool_GiB=(rc.num_pages - 1) * rc.page_size * kv_per_token / 2**30, weight_bytes=weight_bytes,
             kv_bytes_per_token=kv_per_token, matmul_params=matmul_params)

  def bounds(batch, context):
    memory_ms = (weight_bytes + batch * context * kv_per_token) / bandwidth * 1e3
    flop_ms = 2 * matmul_params * batch / flop_rate * 1e3
    return memory_ms, flop_ms


  compiled = runner.num_compiled()
  fill_pool(runner)
  rng = np.random.default_rng(3)
  for context in contexts:
    for batch in batches:
      row = {"batch": batch, "context": context}
      out["rows"].append(row)
      pages = -(-(context + burst_k - 1) // PAGE_SIZE)  # the burst's later steps get slots of their own
      if batch > rc.max_num_seqs:
        row["skipped"] = f"batch {batch} > max_num_seqs {rc.max_num_seqs}"
        continue
      if context + burst_k > rc.max_model_len:
        row["skipped"] = f"context {context} + {burst_k} steps > max_model_len {rc.max_model_len}"
        continue
      run = batch
      while run and 1 + run * pages > rc.num_pages:  # page 0 is the engine's reserved page
        run //= 2
      if not run:
        row["skipped"] = f"one sequence of {context} tokens does not fit the KV pool"
        continue
      if run < batch:
        row.update(batch=run, capped_from=batch,
                   cap_reason=f"{batch} x {context} tokens of KV = {batch * context * kv_per_token / 2**30:.3g} GiB "
                   f"> the pool's {out['kv_pool_GiB']:.3g} GiB")
      inputs = _decode_batch(runner, run, context, rng, first_page=1, spare=burst_k - 1)
      single = _time_steps(runner, inputs, iters)
      memory_ms, flop_ms = bounds(run, context)
      row.update(bucket=runner.bucket_for(run), single_step_ms=single["device_ms"],
                 single_step_ms_spread=single["device_ms_spread"], single_waited_ms=single["waited_ms"])
      step_ms = single["device_ms"]
      if burst_k > 1:
        # The burst's steps read contexts context .. context + K - 1, each writing its own slots.
        burst = _time_steps(_BurstRunner(runner), inputs, max(2, iters // burst_k))
        step_ms = row["burst_step_ms"] = burst["device_ms"] / burst_k
        row["burst_step_ms_spread"] = [x / burst_k for x in burst["device_ms_spread"]]
        memory_ms, flop_ms = bounds(run, context + (burst_k - 1) / 2)
      bound_ms = max(memory_ms, flop_ms)
      serial = step_serial_s(run, context + (burst_k - 1) / 2, kv_per_token=kv_per_token, weight_bytes=weight_bytes,
                             bandwidth=bandwidth, matmul_params=matmul_params, flop_rate=flop_rate) * 1e3
      row.update(step_ms=step_ms, roofline_ms=memory_ms, flop_bound_ms=flop_ms, bound_ms=bound_ms,
                 bound="memory" if memory_ms >= flop_ms else "flops", fraction=bound_ms / step_ms,
                 serial_ms=serial, serial_fraction=serial / step_ms, tokens_per_s=run / step_ms * 1e3)
      print(json.dumps(row), flush=True)
      save(out)
  out["compiled_during_sweep"] = runner.num_compiled() - compiled
  return out


def markdown(results: dict) -> list[str]:
  """The report's lines: the run's setting, the workloads, the long tail's distribution, the sweep."""
  nan = float("nan")
  bw = results["ceiling"]
  lines = [f"{results['device']}, JAX {results['jax']}, {results['date']}, {results['preset']} random weights bf16; "
           f"copy ceiling {bw['best_GBps']:.0f} GB/s; matmul {bw.get('matmul_TFLOPs', nan):.3g} TFLOP/s "
           f"({'fp8' if bw.get('matmul_dtype') == 'float8_e4m3fn' else 'bf16'} {bw.get('matmul_n', '-')}^3); "
           f"engine start {results.get('engine_start_s', nan):.0f} s; "
           f"max_model_len {results.get('max_model_len', '-')}; engine args {results.get('engine_args')}"]
  if results.get("workloads"):
    lines += ["", "| in/out x requests | output tok/s | roofline output tok/s | fraction | serial bound tok/s | "
              "fraction | total tok/s | decode step wall ms (batch) | roofline step ms | fraction | serial step ms | "
              "fraction | host ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["workloads"]:
      label = r.get("label") or f"{r['input_len']}/{r['output_len']} x {r['requests']}"
      lines.append(f"| {label} | {r['output_tok_s']:.0f} | {r['roofline_output_tok_s']:.0f} | "
                   f"{r['roofline_fraction_workload']:.2f} | {r.get('serial_output_tok_s', nan):.0f} | "
                   f"{r.get('serial_fraction', nan):.2f} | {r['total_tok_s']:.0f} | "
                   f"{r.get('decode_wall_ms', nan):.2f} ({r.get('decode_batch', '-')}) | "
                   f"{r.get('roofline_step_ms', nan):.2f} | {r.get('roofline_fraction', nan):.2f} | "
                   f"{r.get('serial_step_ms', nan):.2f} | {r.get('serial_step_fraction', nan):.2f} | "
                   f"{r.get('host_ms', nan):.3f} |")
    tails = [f"- {longtail_text(r['longtail'])}" for r in results["workloads"] if "longtail" in r]
    tails += [f"- {breakdown_text(r)}" for r in results["workloads"] if r.get("breakdown")]
    if tails:
      lines += [""] + tails
  sweep = results.get("step_sweep")
  if sweep:
    k = sweep.get("num_decode_steps", 1)
    lines += ["", f"Decode step sweep (the engine's runner; KV pool {sweep.get('kv_pool_GiB', nan):.3g} GiB; "
              f"step = {'burst of ' + str(k) + ' steps per call, per step' if k > 1 else 'single step'}; "
              "roofline = (weight bytes + batch x context x KV bytes per token) / copy bandwidth; "
              "FLOP bound = 2 x matmul params x batch / matmul rate; serial = KV bytes / copy bandwidth + the "
              "matmuls' own bound, the larger of weight bytes / bandwidth and FLOPs / rate):", "",
              "| batch | context | step ms | single step ms | roofline ms | FLOP bound ms | fraction | serial ms | "
              "fraction | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sweep["rows"]:
      note = r.get("skipped") or (f"capped from {r['capped_from']}: {r['cap_reason']}" if "capped_from" in r else "")
      cells = [f"{r[k]:.2f}" if k in r else "-"
               for k in ("step_ms", "single_step_ms", "roofline_ms", "flop_bound_ms", "fraction", "serial_ms",
                         "serial_fraction")]
      lines.append(f"| {r['batch']} | {r['context']} | {' | '.join(cells)} | {note} |")
    if sweep.get("skipped"):
      lines.append(f"sweep skipped: {sweep['skipped']}")
  anchor = results.get("hf_anchor")
  if isinstance(anchor, list):
    lines += ["", "transformers `generate` against jserve, same prompts, 128/128, greedy:", "",
              "| batch | transformers output tok/s | jserve output tok/s | jserve / transformers |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['hf_output_tok_s']:,.0f} | {r['jserve_output_tok_s']:,.0f} | {r['speedup']:.1f}x |"
              for r in anchor]
  elif anchor:
    lines += ["", f"transformers generate anchor: {json.dumps(anchor)}"]
  return lines


def write(results: dict):
  """e2e.json and e2e.md, rewritten after every stage."""
  with open(os.path.join(FLAGS.out_dir, "e2e.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(FLAGS.out_dir, "e2e.md"), "w") as f:
    f.write("\n".join(markdown(results)) + "\n")


def main(argv):
  del argv
  anchor = bool(FLAGS.hf_batch) and not FLAGS.dummy
  if anchor:
    # transformers runs on the same GPU before the engine starts: JAX takes memory as it needs it
    # instead of its whole share at once.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  import numpy as np

  from jserve import LLM, SamplingParams
  from tools.ceilings import matmul_rate
  from tools.make_random_checkpoint import make_checkpoint
  from tools.step_timer import StepTimer
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  # The ceilings first: PyTorch's copy runs before JAX's backend starts and takes jserve's share of
  # the card (XLA_PYTHON_CLIENT_MEM_FRACTION, set by importing jserve).
  bw = copy_bandwidth()
  results = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
             "device": jax.devices()[0].device_kind, "preset": FLAGS.preset, "ceiling": bw,
             "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
  bw.update(matmul_rate(FLAGS.matmul_n))
  extra = json.loads(FLAGS.engine_args)
  if extra.get("activation_quantization") == "fp8":
    # Its products run on the fp8 tensor cores: FLOP bounds at the fp8 rate (the LM head and attention
    # stay bf16, so this bound is a little below what the engine can reach: its fractions are not flattered).
    bw["matmul_bf16_TFLOPs"] = bw["matmul_TFLOPs"]
    bw.update(matmul_rate(FLAGS.matmul_n, fp8=True))
  print(f"ceilings: {bw}", flush=True)
  model = os.path.join(tempfile.mkdtemp(), FLAGS.preset)
  t = time.perf_counter()
  cfg = make_checkpoint(FLAGS.preset, model, weights=not FLAGS.dummy)
  results["checkpoint_s"] = time.perf_counter() - t
  hf = None
  if anchor:
    try:
      hf = hf_generate_rates(model, [int(b) for b in FLAGS.hf_batch], cfg.vocab_size)
    except Exception as e:  # noqa: BLE001 - the anchor is optional where torch has no GPU
      results["hf_anchor"] = {"error": repr(e)}
  if FLAGS.dummy:
    extra["load_format"] = "dummy"
  results["engine_args"] = extra
  model_len = cfg.max_position_embeddings
  workloads = parse_workloads(FLAGS.workloads, model_len)
  batches, contexts = parse_sweep(FLAGS.step_sweep)
  # The longest request, and the sweep's longest context plus a burst of decode steps past it.
  need = max((i + o for w in workloads for i, o in zip(w["in_lens"], w["out_lens"])), default=0)
  if contexts:
    need = max(need, max(contexts) + extra.get("num_decode_steps", 1))
  if FLAGS.hf_batch:
    need = max(need, 256)  # the anchor's 128/128
  results["max_model_len"] = max_len = min(need + 16, model_len)
  if not FLAGS.stack_pairs:
    from jserve.models import quant
    quant.STACKED_PAIRS = {}  # read by quant.stack_pairs when the engine places its weights
  results["stack_pairs"] = FLAGS.stack_pairs
  t = time.perf_counter()
  llm = LLM(model, max_model_len=max_len, max_num_seqs=FLAGS.max_num_seqs,
            max_num_batched_tokens=FLAGS.max_num_batched_tokens, **extra)
  results["engine_start_s"] = time.perf_counter() - t
  # Bytes a step reads: every weight, except an untied input embedding, of which a step reads only
  # its tokens' rows (a tied one is read whole as the LM head).
  params = llm.engine.params
  results["layer_params"] = {k: type(v).__name__ for k, v in sorted(params["layers"][0].items())}
  results["program_memory"] = llm.engine.runner.program_memory()
  print(f"program memory: {results['program_memory']}", flush=True)
  weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  if not cfg.tie_word_embeddings:
    weight_bytes -= params["embed"].nbytes
  results["weight_bytes_read_per_step"] = weight_bytes
  # The pool's own element size: an fp8 KV cache (kv_cache_dtype) reads half the bytes of bfloat16.
  kv_dtype = llm.engine.runner.kv_caches[0].dtype
  results["kv_dtype"] = str(kv_dtype)
  kv_per_token = cfg.kv_bytes_per_token(kv_dtype.itemsize)
  matmul_params = matmul_params_of(cfg)
  if batches:
    # Before the workloads: it fills the KV pool with random values, which no cached prefix may see.
    results["step_sweep"] = step_sweep(llm, batches, contexts, weight_bytes=weight_bytes, kv_per_token=kv_per_token,
                                       matmul_params=matmul_params, ceiling=bw,
                                       iters=FLAGS.step_iters,
                                       save=lambda s: write(dict(results, step_sweep=s)))
    write(results)
  rng = np.random.default_rng(0)
  results["workloads"] = []
  for w in workloads:
    in_lens, out_lens = w["in_lens"], w["out_lens"]
    count = len(in_lens)
    prompts = [rng.integers(10, min(cfg.vocab_size, 4000), size=n).tolist() for n in in_lens]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    timer = StepTimer(llm.engine, block=False)  # not blocking: steps overlap as in production
    preempted, rc = llm.engine.scheduler.num_preemptions, llm.engine.runner.rc
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    preempted = llm.engine.scheduler.num_preemptions - preempted
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_mean, out_mean = sum(in_lens) / count, sum(out_lens) / count
    equal = len(set(in_lens)) == 1 and len(set(out_lens)) == 1
    row = {"label": w["label"], "input_len": in_lens[0] if equal else in_mean,
           "output_len": out_lens[0] if equal else out_mean, "requests": count, "elapsed_s": elapsed,
           "preemptions": preempted, "kv_pool_tokens": (rc.num_pages - 1) * rc.page_size,
           "output_tok_s": out_tokens / elapsed, "total_tok_s": (out_tokens + sum(in_lens)) / elapsed,
           "steps": len(timer.seqs)}
    if "longtail" in w:
      row["longtail"] = w["longtail"]
    # The roofline of the whole workload (see workload_bounds): tokens/s at that bound is what the
    # device allows.
    bounds = workload_bounds(in_lens, out_lens, max_num_seqs=FLAGS.max_num_seqs,
                             max_num_batched_tokens=FLAGS.max_num_batched_tokens, weight_bytes=weight_bytes,
                             kv_per_token=kv_per_token, bandwidth=bw["best_GBps"] * 1e9,
                             matmul_params=matmul_params, flop_rate=bw["matmul_TFLOPs"] * 1e12)
    bound_s, serial_s = bounds["roofline_s"], bounds["serial_s"]
    row.update(roofline_output_tok_s=sum(out_lens) / bound_s, roofline_fraction_workload=bound_s / elapsed,
               serial_output_tok_s=sum(out_lens) / serial_s, serial_fraction=serial_s / elapsed,
               bounds_s=bounds, roofline_decode_steps=decode_steps(out_lens, FLAGS.max_num_seqs))
    full = min(FLAGS.max_num_seqs, count)
    row["breakdown"] = timer.breakdown(full)
    summary = timer.summary(full)
    if summary:
      # The mean context of a decode step over the run: each request's out_i steps at in_i + out_i / 2.
      context = sum(o * (i + o / 2) for i, o in zip(in_lens, out_lens)) / sum(out_lens)
      bandwidth, flop_rate = bw["best_GBps"] * 1e9, bw["matmul_TFLOPs"] * 1e12
      roofline = (weight_bytes + full * context * kv_per_token) / bandwidth
      # Attention's KV reads, then the matmuls at their own bound: a batch of 256 on an 8B model is
      # compute-bound, and its FLOPs cannot hide under the attention that runs before them.
      serial = full * context * kv_per_token / bandwidth + matmul_step_s(
          full, weight_bytes=weight_bytes, bandwidth=bandwidth, matmul_params=matmul_params, flop_rate=flop_rate)
      row.update(decode_batch=full, decode_wall_ms=summary["wall_ms"], host_ms=summary["host_ms"],
                 roofline_step_ms=roofline * 1e3, roofline_fraction=roofline * 1e3 / summary["wall_ms"],
                 serial_step_ms=serial * 1e3, serial_step_fraction=serial * 1e3 / summary["wall_ms"],
                 decode_steps_timed=summary["steps"], wall_per_step_ms=elapsed / len(timer.seqs) * 1e3,
                 decode_mean_context=context)
    results["workloads"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "longtail"}), flush=True)
    write(results)
  if hf:
    results["hf_anchor"] = hf_anchor(llm, hf, cfg.vocab_size)
  if anchor:
    print(json.dumps(results["hf_anchor"]), flush=True)
  write(results)
  print("\n".join(markdown(results)))


if __name__ == "__main__":
  app.run(main)

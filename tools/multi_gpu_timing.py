"""The timing and big parts of tools/bench_multi_gpu.py: the engine's step against the cost model.

`timing` builds the engine's runner for each plan of the timing shape and
times decode and prefill steps; `big` serves a shape that needs several
devices through `LLMEngine` and times its decode steps the same way. Both
make random weights on the devices (`load_format="dummy"`) and compile only
the token buckets they step at.
"""

import dataclasses
import math
import time
import traceback

import numpy as np

from tools.multi_gpu_parts import (PAGE_SIZE, Context, free, generate, layout_name, make_prompts, memory_gib,
                                   only_buckets, sync, weight_bytes_per_device)


def timing(ctx: Context) -> dict:
  """bf16 steps of the full timing shape under tensor 1, 2 (4) and pipeline 2, against the cost model."""
  import jax

  from jserve.config import load_model_config
  s = ctx.settings
  cfg = load_model_config(s.timing_dir)
  g = jax.device_count()
  # Tensor 4 before pipeline 2: on four GPUs it is what a two-GPU run cannot show.
  plans = [(tp, pp) for tp, pp in [(1, 1), (2, 1), (4, 1), (1, 2)] if tp * pp <= g]
  out = {"model": f"{s.timing_name} ({cfg.num_layers} layers), bfloat16, random weights", "name": s.timing_name,
         "context": s.context, "prefill_tokens": s.prefill_tokens, "plans": {}}
  for tp, pp in plans:
    name = layout_name(tp, pp)
    if ctx.left() < 45:
      out["plans"][name] = {"skipped": "out of time"}
      continue
    try:
      out["plans"][name] = time_plan(ctx, cfg, s.timing_dir, tp, pp, prefill=True)
    except Exception:
      out["plans"][name] = {"error": traceback.format_exc()}
    free()
    ctx.save(out)
  out["tp2_vs_tp1_decode_speedup"] = speedup(out["plans"], "tp2", "tp1")
  if "tp4" in out["plans"]:
    out["tp4_vs_tp1_decode_speedup"] = speedup(out["plans"], "tp4", "tp1")
  return out


def speedup(plans: dict, fast: str, base: str) -> dict:
  a, b = plans.get(fast, {}).get("steps", {}), plans.get(base, {}).get("steps", {})
  return {k: b[k]["device_ms"] / a[k]["device_ms"] for k in a if k.startswith("decode") and k in b}


def time_plan(ctx: Context, cfg, model_dir: str, tp: int, pp: int, prefill: bool) -> dict:
  """Builds the engine's runner for one plan (random weights, the buckets it needs) and times its steps."""
  import jax

  from jserve.engine.placement import engine_mesh, load_engine_params
  from jserve.engine.runner import ModelRunner, RunnerConfig
  s = ctx.settings
  t = time.perf_counter()
  mesh = engine_mesh(cfg, tp, None, pp)
  params = sync(load_engine_params(model_dir, cfg, "bfloat16", mesh, "dummy"))
  res = {"tp": tp, "pp": pp, "weights_s": time.perf_counter() - t,
         "weight_GiB_per_device": weight_bytes_per_device(params) / 2**30}
  batch = max(s.decode_batches)
  pages_ctx = -(-s.context // PAGE_SIZE)
  num_pages = 1 + batch * pages_ctx + (-(-s.prefill_tokens // PAGE_SIZE) if prefill else 0)
  budget = s.prefill_tokens if prefill else batch
  rc = RunnerConfig(num_pages=num_pages, page_size=PAGE_SIZE, max_num_seqs=batch, max_num_batched_tokens=budget,
                    max_model_len=max(s.context, s.prefill_tokens if prefill else 0) + PAGE_SIZE, kv_dtype="bfloat16")
  runner = ModelRunner(cfg, params, rc, mesh=mesh)
  runner.buckets = sorted(set(s.decode_batches) | ({s.prefill_tokens} if prefill else set()))
  t = time.perf_counter()
  runner.compile_all()
  res["compile_s"] = time.perf_counter() - t
  res["buckets"] = runner.buckets
  fill_pool(runner)
  res["steps"] = time_runner_steps(ctx, cfg, runner, tp, pp, prefill)
  res["memory_GiB_device0"] = memory_gib(jax.devices()[0])
  del runner, params
  return res


def time_runner_steps(ctx: Context, cfg, runner, tp: int, pp: int, prefill: bool) -> dict:
  """Decode at each batch (context `s.context`) and a prefill step, each beside its estimates."""
  s = ctx.settings
  rng = np.random.default_rng(0)
  steps = {}
  for b in s.decode_batches:
    batch = _decode_batch(runner, b, s.context, rng, first_page=1)  # page 0 is the engine's reserved page
    steps[f"decode_{b}"] = dict(_time_steps(runner, batch, s.timing_iters), batch=b, context=s.context)
    steps[f"decode_{b}"].update(estimates(ctx, cfg, tp, pp, tokens=b, context=s.context))
    steps[f"decode_{b}"]["tokens_per_s"] = b / steps[f"decode_{b}"]["device_ms"] * 1e3
  if prefill:
    first = 1 + max(s.decode_batches) * -(-s.context // PAGE_SIZE)
    batch = _prefill_batch(runner, s.prefill_tokens, rng, first)
    steps["prefill"] = dict(_time_steps(runner, batch, s.prefill_iters), tokens=s.prefill_tokens)
    steps["prefill"].update(estimates(ctx, cfg, tp, pp, tokens=s.prefill_tokens, context=None))
  return steps


def fill_pool(runner):
  """Values in [-1, 1) throughout the KV pool, so that attention never times over zeros; shardings unchanged.

  Each layer's pool is freed before its new values are made, and they are made by one elementwise pass over
  indices (a hash, no random generator's temporaries), so the fill needs no memory beyond the pool itself: the
  engine sizes the pool to fill what the device has left (an 8B w8a8 pool of 1.77 GiB a layer ran an H100 out of
  memory when a layer's old and new values had to coexist)."""
  import jax
  import jax.numpy as jnp

  def values(seed, shape, dtype):
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):  # the flat index, modulo 2^32
      idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
      stride *= shape[d]
    h = (idx + seed) * jnp.uint32(2654435761)
    h = (h ^ (h >> 15)) * jnp.uint32(2246822519)
    h = h ^ (h >> 13)
    return ((h >> 8).astype(jnp.float32) * (2.0 / 2**24) - 1.0).astype(dtype)

  fills = {}
  for i, x in enumerate(runner.kv_caches):
    shape, dtype, sharding = x.shape, x.dtype, x.sharding
    key = (shape, dtype, sharding)
    if key not in fills:
      fills[key] = jax.jit(lambda seed, shape=shape, dtype=dtype: values(seed, shape, dtype), out_shardings=sharding)
    runner.kv_caches[i] = None
    x.delete()
    runner.kv_caches[i] = fills[key](jnp.uint32(i * 0x9E3779B9 % 2**32))
  sync(runner.kv_caches)


def _decode_batch(runner, batch: int, context: int, rng, first_page: int, spare: int = 0):
  """The runner's own batch for `batch` sequences each decoding at position `context - 1`.

  `spare`: positions past the context that each sequence's pages also hold, for a burst of
  1 + spare steps (without them, every sequence's later steps would write the same slots of the
  reserved page 0, and those colliding writes would be timed too).
  """
  from jserve.engine.request import Request, SamplingParams
  greedy = SamplingParams(temperature=0.0, max_tokens=1)
  pages = -(-(context + spare) // PAGE_SIZE)
  requests, tables = [], {}
  for b in range(batch):
    req = Request(f"d{b}", rng.integers(3, 4000, size=context).tolist(), greedy)
    req.num_computed_tokens = context - 1
    tables[req.request_id] = list(range(first_page + b * pages, first_page + (b + 1) * pages))
    requests.append(req)
  return runner.build(requests, [1] * batch, tables)[:3]


def _prefill_batch(runner, tokens: int, rng, first_page: int):
  from jserve.engine.request import Request, SamplingParams
  req = Request("p", rng.integers(3, 4000, size=tokens).tolist(), SamplingParams(temperature=0.0, max_tokens=1))
  table = list(range(first_page, first_page + -(-tokens // PAGE_SIZE)))
  return runner.build([req], [tokens], {"p": table})[:3]


def _time_steps(runner, batch, iters: int) -> dict:
  """Median time of a step: dispatched back to back (the device's time), and waited for one by one."""
  inputs, sampling, tokens = batch
  for _ in range(2):
    sync(runner.execute(inputs, sampling, tokens)[0])
  waited = []
  for _ in range(3):
    t = time.perf_counter()
    sync(runner.execute(inputs, sampling, tokens)[0])
    waited.append(time.perf_counter() - t)
  rounds = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(iters):
      out = runner.execute(inputs, sampling, tokens)[0]
    sync(out)
    rounds.append((time.perf_counter() - t) / iters)
  return {"device_ms": float(np.median(rounds)) * 1e3, "device_ms_spread": [min(rounds) * 1e3, max(rounds) * 1e3],
          "waited_ms": float(np.median(waited)) * 1e3, "iters": iters}


def estimates(ctx: Context, cfg, tp: int, pp: int, *, tokens: int, context: int | None) -> dict:
  """The cost model's step time with nominal H200 numbers and with the ceilings measured in this run.

  Decode: the engine sends the whole batch through the stages one after another (no micro-batches),
  so its step is `pp` times the slowest stage's step over the whole batch; `planner_round_ms` is
  what the planner assumes instead (pp micro-batches in flight). Prefill: one prompt of `tokens`.
  """
  import jax

  from sharding import costs
  g = max(jax.device_count(), 1)
  layout = costs.Layout(1, pp, tp)
  out = {}
  for label, device in _devices(ctx, tp).items():
    if context is None:
      workload = costs.Workload(prompt_len=tokens, max_num_batched_tokens=tokens)
      sec = costs.prefill_seconds(cfg, layout, device, workload, g)
      out[f"{label}_ms"] = sec * 1e3
      continue
    workload = costs.Workload(concurrency=tokens, avg_context=context, max_num_seqs=tokens)
    step = costs.stage_step_cost(cfg, layout, device, workload, tokens=tokens, context_tokens=tokens * context,
                                 attn_flops_per_layer=4 * tokens * context * cfg.num_heads * cfg.head_dim,
                                 devices_per_host=g)
    out[f"{label}_ms"] = pp * step.total_s * 1e3
    out[f"{label}_bound"] = step.bound
    if label == "measured":
      out["roofline_ms"] = pp * step.hbm_s * 1e3  # weights and KV over the measured copy bandwidth
    if label == "nominal" and pp > 1:
      out["planner_round_ms"] = costs.decode_round(cfg, layout, device, workload, tokens, g)[0] * 1e3
  return out


def _devices(ctx: Context, tp: int) -> dict:
  """The H200 preset, and the same with this run's copy bandwidth, all-reduce bus bandwidth and latency."""
  from sharding.costs import DEVICE_PRESETS
  nominal = DEVICE_PRESETS["H200-141GB"]
  out = {"nominal": nominal}
  c = ctx.ceilings or {}
  if "copy_GBps_min" in c:
    fields = {"hbm_gbps": c["copy_GBps_min"]}
    group = c.get("allreduce", {}).get(str(tp))
    if group:
      fields.update(link_gbps=group["busbw_GBps"], collective_latency_us=group["latency_us"])
    out["measured"] = dataclasses.replace(nominal, **fields)
  return out


# --- the big model --------------------------------------------------------------------------------

def big(ctx: Context) -> dict:
  """The big shape on `big_tp` devices: engine start, a few requests end to end, decode steps timed,
  and offline throughput when the time left allows."""
  import jax

  from jserve.config import load_model_config
  from jserve.engine.engine import EngineConfig, LLMEngine
  s = ctx.settings
  cfg = load_model_config(s.big_dir)
  g = jax.device_count()
  tp = s.big_tp or (4 if g >= 4 else 2)
  if tp > g:
    return {"skipped": f"tensor {tp} needs {tp} devices; {g} present"}
  out = {"model": f"{s.big_name} ({cfg.num_layers} layers), bfloat16, random weights made on the devices",
         "name": s.big_name, "tp": tp, "weights_GiB_total": 2 * cfg.param_count() / 2**30,
         "device_limit_GiB": memory_gib(jax.devices()[0]).get("bytes_limit")}
  batch = max(s.decode_batches)
  e2e_in, e2e_out, e2e_n = s.e2e
  off = s.offline or (0, 0, 0)
  max_len = max(s.context, e2e_in + e2e_out, off[0] + off[1]) + PAGE_SIZE
  num_pages = 1 + max(batch * -(-(s.context + 1) // PAGE_SIZE), off[2] * -(-max_len // PAGE_SIZE))
  t = time.perf_counter()
  with only_buckets(s.decode_batches):
    engine = LLMEngine(EngineConfig(
        model=s.big_dir, dtype="bfloat16", load_format="dummy", tensor_parallel_size=tp, max_model_len=max_len,
        max_num_seqs=batch, max_num_batched_tokens=batch, num_pages=num_pages, enable_prefix_caching=False,
        compilation_cache_dir=None))
  out.update(start_s=time.perf_counter() - t, buckets=engine.runner.buckets, num_pages=num_pages,
             weight_GiB_per_device=weight_bytes_per_device(engine.params) / 2**30)
  fill_pool(engine.runner)
  out["memory_GiB_device0"] = memory_gib(jax.devices()[0])
  ctx.save(out)
  out["steps"] = time_runner_steps(ctx, cfg, engine.runner, tp, 1, False)
  ctx.save(out)

  # No StepTimer here: it waits for every step, and the engine overlaps a step with the host's work
  # on the one before; the device time of a step is measured above.
  out["e2e"] = _serve(engine, make_prompts(cfg.vocab_size, lens=[e2e_in] * e2e_n, seed=1), e2e_out)
  ctx.save(out)
  if s.offline:
    out["offline"] = _offline(ctx, engine, cfg, out["steps"])
  return out


def _serve(engine, prompts: list, out_len: int) -> dict:
  """Serves `prompts` to `out_len` tokens each (greedy, ignore_eos): throughput and wall time per step."""
  from jserve.engine.request import SamplingParams
  steps = engine.num_steps
  t = time.perf_counter()
  outs = generate(engine, prompts, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
  elapsed = time.perf_counter() - t
  produced = sum(len(o.outputs[0].token_ids) for o in outs)
  steps = engine.num_steps - steps
  return {"requests": len(prompts), "input_len": len(prompts[0]), "output_len": out_len, "elapsed_s": elapsed,
          "output_tokens": produced, "output_tok_s": produced / elapsed,
          "total_tok_s": (produced + sum(map(len, prompts))) / elapsed, "steps": steps,
          "wall_ms_per_step": elapsed / max(steps, 1) * 1e3, "first_tokens": outs[0].outputs[0].token_ids[:8]}


def _offline(ctx: Context, engine, cfg, steps: dict) -> dict:
  """Offline throughput at in/out/count (as `LLM.generate` runs it), only if it fits in the time left."""
  in_len, out_len, count = ctx.settings.offline
  budget = engine.max_num_batched_tokens
  small = min(ctx.settings.decode_batches)
  step_s = {int(k.split("_")[1]): v["device_ms"] / 1e3 for k, v in steps.items() if k.startswith("decode")}
  # Prefill chunks run in full-budget steps; decodes in the smallest bucket that holds them; 3 ms of host each.
  estimate = (math.ceil(in_len * count / budget) * (step_s[max(step_s)] + 0.003)
              + out_len * (step_s[small if count <= small else max(step_s)] + 0.003))
  res = {"input_len": in_len, "output_len": out_len, "requests": count, "estimated_s": estimate}
  if estimate * 1.3 + 15 > ctx.left():
    res["skipped"] = f"needs about {estimate:.0f} s, {ctx.left():.0f} s left"
    return res
  res.update(_serve(engine, make_prompts(cfg.vocab_size, lens=[in_len] * count, seed=2), out_len))
  return res

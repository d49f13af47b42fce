"""The parts of tools/bench_multi_gpu.py; each runs in its own process and returns a JSON-able dict.

    ceilings     copy bandwidth of every device, all-reduce (psum) time and bus bandwidth per group size
    equality     greedy tokens of tensor / pipeline layouts against one device (float32, random weights)
    distributed  two processes with one device each, joined by jax.distributed (multi_gpu_distributed.py)
    timing       the engine's jit step for decode and prefill under each plan, beside the cost model
    big          a model that needs several devices (the 70B shape), served and timed (both multi_gpu_timing.py)

This module also holds what the parts share: their settings and context.

Every part makes its random weights on the devices (`load_format="dummy"`);
model directories hold only config.json and a tokenizer. A part reports as it
goes (`ctx.save`), so what it finished survives being stopped at its deadline.
"""

import contextlib
import dataclasses
import gc
import os
import time
import traceback
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY_PROMPT_LENS = (5, 17, 40, 63)  # one prompt prefilled in two 32-token chunks and part of a third
PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Shapes and sizes of one run: real ones on GPUs, tiny ones for --smoke on simulated CPU devices."""

  smoke: bool
  timing_name: str  # preset names, for the reports
  big_name: str
  equality_dir: str  # the timing preset's shape with `equality_layers` layers
  timing_dir: str
  big_dir: str
  equality_layers: int
  new_tokens: int = 16
  decode_batches: tuple[int, ...] = (64, 256)
  context: int = 1024
  prefill_tokens: int = 4096
  timing_iters: int = 20
  prefill_iters: int = 5
  e2e: tuple[int, int, int] = (128, 64, 64)  # input, output, requests
  offline: tuple[int, int, int] | None = (1000, 1000, 64)
  copy_bytes: int = 4 << 30
  allreduce_bytes: tuple[int, ...] = (16 << 10, 512 << 10, 2 << 20, 32 << 20, 256 << 20, 1 << 30)
  big_tp: int = 0  # 0: 2 on two devices, 4 on four or more


@dataclasses.dataclass
class Context:
  settings: Settings
  deadline: float  # time.time() by which the part must have returned
  ceilings: dict | None  # the ceilings part's report, when it ran first
  save: Callable[[dict], None]

  def left(self) -> float:
    return self.deadline - time.time()


# --- helpers ---------------------------------------------------------------------------------------

def sync(x):
  import jax
  return jax.block_until_ready(x)


def free():
  import jax
  gc.collect()
  jax.clear_caches()


def make_prompts(vocab: int, lens=GREEDY_PROMPT_LENS, seed: int = 0) -> list[list[int]]:
  """Token ids under the tokenizer's vocabulary (4096 at most), the same in every part."""
  rng = np.random.default_rng(seed)
  return [rng.integers(3, min(vocab, 4000), size=n).tolist() for n in lens]


def generate(engine, prompts, params) -> list:
  ids = [engine.add_request(None, p, params) for p in prompts]
  done = {}
  while engine.has_unfinished():
    done.update((o.request_id, o) for o in engine.step() if o.finished)
  return [done[i] for i in ids]


def weight_bytes_per_device(params) -> int:
  import jax
  leaves = jax.tree_util.tree_leaves(params)
  device = min(leaves[0].devices(), key=lambda d: d.id)
  return sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)


def memory_gib(device) -> dict:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats:
    return {}
  return {k: round(stats[k] / 2**30, 2) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


@contextlib.contextmanager
def only_buckets(sizes):
  """Makes engines built inside compile only the token buckets `sizes`.

  The runner compiles one program per power of two up to the token budget; on
  an 80-layer model each costs tens of seconds, and a benchmark that steps at
  64 and 256 tokens needs two of them. Patched here, in the tool, so that the
  engine keeps a single bucket rule.
  """
  from jserve.engine import runner
  saved = runner.token_buckets
  runner.token_buckets = lambda budget: sorted(sizes)
  try:
    yield
  finally:
    runner.token_buckets = saved


# --- ceilings -------------------------------------------------------------------------------------

def ceilings(ctx: Context) -> dict:
  """Copy bandwidth of every device (bytes read plus written) and all-reduce time per group size."""
  import jax
  s = ctx.settings
  out = {"jax": jax.__version__, "platform": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()]}
  out["jax_copy_GBps"] = [_jax_copy(d, s.copy_bytes) for d in jax.devices()]
  ctx.save(out)
  # After JAX, as tools/bench_e2e.py does (seen working on one H200); JAX here grows its pool on demand.
  out["torch_copy_GBps"] = _torch_copy(s.copy_bytes) if not s.smoke else "skipped (smoke)"
  best = list(out["jax_copy_GBps"])
  if isinstance(out["torch_copy_GBps"], list):
    best = [max(a, b) for a, b in zip(best, out["torch_copy_GBps"])]
  out["copy_GBps"] = best
  out["copy_GBps_min"] = min(best)  # a tensor-parallel step waits for its slowest device
  groups = sorted({g for g in (2, 4, 8, jax.device_count()) if 2 <= g <= jax.device_count()})
  out["allreduce"] = {}
  for g in groups:
    out["allreduce"][str(g)] = _allreduce(jax.devices()[:g], s.allreduce_bytes)
    ctx.save(out)
  return out


def _torch_copy(nbytes: int):
  """PyTorch device-to-device copy on every GPU, GB/s; an error string where torch has no CUDA."""
  try:
    import torch
    result = []
    for i in range(torch.cuda.device_count()):
      a = torch.rand(nbytes // 2, dtype=torch.bfloat16, device=f"cuda:{i}")
      b = torch.empty_like(a)
      b.copy_(a)
      torch.cuda.synchronize(i)
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      for _ in range(10):
        b.copy_(a)
      end.record()
      torch.cuda.synchronize(i)
      result.append(2 * nbytes * 10 / (start.elapsed_time(end) / 1e3) / 1e9)
      del a, b
      torch.cuda.empty_cache()
    return result or "no CUDA device seen by torch"
  except Exception as e:  # torch without CUDA: the JAX figures stand alone
    return f"unavailable: {e}"


def _jax_copy(device, nbytes: int, iters: int = 10) -> float:
  """A donated elementwise pass over `nbytes` of random bf16 on `device`: GB/s counting read plus write."""
  import jax
  import jax.numpy as jnp
  sharding = jax.sharding.SingleDeviceSharding(device)
  # Two axes: 2^31 elements on one axis is past what int32 indexing in the random generator covers.
  shape = (max(nbytes // 2 // _ROW, 1), _ROW)
  x = jax.jit(lambda k: jax.random.uniform(k, shape, jnp.bfloat16, -1, 1), out_shardings=sharding)(
      jax.random.key(1))
  flip = jax.jit(lambda a: a * -1, donate_argnums=0)  # no overflow however many passes
  x = sync(flip(x))
  times = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(iters):
      x = flip(x)
    sync(x)
    times.append((time.perf_counter() - t) / iters)
  return 2 * x.size * 2 / float(np.median(times)) / 1e9


_ROW = 4096  # elements per row of the bandwidth buffers


def _allreduce(devices, sizes) -> dict:
  """psum over `devices` for each per-device size: time, algorithm and bus bandwidth (NCCL's convention:
  bus = algorithm x 2 (g - 1) / g, which a ring moves over each link)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  g = len(devices)
  mesh = Mesh(np.array(devices), ("x",))
  on = NamedSharding(mesh, P("x"))
  # Each device holds one block; the sum comes back on every device (declared split, so no copy).
  reduce = jax.jit(_shard_map(lambda a: jax.lax.psum(a, "x"), mesh, P("x"), P("x")))
  rows = []
  for nbytes in sizes:
    shape = (g * max(nbytes // 2 // _ROW, 1), _ROW)
    x = jax.jit(lambda k, shape=shape: jax.random.uniform(k, shape, jnp.bfloat16, -1, 1), out_shardings=on)(
        jax.random.key(2))
    sync(reduce(x))
    iters = 20 if nbytes < (64 << 20) else 5
    times = []
    for _ in range(3):
      t = time.perf_counter()
      for _ in range(iters):
        y = reduce(x)
      sync(y)
      times.append((time.perf_counter() - t) / iters)
    sec = float(np.median(times))
    rows.append({"bytes": nbytes, "us": sec * 1e6, "algbw_GBps": nbytes / sec / 1e9,
                 "busbw_GBps": nbytes / sec / 1e9 * 2 * (g - 1) / g})
    del x, y
  return {"group": g, "sizes": rows, "latency_us": rows[0]["us"], "busbw_GBps": max(r["busbw_GBps"] for r in rows)}


def _shard_map(fn, mesh, in_specs, out_specs):
  import jax
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map
  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# --- equality -------------------------------------------------------------------------------------

def equality(ctx: Context) -> dict:
  """Greedy tokens of each layout against one device, float32 with true float32 matmuls."""
  import jax

  from jserve.config import load_model_config
  from jserve.engine.engine import EngineConfig, LLMEngine
  from jserve.engine.request import SamplingParams
  s = ctx.settings
  # For this process only (each part has its own): without it the GPU runs float32 matmuls in TF32,
  # whose rounding differs between a whole and a split contraction far more than float32's does.
  jax.config.update("jax_default_matmul_precision", "highest")
  cfg = load_model_config(s.equality_dir)
  g = jax.device_count()
  layouts = [(tp, pp) for tp, pp in [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)] if tp * pp <= g]
  prompts = make_prompts(cfg.vocab_size)
  params = SamplingParams(max_tokens=s.new_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
  out = {"model": f"{cfg.num_layers} layers of the {s.timing_name} shape, float32, random weights",
         "prompt_lens": list(GREEDY_PROMPT_LENS), "new_tokens": s.new_tokens, "runs": {}}
  for tp, pp in layouts:
    name = layout_name(tp, pp)
    if ctx.left() < 20:
      out["runs"][name] = {"skipped": "out of time"}
      continue
    t = time.perf_counter()
    try:
      engine = LLMEngine(EngineConfig(
          model=s.equality_dir, dtype="float32", load_format="dummy", tensor_parallel_size=tp,
          pipeline_parallel_size=pp, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_pages=48,
          enable_prefix_caching=False, compilation_cache_dir=None))
      start_s = time.perf_counter() - t
      outs = generate(engine, prompts, params)
      run = {"tokens": [o.outputs[0].token_ids for o in outs], "start_s": start_s,
             "total_s": time.perf_counter() - t}
      run["logprobs"], run["margins"] = _logprobs_and_margins(outs)
      del engine
    except Exception:
      run = {"error": traceback.format_exc()}
    out["runs"][name] = run
    free()
    ctx.save(out)
  ref = out["runs"].get("tp1", {})
  for name, run in out["runs"].items():
    if name != "tp1" and "tokens" in run and "tokens" in ref:
      run.update(compare_tokens(run, ref))
  checked = [r for name, r in out["runs"].items() if name != "tp1"]
  out["all_equal"] = bool(checked) and all(r.get("equal") for r in checked)
  return out


def layout_name(tp: int, pp: int) -> str:
  return {(1, 1): "tp1"}.get((tp, pp), "x".join(([f"pp{pp}"] if pp > 1 else []) + ([f"tp{tp}"] if tp > 1 else [])))


def _logprobs_and_margins(outs):
  """Per prompt and token: the chosen token's logprob, and its lead over the runner-up (a near tie
  is where a different rounding may pick another token)."""
  lps, margins = [], []
  for o in outs:
    c = o.outputs[0]
    lps.append([d[t] for t, d in zip(c.token_ids, c.logprobs)])
    margins.append([float(np.subtract(*sorted(d.values(), reverse=True)[:2])) if len(d) > 1 else None
                    for d in c.logprobs])
  return lps, margins


def compare_tokens(run: dict, ref: dict) -> dict:
  """Equal or not; else where the first difference is and how close the reference's top two were there."""
  out = {"equal": run["tokens"] == ref["tokens"]}
  diffs = []
  for i, (a, b) in enumerate(zip(run["tokens"], ref["tokens"])):
    same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if same is not None:
      margin = ref.get("margins", [[None] * len(b)] * len(ref["tokens"]))[i][same]
      diffs.append({"prompt": i, "position": same, "reference_top2_margin": margin})
  if diffs:
    out["first_differences"] = diffs
  if "logprobs" in run and "logprobs" in ref:
    out["max_logprob_diff"] = max(
        (abs(x - y) for a, b, ta, tb in zip(run["logprobs"], ref["logprobs"], run["tokens"], ref["tokens"])
         for x, y, u, v in zip(a, b, ta, tb) if u == v), default=None)
  return out

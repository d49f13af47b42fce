"""Benchmarks decode-shaped matmuls on a GPU: XLA's dot, the Pallas decode kernel over a tile sweep, torch.matmul.

Run on the GPU machine from the source tree:

    PYTHONPATH=. python tools/bench_matmul.py --out_dir=/tmp/bench_matmul

and on a CPU, as a smoke run of this script (the kernel in interpret mode, tiny shapes):

    PYTHONPATH=. python tools/bench_matmul.py --smoke --out_dir=/tmp/bench_matmul

For each weight shape of Llama-3.1-8B and Llama-3.2-1B (QKV, O, gate_up, down,
LM head; the 1B LM head is its tied [V, D] embedding, multiplied transposed)
and the fused gate/up kernel against two dots and a silu, and for each row
count M in --ms, it times in one process:

- XLA: `jnp.dot` with float32 accumulation, cast to bfloat16 (the model's
  projection, cuBLAS or XLA's own GEMM, whichever XLA picks);
- the Pallas kernel (`pallas_kernels/decode_matmul/gpu.py`) with every
  candidate of `tuning.GPU_SWEEP` for the M bucket, then the best at half and
  twice its split count (M = 1 takes the M = 16 winner); each candidate is
  first checked against an exact float32 product on the GPU;
- torch.matmul (cuBLAS), replayed from a CUDA graph (tools/torch_matmul.py).

With --weights=fp8 (or bf16,fp8) the same projections (not the LM heads, which
jserve does not quantize) also run with fp8 weights and a float32 scale per
column, as `quantization="fp8"` stores them: XLA is then the model's own
`quant.fp8_dot` (the weight converted to bfloat16 inside the einsum), the
Pallas kernel converts the fp8 tiles in registers (its candidates come from
`tuning.GPU_SWEEP_FP8`), the Hopper kernel takes no fp8 weight, and the
PyTorch anchor is the weight converted by `.to(torch.bfloat16)`, then
cuBLAS, then the scale. With --weights=w8a8 they run as
`activation_quantization="fp8"` multiplies them: the fp8 weight stored
[N, K] (gate and up stacked, [2, N, K], as `quant.stack_pairs` stores them),
each row of x quantized to fp8 with a scale of its own, fp8 by fp8 on the
tensor cores (XLA: the model's own `quant.fp8_dot_a8`; Pallas: the w8a8
kernels `gpu.matmul_a8_nt` and `gpu.gate_up_silu_a8`, x quantized by
`quant.quantize_rows` inside the timed call, their candidates from
`tuning.GPU_SWEEP_A8`, their winners printed as `GPU_TABLE_A8` and
`GPU_TABLE_GATE_UP_A8`; the anchor: `torch._scaled_mm` with the same row and
column scales). Their products are checked against the exact one with a
tolerance for the activations' e4m3 rounding (`matmul_cases.A8_TOL`). Their
TB/s count one byte per weight element (the scales, under 0.2%, are left
out), so they read directly against the copy ceiling; the "fp8 speed-up"
column divides the same shape's bfloat16 time by the fp8 one, for the
Pallas kernel and for XLA, when both ran.

Every timed call multiplies by several distinct copies of the weights (at
least --min_bytes in all, so nothing is served from the 50 MB L2), all in
one jit call or graph replay so dispatch is amortized; the bandwidth figure
is weight bytes per second. Kernels of one shape compile in parallel
threads. Sweeping stops after --budget_s seconds (the rest times the
current tuned config only) to keep the run under 4 minutes on one H200.

The shapes, their operands and the XLA products under test are in tools/matmul_cases.py.

Output: OUT_DIR/matmul.json (everything), OUT_DIR/matmul.md (the table, with
device, JAX version and date, and the tuning table to paste into
pallas_kernels/decode_matmul/tuning.py); the short table is printed last.
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--smoke" in sys.argv[1:]:  # the Mosaic GPU interpreter wants several CPU devices (see bench_prefill)
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tools.ceilings import copy_ceilings  # noqa: E402
from tools.matmul_cases import (A8_TOL, a8_pair, compiler_options, dequantized, entry, entry_a8,  # noqa: E402
                                entry_ops, exact, fp8_pair, kernel_mix, kn_pairs, make_weights, make_x, over_copies,
                                rel_err, shapes_to_run, stacked, xla_fn, xla_weight_only_fn)
from tools.matmul_report import markdown, table_lines, tuning_tables  # noqa: E402
from tools.torch_matmul import torch_time  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels.decode_matmul import gpu, hopper, tuning  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_matmul", "where matmul.md and matmul.json go")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes, kernel in interpret mode: a CPU run of this script")
_MS = flags.DEFINE_list("ms", ["1", "16", "64", "128", "256"], "row counts M")
_MODELS = flags.DEFINE_list("models", ["8b", "1b"], "weight shapes of which models (8b, 8b-split, 1b)")
_SHAPES = flags.DEFINE_list("shapes", None, "only these shapes of the models, by the name after the model's "
                            "(gate_up, down, qkv, o, lm_head, gate_up fused; 8b-split: gate, k or v, q, k and v)")
_WEIGHTS = flags.DEFINE_list("weights", ["bf16"], "weight dtypes: bf16, fp8 (float8 e4m3 with a scale per column), "
                              "w8a8 (the same, stored [N, K], activations quantized per row)")
_BUDGET_S = flags.DEFINE_float("budget_s", 170.0, "seconds after which shapes are no longer swept")
_SWEEP = flags.DEFINE_bool("sweep", True, "sweep the Triton kernel's tiles; --nosweep times its tuned config, XLA, "
                           "cuBLAS and the Hopper kernel's variants on every shape")
_KERNELS = flags.DEFINE_bool("kernels", True, "time the Pallas kernels; --nokernels times XLA and torch only (and "
                              "skips the kernels' edge checks)")
_CHECKS_ONLY = flags.DEFINE_bool("checks_only", False, "run the correctness checks only; exit 1 if one fails (a "
                                  "hanging kernel then costs a short `timeout` before the timings, not the whole run)")
_MIN_BYTES = flags.DEFINE_integer("min_bytes", 1 << 30, "weight bytes per timed call (distinct copies)")
_THREADS = flags.DEFINE_integer("compile_threads", 12, "parallel compiles")

_T0 = time.perf_counter()
_LOG = []


def log(msg):
  msg = f"[{time.perf_counter() - _T0:6.1f}s] {msg}"
  print(msg, flush=True)
  _LOG.append(msg)


def elapsed():
  return time.perf_counter() - _T0


# ---------------------------------------------------------------- the functions timed

def kernel_fn(shape, cfg, interpret):
  """The Pallas kernel over the weight copies; w8a8 compiles with the options of XLA's w8a8 product."""
  if shape.a8:
    return over_copies(entry_a8(gpu, shape.kind, config=cfg, interpret=interpret), compiler_options(shape))
  return over_copies(entry(gpu, shape.kind, shape.fp8, config=cfg, interpret=interpret))


# The Hopper (Mosaic GPU) kernel's candidates, timed beside the Triton sweep at every M.
HOPPER_VARIANTS = {"hopper n128": hopper.HopperMatmulBlocks(), "hopper n256": hopper.HopperMatmulBlocks(block_n=256),
                   "hopper n64": hopper.HopperMatmulBlocks(block_n=64)}


def hopper_fn(shape, blocks, interpret):
  return over_copies(entry(hopper, shape.kind, blocks=blocks, interpret=interpret))


def hopper_jobs(shape, ms, xs, ws, interpret):
  """{(label, m): (jitted, args)} for the variants hopper.supports takes at this shape."""
  if hopper.plgpu is None or shape.fp8:  # it takes no fp8 weights (hopper.supports says why)
    return {}
  jobs = {}
  w0 = ws[0][0] if shape.kind == "gate_up" else ws[0]
  for m in ms:
    for label, blocks in HOPPER_VARIANTS.items():
      if hopper.supports(xs[m], w0, blocks, shape.num_weights, transposed=shape.kind == "nk") is None:
        jobs[(label, m)] = (hopper_fn(shape, blocks, interpret), (xs[m], ws))
  return jobs


_HOST_BOUND = []  # (time per call, host time to issue it) of calls whose issue took most of their time


def time_fn(fn, *args, reps, rounds):
  """Median over rounds of the mean time of `reps` back-to-back calls, in seconds.

  Calls are issued asynchronously, so this is the device's time as long as
  issuing a call takes less; calls where it took over half are logged.
  """
  jax.block_until_ready(fn(*args))
  times, issue = [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    issue.append((time.perf_counter() - t0) / reps)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  t, t_issue = float(np.median(times)), float(np.median(issue))
  if t_issue > 0.5 * t:
    _HOST_BOUND.append((t, t_issue))
  return t


def compile_all(jobs, serial=()):
  """Compiles {label: (jitted fn, args)}: {label: compiled, or the exception}.

  Pallas kernels compile in parallel threads (Triton compiles on the CPU).
  The labels in `serial` (XLA's dots) compile one after another in a thread of
  their own: XLA autotunes its GEMMs by timing them on the GPU, and two
  autotuners at once would time each other's kernels.
  """
  lowered = {}
  for label, (fn, args) in jobs.items():
    try:
      lowered[label] = fn.lower(*args)
    except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the run
      lowered[label] = e

  def comp(label):
    low = lowered[label]
    if isinstance(low, Exception):
      return label, low
    try:
      return label, low.compile()
    except Exception as e:  # noqa: BLE001
      return label, e

  serial_labels = [lb for lb in lowered if lb in serial]
  with concurrent.futures.ThreadPoolExecutor(max(1, _THREADS.value)) as pool:
    serial_future = pool.submit(lambda: [comp(lb) for lb in serial_labels])
    out = dict(pool.map(comp, [lb for lb in lowered if lb not in serial]))
    out.update(serial_future.result())
  return out


# ---------------------------------------------------------------- one shape

def candidates(shape, m, best_plain=None):
  """The current config of the shape first, then the bucket's sweep (or the plain gate_up's best for fused)."""
  bucket = min(tuning.m_bucket(m), tuning.MAX_M)
  gate_up = shape.kind == "gate_up"
  out = {}
  cur = tuning.gpu_config(m, shape.k, shape.n, gate_up=gate_up, itemsize=shape.itemsize, w_itemsize=shape.w_itemsize,
                          a8=shape.a8)
  out[cur.short()] = cur
  sweep = tuning.GPU_SWEEP_A8 if shape.a8 else tuning.GPU_SWEEP_FP8 if shape.fp8 else tuning.GPU_SWEEP
  pool = best_plain if (gate_up and best_plain) else sweep[bucket]
  if _SMOKE.value:
    pool = pool[:2]
  for c in pool:
    c = tuning.fit(dataclasses.replace(c, num_splits=None), m, shape.k, shape.n, itemsize=shape.itemsize,
                   num_weights=shape.num_weights, w_itemsize=shape.w_itemsize)
    out.setdefault(c.short(), c)
  return out


def split_variants(cfg, m, shape, tried):
  out = {}
  for z in (cfg.num_splits // 2, cfg.num_splits * 2):
    if z < 1 or z > tuning.MAX_SPLITS or shape.k % (z * cfg.block_k) or shape.k // (z * cfg.block_k) < 2:
      continue
    c = dataclasses.replace(cfg, num_splits=z)
    if c.short() not in tried:
      out[c.short()] = c
  return out


def time_kernels(compiled, cfgs, x, ws, ref, reps, rounds, tol=1e-2):
  """Checks (relative error against `ref` at most `tol`) and times each compiled config; rows sorted fastest
  first."""
  rows = []
  for label, cfg in cfgs.items():
    fn = compiled[label]
    row = dict(config=label, cfg=dataclasses.asdict(cfg))
    if isinstance(fn, Exception):
      row["error"] = repr(fn)[:300]
    else:
      try:
        out = fn(x, ws)
        row["err"] = float(rel_err(out[0], ref))
        row["ok"] = bool(row["err"] <= tol)
        if row["ok"]:
          row["s"] = time_fn(fn, x, ws, reps=reps, rounds=rounds) / len(ws)
      except Exception as e:  # noqa: BLE001
        row["error"] = repr(e)[:300]
    rows.append(row)
  return sorted(rows, key=lambda r: r.get("s", float("inf")))


def bench_shape(shape, ms, best_plain_by_m, interpret, sweep):
  """All row counts of one weight shape: returns result rows."""
  copies = 2 if _SMOKE.value else int(min(128, max(1, -(-_MIN_BYTES.value // shape.weight_bytes))))
  reps, rounds = (1, 1) if _SMOKE.value else (5, 5)
  ws = make_weights(shape, copies, seed=zlib.crc32(shape.name.encode()))
  xs = {m: make_x(m, shape.k, seed=m) for m in ms}
  w0 = dequantized(kn_pairs(ws[0]) if shape.a8 else ws[0]) if shape.fp8 else ws[0]
  refs = {m: exact(xs[m], w0, shape.kind) for m in ms}
  gate_up = shape.kind == "gate_up"
  tol = A8_TOL if shape.a8 else 1e-2

  # Round 1: XLA at every M and the kernel candidates of every swept M, compiled together.
  # M = 1 takes the M = 16 winner, in round 2. The kernel takes no prompt-sized rows.
  kernel_ms = [m for m in ms if m <= tuning.MAX_M] if _KERNELS.value else []
  sweep_ms = [m for m in kernel_ms if m != 1 or 16 not in kernel_ms]
  cfgs = {}
  for m in sweep_ms:
    if sweep:
      cfgs[m] = candidates(shape, m, best_plain_by_m.get(m) if gate_up else None)
    else:
      c = tuning.gpu_config(m, shape.k, shape.n, gate_up=gate_up, itemsize=shape.itemsize,
                            w_itemsize=shape.w_itemsize, a8=shape.a8)
      cfgs[m] = {c.short(): c}
  xla_kinds = {"xla": xla_fn(shape)}
  if shape.a8:  # the same [N, K] store multiplied weight-only: the alternative for decode-sized rows
    xla_kinds["xla_wo"] = xla_weight_only_fn(shape)
  jobs = {(k, m): (fn, (xs[m], ws)) for k, fn in xla_kinds.items() for m in ms}
  jobs.update({(m, label): (kernel_fn(shape, c, interpret), (xs[m], ws)) for m in sweep_ms
               for label, c in cfgs[m].items()})
  h_jobs = hopper_jobs(shape, kernel_ms, xs, ws, interpret)
  jobs.update(h_jobs)
  t0 = time.perf_counter()
  compiled = compile_all(jobs, serial=[(k, m) for k in xla_kinds for m in ms])
  log(f"  compiled {len(jobs)} in {time.perf_counter() - t0:.1f} s")

  xla_rows = {m: {} for m in ms}
  for k in xla_kinds:
    for m in ms:
      fn = compiled[(k, m)]
      try:
        if isinstance(fn, Exception):
          raise fn
        err = float(rel_err(fn(xs[m], ws)[0], refs[m]))
        hlo = fn.as_text()
        xla_rows[m].update({f"{k}_s": time_fn(fn, xs[m], ws, reps=reps, rounds=rounds) / copies, f"{k}_err": err,
                            f"{k}_kernels": kernel_mix(hlo, copies), f"{k}_entry": entry_ops(hlo)})
      except Exception as e:  # noqa: BLE001
        xla_rows[m][f"{k}_error"] = repr(e)[:300]
  per_m = {m: time_kernels({lb: compiled[(m, lb)] for lb in cfgs[m]}, cfgs[m], xs[m], ws, refs[m], reps, rounds,
                           tol) for m in sweep_ms}
  hopper_rows = {}
  for m in ms:
    variants = {lb: HOPPER_VARIANTS[lb] for lb, mm in h_jobs if mm == m}
    hopper_rows[m] = time_kernels({lb: compiled[(lb, m)] for lb in variants}, variants, xs[m], ws, refs[m], reps,
                                  rounds)

  # Round 2: each swept M's best at half and twice its splits; M = 1 with the M = 16 winner.
  more = {}
  for m in sweep_ms:
    if sweep and per_m[m] and "s" in per_m[m][0]:
      more[m] = split_variants(tuning.GpuConfig(**per_m[m][0]["cfg"]), m, shape, {r["config"] for r in per_m[m]})
  if 1 in kernel_ms and 1 not in per_m:
    more[1] = {}
    src = per_m.get(16, [])
    if src and "s" in src[0]:
      c = tuning.fit(tuning.GpuConfig(**src[0]["cfg"]), 1, shape.k, shape.n, itemsize=shape.itemsize,
                     num_weights=shape.num_weights, w_itemsize=shape.w_itemsize)
      more[1][c.short()] = c
    cur = tuning.gpu_config(1, shape.k, shape.n, gate_up=gate_up, itemsize=shape.itemsize, w_itemsize=shape.w_itemsize,
                            a8=shape.a8)
    more[1].setdefault(cur.short(), cur)
  jobs = {(m, lb): (kernel_fn(shape, c, interpret), (xs[m], ws)) for m, cs in more.items() for lb, c in cs.items()}
  compiled = compile_all(jobs) if jobs else {}
  for m, cs in more.items():
    rows = time_kernels({lb: compiled[(m, lb)] for lb in cs}, cs, xs[m], ws, refs[m], reps, rounds, tol)
    per_m[m] = sorted(per_m.get(m, []) + rows, key=lambda r: r.get("s", float("inf")))

  results = []
  for m in ms:
    row = dict(shape=shape.name, kind=shape.kind, fp8=shape.fp8, a8=shape.a8, bf16_shape=shape.bf16_name, m=m,
               k=shape.k, n=shape.n, copies=copies, weight_bytes=shape.weight_bytes, **xla_rows.get(m, {}))
    try:
      t, how = torch_time(shape, xs[m], ws, reps, rounds)
      row.update(torch_s=t / copies, torch_how=how)
    except Exception as e:  # noqa: BLE001
      row["torch_error"] = repr(e)[:300]
    sweep_rows = per_m.get(m, [])
    row["sweep"] = sweep_rows
    row["hopper"] = hopper_rows[m]
    if row["hopper"] and "s" in row["hopper"][0]:
      row.update(hopper_s=row["hopper"][0]["s"], hopper_config=row["hopper"][0]["config"])
    if sweep_rows and "s" in sweep_rows[0]:
      row.update(pallas_s=sweep_rows[0]["s"], pallas_config=sweep_rows[0]["config"],
                 pallas_cfg=sweep_rows[0]["cfg"], pallas_err=sweep_rows[0]["err"])
    for k in ("xla", "xla_wo", "torch", "pallas", "hopper"):
      if f"{k}_s" in row:
        row[f"{k}_TBps"] = shape.weight_bytes / row[f"{k}_s"] / 1e12
    results.append(row)
    log(f"  {shape.name} M={m}: " + ", ".join(
        f"{k} {row[f'{k}_s'] * 1e6:.1f} us ({row[f'{k}_TBps']:.2f} TB/s)" for k in ("xla", "xla_wo", "torch", "pallas")
        if f"{k}_s" in row) + f" [{row.get('pallas_config', 'no kernel result')}]"
        + (f", hopper {row['hopper_s'] * 1e6:.1f} us ({row['hopper_TBps']:.2f} TB/s) [{row['hopper_config']}]"
           if "hopper_s" in row else "")
        + "".join(f"; {k}: {row[f'{k}_kernels']}" for k in xla_kinds if f"{k}_kernels" in row))
  del ws
  return results


# ---------------------------------------------------------------- checks and output

def check_edges(interpret):
  """Masked rows and columns, split-K, float32, fp8 weights, w8a8 and all five entry points, compiled for this
  device."""
  small = tuning.GpuConfig(block_m=16, block_n=32, block_k=32, num_splits=1, num_warps=4, num_stages=2)
  triton = lambda kind, cfg, fp8=False: entry(gpu, kind, fp8, config=cfg, interpret=interpret)
  a8 = lambda kind, cfg: entry_a8(gpu, kind, config=cfg, interpret=interpret)
  # (label, kind, dtype, M, K, N, seed, entry point); "fp8" in the label: fp8 weights with their scales;
  # "w8a8": [N, K] fp8 weights with theirs (gate and up stacked), x quantized per row by the entry point
  cases = [("kn f32 M=5 N=200", "kn", jnp.float32, 5, 128, 200, 5, triton("kn", small)),
           ("kn bf16 M=1 N=200 z2", "kn", jnp.bfloat16, 1, 256, 200, 1,
            triton("kn", dataclasses.replace(small, num_splits=2))),
           ("nk bf16 M=7 N=200", "nk", jnp.bfloat16, 7, 128, 200, 7, triton("nk", small)),
           ("gate_up bf16 M=9 z2", "gate_up", jnp.bfloat16, 9, 128, 80, 9,
            triton("gate_up", dataclasses.replace(small, num_splits=2))),
           ("kn bf16 M=256 default", "kn", jnp.bfloat16, 256, 512, 384, 256, triton("kn", None)),
           ("kn fp8 M=5 N=200", "kn", jnp.bfloat16, 5, 128, 200, 15, triton("kn", small, True)),
           ("kn fp8 M=1 N=200 z2", "kn", jnp.bfloat16, 1, 256, 200, 11,
            triton("kn", dataclasses.replace(small, num_splits=2), True)),
           ("gate_up fp8 M=9 z2", "gate_up", jnp.bfloat16, 9, 128, 80, 19,
            triton("gate_up", dataclasses.replace(small, num_splits=2), True)),
           ("kn fp8 M=16 default", "kn", jnp.bfloat16, 16, 1024, 384, 16, triton("kn", None, True)),
           ("kn fp8 M=256 default", "kn", jnp.bfloat16, 256, 512, 384, 257, triton("kn", None, True)),
           ("gate_up fp8 M=64 default", "gate_up", jnp.bfloat16, 64, 512, 256, 65, triton("gate_up", None, True)),
           ("kn w8a8 M=5 N=200", "kn", jnp.bfloat16, 5, 128, 200, 25, a8("kn", small)),
           ("kn w8a8 M=1 N=200 z2", "kn", jnp.bfloat16, 1, 256, 200, 21,
            a8("kn", dataclasses.replace(small, num_splits=2))),
           ("gate_up w8a8 M=9 N=80", "gate_up", jnp.bfloat16, 9, 128, 80, 29, a8("gate_up", small)),
           ("gate_up w8a8 M=9 N=80 z2", "gate_up", jnp.bfloat16, 9, 128, 80, 39,
            a8("gate_up", dataclasses.replace(small, num_splits=2))),
           ("kn w8a8 M=256 default", "kn", jnp.bfloat16, 256, 512, 384, 259, a8("kn", None)),
           ("gate_up w8a8 M=64 default", "gate_up", jnp.bfloat16, 64, 512, 256, 69, a8("gate_up", None))]
  if hopper.plgpu is not None:  # the Hopper kernel: one and several row tiles, split-K, gate/up, w[N, K]
    B = hopper.HopperMatmulBlocks
    h = lambda kind, blocks: entry(hopper, kind, blocks=blocks, interpret=interpret)
    cases += [("hopper kn M=5 z1", "kn", jnp.bfloat16, 5, 512, 256, 6, h("kn", B(num_splits=1))),
              ("hopper kn M=200 z2", "kn", jnp.bfloat16, 200, 512, 256, 201,
               h("kn", B(block_n=64, num_splits=2, num_stages=3))),
              ("hopper gate_up M=9 n64", "gate_up", jnp.bfloat16, 9, 512, 128, 10, h("gate_up", B(block_n=64))),
              ("hopper nk M=7 z2", "nk", jnp.bfloat16, 7, 512, 256, 8, h("nk", B(num_splits=2)))]
  jobs, refs = {}, {}
  for label, kind, dtype, m, k, n, seed, fn in cases:
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w, w2 = ((jax.random.normal(kk, (k, n), jnp.float32) * k**-0.5).astype(dtype) for kk in keys[1:])
    if "w8a8" in label:
      w, w2 = a8_pair(w), a8_pair(w2)
      w = stacked(w, w2) if kind == "gate_up" else w
      ref_w = dequantized(kn_pairs(w))
    else:
      if "fp8" in label:
        w, w2 = fp8_pair(w), fp8_pair(w2)
      w = {"kn": w, "nk": w.T if kind == "nk" else None, "gate_up": (w, w2)}[kind]
      ref_w = dequantized(w) if "fp8" in label else w
    jobs[label] = (jax.jit(fn), (x, w))
    refs[label] = exact(x, ref_w, kind)
  compiled = compile_all(jobs)
  rows = []
  for label, kind, dtype, *_ in cases:
    try:
      fn = compiled[label]
      if isinstance(fn, Exception):
        raise fn
      err = float(rel_err(fn(*jobs[label][1]), refs[label]))
      tol = 1e-5 if dtype == jnp.float32 else A8_TOL if "w8a8" in label else 1e-2
      rows.append(dict(case=label, err=err, tol=tol, ok=bool(err <= tol)))
    except Exception:  # noqa: BLE001
      rows.append(dict(case=label, ok=False, error=traceback.format_exc(limit=3)))
    log(f"  check {label}: err={rows[-1].get('err')} ok={rows[-1]['ok']}")
  return rows


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  interpret = _SMOKE.value or jax.default_backend() != "gpu"
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, date=datetime.date.today().isoformat(),
              backend=jax.default_backend(), interpret=interpret)
  try:
    import torch
    meta["torch"] = torch.__version__
  except ImportError:
    pass
  log(f"{meta}")
  res = dict(meta=meta, ceiling={}, checks=[], rows=[])

  def save():
    with open(os.path.join(_OUT_DIR.value, "matmul.json"), "w") as f:
      json.dump(dict(res, log=_LOG), f, indent=1, default=str)
    with open(os.path.join(_OUT_DIR.value, "matmul.md"), "w") as f:
      f.write(markdown(**res))

  if not interpret:
    res["ceiling"] = copy_ceilings(2 << 30)
    log(f"ceiling {res['ceiling']}")
  res["checks"] = check_edges(interpret) if _KERNELS.value or _CHECKS_ONLY.value else []
  save()
  if _CHECKS_ONLY.value:
    failed = [c["case"] for c in res["checks"] if not c["ok"]]
    log(f"checks: {len(res['checks']) - len(failed)} of {len(res['checks'])} passed" +
        (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)
  ms = [int(m) for m in _MS.value]
  shapes = shapes_to_run(_SMOKE.value, _MODELS.value, _WEIGHTS.value, _SHAPES.value)
  # per (model prefix, fp8, w8a8) and M: the plain gate_up shape's fastest configs, tried on the fused one
  best_plain = {}
  for shape in shapes:
    sweep = _SWEEP.value and elapsed() < _BUDGET_S.value
    if _SWEEP.value and elapsed() > _BUDGET_S.value + 30:
      log(f"skipping {shape.name}: past the time budget")
      continue
    log(f"{shape.name}: K={shape.k} N={shape.n} {shape.kind} {'sweep' if sweep else 'current config only'}")
    prefix = (shape.name.split()[0], shape.fp8, shape.a8)
    try:
      rows = bench_shape(shape, ms, best_plain.get(prefix, {}), interpret, sweep)
    except Exception:  # noqa: BLE001
      log(traceback.format_exc(limit=4))
      continue
    if shape.name.endswith("gate_up"):
      best_plain[prefix] = {r["m"]: tuple(tuning.GpuConfig(**s["cfg"]) for s in r["sweep"][:3] if "s" in s)
                            for r in rows}
    res["rows"] += rows
    save()
  if _HOST_BOUND and not interpret:
    log(f"WARNING: {len(_HOST_BOUND)} timings were host-bound (issue over half the call time), e.g. "
        f"{_HOST_BOUND[0][1] * 1e6:.0f} of {_HOST_BOUND[0][0] * 1e6:.0f} us: raise --min_bytes")
  res["host_bound"] = _HOST_BOUND
  save()
  print(tuning_tables(res["rows"]))
  print()
  print("\n".join(table_lines(res["rows"], res["ceiling"].get("ceiling_TBps", 0.0))))
  log(f"done; results in {_OUT_DIR.value}/matmul.md and matmul.json")


if __name__ == "__main__":
  app.run(main)

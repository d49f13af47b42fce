"""Compiles jserve's Pallas Triton kernels to Hopper machine code on any machine, and counts instructions.

    pip install triton   # its wheel carries the compiler, ptxas and nvdisasm; no GPU needed
    PYTHONPATH=. python -m tools.kernel_sass --out_dir=/tmp/sass [--cases=matmul,attention] [--cc=90]

Each case lowers a kernel for CUDA on this machine (the Pallas Triton lowering runs in Python), catches
the Triton IR it hands to XLA, compiles that with the `triton` package for the given compute capability
(9.0: H100 and H200) and disassembles the cubin. The report counts, per kernel, its instructions in
all and in each loop body (a loop: the code between a backward branch and its target), by opcode,
and for the streaming loop of each case the warp instructions it issues per byte it brings in.

Why: a decode kernel that must stream at the copy bandwidth is also bound by instruction issue. An
H200 SM receives about 18 bytes per clock at 4.8 TB/s and issues at most 4 warp instructions per
clock, so a loop that issues more than about 0.22 warp instructions per byte cannot keep up with
memory whatever its tiles, and one near that needs every issue slot (the report's "issue share").
This tool tells that from the machine code, without a GPU: it found the fp8 paths of the decode
matmul and of the decode attention needing about 80% of the issue slots, against 14% and 22% for
bfloat16 (docs/kernels.md). Timing still needs the GPU (tools/bench_matmul.py, tools/sweep_decode.py).
The Triton release that compiles here need not be the one inside the GPU's jaxlib: the counts are
what that release makes of the same IR.

Writes <out_dir>/<case>.ttir, .ptx and .sass per kernel, kernel_sass.json and kernel_sass.md; prints the table.
"""

import collections
import dataclasses
import datetime
import functools
import json
import os
import re
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
  """Defined only when run as a script: tests import this module beside benchmarks with an --out_dir."""
  flags.DEFINE_string("out_dir", "/tmp/kernel_sass", "where the IR, machine code and report go")
  flags.DEFINE_list("cases", ["matmul", "attention"], "case groups: matmul, attention, attention_tiles")
  flags.DEFINE_integer("cc", 90, "compute capability to compile for (90: Hopper)")


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L\w+):")
_BRANCH_TARGET = re.compile(r"`\((\.L\w+)\)")


@dataclasses.dataclass
class Instr:
  addr: int
  opcode: str  # without modifiers: LDGSTS, HMMA, F2FP, ...
  text: str


def parse_sass(sass: str) -> tuple[list[Instr], dict[str, int]]:
  """nvdisasm's listing as instructions in address order, and each label's address."""
  instrs, labels, pending = [], {}, []
  for line in sass.splitlines():
    label = _LABEL.match(line.strip())
    if label:
      pending.append(label.group(1))
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    addr = int(m.group(1), 16)
    for name in pending:
      labels[name] = addr
    pending = []
    instrs.append(Instr(addr, m.group(3), line.strip()))
  return instrs, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
  """(first, last) instruction indices of each loop body: a branch back to a label at or before it."""
  index_of = {ins.addr: i for i, ins in enumerate(instrs)}
  out = []
  for i, ins in enumerate(instrs):
    if ins.opcode != "BRA":
      continue
    target = _BRANCH_TARGET.search(ins.text)
    if target and target.group(1) in labels and labels[target.group(1)] <= ins.addr:
      out.append((index_of[labels[target.group(1)]], i))
  return sorted(out)


def mix(instrs: list[Instr]) -> collections.Counter:
  return collections.Counter(ins.opcode for ins in instrs)


# Hopper's issue budget against its memory: an SM issues at most 4 warp instructions per clock, and
# receives bandwidth / (SMs x clock) bytes per clock. H200: 4.8 TB/s over 132 SMs at 1.98 GHz.
H200_BYTES_PER_SM_CLOCK = 4.8e12 / (132 * 1.98e9)
ISSUE_PER_SM_CLOCK = 4


def issue_share(warp_instructions_per_byte: float) -> float:
  """The share of an H200 SM's issue slots a loop needs to stream at the full memory bandwidth."""
  return warp_instructions_per_byte * H200_BYTES_PER_SM_CLOCK / ISSUE_PER_SM_CLOCK


def summarize(sass: str, bytes_per_iter: int | None, num_warps: int = 1) -> dict:
  """Counts of the whole kernel and of each loop; the streaming loop is the one with the most async copies
  (LDGSTS, global to shared) and, on ties, the longest: the loop that brings the tiles in. Every warp of
  a program runs the loop body once per iteration: with `bytes_per_iter`, its warp instructions per
  byte (body x `num_warps` / bytes) and the share of the issue slots that needs at full bandwidth."""
  instrs, labels = parse_sass(sass)
  body = []
  for first, last in loops(instrs, labels):
    m = mix(instrs[first:last + 1])
    body.append(dict(first_addr=instrs[first].addr, instructions=last - first + 1, mix=dict(m.most_common())))
  out = dict(instructions=len(instrs), mix=dict(mix(instrs).most_common()), loops=body)
  streaming = max(body, key=lambda b: (b["mix"].get("LDGSTS", 0), b["instructions"]), default=None)
  if streaming is not None:
    out["streaming_loop"] = streaming
    if bytes_per_iter:
      per_byte = streaming["instructions"] * num_warps / bytes_per_iter
      out.update(bytes_per_iter=bytes_per_iter, warp_instructions_per_byte=per_byte, issue_share=issue_share(per_byte))
  return out


# --- catching the Triton IR --------------------------------------------------------------------------------

def capture(fn, *args) -> list[dict]:
  """Lowers `fn(*args)` for CUDA here and returns each Pallas Triton kernel in it: its name, Triton IR
  text, warps and stages.

  The IR is caught where Pallas' Triton lowering builds it; the warps and stages are the lowering rule's
  own locals at that point (JAX 0.10 and 0.11 both compute them before building the IR). JAX 0.11
  then compiles the IR at once, which needs a GPU: the error that gives on a machine without one comes
  after the IR was caught and is ignored."""
  import jax
  from jax._src.pallas.triton import pallas_call_registration as registration

  kernels = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def catching(*a, **kw):
    result = original(*a, **kw)
    rule = sys._getframe(1).f_locals  # pallas_call_lowering's frame
    text = result.module.operation.get_asm(enable_debug_info=False)
    kernels.append(dict(name=re.match(r"module @(\S+)", text).group(1), ttir=text,
                        num_warps=int(rule["num_warps"]), num_stages=int(rule["num_stages"])))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = catching
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  except Exception:  # noqa: BLE001 -- see the docstring; without any IR caught, the error is the answer
    if not kernels:
      raise
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  return kernels


def compile_to_sass(ttir_path: str, num_warps: int, num_stages: int, cc: int) -> dict:
  """Triton IR file -> PTX, cubin and SASS with the `triton` package (no GPU used)."""
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, made explicit
  from triton.backends.compiler import GPUTarget
  from triton.compiler import compile as triton_compile
  kernel = triton_compile(ttir_path, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
  cubin = ttir_path.removesuffix(".ttir") + ".cubin"
  with open(cubin, "wb") as f:
    f.write(kernel.asm["cubin"])
  nvdisasm = os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia", "bin", "nvdisasm")
  sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
  return dict(ptx=kernel.asm["ptx"], sass=sass, shared_bytes=kernel.metadata.shared)


# --- the cases ----------------------------------------------------------------------------------------------

def matmul_cases():
  """The 8B down projection at M=1 (K=14336, N=4096): bfloat16 and fp8 weights, stored [K, N] (`matmul`)
  and [N, K] (`matmul_nt`), and fp8 with float16 activations; the fused gate/up with fp8 weights stored
  each way; w8a8's down and stacked gate/up (and the gate/up at 64 rows, on the fp8 tensor cores). Bytes per
  iteration: the weight tiles."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.decode_matmul import gpu, tuning
  shape = jax.ShapeDtypeStruct
  m, k, n = 1, 14336, 4096
  cases = []
  for x_dtype, w_dtype in ((jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float8_e4m3fn),
                           (jnp.float16, jnp.float8_e4m3fn)):
    fp8 = w_dtype != jnp.bfloat16
    cfg = tuning.gpu_config(m, k, n, itemsize=2, w_itemsize=1 if fp8 else 2)
    scale = shape((n,), jnp.float32) if fp8 else None
    tag = f"x {jnp.dtype(x_dtype).name}, w {jnp.dtype(w_dtype).name}"
    tile_bytes = cfg.block_k * cfg.block_n * (1 if fp8 else 2)
    cases.append((f"matmul [K, N], {tag}", functools.partial(gpu.matmul, config=cfg),
                  (shape((m, k), x_dtype), shape((k, n), w_dtype), scale), tile_bytes))
    cases.append((f"matmul_nt [N, K], {tag}", functools.partial(gpu.matmul_nt, config=cfg),
                  (shape((m, k), x_dtype), shape((n, k), w_dtype), scale), tile_bytes))
  cases = [(name, (lambda f: lambda x, w, s: f(x, w, w_scale_N=s))(fn), args, b) for name, fn, args, b in cases]
  # The fused gate/up of the 8B shape (K=4096, N=14336 per weight), fp8 weights stored each way: two tiles
  # per iteration.
  for transposed in (False, True):
    cfg = tuning.gpu_config(m, 4096, 14336, gate_up=True, itemsize=2, w_itemsize=1)
    w = shape((14336, 4096) if transposed else (4096, 14336), jnp.float8_e4m3fn)
    fn = functools.partial(gpu.gate_up_silu, config=cfg, transposed=transposed)
    cases.append((f"gate_up {'[N, K]' if transposed else '[K, N]'}, x bfloat16, w float8_e4m3fn",
                  lambda x, g, u, s, fn=fn: fn(x, g, u, w_gate_scale_N=s, w_up_scale_N=s),
                  (shape((m, 4096), jnp.bfloat16), w, w, shape((14336,), jnp.float32)),
                  2 * cfg.block_k * cfg.block_n))
  # w8a8: fp8 rows of x by fp8 weights [N, K] (`matmul_a8_nt`, the down shape) and the stacked gate/up pair
  # [2, N, K] (`gate_up_silu_a8`).
  cfg = tuning.gpu_config(m, k, n, itemsize=1, w_itemsize=1, a8=True)
  cases.append(("matmul_a8_nt [N, K], x and w float8_e4m3fn", functools.partial(gpu.matmul_a8_nt, config=cfg),
                (shape((m, k), jnp.float8_e4m3fn), shape((m,), jnp.float32), shape((n, k), jnp.float8_e4m3fn),
                 shape((n,), jnp.float32)), cfg.block_k * cfg.block_n))
  for rows in (m, 64):  # 64 rows: tiles that take Hopper's fp8 tensor cores (gpu.FP8_IMPRECISE_ACC)
    cfg = tuning.gpu_config(rows, 4096, 14336, gate_up=True, itemsize=1, w_itemsize=1, a8=True)
    cases.append((f"gate_up_silu_a8 [2, N, K], x and w float8_e4m3fn, M={rows}",
                  functools.partial(gpu.gate_up_silu_a8, config=cfg),
                  (shape((rows, 4096), jnp.float8_e4m3fn), shape((rows,), jnp.float32),
                   shape((2, 14336, 4096), jnp.float8_e4m3fn), shape((2, 14336), jnp.float32)),
                  2 * cfg.block_k * cfg.block_n))
  return cases


def _attention_case(name: str, pool_dtype, decode_tile):
  """A decode-only call of the 8B attention (32 query heads, 8 KV heads, head dim 128, pages of 16, batch
  256) over a pool of `pool_dtype`, with `decode_tile` as its decode launch. Bytes per iteration: one
  block of K and V rows."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.ragged_paged_attention import gpu, tuning
  shape = jax.ShapeDtypeStruct
  q = shape((256, 32, 128), jnp.bfloat16)
  meta = (shape((256,), jnp.int32), shape((256, 128), jnp.int32), shape((257,), jnp.int32), shape((1,), jnp.int32))
  cfg = dataclasses.replace(tuning.gpu_config(128, 16, 4), decode=decode_tile)
  fn = functools.partial(gpu.ragged_paged_attention, sm_scale=128**-0.5, config=cfg, decode_only=True, num_splits=1)
  pool = shape((4096, 16, 16, 128), pool_dtype)
  return name, fn, (q, pool, *meta), 2 * decode_tile.block_n * 128 * jnp.dtype(pool_dtype).itemsize


def attention_cases():
  """The 8B decode attention at the table's tiles: a bfloat16 pool, an fp8 pool widened to bfloat16, and an
  fp8 pool with `f16_dot`."""
  import jax.numpy as jnp

  from pallas_kernels.ragged_paged_attention import tuning
  table = tuning.gpu_config(128, 16, 4).decode
  return [_attention_case(f"attention decode, {jnp.dtype(pool).name} pool" + (", f16_dot" if f16 else ""), pool,
                          dataclasses.replace(table, f16_dot=f16))
          for pool, f16 in ((jnp.bfloat16, False), (jnp.float8_e4m3fn, False), (jnp.float8_e4m3fn, True))]


def attention_tile_cases():
  """The fp8-pool decode attention at every decode tile tools/sweep_decode.py tries, widened to bfloat16 and
  with `f16_dot`: which tiles could stream at the bandwidth, before a GPU times them."""
  import jax.numpy as jnp

  from pallas_kernels.ragged_paged_attention import tuning
  tiles = dict.fromkeys((tuning.gpu_config(128, 16, 4).decode,) + tuning.GPU_SWEEP_DECODE_WIDE)
  return [_attention_case(f"attention fp8, m{t.block_m} n{t.block_n} w{t.num_warps} st{t.num_stages}"
                          + (", f16_dot" if f16 else ""), jnp.float8_e4m3fn, dataclasses.replace(t, f16_dot=f16))
          for t in tiles for f16 in (False, True)]


GROUPS = {"matmul": matmul_cases, "attention": attention_cases, "attention_tiles": attention_tile_cases}


def run_meta(cc: int) -> dict:
  """Where and with what the report was made: this machine (no GPU is used), JAX, Triton, the target, the date."""
  import platform

  import jax
  import triton
  return dict(machine=f"{platform.machine()} CPU, {jax.default_backend()} backend (no GPU used)",
              jax=jax.__version__, triton=triton.__version__, cc=cc, date=datetime.date.today().isoformat())


def markdown(rows: list[dict], meta: dict) -> list[str]:
  lines = [f"Device: {meta['machine']}; JAX {meta['jax']}; Triton {meta['triton']}; {meta['date']}. Compiled for "
           f"compute capability {meta['cc'] / 10:.1f}; counts are static instructions of the machine code (one "
           "warp's view); the streaming loop is the loop body that issues the tiles' async copies.", "",
           "| case | kernel | warps / stages | shared KiB | instructions | streaming loop | bytes per iteration | "
           "warp instructions per byte | issue share at H200 bandwidth | top opcodes of the loop |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['case']} | {r.get('kernel', '-')} | | | failed: {r['error'][:120]} | | | | | |")
      continue
    s = r["summary"]
    loop = s.get("streaming_loop") or {}
    top = ", ".join(f"{op} {n}" for op, n in list(loop.get("mix", {}).items())[:6])
    per_byte = f"{s['warp_instructions_per_byte']:.3f}" if "warp_instructions_per_byte" in s else "-"
    share = f"{100 * s['issue_share']:.0f}%" if "issue_share" in s else "-"
    lines.append(f"| {r['case']} | `{r['kernel']}` | {r['num_warps']} / {r['num_stages']} | "
                 f"{r['shared_bytes'] / 1024:.0f} | {s['instructions']} | {loop.get('instructions', '-')} | "
                 f"{s.get('bytes_per_iter', '-')} | {per_byte} | {share} | {top} |")
  return lines


def main(argv):
  del argv
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  rows, meta = [], run_meta(FLAGS.cc)
  for group in FLAGS.cases:
    if group not in GROUPS:
      raise app.UsageError(f"--cases: {group!r} is not one of {', '.join(GROUPS)}")
    for case, fn, args, bytes_per_iter in GROUPS[group]():
      for kernel in capture(fn, *args):
        stem = re.sub(r"[^a-z0-9]+", "_", case.lower()).strip("_") + "__" + kernel["name"]
        path = os.path.join(FLAGS.out_dir, stem + ".ttir")
        with open(path, "w") as f:
          f.write(kernel["ttir"])
        row = dict(case=case, kernel=kernel["name"], num_warps=kernel["num_warps"], num_stages=kernel["num_stages"])
        try:
          compiled = compile_to_sass(path, kernel["num_warps"], kernel["num_stages"], FLAGS.cc)
        except Exception as e:  # noqa: BLE001 -- a kernel Triton refuses is a row of the report
          row["error"] = repr(e)
          rows.append(row)
          continue
        for ext in ("ptx", "sass"):
          with open(os.path.join(FLAGS.out_dir, f"{stem}.{ext}"), "w") as f:
            f.write(compiled[ext])
        row.update(shared_bytes=compiled["shared_bytes"],
                   summary=summarize(compiled["sass"], bytes_per_iter, kernel["num_warps"]))
        rows.append(row)
        print(f"{case}: {kernel['name']}: {row['summary']['instructions']} instructions", flush=True)
  with open(os.path.join(FLAGS.out_dir, "kernel_sass.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  text = "\n".join(markdown(rows, meta))
  with open(os.path.join(FLAGS.out_dir, "kernel_sass.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""Decode-shaped matmuls for Hopper GPUs: Pallas with the Mosaic GPU lowering (TMA and wgmma).

The Triton kernel of gpu.py streamed weights at 0.50-0.88x cuBLAS's bandwidth
on an H200 (docs/benchmarks/kernels.md): Pallas' Triton lowering loads tiles
with per-thread pointer loads and gives no control over how many bytes are in
flight. This kernel moves every tile by TMA, a bulk copy issued by one thread,
into a ring of shared-memory stages, and multiplies with warpgroup MMAs:

- one program owns `block_n` output columns and a 1/`num_splits` share of K;
  the grid is (N tiles, K splits), enough programs to cover the SMs;
- warpgroup C (the last) is the producer: for each `block_k` step of its K
  share it copies the step's x rows ([Mp, block_k], from L2 after the first
  program) and weight tile ([block_k, block_n], from HBM) into the next of
  `num_stages` slots, each with a "full" barrier (the copies landed) and an
  "empty" one (every consumer is done with it);
- warpgroups 0..C-1 are consumers, 64 rows of x each (one wgmma M tile; x is
  padded to C x 64 rows), each accumulating its [64, block_n] product in
  registers; the epilogue (a cast, or silu(gate) * up for `gate_up_silu`)
  runs once, then the tile goes out by TMA.

With `num_splits` > 1 the programs write float32 partial sums and XLA adds
them (and applies silu for gate/up, which must see the whole sum).
`matmul_nt` takes w stored [N, K] (the tied LM head): its tiles are
[block_n, block_k], handed to the wgmma transposed.

Every copy starts on whole tiles: K and N offsets are multiples of the
blocks, and x is padded to whole 64-row tiles (Mosaic GPU copies through a
tiled view of global memory; see pallas_kernels/ragged_paged_attention/hopper.py).

Axis letters as in gpu.py: M rows of x, K the contracted dim, N output
columns, Z the K splits; C consumer warpgroups.

Status: tested in the Mosaic GPU interpreter and by lowering for CUDA on the
CPU. On an H200 (2026-12-06) one row tile passed its GPU check and four row
tiles hung; the register budget of `consumer_registers` is the likely cause
and is fixed; not re-run on a GPU since. `impl="auto"` does not pick it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mosaic_gpu import interpret_params, lane_params, plgpu

WG_ROWS = 64  # rows of one wgmma M tile: one consumer warpgroup's share of x
SMEM_LIMIT = 227 * 1024
NUM_SMS = 132
MAX_SPLITS = 8
MAX_CONSUMERS = 4  # M <= 256
OUT_ITEMSIZE = 4  # the output staging buffer is budgeted as float32 (partial sums, a float32 LM head)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopperMatmulBlocks:
  """`block_n` output columns per program, `block_k` of K per step (64: one 128-byte swizzled row of
  bfloat16), up to `num_stages` steps in flight; `num_splits` None fills the SMs (`plan`)."""
  block_n: int = 128
  block_k: int = 64
  num_stages: int = 6
  num_splits: int | None = None


PRODUCER_REGISTERS = 40


def launch_registers(warpgroups: int) -> int:
  """Registers per thread the kernel starts with: the SM's 64K over its threads, in steps of 8."""
  return min(255, 65536 // (128 * warpgroups)) // 8 * 8


def consumer_registers(consumers: int) -> int:
  """Registers per consumer thread after the producer gives its share back, at most 232 (`setmaxnreg`'s
  range). `setmaxnreg` only moves registers between the warpgroups of the block: their sum stays
  what the block started with, `launch_registers` times its threads, not the SM's whole 64K. Asking
  for more waits forever (likely why the kernel hung on an H200 with 4 consumers asking 112 each)."""
  pool = launch_registers(consumers + 1) * (consumers + 1) - PRODUCER_REGISTERS
  return min(232, pool // consumers // 8 * 8)


def default_blocks(m: int, num_weights: int = 1, n: int = 128) -> HopperMatmulBlocks:
  """128 columns per program, or 64 where N is not a multiple of 128 or where the accumulators of
  128 would not fit the consumers' registers (gate/up at more than 128 rows)."""
  consumers = -(-m // WG_ROWS)
  if n % 128 or num_weights * 128 // 2 > consumer_registers(consumers) - 48:
    return HopperMatmulBlocks(block_n=64)
  return HopperMatmulBlocks()


def smem_bytes(blocks: HopperMatmulBlocks, consumers: int, num_weights: int, out_itemsize: int) -> int:
  per_stage = (consumers * WG_ROWS + num_weights * blocks.block_n) * blocks.block_k * 2
  out = num_weights * consumers * WG_ROWS * blocks.block_n * out_itemsize
  return blocks.num_stages * per_stage + out


def plan(m: int, k: int, n: int, blocks: HopperMatmulBlocks, num_weights: int = 1):
  """(consumers, splits, stages) for one call: splits divide K's steps and fill the SMs; stages
  are cut to what fits shared memory."""
  consumers = -(-m // WG_ROWS)
  steps = k // blocks.block_k
  splits = blocks.num_splits
  if splits is None:
    splits, tiles = 1, n // blocks.block_n
    while splits < MAX_SPLITS and tiles * splits < NUM_SMS and steps % (2 * splits) == 0:
      splits *= 2
  stages = blocks.num_stages
  while stages > 2 and smem_bytes(dataclasses.replace(blocks, num_stages=stages), consumers, num_weights,
                                  OUT_ITEMSIZE) > SMEM_LIMIT:
    stages -= 1
  return consumers, splits, stages


def supports(x_MK, w, blocks: HopperMatmulBlocks | None = None, num_weights: int = 1,
             transposed: bool = False) -> str | None:
  """None when this kernel takes these operands (w as [K, N], or [N, K] when `transposed`) with
  `blocks` (None: `default_blocks`); otherwise why not."""
  if plgpu is None:
    return "this jaxlib has no Mosaic GPU"
  w_KN = w.T if transposed and w.ndim == 2 else w
  if x_MK.ndim != 2 or w_KN.ndim != 2 or x_MK.shape[1] != w_KN.shape[0]:
    return (f"x shape {x_MK.shape}, w shape {w.shape}: need x[M, K] and "
            f"{'w[N, K]' if transposed else 'w[K, N]'}")
  m, k = x_MK.shape
  n = w_KN.shape[1]
  blocks = default_blocks(m, num_weights, n) if blocks is None else blocks
  if w_KN.dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    # wgmma multiplies fp8 only by fp8 activations, and converting the weight to bfloat16 in registers
    # would take it off the TMA -> shared memory -> wgmma path this kernel is built on.
    return (f"w is {w_KN.dtype}: this kernel takes no fp8 weights (wgmma takes fp8 only with fp8 activations); "
            "the Triton kernel (impl='gpu') converts them")
  if x_MK.dtype != w_KN.dtype or x_MK.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtypes x={x_MK.dtype}, w={w_KN.dtype}: wgmma needs bfloat16 or float16 for both"
  if not 0 < m <= MAX_CONSUMERS * WG_ROWS:
    return f"M={m}: this kernel takes 1 to {MAX_CONSUMERS * WG_ROWS} rows"
  if blocks.block_k != 64 or blocks.block_n % 64 or not 64 <= blocks.block_n <= 256:
    return f"{blocks}: need block_k 64 and block_n a multiple of 64 up to 256"
  if k % blocks.block_k or n % blocks.block_n:
    return f"K={k}, N={n}: need multiples of block_k={blocks.block_k} and block_n={blocks.block_n}"
  consumers, splits, stages = plan(m, k, n, blocks, num_weights)
  # Each consumer thread holds num_weights accumulators of block_n / 2 floats, plus ~48 registers of
  # addresses, loop state and the epilogue.
  if num_weights * blocks.block_n // 2 > consumer_registers(consumers) - 48:
    return (f"{blocks} at M={m}: {num_weights} accumulators of {blocks.block_n // 2} registers per thread do not "
            f"fit the {consumer_registers(consumers)} each of {consumers} consumer warpgroups gets")
  if (k // blocks.block_k) % splits:
    return f"num_splits={splits} does not divide K's {k // blocks.block_k} steps"
  need = smem_bytes(dataclasses.replace(blocks, num_stages=stages), consumers, num_weights, OUT_ITEMSIZE)
  if need > SMEM_LIMIT:
    return f"{blocks} with {consumers} row tiles needs {need} bytes of shared memory, over {SMEM_LIMIT}"
  return None


def _kernel(x_ref, *refs, num_weights, consumers, steps, block_k, block_n, num_stages, epilogue, transposed,
            interpreted):
  """One program: `block_n` columns of the output, K steps [split * steps, (split + 1) * steps)."""
  w_refs, o_ref, scratch = refs[:num_weights], refs[num_weights], refs[num_weights + 1]
  (x_smem, w_smems, o_smem), (full, empty) = scratch
  col = lax.axis_index("n")
  split = lax.axis_index("split")
  wg = lax.axis_index("wg")
  k_first = split * steps
  layout = (lambda x, _: x) if interpreted else plgpu.layout_cast

  @pl.when(wg == consumers)
  def _producer():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

    @pl.loop(0, steps)
    def _(step):
      slot = lax.rem(step, num_stages)

      @pl.when(step >= num_stages)
      def _():
        plgpu.barrier_wait(empty.at[slot])
      ks = pl.ds((k_first + step) * block_k, block_k)
      plgpu.copy_gmem_to_smem(x_ref.at[:, :, ks], x_smem.at[slot], full.at[slot])
      cols = pl.ds(col * block_n, block_n)
      for w_ref, w_smem in zip(w_refs, w_smems):  # a [block_k, block_n] tile, or [block_n, block_k] transposed
        plgpu.copy_gmem_to_smem(w_ref.at[cols, ks] if transposed else w_ref.at[ks, cols], w_smem.at[slot],
                                full.at[slot])

    # Observe the consumers' last releases too, so every barrier phase is waited on.
    @pl.loop(max(steps - num_stages, 0), steps)
    def _(step):
      plgpu.barrier_wait(empty.at[lax.rem(step, num_stages)])

  @pl.when(wg < consumers)
  def _consumer():
    plgpu.set_max_registers(consumer_registers(consumers), action="increase")

    def body(step, accs):
      slot = lax.rem(step, num_stages)
      plgpu.barrier_wait(full.at[slot])
      x_tile = x_smem.at[slot, wg]
      out = []
      for acc, w_smem in zip(accs, w_smems):
        if interpreted:  # the interpreter's wgmma takes no transposed operand nor a carried accumulator
          dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
          out.append(acc + lax.dot_general(x_tile[...], w_smem[slot], dims, preferred_element_type=jnp.float32))
        else:
          def mma(acc_ref, w_smem=w_smem):
            w_tile = plgpu.transpose_ref(w_smem.at[slot], (1, 0)) if transposed else w_smem.at[slot]
            plgpu.wgmma(acc_ref, x_tile, w_tile)
          out.append(pl.run_state(mma)(plgpu.ACC.init(acc)))
      plgpu.barrier_arrive(empty.at[slot])
      return tuple(out)

    zeros = layout(jnp.zeros((WG_ROWS, block_n), jnp.float32), plgpu.Layout.WGMMA)
    accs = lax.fori_loop(0, steps, body, (zeros,) * num_weights)
    results = epilogue(*accs)
    for i, r in enumerate(results):
      o_smem.at[i, wg][...] = r.astype(o_smem.dtype)
    plgpu.commit_smem()
    for i in range(len(results)):
      plgpu.copy_smem_to_gmem(o_smem.at[i, wg], o_ref.at[split, i, wg, :, pl.ds(col * block_n, block_n)])
    plgpu.wait_smem_to_gmem(0)


def _launch(x_MK, ws, *, epilogue, fused_epilogue, out_dtype, blocks, interpret, transposed=False):
  """The kernel over ws (each [K, N], or [N, K] when `transposed`); returns [M, N] in out_dtype after
  the split sum and epilogue."""
  why_not = supports(x_MK, ws[0], blocks, len(ws), transposed=transposed)
  if why_not:
    raise ValueError(why_not)
  if interpret is True:
    interpret = interpret_params()
  m, k = x_MK.shape
  n = ws[0].shape[0] if transposed else ws[0].shape[1]
  consumers, splits, stages = plan(m, k, n, blocks, len(ws))
  steps = k // blocks.block_k // splits
  rows = consumers * WG_ROWS
  # Whole 64-row tiles of x (rows past M are zeros and their outputs are dropped), viewed as
  # [C, 64, K] so each consumer's rows are a leading index of the shared-memory slot.
  x_CRK = jnp.pad(x_MK, ((0, rows - m), (0, 0))).reshape(consumers, WG_ROWS, k)
  # One fused result (cast in the kernel) when there is no split sum; else float32 partials.
  fused = splits == 1
  num_out = 1 if fused else len(ws)
  o_dtype = out_dtype if fused and len(ws) == 1 else jnp.float32
  dtype = x_MK.dtype
  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  w_tile = (blocks.block_n, blocks.block_k) if transposed else (blocks.block_k, blocks.block_n)
  kernel = functools.partial(_kernel, num_weights=len(ws), consumers=consumers, steps=steps,
                             block_k=blocks.block_k, block_n=blocks.block_n, num_stages=stages,
                             epilogue=fused_epilogue if fused else (lambda *accs: accs),
                             transposed=transposed, interpreted=bool(interpret))
  out_shape = (splits, num_out, consumers, WG_ROWS, n)

  # plgpu.kernel allocates the output without initializing it: every element is stored once.
  call = plgpu.kernel(
      lambda *refs: kernel(*refs[:1 + len(ws) + 1], refs[1 + len(ws) + 1:]),
      out_type=jax.ShapeDtypeStruct(out_shape, o_dtype),
      scratch_types=((plgpu.SMEM((stages, consumers, WG_ROWS, blocks.block_k), dtype, transforms=tiled),
                      tuple(plgpu.SMEM((stages, *w_tile), dtype, transforms=tiled) for _ in ws),
                      plgpu.SMEM((num_out, consumers, WG_ROWS, blocks.block_n), o_dtype)),
                     (plgpu.Barrier(num_arrivals=1 + len(ws), num_barriers=stages),
                      plgpu.Barrier(num_arrivals=consumers, num_barriers=stages))),
      compiler_params=lane_params(),
      grid=(n // blocks.block_n, splits), grid_names=("n", "split"), num_threads=consumers + 1, thread_name="wg",
      interpret=interpret or False)
  out = call(x_CRK, *ws)
  out_ZOMN = out.reshape(splits, num_out, rows, n)[:, :, :m]
  if fused:
    return out_ZOMN[0, 0].astype(out_dtype)
  return epilogue(*out_ZOMN.sum(axis=0)).astype(out_dtype)


def _silu_times(g, u):
  return g / (1.0 + jnp.exp(-g)) * u


def matmul(x_MK, w_KN, *, out_dtype=None, blocks: HopperMatmulBlocks | None = None, interpret=False):
  """x @ w with float32 accumulation, in `out_dtype` (x's dtype when None). `blocks`: None for
  `default_blocks`. `interpret`: False, True (the Mosaic GPU interpreter with `interpret_params`) or
  interpreter parameters."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  blocks = default_blocks(x_MK.shape[0], 1, w_KN.shape[-1]) if blocks is None else blocks
  return _launch(x_MK, (w_KN,), epilogue=lambda a: a, fused_epilogue=lambda a: (a,), out_dtype=out_dtype,
                 blocks=blocks, interpret=interpret)


def matmul_nt(x_MK, w_NK, *, out_dtype=None, blocks: HopperMatmulBlocks | None = None, interpret=False):
  """x @ w.T, w stored [N, K] (the tied LM head: the [V, D] embedding); otherwise as `matmul`."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  blocks = default_blocks(x_MK.shape[0], 1, w_NK.shape[0]) if blocks is None else blocks
  return _launch(x_MK, (w_NK,), epilogue=lambda a: a, fused_epilogue=lambda a: (a,), out_dtype=out_dtype,
                 blocks=blocks, interpret=interpret, transposed=True)


def gate_up_silu(x_MK, w_gate_KN, w_up_KN, *, out_dtype=None, blocks: HopperMatmulBlocks | None = None,
                 interpret=False):
  """silu(x @ w_gate) * (x @ w_up): both weights' tiles stream through the same stages."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  blocks = default_blocks(x_MK.shape[0], 2, w_gate_KN.shape[-1]) if blocks is None else blocks
  if w_up_KN.shape != w_gate_KN.shape or w_up_KN.dtype != w_gate_KN.dtype:
    raise ValueError(f"w_gate {w_gate_KN.shape} {w_gate_KN.dtype} and w_up {w_up_KN.shape} {w_up_KN.dtype} differ")
  return _launch(x_MK, (w_gate_KN, w_up_KN), epilogue=_silu_times, fused_epilogue=lambda g, u: (_silu_times(g, u),),
                 out_dtype=out_dtype, blocks=blocks, interpret=interpret)


__all__ = ["HopperMatmulBlocks", "default_blocks", "gate_up_silu", "interpret_params", "matmul", "matmul_nt", "plan",
           "supports"]

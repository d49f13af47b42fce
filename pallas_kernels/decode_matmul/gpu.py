"""Decode-shaped matmuls for NVIDIA GPUs: Pallas with the Triton lowering.

x[M, K] @ w[K, N] for M <= 256 rows (a decode step's tokens) and weights that
are streamed from HBM once per call. At these shapes a projection is
memory-bound (M flop per weight byte against the H200's ~206), so the kernel
is built to keep the memory system busy rather than the tensor cores:

- the grid is (M tiles, N tiles, K splits) with the M tiles fastest, so the
  programs that share a weight tile run side by side and all but the first
  find it in L2: the weights leave HBM once however M is tiled;
- each program loops over its share of K, `block_k` rows of its weight
  column tile per step; Triton software-pipelines the loop (`num_stages`
  loads in flight), which is what hides HBM latency;
- when M x N tiles are too few to cover the GPU's SMs, K is split over
  several programs (split-K) that write float32 partial sums, and XLA adds
  them (`tuning.fit` picks the split count);
- rows past M and columns past N are masked (x loads read zeros, weight
  columns past N are left undefined as only their own outputs see them,
  stores are dropped); K must be a multiple of 16 and is never masked;
- a weight may be fp8 (float8_e4m3fn or e5m2, weight-only quantization) with
  a float32 scale per output column: the kernel loads the one-byte tiles,
  converts them to x's dtype in registers (exact: every fp8 value is a
  bfloat16, float16 and float32 value) and multiplies as for bfloat16; the
  scale multiplies each program's float32 accumulator once, before its store,
  the partial sums of split-K included (a per-column factor commutes with the
  sum over K, so scaling the partials or their sum is the same product). e4m3
  needs compute capability 8.9 or later (Triton has no e4m3 convert before Ada).

fp8 activations too (w8a8, `matmul_a8_nt` and `gate_up_silu_a8`): x arrives as e4m3 with a float32
scale per row (each token quantized by the caller, as `jserve.models.quant.quantize_rows` does), the
weight as e4m3 [N, K] with its scale per column, and the tiles are multiplied fp8 by fp8 with float32
accumulation; both scales multiply the accumulator before the store. On Hopper they multiply on the fp8
tensor cores (wgmma: see FP8_IMPRECISE_ACC), tiles of fewer than 64 rows swapped (w_tile @ x_tile.T) so
that the weight tile is wgmma's 64-row operand: `tools/kernel_sass.py` counts about 0.03 warp
instructions per weight byte at M = 1, 13-15% of the issue slots at the H200's bandwidth. A stacked
pair (gate and up, `[2, N, K]`, `quant.stack_pairs`) is one weight array: the program reads its gate
tile at row offset 0 and its up tile at N of the [2N, K] view, so nothing is sliced or copied outside
the kernel.

Five entry points share one kernel body: `matmul` (w as [K, N]),
`matmul_nt` (w as [N, K]: the tied LM head that multiplies by the [V, D]
embedding, and fp8 weights in `quant.Fp8WeightNK`) and `gate_up_silu` (two
weights streamed by the same program, [K, N] or [N, K], silu(x @ w_gate) *
(x @ w_up) applied before the only store), and the w8a8 `matmul_a8_nt` and `gate_up_silu_a8`.

Axis letters, local to this kernel (the GEMM convention, not jserve/shapes.py's
KV heads and query heads): M rows of x, K the contracted dim, N output
columns, Z the K splits.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_matmul import reference, tuning

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
FP8_DTYPES = reference.FP8_DTYPES

# Hopper's fp8 tensor cores (wgmma) add products in an accumulator narrower than float32, so Triton multiplies
# fp8 by fp8 on them only when the dot says how many products along K may be added there before the sum moves
# into float32 (the dot's `maxNumImpreciseAcc`). Pallas' Triton lowering (JAX 0.10 and 0.11) leaves it unset,
# and Triton then widens both operands to float16 for mma.sync instead, at half the rate. Every fp8 x fp8 dot
# the lowering emits gets this many (the promotion interval DeepSeek-V3's fp8 GEMMs use); with it Triton takes
# wgmma where one operand has 64 rows (tools/kernel_sass.py shows QGMMA in place of HMMA and F2FP). Only the
# w8a8 entries multiply fp8 by fp8: the other kernels widen their fp8 operands before the dot.
FP8_IMPRECISE_ACC = 128
_FP8_IR_TYPES = ("f8E4M3FN", "f8E5M2")


def _with_fp8_accumulation(dot):
  def fp8_aware_dot(a, b, c, *, input_precision=None, max_num_imprecise_acc=None, **kw):
    if max_num_imprecise_acc is None and all(str(ir.RankedTensorType(v.type).element_type) in _FP8_IR_TYPES
                                             for v in (a, b)):
      max_num_imprecise_acc = FP8_IMPRECISE_ACC
    return dot(a, b, c, input_precision=input_precision, max_num_imprecise_acc=max_num_imprecise_acc, **kw)
  fp8_aware_dot.sets_fp8_accumulation = True
  return fp8_aware_dot


def set_fp8_accumulation() -> bool:
  """Makes the Triton dialect's `dot`, as Pallas' lowering calls it, give fp8 x fp8 dots FP8_IMPRECISE_ACC (once;
  idempotent). False where this JAX has no such module (nothing is changed then)."""
  try:
    from jax._src.lib.triton import dialect
  except ImportError:
    return False
  if not getattr(dialect.dot, "sets_fp8_accumulation", False):
    dialect.dot = _with_fp8_accumulation(dialect.dot)
  return True


set_fp8_accumulation()


def supports(x_MK, w, *, transposed: bool = False, w_scale_N=None) -> str | None:
  """None when the kernel takes these operands (w is [N, K] when `transposed`, `w_scale_N` its float32
  scale per output column or None); otherwise why not. An fp8 weight needs its scale."""
  if x_MK.ndim != 2 or w.ndim != 2:
    return f"x shape {x_MK.shape}, w shape {w.shape}: need two 2-D operands"
  m, k = x_MK.shape
  w_k = w.shape[1] if transposed else w.shape[0]
  if w_k != k:
    return f"x shape {x_MK.shape}, w shape {w.shape}: contracted dims differ ({k} != {w_k})"
  if m > tuning.MAX_M:
    return f"M={m}: more rows than the decode kernel takes ({tuning.MAX_M})"
  if k % 16:
    return f"K={k}: need a multiple of 16 (K is not masked)"
  if x_MK.dtype not in DTYPES or (w.dtype != x_MK.dtype and w.dtype not in FP8_DTYPES):  # fp8: converted to x's
    return (f"dtypes x={x_MK.dtype}, w={w.dtype}: need one of float32, bfloat16, float16 for both, or an fp8 "
            "weight (float8_e4m3fn, float8_e5m2) with its scale")
  return reference.check_scale(w, w_scale_N, w.shape[0] if transposed else w.shape[1])


def supports_a8(x8_MK, x_scale_M, w_NK, w_scale_N, *, halves: bool = False) -> str | None:
  """None when the w8a8 kernel takes these operands: x8 e4m3 [M, K] with its float32 scale per row [M], the
  weight e4m3 [N, K] (or a stacked pair [2, N, K] when `halves`) with its float32 scale of the output axes."""
  if x8_MK.ndim != 2 or x8_MK.dtype != jnp.float8_e4m3fn:
    return f"x8 {x8_MK.shape} {x8_MK.dtype}: need float8_e4m3fn [M, K]"
  m, k = x8_MK.shape
  if x_scale_M.shape != (m,) or x_scale_M.dtype != jnp.float32:
    return f"x_scale_M {x_scale_M.shape} {x_scale_M.dtype}: need float32 of shape ({m},), one per row"
  if w_NK.dtype != jnp.float8_e4m3fn or w_NK.ndim != (3 if halves else 2) or (halves and w_NK.shape[0] != 2):
    return f"w {w_NK.shape} {w_NK.dtype}: need float8_e4m3fn {'[2, N, K]' if halves else '[N, K]'}"
  if w_NK.shape[-1] != k:
    return f"x8 {x8_MK.shape}, w {w_NK.shape}: contracted dims differ ({k} != {w_NK.shape[-1]})"
  if w_scale_N.shape != w_NK.shape[:-1] or w_scale_N.dtype != jnp.float32:
    return f"w_scale {w_scale_N.shape} {w_scale_N.dtype}: need float32 of shape {w_NK.shape[:-1]}"
  if m > tuning.MAX_M:
    return f"M={m}: more rows than the decode kernel takes ({tuning.MAX_M})"
  if k % 32:
    return f"K={k}: need a multiple of 32 (K is not masked; fp8 tiles are at least 32 deep)"
  return None


def _matmul_kernel(x_ref, *refs, m, n, cfg, steps, transposed, gate_up, split_out, scaled, a8=False, swap=False):
  """One program: a block_m x block_n output tile (of each weight) over `steps` K blocks of one split.
  `refs`: x's scale per row when `a8`, the weights, their scales when `scaled`, then the outputs. With
  `a8` and `gate_up` the pair is one stacked weight (and one scale) seen as [2N, K]: the up tile is the
  gate tile's rows moved by n. `swap` (w8a8 tiles of fewer than 64 rows): each step multiplies
  w_tile @ x_tile.T, [N, M], so that the weight tile is the operand of 64 rows that Hopper's fp8 wgmma needs
  and x's few rows the other (as few as 8); the sum is transposed once, after the K loop."""
  xs_ref, refs = (refs[0], refs[1:]) if a8 else (None, refs)
  num_w = 2 if gate_up else 1
  num_refs = 1 if a8 else num_w  # the stacked pair is one array
  num_s = num_refs if scaled else 0
  w_refs, s_refs, o_refs = refs[:num_refs], refs[num_refs:num_refs + num_s], refs[num_refs + num_s:]
  offsets = (0, n) if a8 and gate_up else (0,) * num_w  # where each weight's rows start in its array
  if a8 and gate_up:
    w_refs, s_refs = w_refs * 2, s_refs * 2
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  i_m, i_n, i_z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = pl.ds(i_m * bm, bm), pl.ds(i_n * bn, bn)
  w_cols = [pl.ds(i_n * bn + off, bn) for off in offsets]
  # Masks only where the shape needs them: an unmasked load keeps Triton's
  # widest vector loads without any analysis of the mask.
  row_ok_M = i_m * bm + jnp.arange(bm, dtype=jnp.int32) < m if m % bm else None
  col_ok_N = i_n * bn + jnp.arange(bn, dtype=jnp.int32) < n if n % bn else None
  precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
  k0 = i_z * (steps * bk)

  def load(ref_at, mask, fill=True):
    """`fill=False` leaves masked elements undefined (no `other`): right for a weight tile's columns past N,
    whose outputs are never stored, and needed for fp8, which the Triton lowering cannot fill (it has no
    cast of an integer splat to float8)."""
    if mask is None:
      return plgpu.load(ref_at)
    return plgpu.load(ref_at, mask=mask, other=0) if fill else plgpu.load(ref_at, mask=mask)

  def body(j, accs):
    ks = pl.ds(pl.multiple_of(k0 + j * bk, bk), bk)
    # fp8 rows past M are left undefined (Triton cannot fill fp8): each feeds only its own output row, never stored.
    x_MK = load(x_ref.at[rows, ks], None if row_ok_M is None else jnp.broadcast_to(row_ok_M[:, None], (bm, bk)),
                fill=not a8)
    out = []
    # An fp8 weight tile becomes x's dtype here, in registers (`astype` is a no-op otherwise): only the
    # one-byte tile crosses the memory bus.
    for w_ref, w_at, acc_MN in zip(w_refs, w_cols, accs):
      if transposed:
        w_NK = load(w_ref.at[w_at, ks], None if col_ok_N is None else jnp.broadcast_to(col_ok_N[:, None], (bn, bk)),
                    fill=False)
        if swap:  # the weight tile as the wgmma's 64-row operand, x's few rows as its other: [N, M]
          p_MN = lax.dot_general(w_NK, x_MK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        else:
          p_MN = lax.dot_general(x_MK, w_NK.astype(x_MK.dtype), (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
      else:
        w_KN = load(w_ref.at[ks, cols], None if col_ok_N is None else jnp.broadcast_to(col_ok_N[None, :], (bk, bn)),
                    fill=False)
        p_MN = lax.dot_general(x_MK, w_KN.astype(x_MK.dtype), (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
      out.append(acc_MN + p_MN)
    return tuple(out)

  accs = tuple(jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32) for _ in range(num_w))
  accs = lax.fori_loop(0, steps, body, accs)
  if swap:
    accs = tuple(acc_NM.T for acc_NM in accs)
  if scaled:  # once per output column, after the K loop (and before any split sum: see the module docstring)
    accs = tuple(acc_MN * load(s_ref.at[w_at], col_ok_N)[None, :] for acc_MN, s_ref, w_at in zip(accs, s_refs, w_cols))
  if a8:  # and once per row: x's scale (rows past M read as zeros, and are not stored)
    x_scale_M = load(xs_ref.at[rows], row_ok_M)
    accs = tuple(acc_MN * x_scale_M[:, None] for acc_MN in accs)

  mask_MN = None
  if row_ok_M is not None or col_ok_N is not None:
    mask_MN = jnp.ones((bm, bn), jnp.bool_)
    if row_ok_M is not None:
      mask_MN &= row_ok_M[:, None]
    if col_ok_N is not None:
      mask_MN &= col_ok_N[None, :]
  if split_out:
    for o_ref, acc_MN in zip(o_refs, accs):
      plgpu.store(o_ref.at[i_z, rows, cols], acc_MN, mask=mask_MN)
    return
  if gate_up:
    g_MN, u_MN = accs
    # silu(g) = g * sigmoid(g), written with exp: the Triton lowering has no logistic.
    res_MN = g_MN / (1.0 + jnp.exp(-g_MN)) * u_MN
  else:
    (res_MN,) = accs
  [o_ref] = o_refs
  plgpu.store(o_ref.at[rows, cols], res_MN.astype(o_ref.dtype), mask=mask_MN)


def _launch(x_MK, ws, scales, *, n, out_dtype, config, transposed, gate_up, interpret, x_scale_M=None):
  """`scales`: () or one float32 [N] per weight. `x_scale_M`: x's scale per row, for w8a8 (x and the weights
  fp8, `ws` one [N, K] weight or, with `gate_up`, the stacked pair viewed as [2N, K])."""
  m, k = x_MK.shape
  a8 = x_scale_M is not None
  num_weights = 2 if gate_up else 1
  cfg = tuning.fit(config, m, k, n, itemsize=x_MK.dtype.itemsize, num_weights=num_weights,
                   w_itemsize=ws[0].dtype.itemsize)
  steps = k // (cfg.block_k * cfg.num_splits)
  split_out = cfg.num_splits > 1
  grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), cfg.num_splits)
  # w8a8 tiles of under 64 rows multiply swapped (see _matmul_kernel), so that they too run on wgmma.
  swap = a8 and cfg.block_m < 64
  kernel = functools.partial(_matmul_kernel, m=m, n=n, cfg=cfg, steps=steps, transposed=transposed,
                             gate_up=gate_up, split_out=split_out, scaled=bool(scales), a8=a8, swap=swap)
  # Profiles tell the fp8 and w8a8 launches apart, and those of [N, K] weights.
  fp8 = "_a8" if a8 else "_fp8" if ws[0].dtype in FP8_DTYPES else ""
  nt = "_nt" if transposed else ""
  if split_out:
    out_shape = [jax.ShapeDtypeStruct((cfg.num_splits, m, n), jnp.float32)] * num_weights
  else:
    out_shape = [jax.ShapeDtypeStruct((m, n), out_dtype)]
  operands = (x_MK, *((x_scale_M,) if a8 else ()), *ws, *scales)
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[pl.BlockSpec()] * len(operands),
      out_specs=[pl.BlockSpec()] * len(out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name=f"decode_matmul{fp8}{nt}_m{cfg.block_m}_n{cfg.block_n}_k{cfg.block_k}_z{cfg.num_splits}",
  )(*operands)
  if not split_out:
    return outs[0]
  sums = [jnp.sum(o_ZMN, axis=0) for o_ZMN in outs]
  if gate_up:
    g_MN, u_MN = sums
    return (jax.nn.silu(g_MN) * u_MN).astype(out_dtype)
  return sums[0].astype(out_dtype)


def _check(x_MK, w, transposed, w_scale_N):
  why_not = supports(x_MK, w, transposed=transposed, w_scale_N=w_scale_N)
  if why_not:
    raise ValueError(why_not)


def _config(x_MK, w, n, gate_up):
  m, k = x_MK.shape
  return tuning.gpu_config(m, k, n, gate_up=gate_up, itemsize=x_MK.dtype.itemsize, w_itemsize=w.dtype.itemsize)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def matmul(x_MK, w_KN, *, out_dtype=None, config=None, interpret=False, w_scale_N=None):
  """x @ w with float32 accumulation, in `out_dtype` (x's when None). `config` overrides the tuned tiles.
  `w_scale_N`: the float32 scale per column of an fp8 (or any) weight, applied to the float32 product."""
  _check(x_MK, w_KN, False, w_scale_N)
  n = w_KN.shape[1]
  return _launch(x_MK, (w_KN,), () if w_scale_N is None else (w_scale_N,), n=n, out_dtype=out_dtype or x_MK.dtype,
                 config=config or _config(x_MK, w_KN, n, False), transposed=False, gate_up=False,
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def matmul_nt(x_MK, w_NK, *, out_dtype=None, config=None, interpret=False, w_scale_N=None):
  """x @ w.T with float32 accumulation, w stored [N, K] (each output column's weights contiguous)."""
  _check(x_MK, w_NK, True, w_scale_N)
  n = w_NK.shape[0]
  return _launch(x_MK, (w_NK,), () if w_scale_N is None else (w_scale_N,), n=n, out_dtype=out_dtype or x_MK.dtype,
                 config=config or _config(x_MK, w_NK, n, False), transposed=True, gate_up=False,
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret", "transposed"))
def gate_up_silu(x_MK, w_gate, w_up, *, out_dtype=None, config=None, interpret=False, w_gate_scale_N=None,
                 w_up_scale_N=None, transposed=False):
  """silu(x @ w_gate) * (x @ w_up) in float32, cast once; one program streams the same tile of both weights.
  The weights are [K, N], or [N, K] when `transposed`; they share shape and dtype, and both have scales or
  neither has."""
  _check(x_MK, w_gate, transposed, w_gate_scale_N)
  _check(x_MK, w_up, transposed, w_up_scale_N)
  if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
    raise ValueError(f"w_gate {w_gate.shape} {w_gate.dtype} and w_up {w_up.shape} {w_up.dtype} differ")
  if (w_gate_scale_N is None) != (w_up_scale_N is None):
    raise ValueError("w_gate_scale_N and w_up_scale_N: give both or neither")
  n = w_gate.shape[0] if transposed else w_gate.shape[1]
  scales = () if w_gate_scale_N is None else (w_gate_scale_N, w_up_scale_N)
  return _launch(x_MK, (w_gate, w_up), scales, n=n, out_dtype=out_dtype or x_MK.dtype,
                 config=config or _config(x_MK, w_gate, n, True), transposed=transposed, gate_up=True,
                 interpret=interpret)


def _check_a8(x8_MK, x_scale_M, w_NK, w_scale_N, halves):
  why_not = supports_a8(x8_MK, x_scale_M, w_NK, w_scale_N, halves=halves)
  if why_not:
    raise ValueError(why_not)


def _config_a8(m, k, n, gate_up):
  return tuning.gpu_config(m, k, n, gate_up=gate_up, itemsize=1, w_itemsize=1, a8=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def matmul_a8_nt(x8_MK, x_scale_M, w_NK, w_scale_N, *, out_dtype=jnp.bfloat16, config=None, interpret=False):
  """(x8 * x_scale) @ (w * w_scale).T: fp8 x [M, K] with its float32 scale per row, fp8 w [N, K] with its
  float32 scale per column, multiplied fp8 by fp8 with float32 accumulation, both scales applied to the
  float32 sum, cast once to `out_dtype`."""
  _check_a8(x8_MK, x_scale_M, w_NK, w_scale_N, False)
  m, k = x8_MK.shape
  n = w_NK.shape[0]
  return _launch(x8_MK, (w_NK,), (w_scale_N,), n=n, out_dtype=out_dtype, config=config or _config_a8(m, k, n, False),
                 transposed=True, gate_up=False, interpret=interpret, x_scale_M=x_scale_M)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def gate_up_silu_a8(x8_MK, x_scale_M, w_2NK, w_scale_2N, *, out_dtype=jnp.bfloat16, config=None, interpret=False):
  """silu(g) * u for [g, u] = the stacked pair's two products with the fp8 rows of x (as `matmul_a8_nt`): w
  is [2, N, K] (gate, then up), its scale [2, N]; one program streams the same tile of both halves."""
  _check_a8(x8_MK, x_scale_M, w_2NK, w_scale_2N, True)
  m, k = x8_MK.shape
  n = w_2NK.shape[1]
  # [2, N, K] -> [2N, K] and [2, N] -> [2N] are views of the same bytes: no copy.
  return _launch(x8_MK, (w_2NK.reshape(2 * n, k),), (w_scale_2N.reshape(2 * n),), n=n, out_dtype=out_dtype,
                 config=config or _config_a8(m, k, n, True), transposed=True, gate_up=True, interpret=interpret,
                 x_scale_M=x_scale_M)

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

Three entry points share one kernel body: `matmul` (w as [K, N]),
`matmul_nt` (w as [N, K]: the tied LM head that multiplies by the [V, D]
embedding, and fp8 weights in `quant.Fp8WeightNK`) and `gate_up_silu` (two
weights streamed by the same program, [K, N] or [N, K], silu(x @ w_gate) *
(x @ w_up) applied before the only store).

Axis letters, local to this kernel (the GEMM convention, not jserve/shapes.py's
KV heads and query heads): M rows of x, K the contracted dim, N output
columns, Z the K splits.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_matmul import reference, tuning

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
FP8_DTYPES = reference.FP8_DTYPES


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


def _matmul_kernel(x_ref, *refs, m, n, cfg, steps, transposed, gate_up, split_out, scaled):
  """One program: a block_m x block_n output tile (of each weight) over `steps` K blocks of one split.
  `refs`: the weights, their scales when `scaled`, then the outputs."""
  num_w = 2 if gate_up else 1
  num_s = num_w if scaled else 0
  w_refs, s_refs, o_refs = refs[:num_w], refs[num_w:num_w + num_s], refs[num_w + num_s:]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  i_m, i_n, i_z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = pl.ds(i_m * bm, bm), pl.ds(i_n * bn, bn)
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
    x_MK = load(x_ref.at[rows, ks], None if row_ok_M is None else jnp.broadcast_to(row_ok_M[:, None], (bm, bk)))
    out = []
    # An fp8 weight tile becomes x's dtype here, in registers (`astype` is a no-op otherwise): only the
    # one-byte tile crosses the memory bus.
    for w_ref, acc_MN in zip(w_refs, accs):
      if transposed:
        w_NK = load(w_ref.at[cols, ks], None if col_ok_N is None else jnp.broadcast_to(col_ok_N[:, None], (bn, bk)),
                    fill=False)
        p_MN = lax.dot_general(x_MK, w_NK.astype(x_MK.dtype), (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
      else:
        w_KN = load(w_ref.at[ks, cols], None if col_ok_N is None else jnp.broadcast_to(col_ok_N[None, :], (bk, bn)),
                    fill=False)
        p_MN = lax.dot_general(x_MK, w_KN.astype(x_MK.dtype), (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
      out.append(acc_MN + p_MN)
    return tuple(out)

  accs = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(num_w))
  accs = lax.fori_loop(0, steps, body, accs)
  if scaled:  # once per output column, after the K loop (and before any split sum: see the module docstring)
    accs = tuple(acc_MN * load(s_ref.at[cols], col_ok_N)[None, :] for acc_MN, s_ref in zip(accs, s_refs))

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


def _launch(x_MK, ws, scales, *, n, out_dtype, config, transposed, gate_up, interpret):
  """`scales`: () or one float32 [N] per weight."""
  m, k = x_MK.shape
  cfg = tuning.fit(config, m, k, n, itemsize=x_MK.dtype.itemsize, num_weights=len(ws),
                   w_itemsize=ws[0].dtype.itemsize)
  steps = k // (cfg.block_k * cfg.num_splits)
  split_out = cfg.num_splits > 1
  grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), cfg.num_splits)
  kernel = functools.partial(_matmul_kernel, m=m, n=n, cfg=cfg, steps=steps, transposed=transposed,
                             gate_up=gate_up, split_out=split_out, scaled=bool(scales))
  fp8 = "_fp8" if ws[0].dtype in FP8_DTYPES else ""  # profiles tell the fp8 launches apart,
  nt = "_nt" if transposed else ""  # and those of [N, K] weights
  if split_out:
    out_shape = [jax.ShapeDtypeStruct((cfg.num_splits, m, n), jnp.float32)] * len(ws)
  else:
    out_shape = [jax.ShapeDtypeStruct((m, n), out_dtype)]
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[pl.BlockSpec()] * (1 + len(ws) + len(scales)),
      out_specs=[pl.BlockSpec()] * len(out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name=f"decode_matmul{fp8}{nt}_m{cfg.block_m}_n{cfg.block_n}_k{cfg.block_k}_z{cfg.num_splits}",
  )(x_MK, *ws, *scales)
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

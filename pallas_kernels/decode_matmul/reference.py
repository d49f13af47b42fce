"""Decode-shaped matmuls in plain JAX: the spec the kernel must match.

Axis letters, local to this kernel (the GEMM convention, not the KV heads and
query heads of jserve/shapes.py): M rows of the activation (tokens of a
decode step), K the contracted dim, N output columns.

A weight may be float8 (e4m3 or e5m2) with a float32 scale per output column
(`w_scale_N`): the product is then x times the dequantized weight, w * scale.
Every fp8 value is exact in bfloat16, float16 and float32, so the weight is
converted to x's dtype, multiplied with float32 accumulation, and the product
scaled per column; a per-column factor commutes with the sum over K, so this
is x @ (w * scale) up to float32 rounding (and what jserve.models.quant.fp8_dot
computes).

w8a8 (`matmul_a8_nt`, `gate_up_silu_a8`): x arrives quantized too, e4m3 with a float32 scale per row,
and the fp8 operands are multiplied as they are, with float32 accumulation; the float32 sum times x's
row scale and the weight's column scale is the product, cast once.
"""

import jax
import jax.numpy as jnp

FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def check_scale(w, w_scale_N, n: int) -> str | None:
  """None when `w_scale_N` suits the weight (w has n output columns); otherwise why not.

  An fp8 weight needs its scale: without it the product would be off by a factor per column, and
  nothing downstream could tell.
  """
  if w_scale_N is None:
    if w.dtype in FP8_DTYPES:
      return f"w is {w.dtype} without w_scale_N: an fp8 weight needs its float32 scale per output column"
    return None
  if w_scale_N.shape != (n,) or w_scale_N.dtype != jnp.float32:
    return f"w_scale_N {w_scale_N.shape} {w_scale_N.dtype}: need float32 of shape ({n},), one per output column"
  return None


def _weight(w, x_MK, w_scale_N, n):
  why_not = check_scale(w, w_scale_N, n)
  if why_not:
    raise ValueError(why_not)
  # Only fp8 is converted: other mixed dtypes keep jnp.dot's promotion (the dispatcher's XLA fallback).
  return w.astype(x_MK.dtype) if w.dtype in FP8_DTYPES else w


def _scaled(p_MN, w_scale_N):
  return p_MN if w_scale_N is None else p_MN * w_scale_N


def matmul(x_MK, w_KN, *, out_dtype=None, w_scale_N=None):
  """x @ w with float32 accumulation (times `w_scale_N` per column), cast to `out_dtype` (x's when None)."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  w_KN = _weight(w_KN, x_MK, w_scale_N, w_KN.shape[1])
  return _scaled(jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32), w_scale_N).astype(out_dtype)


def matmul_nt(x_MK, w_NK, *, out_dtype=None, w_scale_N=None):
  """x @ w.T with float32 accumulation: the tied LM head, whose weight is the [V, D] embedding."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  w_NK = _weight(w_NK, x_MK, w_scale_N, w_NK.shape[0])
  p_MN = jnp.einsum("MK,NK->MN", x_MK, w_NK, preferred_element_type=jnp.float32)
  return _scaled(p_MN, w_scale_N).astype(out_dtype)


def gate_up_silu(x_MK, w_gate, w_up, *, out_dtype=None, w_gate_scale_N=None, w_up_scale_N=None,
                 transposed=False):
  """silu(x @ w_gate) * (x @ w_up), both products (each times its scale) and the activation in float32,
  cast once at the end. The weights are [K, N], or [N, K] when `transposed`."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  n_axis = 0 if transposed else 1
  w_gate = _weight(w_gate, x_MK, w_gate_scale_N, w_gate.shape[n_axis])
  w_up = _weight(w_up, x_MK, w_up_scale_N, w_up.shape[n_axis])
  eq = "MK,NK->MN" if transposed else "MK,KN->MN"
  g_MN = _scaled(jnp.einsum(eq, x_MK, w_gate, preferred_element_type=jnp.float32), w_gate_scale_N)
  u_MN = _scaled(jnp.einsum(eq, x_MK, w_up, preferred_element_type=jnp.float32), w_up_scale_N)
  return (jax.nn.silu(g_MN) * u_MN).astype(out_dtype)


def matmul_a8_nt(x8_MK, x_scale_M, w_NK, w_scale_N, *, out_dtype=jnp.bfloat16):
  """(x8 * x_scale) @ (w * w_scale).T for fp8 x [M, K] and w [N, K], each with its float32 scale per row and
  column: the fp8 product accumulated in float32, then both scales."""
  p_MN = jnp.einsum("MK,NK->MN", x8_MK, w_NK, preferred_element_type=jnp.float32)
  return (p_MN * x_scale_M[:, None] * w_scale_N).astype(out_dtype)


def gate_up_silu_a8(x8_MK, x_scale_M, w_2NK, w_scale_2N, *, out_dtype=jnp.bfloat16):
  """silu(g) * u of a stacked pair [2, N, K] (gate, then up) with its scale [2, N], each half as `matmul_a8_nt`."""
  g_MN, u_MN = (jnp.einsum("MK,NK->MN", x8_MK, w_2NK[i], preferred_element_type=jnp.float32)
                * x_scale_M[:, None] * w_scale_2N[i] for i in range(2))
  return (jax.nn.silu(g_MN) * u_MN).astype(out_dtype)

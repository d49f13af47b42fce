"""Decode-shaped matmuls in plain JAX: the spec the kernel must match.

Axis letters, local to this kernel (the GEMM convention, not the KV heads and
query heads of jserve/shapes.py): M rows of the activation (tokens of a
decode step), K the contracted dim, N output columns.
"""

import jax
import jax.numpy as jnp


def matmul(x_MK, w_KN, *, out_dtype=None):
  """x @ w with float32 accumulation, cast to `out_dtype` (x's dtype when None)."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  return jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32).astype(out_dtype)


def matmul_nt(x_MK, w_NK, *, out_dtype=None):
  """x @ w.T with float32 accumulation: the tied LM head, whose weight is the [V, D] embedding."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  return jnp.einsum("MK,NK->MN", x_MK, w_NK, preferred_element_type=jnp.float32).astype(out_dtype)


def gate_up_silu(x_MK, w_gate_KN, w_up_KN, *, out_dtype=None):
  """silu(x @ w_gate) * (x @ w_up), both products and the activation in float32, cast once at the end."""
  out_dtype = x_MK.dtype if out_dtype is None else out_dtype
  g_MN = jnp.dot(x_MK, w_gate_KN, preferred_element_type=jnp.float32)
  u_MN = jnp.dot(x_MK, w_up_KN, preferred_element_type=jnp.float32)
  return (jax.nn.silu(g_MN) * u_MN).astype(out_dtype)

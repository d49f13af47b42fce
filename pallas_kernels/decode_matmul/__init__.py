"""Decode-shaped matmuls: x[M, K] @ w[K, N] for M <= 256, weights streamed from HBM.

Each entry point dispatches on `impl`: "xla" is `jnp.dot` (cuBLAS on a GPU);
"gpu" is the Pallas kernel (Triton lowering), with `interpret=True` runnable
on any machine, which is how the tests run it; "hopper" is the Mosaic GPU
kernel of hopper.py (TMA and wgmma), not yet measured on a GPU; "auto" is the
Triton kernel on GPUs
(except for shapes where `tuning`'s tables record XLA as faster) and XLA
elsewhere. Shapes the kernel does not take (more than `MAX_M` rows,
K not a multiple of 16, mixed dtypes) go to XLA: prefill steps take that path
on every backend by design, so it is not logged. `reference.py` is the spec;
docs/kernels.md describes the kernel.
"""

import jax
from absl import logging

from pallas_kernels.decode_matmul import reference, tuning
from pallas_kernels.decode_matmul.tuning import MAX_M

IMPLS = ("auto", "gpu", "hopper", "xla")


def _use_kernel(impl, x_MK, w, transposed, gate_up=False) -> bool:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  auto = impl == "auto"
  if auto:
    impl = "gpu" if jax.default_backend() == "gpu" else "xla"
  if impl == "xla":
    return False
  from pallas_kernels.decode_matmul import gpu
  why_not = gpu.supports(x_MK, w, transposed=transposed)
  if why_not is None:
    m, k = x_MK.shape
    n = w.shape[0] if transposed else w.shape[1]
    # "auto" follows the measurements: shapes where XLA won are left to XLA.
    return not (auto and tuning.xla_is_faster(m, k, n, gate_up=gate_up))
  if x_MK.ndim == 2 and x_MK.shape[0] > MAX_M:
    return False  # prefill-sized: XLA's own tiles are the right tool, and this is expected
  logging.log_first_n(logging.WARNING, "decode matmul kernel unavailable (%s); using XLA", 1, why_not)
  return False


def _use_hopper(x_MK, w, num_weights=1, transposed=False, interpret=False) -> bool:
  from pallas_kernels.decode_matmul import hopper
  from pallas_kernels.mosaic_gpu import device_supports
  why_not = (hopper.supports(x_MK, w, num_weights=num_weights, transposed=transposed)
             or (None if interpret else device_supports()))
  if why_not is not None and not (x_MK.ndim == 2 and x_MK.shape[0] > MAX_M):  # prefill rows: XLA, as expected
    logging.log_first_n(logging.WARNING, "Hopper matmul kernel unavailable (%s); using XLA", 1, why_not)
  return why_not is None


def decode_matmul(x_MK, w_KN, *, out_dtype=None, impl="auto", interpret=False):
  """x @ w with float32 accumulation, in `out_dtype` (x's dtype when None)."""
  if impl == "hopper":
    if _use_hopper(x_MK, w_KN, interpret=interpret):
      from pallas_kernels.decode_matmul import hopper
      return hopper.matmul(x_MK, w_KN, out_dtype=out_dtype, interpret=interpret)
    return reference.matmul(x_MK, w_KN, out_dtype=out_dtype)
  if _use_kernel(impl, x_MK, w_KN, False):
    from pallas_kernels.decode_matmul import gpu
    return gpu.matmul(x_MK, w_KN, out_dtype=out_dtype, interpret=interpret)
  return reference.matmul(x_MK, w_KN, out_dtype=out_dtype)


def decode_matmul_nt(x_MK, w_NK, *, out_dtype=None, impl="auto", interpret=False):
  """x @ w.T with float32 accumulation, w stored [N, K] (the tied LM head: the [V, D] embedding)."""
  if impl == "hopper":
    if _use_hopper(x_MK, w_NK, transposed=True, interpret=interpret):
      from pallas_kernels.decode_matmul import hopper
      return hopper.matmul_nt(x_MK, w_NK, out_dtype=out_dtype, interpret=interpret)
    return reference.matmul_nt(x_MK, w_NK, out_dtype=out_dtype)
  if _use_kernel(impl, x_MK, w_NK, True):
    from pallas_kernels.decode_matmul import gpu
    return gpu.matmul_nt(x_MK, w_NK, out_dtype=out_dtype, interpret=interpret)
  return reference.matmul_nt(x_MK, w_NK, out_dtype=out_dtype)


def gate_up_silu(x_MK, w_gate_KN, w_up_KN, *, out_dtype=None, impl="auto", interpret=False):
  """silu(x @ w_gate) * (x @ w_up) with float32 products and activation, cast once to `out_dtype`.

  The kernel streams the same column tile of both weights in one program and
  applies the activation before its only store; XLA computes the same thing
  from two dots.
  """
  same = w_up_KN.shape == w_gate_KN.shape and w_up_KN.dtype == w_gate_KN.dtype
  if impl == "hopper":
    if same and _use_hopper(x_MK, w_gate_KN, num_weights=2, interpret=interpret):
      from pallas_kernels.decode_matmul import hopper
      return hopper.gate_up_silu(x_MK, w_gate_KN, w_up_KN, out_dtype=out_dtype, interpret=interpret)
    return reference.gate_up_silu(x_MK, w_gate_KN, w_up_KN, out_dtype=out_dtype)
  if (_use_kernel(impl, x_MK, w_gate_KN, False, gate_up=True) and w_up_KN.shape == w_gate_KN.shape
      and w_up_KN.dtype == w_gate_KN.dtype):
    from pallas_kernels.decode_matmul import gpu
    return gpu.gate_up_silu(x_MK, w_gate_KN, w_up_KN, out_dtype=out_dtype, interpret=interpret)
  return reference.gate_up_silu(x_MK, w_gate_KN, w_up_KN, out_dtype=out_dtype)


__all__ = ["IMPLS", "MAX_M", "decode_matmul", "decode_matmul_nt", "gate_up_silu"]

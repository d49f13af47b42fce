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

A weight may be fp8 (weight-only quantization) with its float32 scale per
output column (`w_scale_N`; for gate/up one per weight): the Triton kernel
converts the one-byte tiles to x's dtype in registers. The Hopper kernel takes
no fp8 weight (see hopper.supports), so impl="hopper" leaves those to XLA. An
fp8 weight without its scale is a ValueError whatever `impl` says.

w8a8 (fp8 activations by fp8 weights [N, K]): `use_a8_kernel` says whether a product goes to the Triton
kernel's w8a8 entries, `matmul_a8_nt` and `gate_up_silu_a8`, which take x quantized per row by the caller
(jserve/models/quant.py keeps XLA's w8a8 product for the rest). "gpu" takes every decode-sized product;
"auto" only the shapes whose w8a8 table (`tuning.GPU_TABLE_A8`) names a tile, none until measured.
"""

import functools

import jax
import jax.numpy as jnp
from absl import logging

from pallas_kernels.decode_matmul import reference, tuning
from pallas_kernels.decode_matmul.tuning import MAX_M

IMPLS = ("auto", "gpu", "hopper", "xla")


def _check_scale(w, w_scale_N, transposed=False):
  why_not = reference.check_scale(w, w_scale_N, w.shape[0] if transposed else w.shape[-1])
  if why_not:
    raise ValueError(why_not)


def _device_converts(w, interpret) -> str | None:
  """Why this GPU's Triton cannot convert `w`'s dtype, or None (also off GPUs and when interpreting)."""
  if interpret or w.dtype != jnp.float8_e4m3fn or jax.default_backend() != "gpu":
    return None
  capability = str(getattr(jax.devices()[0], "compute_capability", "") or "")
  major, _, minor = capability.partition(".")
  if major.isdigit() and minor.isdigit() and (int(major), int(minor)) < (8, 9):
    return f"compute capability {capability}: Triton converts float8_e4m3fn from 8.9 (Ada, Hopper) on"
  return None


def _use_kernel(impl, x_MK, w, transposed, gate_up=False, w_scale_N=None, interpret=False) -> bool:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  auto = impl == "auto"
  if auto:
    impl = "gpu" if jax.default_backend() == "gpu" else "xla"
  if impl == "xla":
    return False
  from pallas_kernels.decode_matmul import gpu
  why_not = gpu.supports(x_MK, w, transposed=transposed, w_scale_N=w_scale_N) or _device_converts(w, interpret)
  if why_not is None:
    m, k = x_MK.shape
    n = w.shape[0] if transposed else w.shape[1]
    # "auto" follows the measurements: shapes where XLA won are left to XLA.
    return not (auto and tuning.xla_is_faster(m, k, n, gate_up=gate_up, fp8=w.dtype in gpu.FP8_DTYPES))
  if x_MK.ndim == 2 and x_MK.shape[0] > MAX_M:
    return False  # prefill-sized: XLA's own tiles are the right tool, and this is expected
  logging.log_first_n(logging.WARNING, "decode matmul kernel unavailable (%s); using XLA", 1, why_not)
  return False


def use_a8_kernel(impl, m: int, k: int, n: int, *, gate_up: bool = False, interpret: bool = False) -> bool:
  """Whether a w8a8 product of m rows by an [n, k] fp8 weight (a stacked [2, n, k] pair with `gate_up`) runs in
  the Triton kernel: under "gpu" (or its interpreter) whenever the kernel takes the shape, under "auto" on a
  GPU only where the w8a8 table names a tile. fp8 needs compute capability 8.9 or later (Ada, Hopper)."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  if impl in ("xla", "hopper") or m > MAX_M or k % 32:
    return False
  on_gpu = jax.default_backend() == "gpu"
  if impl == "auto" and (not on_gpu or tuning.xla_is_faster(m, k, n, gate_up=gate_up, a8=True)):
    return False
  if not interpret and not on_gpu:
    return False
  why_not = _device_converts(jax.ShapeDtypeStruct((k, n), jnp.float8_e4m3fn), interpret)
  if why_not:
    logging.log_first_n(logging.WARNING, "w8a8 decode matmul kernel unavailable (%s); using XLA", 1, why_not)
  return why_not is None


def matmul_a8_nt(x8_MK, x_scale_M, w_NK, w_scale_N, *, out_dtype=jnp.bfloat16, interpret=False):
  """The Triton kernel's w8a8 product (see `use_a8_kernel`): fp8 x [M, K] and its scale per row by fp8 w [N, K]
  and its scale per column, accumulated in float32, in `out_dtype`."""
  from pallas_kernels.decode_matmul import gpu
  return gpu.matmul_a8_nt(x8_MK, x_scale_M, w_NK, w_scale_N, out_dtype=out_dtype, interpret=interpret)


def gate_up_silu_a8(x8_MK, x_scale_M, w_2NK, w_scale_2N, *, out_dtype=jnp.bfloat16, interpret=False):
  """silu(gate) * up of a stacked fp8 pair [2, N, K] (scale [2, N]) with the fp8 rows of x, in the Triton kernel."""
  from pallas_kernels.decode_matmul import gpu
  return gpu.gate_up_silu_a8(x8_MK, x_scale_M, w_2NK, w_scale_2N, out_dtype=out_dtype, interpret=interpret)


def _use_hopper(x_MK, w, num_weights=1, transposed=False, interpret=False) -> bool:
  from pallas_kernels.decode_matmul import hopper
  from pallas_kernels.mosaic_gpu import device_supports
  why_not = (hopper.supports(x_MK, w, num_weights=num_weights, transposed=transposed)
             or (None if interpret else device_supports()))
  if why_not is not None and not (x_MK.ndim == 2 and x_MK.shape[0] > MAX_M):  # prefill rows: XLA, as expected
    logging.log_first_n(logging.WARNING, "Hopper matmul kernel unavailable (%s); using XLA", 1, why_not)
  return why_not is None


def decode_matmul(x_MK, w_KN, *, out_dtype=None, impl="auto", interpret=False, w_scale_N=None):
  """x @ w with float32 accumulation (times `w_scale_N` per column: an fp8 weight's scale), in `out_dtype`
  (x's dtype when None)."""
  _check_scale(w_KN, w_scale_N)
  scale = dict(w_scale_N=w_scale_N)
  if impl == "hopper":
    if _use_hopper(x_MK, w_KN, interpret=interpret) and w_scale_N is None:
      from pallas_kernels.decode_matmul import hopper
      return hopper.matmul(x_MK, w_KN, out_dtype=out_dtype, interpret=interpret)
    return reference.matmul(x_MK, w_KN, out_dtype=out_dtype, **scale)
  if _use_kernel(impl, x_MK, w_KN, False, w_scale_N=w_scale_N, interpret=interpret):
    from pallas_kernels.decode_matmul import gpu
    return gpu.matmul(x_MK, w_KN, out_dtype=out_dtype, interpret=interpret, **scale)
  return reference.matmul(x_MK, w_KN, out_dtype=out_dtype, **scale)


def decode_matmul_nt(x_MK, w_NK, *, out_dtype=None, impl="auto", interpret=False, w_scale_N=None):
  """x @ w.T with float32 accumulation, w stored [N, K] (the tied LM head: the [V, D] embedding)."""
  _check_scale(w_NK, w_scale_N, transposed=True)
  scale = dict(w_scale_N=w_scale_N)
  if impl == "hopper":
    if _use_hopper(x_MK, w_NK, transposed=True, interpret=interpret) and w_scale_N is None:
      from pallas_kernels.decode_matmul import hopper
      return hopper.matmul_nt(x_MK, w_NK, out_dtype=out_dtype, interpret=interpret)
    return reference.matmul_nt(x_MK, w_NK, out_dtype=out_dtype, **scale)
  if _use_kernel(impl, x_MK, w_NK, True, w_scale_N=w_scale_N, interpret=interpret):
    from pallas_kernels.decode_matmul import gpu
    return gpu.matmul_nt(x_MK, w_NK, out_dtype=out_dtype, interpret=interpret, **scale)
  return reference.matmul_nt(x_MK, w_NK, out_dtype=out_dtype, **scale)


def gate_up_silu(x_MK, w_gate, w_up, *, out_dtype=None, impl="auto", interpret=False, w_gate_scale_N=None,
                 w_up_scale_N=None, transposed=False):
  """silu(x @ w_gate) * (x @ w_up) with float32 products and activation, cast once to `out_dtype`.

  The kernel streams the same column tile of both weights in one program and
  applies the activation before its only store; XLA computes the same thing
  from two dots. The weights are [K, N], or [N, K] when `transposed` (as `quant.Fp8WeightNK` stores
  fp8 weights for the kernel). Each may have a scale per column (an fp8 weight must); the kernel takes
  the pair when both weights share shape and dtype and both or neither have scales, else XLA does.
  """
  _check_scale(w_gate, w_gate_scale_N, transposed)
  _check_scale(w_up, w_up_scale_N, transposed)
  scales = dict(w_gate_scale_N=w_gate_scale_N, w_up_scale_N=w_up_scale_N)
  same = (w_up.shape == w_gate.shape and w_up.dtype == w_gate.dtype
          and (w_gate_scale_N is None) == (w_up_scale_N is None))
  fallback = functools.partial(reference.gate_up_silu, x_MK, w_gate, w_up, out_dtype=out_dtype,
                               transposed=transposed, **scales)
  if impl == "hopper":
    if (same and not transposed and w_gate_scale_N is None
        and _use_hopper(x_MK, w_gate, num_weights=2, interpret=interpret)):
      from pallas_kernels.decode_matmul import hopper
      return hopper.gate_up_silu(x_MK, w_gate, w_up, out_dtype=out_dtype, interpret=interpret)
    return fallback()
  if same and _use_kernel(impl, x_MK, w_gate, transposed, gate_up=True, w_scale_N=w_gate_scale_N,
                          interpret=interpret):
    from pallas_kernels.decode_matmul import gpu
    return gpu.gate_up_silu(x_MK, w_gate, w_up, out_dtype=out_dtype, interpret=interpret, transposed=transposed,
                            **scales)
  return fallback()


__all__ = ["IMPLS", "MAX_M", "decode_matmul", "decode_matmul_nt", "gate_up_silu", "gate_up_silu_a8", "matmul_a8_nt",
           "use_a8_kernel"]

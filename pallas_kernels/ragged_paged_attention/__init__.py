"""Ragged paged attention: one launch per layer for a mixed batch of prefill chunks and decodes.

`ragged_paged_attention(...)` dispatches by platform (`impl="auto"`): the GPU
Pallas kernel (Triton lowering) on GPUs, the TPU Pallas kernel (Mosaic) on
TPUs, the pure-JAX reference elsewhere, and the reference wherever a kernel
cannot take the shapes. `impl="gpu"` or `"tpu"` with `interpret=True` runs a
kernel in Pallas' interpreter on any machine, which is how the tests run them
on CPU. `reference.py` documents the KV pool layout and the exact semantics;
docs/kernels.md describes the kernels.
"""

import jax
from absl import logging

from pallas_kernels.ragged_paged_attention import reference

IMPLS = ("auto", "gpu", "tpu", "reference")


def ragged_paged_attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                           *, sm_scale, sliding_window=None, soft_cap=None, impl="auto", interpret=False,
                           decode_only=False):
  """See `reference.ragged_paged_attention` for the semantics; `impl` picks the backend.

  `decode_only`: every sequence has one query row (a decode batch), so the GPU
  kernel runs its decode launch only (see `gpu.ragged_paged_attention`); the
  other backends compute the same either way.

  Rows past `cu_q_lens_E[num_seqs]` are zero, as in the reference; no kernel
  computes them (the GPU kernel does not even load them; the TPU kernel moves
  whole query tiles and writes such rows back unchanged).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    impl = {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "reference")
  args = (q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs)
  kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
  if impl == "gpu":
    from pallas_kernels.ragged_paged_attention import gpu
    why_not = gpu.supports(q_TNH, kv_pages_PSCH)
    if why_not is None:
      return gpu.ragged_paged_attention(*args, interpret=interpret, decode_only=decode_only, **kw)
    logging.log_first_n(logging.WARNING, "GPU attention kernel unavailable (%s); using the reference", 1, why_not)
  elif impl == "tpu":
    from pallas_kernels.ragged_paged_attention import tpu
    why_not = tpu.supports(q_TNH, kv_pages_PSCH)
    if why_not is None:
      return tpu.ragged_paged_attention(*args, interpret=interpret, **kw)
    logging.log_first_n(logging.WARNING, "TPU attention kernel unavailable (%s); using the reference", 1, why_not)
  return reference.ragged_paged_attention(*args, **kw)


def write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, slots_T):
  """Scatters the step's new keys and values into their pages (see reference.write_kv_pages).

  A separate XLA scatter on every backend, before the attention call. On the
  H200 it measured at most 57 us for a 64-token decode step and 286 us for
  16k prefill tokens (docs/benchmarks/kernels.md). The GPU kernel has a
  fused variant, `gpu.ragged_paged_attention_write`, which tools/bench_kernels.py
  times against this scatter; it is not used here until the H200 says it is faster.
  """
  return reference.write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, slots_T)


def default_platform():
  return jax.default_backend()

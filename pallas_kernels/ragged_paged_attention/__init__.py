"""Ragged paged attention: one launch per layer for a mixed batch of prefill chunks and decodes.

`ragged_paged_attention(...)` dispatches by platform (`impl="auto"`): the GPU
and TPU Pallas kernels on those platforms, the pure-JAX reference elsewhere.
`reference.py` documents the KV pool layout and the exact semantics.
"""

import jax

from pallas_kernels.ragged_paged_attention import reference

IMPLS = ("auto", "reference")


def ragged_paged_attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                           *, sm_scale, sliding_window=None, soft_cap=None, impl="auto", interpret=False):
  """See `reference.ragged_paged_attention` for the semantics; `impl` picks the backend."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  del interpret  # only the Pallas kernels take it
  return reference.ragged_paged_attention(
      q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
      sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)


def write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, slots_T):
  """Scatters the step's new keys and values into their pages (see reference.write_kv_pages)."""
  return reference.write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, slots_T)


def default_platform():
  return jax.default_backend()

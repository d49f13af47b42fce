"""Pallas kernels of jserve, each with a pure-JAX reference. Knows nothing of jserve."""

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, write_kv_pages

__all__ = ["ragged_paged_attention", "write_kv_pages"]

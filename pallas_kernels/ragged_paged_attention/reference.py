"""Ragged paged attention in plain JAX: slow, exact, the spec the kernels must match.

The KV pool of one layer is `kv_pages_PSCH`: [num_pages, page_size,
2 * num_kv_heads, head_dim], the key of KV head k at slot 2k and its value at
2k + 1. Its dtype may differ from the queries' (an fp8 pool under bfloat16
queries): keys and values are read up to the queries' precision or higher.
Sequence i of the step owns the query rows
`q_TNH[cu_q_lens_E[i]:cu_q_lens_E[i + 1]]`; those queries are the last
positions of its `kv_lens_B[i]`-token context, whose keys and values live in
pages `page_indices_BP[i, :ceil(kv_lens_B[i] / page_size)]`. Each query attends
causally to its context (and only to the last `sliding_window` positions when
that is set). Rows from `cu_q_lens_E[num_seqs]` on are padding: their output is
zero. Query head n uses KV head n // (num_heads // num_kv_heads).
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30  # not -inf: a fully masked padding row must not make NaNs


# Rows are processed in blocks of this many so that the per-row gather of a whole context
# ([rows, context, C, H]) stays small; it changes memory, not results.
_ROW_BLOCK = 128


def ragged_paged_attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                           *, sm_scale, sliding_window=None, soft_cap=None):
  """Attention of a ragged batch of queries over paged KV; returns [T, N, H] in q's dtype."""
  num_tokens = q_TNH.shape[0]
  kv_lens_B, page_indices_BP, cu_q_lens_E = map(jnp.asarray, (kv_lens_B, page_indices_BP, cu_q_lens_E))
  attend = lambda q, t: _attend_rows(q, t, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E,
                                     jnp.reshape(num_seqs, ()), sm_scale, sliding_window, soft_cap)
  t_T = jnp.arange(num_tokens, dtype=jnp.int32)
  if num_tokens <= _ROW_BLOCK:
    return attend(q_TNH, t_T)
  num_blocks = -(-num_tokens // _ROW_BLOCK)
  pad = num_blocks * _ROW_BLOCK - num_tokens
  q_RBNH = jnp.pad(q_TNH, ((0, pad), (0, 0), (0, 0))).reshape(num_blocks, _ROW_BLOCK, *q_TNH.shape[1:])
  t_RB = jnp.pad(t_T, (0, pad), constant_values=num_tokens).reshape(num_blocks, _ROW_BLOCK)
  o_RBNH = jax.lax.map(lambda args: attend(*args), (q_RBNH, t_RB))
  return o_RBNH.reshape(-1, *q_TNH.shape[1:])[:num_tokens]


def _attend_rows(q_TNH, t_T, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs, sm_scale,
                 sliding_window, soft_cap):
  """Attention for the rows `t_T` of the step (their queries `q_TNH`)."""
  num_tokens, num_heads, head_dim = q_TNH.shape
  _, page_size, num_combined, _ = kv_pages_PSCH.shape
  num_kv_heads = num_combined // 2
  max_seqs, pages_per_seq = page_indices_BP.shape
  ctx_len = pages_per_seq * page_size

  # Sequence of each row: the i with cu[i] <= t < cu[i + 1].
  seq_T = jnp.searchsorted(cu_q_lens_E[1:], t_T, side="right").astype(jnp.int32)
  live_T = t_T < cu_q_lens_E[num_seqs]
  seq_T = jnp.minimum(seq_T, max_seqs - 1)
  kv_len_T = kv_lens_B[seq_T]
  q_pos_T = kv_len_T - (cu_q_lens_E[seq_T + 1] - t_T)

  kv_TXCH = kv_pages_PSCH[page_indices_BP[seq_T]].reshape(num_tokens, ctx_len, num_combined, head_dim)
  k_TXKH = kv_TXCH[:, :, 0::2].astype(jnp.float32)
  v_TXKH = kv_TXCH[:, :, 1::2].astype(jnp.float32)
  q_TKGH = q_TNH.reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim).astype(jnp.float32)

  s_TKGX = jnp.einsum("TKGH,TXKH->TKGX", q_TKGH, k_TXKH, precision=jax.lax.Precision.HIGHEST) * sm_scale
  if soft_cap is not None:
    s_TKGX = soft_cap * jnp.tanh(s_TKGX / soft_cap)
  x_X = jnp.arange(ctx_len, dtype=jnp.int32)
  mask_TX = (x_X[None, :] <= q_pos_T[:, None]) & (x_X[None, :] < kv_len_T[:, None])
  if sliding_window is not None:
    mask_TX &= x_X[None, :] > q_pos_T[:, None] - sliding_window
  s_TKGX = jnp.where(mask_TX[:, None, None, :], s_TKGX, _MASKED)
  p_TKGX = jax.nn.softmax(s_TKGX, axis=-1)
  o_TKGH = jnp.einsum("TKGX,TXKH->TKGH", p_TKGX, v_TXKH, precision=jax.lax.Precision.HIGHEST)
  o_TNH = o_TKGH.reshape(num_tokens, num_heads, head_dim)
  return jnp.where(live_T[:, None, None], o_TNH, 0).astype(q_TNH.dtype)


def write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, slots_T):
  """Writes each token's key and value into flat slot `page * page_size + offset`.

  A slot outside the pool (padding rows use `num_pages * page_size`) is dropped.
  """
  num_pages, page_size, num_combined, head_dim = kv_pages_PSCH.shape
  num_tokens = k_TKH.shape[0]
  kv_TCH = jnp.stack([k_TKH, v_TKH], axis=2).reshape(num_tokens, num_combined, head_dim)
  flat_ZCH = kv_pages_PSCH.reshape(num_pages * page_size, num_combined, head_dim)
  flat_ZCH = flat_ZCH.at[slots_T].set(to_pool_dtype(kv_TCH, kv_pages_PSCH.dtype), mode="drop")
  return flat_ZCH.reshape(num_pages, page_size, num_combined, head_dim)


def to_pool_dtype(x, dtype):
  """`x` as the pool's dtype. An 8-bit float pool (an fp8 KV cache) stores values unscaled, clipped to
  the format's finite range: a plain cast would turn a value past it into NaN (e4m3 has no infinity)."""
  if jnp.dtype(dtype).itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
    top = float(jnp.finfo(dtype).max)
    x = jnp.clip(x, -top, top)
  return x.astype(dtype)


def query_group(q_TNH, kv_pages_PSCH, supports) -> int:
  """Query heads per KV head, after the checks every kernel makes: GQA shapes, then the kernel's `supports`."""
  num_heads, num_kv_heads = q_TNH.shape[1], kv_pages_PSCH.shape[2] // 2
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  why_not = supports(q_TNH, kv_pages_PSCH)
  if why_not:
    raise ValueError(why_not)
  return num_heads // num_kv_heads

"""Ragged paged attention for TPUs: Pallas with the Mosaic lowering.

Grid: (query block, KV head). Program (i, k) owns tokens [i * BQ, (i + 1) * BQ)
of the flattened step and the G query heads of KV head k: its query and
output tiles are [G, BQ, H] blocks of a head-major copy of q ([K, G, T, H]),
moved by the Pallas pipeline. The step metadata (context lengths, the page
table, cu_q_lens and, per query block, its first and last sequence) is
prefetched into SMEM before the grid runs.

Inside a program, every sequence with rows in the block is handled in turn,
each over the KV blocks its rows can see (causal, and within the sliding
window). A KV block is `pages_per_block` pages, fetched page by page from the
pool in HBM by asynchronous copies driven by the page table into one of two
VMEM buffers: while block j is computed, block j + 1 (possibly of the next
sequence) is already being copied into the other. The softmax is the online
(flash) one; at the end of a sequence its rows of the output tile are set.

Each copy moves one [page_size, head_dim] slab (the key, or the value, of one
KV head of one page) into its own slot of a [2, pages_per_block, page_size,
head_dim] buffer, so the buffer is never reshaped as a ref (Pallas' TPU
interpreter cannot follow a reshaped DMA target); the loaded block is
reshaped as a value instead.

This file runs under TPU interpret mode on the CPU (the tests); it has not
been run on a TPU.

Axis letters as in gpu.py: M rows of a tile (query head x token), X KV
positions of one block, 1 a kept axis of size one (TPU vectors stay 2-D).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import reference, tuning

_MASKED = -1e30  # finite, as in the reference: a fully masked row must not make NaNs


def supports(q_TNH, kv_pages_PSCH) -> str | None:
  """None when this kernel handles these shapes; otherwise why not."""
  page_size = kv_pages_PSCH.shape[1]
  if page_size % 8:
    return f"page_size={page_size}: need a multiple of 8 (TPU sublanes)"
  if q_TNH.dtype not in (jnp.float32, jnp.bfloat16):
    return f"dtype={q_TNH.dtype}: need float32 or bfloat16"
  if kv_pages_PSCH.dtype != q_TNH.dtype:
    return f"KV pool dtype {kv_pages_PSCH.dtype}: need the queries' dtype {q_TNH.dtype}"
  return None


def _div(x, d):
  # Division of non-negative ints; `//` would add sign fix-ups the TPU lowering
  # handles only on a TPU.
  return lax.div(x, jnp.int32(d))


def _kernel(kv_lens_ref, pages_ref, cu_q_lens_ref, first_seq_ref, last_seq_ref,  # scalar prefetch (SMEM)
            q_ref, init_ref, kv_hbm_ref,  # inputs: [G, BQ, H] tiles, the pool in HBM
            o_ref,  # output: [G, BQ, H] tile
            k_buf, v_buf, sems,  # scratch: [2, pages_per_block, S, H] x 2, two DMA semaphores
            *, pages_per_seq, sm_scale, sliding_window, soft_cap):
  q_block = pl.program_id(0)
  kv_head = pl.program_id(1)
  group, block_q, head_dim = q_ref.shape
  _, pages_per_block, page_size, _ = k_buf.shape
  block_n = pages_per_block * page_size
  num_pages = kv_hbm_ref.shape[0]
  rows = group * block_q
  f32 = q_ref.dtype == jnp.float32
  precision = lax.Precision.HIGHEST if f32 else None
  t0 = q_block * block_q
  first_seq = first_seq_ref[q_block]
  last_seq = last_seq_ref[q_block]

  o_ref[...] = init_ref[...]  # rows of no live sequence keep what the caller passed

  def seq_bounds(seq):
    """Positions the block's rows of `seq` see: KV blocks [lo, hi), at least one."""
    q_end = cu_q_lens_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    row_first = jnp.maximum(cu_q_lens_ref[seq], t0)
    row_last = jnp.minimum(q_end, t0 + block_q) - 1
    pos_last = kv_len - q_end + row_last
    lo = 0
    if sliding_window is not None:
      lo = _div(jnp.maximum(kv_len - q_end + row_first - sliding_window + 1, 0), block_n)
    hi = jnp.maximum(_div(jnp.maximum(pos_last + block_n, 0), block_n), lo + 1)
    return lo, hi

  def copies(seq, blk, slot):
    """The asynchronous copies of KV block `blk` of `seq` into buffer `slot`."""
    last_page = jnp.maximum(_div(jnp.maximum(kv_lens_ref[seq] + page_size - 1, 0), page_size) - 1, 0)
    out = []
    for p in range(pages_per_block):
      # Past the context the last page is fetched again (and masked): every
      # block issues the same copies, so every wait has its copy.
      slot_in_seq = jnp.minimum(blk * pages_per_block + p, last_page)
      page = jnp.clip(pages_ref[seq * pages_per_seq + slot_in_seq], 0, num_pages - 1)
      out.append(pltpu.make_async_copy(kv_hbm_ref.at[page, :, 2 * kv_head, :], k_buf.at[slot, p], sems.at[slot]))
      out.append(pltpu.make_async_copy(kv_hbm_ref.at[page, :, 2 * kv_head + 1, :], v_buf.at[slot, p],
                                       sems.at[slot]))
    return out

  def start(seq, blk, slot):
    for c in copies(seq, blk, slot):
      c.start()

  def wait(slot):
    for c in copies(first_seq, 0, slot):  # same shapes as the copies started; only their sizes matter
      c.wait()

  m_M = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  t_M1 = t0 + lax.rem(m_M, jnp.int32(block_q))  # row m is query head m // BQ of token t0 + m % BQ

  def attend_block(seq, blk, slot, carry):
    m_M1, l_M1, acc_MH = carry
    q_end = cu_q_lens_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    q_MH = q_ref[...].reshape(rows, head_dim)
    k_XH = k_buf[slot].reshape(block_n, head_dim)
    v_XH = v_buf[slot].reshape(block_n, head_dim)
    s_MX = lax.dot_general(q_MH, k_XH, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
      s_MX = soft_cap * jnp.tanh(s_MX / soft_cap)
    pos_M1 = kv_len - q_end + t_M1
    x_1X = blk * block_n + lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    visible_MX = (t_M1 >= cu_q_lens_ref[seq]) & (t_M1 < q_end) & (x_1X <= pos_M1) & (x_1X < kv_len)
    if sliding_window is not None:
      visible_MX &= x_1X > pos_M1 - sliding_window
    s_MX = jnp.where(visible_MX, s_MX, _MASKED)
    m_new_M1 = jnp.maximum(m_M1, jnp.max(s_MX, axis=1, keepdims=True))
    alpha_M1 = jnp.exp(m_M1 - m_new_M1)
    p_MX = jnp.exp(s_MX - m_new_M1)
    # Masked values (past the context, or another sequence's copy of a last
    # page) may be anything, NaN included: zero them so p = 0 cancels them.
    v_XH = jnp.where(x_1X.reshape(block_n, 1) < kv_len, v_XH, 0).astype(v_XH.dtype)
    pv_MH = lax.dot_general(p_MX.astype(v_XH.dtype), v_XH, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    return m_new_M1, l_M1 * alpha_M1 + jnp.sum(p_MX, axis=1, keepdims=True), acc_MH * alpha_M1 + pv_MH

  def seq_body(seq, slot):
    lo, hi = seq_bounds(seq)

    def blk_body(blk, carry):
      slot, state = carry

      @pl.when(blk + 1 < hi)
      def _():
        start(seq, blk + 1, 1 - slot)

      @pl.when((blk + 1 == hi) & (seq < last_seq))
      def _():
        start(seq + 1, seq_bounds(seq + 1)[0], 1 - slot)

      wait(slot)
      return 1 - slot, attend_block(seq, blk, slot, state)

    state = (jnp.full((rows, 1), _MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    slot, (_, l_M1, acc_MH) = lax.fori_loop(lo, hi, blk_body, (slot, state))
    mine_M1 = (t_M1 >= cu_q_lens_ref[seq]) & (t_M1 < cu_q_lens_ref[seq + 1])
    o_MH = acc_MH / jnp.where(mine_M1, l_M1, 1.0)
    o_ref[...] = jnp.where(mine_M1, o_MH, o_ref[...].reshape(rows, head_dim).astype(jnp.float32)).astype(
        o_ref.dtype).reshape(group, block_q, head_dim)
    return slot

  @pl.when(first_seq <= last_seq)
  def _():
    start(first_seq, seq_bounds(first_seq)[0], 0)
    lax.fori_loop(first_seq, last_seq + 1, seq_body, jnp.int32(0))


def _block_seqs(cu_q_lens_E, num_seqs, *, num_blocks, block_q):
  """First and last sequence with rows in each query block ([Q] int32; last < first when none)."""
  total = cu_q_lens_E[num_seqs]
  start_Q = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
  last_tok_Q = jnp.minimum(start_Q + block_q, total) - 1
  ends_E = cu_q_lens_E[1:]
  first_Q = jnp.sum(ends_E[None, :] <= start_Q[:, None], axis=1, dtype=jnp.int32)
  last_Q = jnp.sum(ends_E[None, :] <= last_tok_Q[:, None], axis=1, dtype=jnp.int32)
  last_Q = jnp.where(start_Q < total, last_Q, -1)
  return first_Q, last_Q


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "config"))
def ragged_paged_attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, out_TNH=None, interpret=False, config=None):
  """Same semantics as `reference.ragged_paged_attention`, with the KV pool layout documented there.

  Rows outside the live query rows keep the value they have in `out_TNH`
  (zeros when it is None). `interpret=True` runs Pallas' TPU interpreter.
  `config` (a `tuning.TpuConfig`) overrides the block sizes.
  """
  num_tokens, num_heads, head_dim = q_TNH.shape
  num_pages, page_size, num_combined, _ = kv_pages_PSCH.shape
  num_kv_heads = num_combined // 2
  group = reference.query_group(q_TNH, kv_pages_PSCH, supports)
  if config is None:
    config = tuning.tpu_config(head_dim, page_size, group)
  max_seqs, pages_per_seq = page_indices_BP.shape
  block_q = min(config.block_q, -(-num_tokens // 8) * 8)
  num_blocks = -(-num_tokens // block_q)
  padded = num_blocks * block_q
  if out_TNH is None:
    out_TNH = jnp.zeros(q_TNH.shape, q_TNH.dtype)

  def to_kgth(x_TNH):
    x_TNH = jnp.pad(x_TNH, ((0, padded - num_tokens), (0, 0), (0, 0)))
    return x_TNH.reshape(padded, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)

  cu_q_lens_E = cu_q_lens_E.astype(jnp.int32)
  first_Q, last_Q = _block_seqs(cu_q_lens_E, jnp.reshape(num_seqs, ()).astype(jnp.int32), num_blocks=num_blocks,
                                block_q=block_q)
  tile = pl.BlockSpec((None, group, block_q, head_dim), lambda i, k, *_: (k, 0, i, 0))
  kernel = functools.partial(_kernel, pages_per_seq=pages_per_seq, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap)
  buf = pltpu.VMEM((2, config.pages_per_block, page_size, head_dim), kv_pages_PSCH.dtype)
  o_KGTH = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(num_blocks, num_kv_heads),
          in_specs=[tile, tile, pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=tile,
          scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2,))],
      ),
      out_shape=jax.ShapeDtypeStruct((num_kv_heads, group, padded, head_dim), q_TNH.dtype),
      input_output_aliases={6: 0},  # the initial output (operand 6, after the 5 prefetched) becomes the output
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="ragged_paged_attention_tpu",
  )(kv_lens_B.astype(jnp.int32), page_indices_BP.astype(jnp.int32).reshape(-1), cu_q_lens_E, first_Q, last_Q,
    to_kgth(q_TNH), to_kgth(out_TNH), kv_pages_PSCH)
  return o_KGTH.transpose(2, 0, 1, 3).reshape(padded, num_heads, head_dim)[:num_tokens]

"""Prefill attention for Hopper GPUs: Pallas with the Mosaic GPU lowering (TMA and warpgroup MMA).

The prefill launch of gpu.py, written for the tensor-core path that the
Triton lowering does not reach through Pallas: keys and values come into
shared memory by TMA, page by page through the page table, and both matmuls
are warpgroup MMAs (wgmma) with the accumulator in registers. gpu.py's
Triton prefill reached 49% of cuDNN's TFLOP/s on an H200; this is the
attempt at the 70% target. The decode launch stays in gpu.py (it is
bandwidth-bound and already near the copy ceiling).

One program is `BLOCK_Q` = 128 query tokens of one sequence and one query
head, in three warpgroups:

- warpgroup 2 is the producer: for each KV block of `block_kv` positions it
  looks up the block's pages and issues one TMA copy per page (keys and
  values separately) into a ring of `num_stages` shared-memory slots, each
  slot guarded by a "full" barrier (the copies landed) and an "empty" one
  (both consumers are done with it);
- warpgroups 0 and 1 are consumers: 64 query rows each (one wgmma M tile),
  online softmax in registers, masks only on the blocks that straddle the
  causal diagonal or the sliding-window edge.

Programs are laid out (query head, item), heads fastest, so the G heads that
share a KV head run side by side and read its blocks once from HBM and then
from L2. Work items are gpu.py's prefill items at 128 tokens, each starting on a
multiple of 8 rows (`ROW_ALIGN`).

What the kernel leaves alone: output rows of other items and padding rows
(each consumer stores its live rows only, by TMA in power-of-two chunks), so
it writes into `out_TNH` in place like the Triton launches. It reads only
the pages of the item's own sequence, whole pages at a time. What it
assumes, unlike gpu.py's masked loads: the slots of those pages past
`kv_len` hold finite values. Their scores are masked, but a value row still
meets its zero weight in the second matmul, and 0 x NaN is NaN. The
engine's pool starts zeroed and only ever takes the model's keys and
values. Query rows past the end of `q_TNH` are left to TMA, which reads
zeros there.
"""

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mosaic_gpu import device_supports, interpret_params, lane_params, plgpu
from pallas_kernels.ragged_paged_attention.tuning import HopperBlocks

_MASKED = -1e30  # finite: a row with nothing visible in a block must not make NaNs
_LOG2E = math.log2(math.e)
WG_ROWS = 64  # query rows of one consumer warpgroup: one wgmma M tile
NUM_CONSUMERS = 2
BLOCK_Q = WG_ROWS * NUM_CONSUMERS  # query tokens of one program
# An item's first query row is a multiple of this (gpu.py aligns the items):
# a TMA copy into a tiled buffer moves whole 8-row tiles of the source, so a
# copy that starts inside a tile would not start at its row.
ROW_ALIGN = 8


SMEM_LIMIT = 227 * 1024  # an H100/H200 block's shared memory


def smem_bytes(blocks: HopperBlocks, head_dim: int, itemsize: int) -> int:
  """Shared memory of one program: query and output tiles of both consumers, and the K/V ring."""
  q_and_out = 2 * NUM_CONSUMERS * WG_ROWS * head_dim * itemsize
  return q_and_out + 2 * blocks.num_stages * blocks.block_kv * head_dim * itemsize


def supports(q_TNH, kv_pages_PSCH, blocks: HopperBlocks = HopperBlocks()) -> str | None:
  """None when this kernel handles these shapes on this JAX; otherwise why not."""
  if plgpu is None:
    return "this jaxlib has no Mosaic GPU"
  head_dim, page_size = q_TNH.shape[-1], kv_pages_PSCH.shape[1]
  if q_TNH.dtype not in (jnp.bfloat16, jnp.float16) or kv_pages_PSCH.dtype != q_TNH.dtype:
    return f"dtypes {q_TNH.dtype} / {kv_pages_PSCH.dtype}: wgmma needs bfloat16 or float16 for both"
  if head_dim % 64 or head_dim > 256:
    return f"head_dim={head_dim}: need a multiple of 64 up to 256 (128-byte swizzled tiles)"
  if page_size % 8 or page_size & (page_size - 1):
    return f"page_size={page_size}: need a power of two, at least 8 (whole 8-row tiles per copy)"
  if blocks.block_kv % 64 or blocks.block_kv > 256:
    return f"block_kv={blocks.block_kv}: need a multiple of 64 up to 256"
  need = smem_bytes(blocks, head_dim, q_TNH.dtype.itemsize)
  if need > SMEM_LIMIT:
    return f"{blocks} at head_dim={head_dim} needs {need} bytes of shared memory, over {SMEM_LIMIT}"
  return None


def _kernel(item_seq_ref, item_q0_ref, kv_lens_ref, page_indices_ref, cu_q_lens_ref, q_ref, kv_ref, o_ref,
            scratch, *, group, page_size, block_kv, num_stages, ping_pong, sm_scale, sliding_window, soft_cap,
            interpreted):
  (q_smem, o_smem, k_smem, v_smem), (q_full, k_full, v_full), (k_empty, v_empty), sched = scratch
  head = lax.axis_index("head")
  item = lax.axis_index("item")
  wg = lax.axis_index("wg")
  seq = item_seq_ref[item]
  kv_head = head // group
  # The interpreter has no register layouts (nor `run_state` in a kernel, below).
  layout = (lambda x, _: x) if interpreted else plgpu.layout_cast
  rows_per_copy = min(page_size, block_kv)
  copies = block_kv // rows_per_copy

  @pl.when(seq >= 0)
  def _():
    q0 = item_q0_ref[item]  # a multiple of ROW_ALIGN, so up to 7 rows before q_start
    q_start = cu_q_lens_ref[seq]
    q_end = cu_q_lens_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    offset = kv_len - q_end  # token t of the step sits at position offset + t
    # A block past the context's last page re-reads that page (masked): the
    # page table's entries past it may be anything.
    last_page = (kv_len - 1) // page_size
    pos_first = offset + jnp.maximum(q0, q_start)  # the item's first row of this sequence
    pos_last = offset + jnp.minimum(q0 + BLOCK_Q, q_end) - 1
    blk_lo = 0 if sliding_window is None else jnp.maximum(pos_first - sliding_window + 1, 0) // block_kv
    num_blocks = pos_last // block_kv + 1 - blk_lo
    # Blocks (counted from blk_lo) in [safe_lo, safe_hi) need no mask: below
    # every row's diagonal and inside every row's window.
    safe_hi = jnp.clip((pos_first + 1) // block_kv - blk_lo, 0, num_blocks)
    safe_lo = jnp.int32(0)  # strongly typed: a weak-typed loop bound breaks the Mosaic GPU loop lowering
    if sliding_window is not None:
      safe_lo = (jnp.maximum(pos_last - sliding_window + 1, 0) + block_kv - 1) // block_kv - blk_lo
      safe_lo = jnp.clip(safe_lo, 0, safe_hi)

    @pl.when(wg == NUM_CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(step, slot, smem, full, channel):
        for c in range(copies):  # one TMA copy per page (or per block-sized part of a large page)
          x0 = (blk_lo + step) * block_kv + c * rows_per_copy
          page = page_indices_ref[seq, jnp.minimum(x0 // page_size, last_page)]
          rows = pl.ds(x0 % page_size if page_size > block_kv else 0, rows_per_copy)
          plgpu.copy_gmem_to_smem(kv_ref.at[page, rows, channel], smem.at[slot, pl.ds(c * rows_per_copy,
                                                                                     rows_per_copy)],
                                  full.at[slot])

      @pl.loop(0, num_blocks)
      def _(step):
        slot = lax.rem(step, num_stages)

        @pl.when(step >= num_stages)
        def _():
          plgpu.barrier_wait(k_empty.at[slot])
        fetch(step, slot, k_smem, k_full, 2 * kv_head)

        @pl.when(step >= num_stages)
        def _():
          plgpu.barrier_wait(v_empty.at[slot])
        fetch(step, slot, v_smem, v_full, 2 * kv_head + 1)

      # Observe the consumers' last releases too, so every barrier phase is
      # waited on before the block ends (the interpreter checks exactly that).
      @pl.loop(jnp.maximum(num_blocks - num_stages, 0), num_blocks)
      def _(step):
        slot = lax.rem(step, num_stages)
        plgpu.barrier_wait(k_empty.at[slot])
        plgpu.barrier_wait(v_empty.at[slot])

    @pl.when(wg < NUM_CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      t0 = q0 + wg * WG_ROWS  # this warpgroup's first token
      q_wg = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0, WG_ROWS), head], q_wg, q_full.at[wg])
      plgpu.barrier_wait(q_full.at[wg])
      pos0 = offset + t0  # position of this warpgroup's row 0

      def take_turn():  # ping-pong: the two consumers' matmuls alternate (see HopperBlocks)
        if ping_pong:
          plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(sched)

      def body(step, carry, masked):
        acc, m, l = carry
        slot = lax.rem(step, num_stages)
        plgpu.barrier_wait(k_full.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_wg, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          take_turn()  # the other consumer's softmax runs under this matmul
          return acc_ref[...]
        if interpreted:  # the interpreter's wgmma takes no transposed operand
          s = lax.dot_general(q_wg[...], k_smem[slot], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
          take_turn()
        else:
          s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_empty.at[slot])
        if soft_cap is not None:
          s = jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * _LOG2E)
        else:
          s = s * (sm_scale * _LOG2E)
        if masked:
          # Key x = x0 + c is visible to row r (position pos0 + r) when
          # x <= pos0 + r, and x > pos0 + r - window: both are tests of c - r.
          r = layout(lax.broadcasted_iota(jnp.int32, (WG_ROWS, block_kv), 0), plgpu.Layout.WGMMA)
          c = layout(lax.broadcasted_iota(jnp.int32, (WG_ROWS, block_kv), 1), plgpu.Layout.WGMMA)
          d = c - r
          x0 = (blk_lo + step) * block_kv
          visible = d <= pos0 - x0
          if sliding_window is not None:
            visible &= d > pos0 - x0 - sliding_window
          s = jnp.where(visible, s, _MASKED)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        if ping_pong:  # done with the softmax: let the other consumer's second matmul go first
          plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_full.at[slot])
        if ping_pong:
          plgpu.barrier_wait(sched)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])
        if interpreted:
          acc = acc + lax.dot_general(p.astype(v_smem.dtype), v_smem[slot], (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        else:  # the wgmma accumulates onto acc
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_empty.at[slot])
        return acc, m_new, l

      head_dim = q_ref.shape[-1]
      carry = (layout(jnp.zeros((WG_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
               layout(jnp.full((WG_ROWS,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
               layout(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
      pl.when(wg == 1)(take_turn)  # consumer 1 starts half a turn behind
      if sliding_window is not None:
        carry = lax.fori_loop(0, safe_lo, functools.partial(body, masked=True), carry)
      carry = lax.fori_loop(safe_lo, safe_hi, functools.partial(body, masked=False), carry)
      acc, _, l = lax.fori_loop(safe_hi, num_blocks, functools.partial(body, masked=True), carry)
      pl.when(wg == 0)(take_turn)  # and consumer 0 ends with the matching half turn

      o_wg = o_smem.at[wg]
      o_wg[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(o_wg.dtype)
      plgpu.commit_smem()
      # Store this sequence's rows [lo, hi) only: all 64, or from lo on, the
      # binary digits of their count as chunks of 32, 16, ..., 1 rows (TMA
      # boxes have static sizes).
      lo = jnp.clip(q_start - t0, 0, WG_ROWS)
      hi = jnp.clip(q_end - t0, lo, WG_ROWS)
      live = hi - lo

      @pl.when(live == WG_ROWS)
      def _():
        plgpu.copy_smem_to_gmem(o_wg, o_ref.at[pl.ds(t0, WG_ROWS), head])

      @pl.when(live < WG_ROWS)
      def _():
        for bit in range(int(math.log2(WG_ROWS)) - 1, -1, -1):
          size = 1 << bit
          start = lo + ((live >> (bit + 1)) << (bit + 1))

          @pl.when((live >> bit) & 1 == 1)
          def _():
            plgpu.copy_smem_to_gmem(o_wg.at[pl.ds(start, size)], o_ref.at[pl.ds(t0 + start, size), head])
      plgpu.wait_smem_to_gmem(0)


def prefill(items, q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, out_TNH, *, sm_scale,
            sliding_window, soft_cap, blocks: HopperBlocks = HopperBlocks(), interpret=False):
  """gpu.py's prefill launch on this kernel: writes the live rows of `items` into `out_TNH` (in place).

  `items`: (sequence or -1, first query row), each [W] int32, at BLOCK_Q
  tokens per item. `interpret`: False, True (the Mosaic GPU interpreter with
  `interpret_params`) or interpreter parameters, which is how the tests run it on a CPU. The
  interpreter (JAX 0.10) has no register layouts, no `run_state` inside a
  kernel, and no wgmma with a transposed or register operand, so there the
  layout casts are skipped and both matmuls are plain dots of the same
  operands; everything else (TMA copies through the page table, the
  barrier protocol, masks, softmax, the chunked stores) runs as compiled. The
  lowering test covers the compiled form; tools/bench_kernels.py checks its
  numbers on the GPU.
  """
  why_not = supports(q_TNH, kv_pages_PSCH, blocks)
  if why_not:
    raise ValueError(why_not)
  if interpret is True:
    interpret = interpret_params()
  item_seq_W, item_q0_W = items
  if q_TNH.shape[0] % 8:  # a TMA source's tiled dimension must be whole 8-row tiles (engine buckets already are)
    q_TNH = jnp.pad(q_TNH, ((0, -q_TNH.shape[0] % 8), (0, 0), (0, 0)))
  num_heads, head_dim = q_TNH.shape[1:]
  num_kv_heads = kv_pages_PSCH.shape[2] // 2
  dtype = q_TNH.dtype
  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  mesh = plgpu.Mesh(grid=(num_heads, item_seq_W.shape[0]), grid_names=("head", "item"),
                    num_threads=NUM_CONSUMERS + 1, thread_name="wg")
  kernel = functools.partial(
      _kernel, group=num_heads // num_kv_heads, page_size=kv_pages_PSCH.shape[1], block_kv=blocks.block_kv,
      num_stages=blocks.num_stages, ping_pong=blocks.ping_pong, sm_scale=sm_scale, sliding_window=sliding_window,
      soft_cap=soft_cap, interpreted=bool(interpret))
  copies = blocks.block_kv // min(kv_pages_PSCH.shape[1], blocks.block_kv)

  def stateful(refs):
    *in_refs, o_ref = refs

    @pl.core_map(mesh, compiler_params=lane_params(approx_math=True), interpret=interpret or False,
                 name=f"ragged_paged_attention_hopper_n{blocks.block_kv}_s{blocks.num_stages}"
                      f"_pp{int(blocks.ping_pong)}")
    def _():
      pl.run_scoped(
          lambda *scratch: kernel(*in_refs, o_ref, scratch),
          (plgpu.SMEM((NUM_CONSUMERS, WG_ROWS, head_dim), dtype, transforms=tiled),
           plgpu.SMEM((NUM_CONSUMERS, WG_ROWS, head_dim), dtype),
           plgpu.SMEM((blocks.num_stages, blocks.block_kv, head_dim), dtype, transforms=tiled),
           plgpu.SMEM((blocks.num_stages, blocks.block_kv, head_dim), dtype, transforms=tiled)),
          (plgpu.Barrier(num_barriers=NUM_CONSUMERS),
           plgpu.Barrier(num_arrivals=copies, num_barriers=blocks.num_stages),
           plgpu.Barrier(num_arrivals=copies, num_barriers=blocks.num_stages)),
          (plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=blocks.num_stages),) * 2,
          plgpu.Barrier(num_arrivals=NUM_CONSUMERS) if blocks.ping_pong else None,
          collective_axes="wg")

  args = (item_seq_W, item_q0_W, kv_lens_B, page_indices_BP, cu_q_lens_E, q_TNH, kv_pages_PSCH, out_TNH)
  return pl.run_state(stateful)(args)[-1]


__all__ = ["BLOCK_Q", "ROW_ALIGN", "device_supports", "interpret_params", "prefill", "supports"]

"""Ragged paged attention for NVIDIA GPUs: Pallas with the Triton lowering.

Work is cut into items on the device, from the step metadata, and run in two
launches over the same output:

- the decode launch has one item per sequence whose new query run is short
  (at most `decode.block_m // G` tokens, G query heads per KV head); its
  context is split over `num_splits` programs (split-K) when there are too few
  sequences to fill the GPU, and `_combine` merges the partial results by
  their log-sum-exp;
- the prefill launch has one item per `prefill.block_m // G` query tokens of
  every longer sequence (query-block tiling), each over its causal context.
  On a Hopper GPU it runs on hopper.py's Mosaic GPU kernel instead (TMA and
  wgmma; items of 128 tokens of one query head): `GpuConfig.prefill_kernel`.

A program takes all G query heads of one KV head as the rows of its tile
(row m is token m // G, head m % G), so a KV page is read once per item, not
once per query head. Keys and values are gathered straight from the paged
pool through the page table, `block_n` positions per step; only the blocks
that straddle the causal diagonal, the sliding-window edge or the end of the
context pay for masking. Both launches write only the live rows of `out_TNH`.

`ragged_paged_attention_write` is the same attention with the step's new
keys and values written into their pool slots by the kernel itself (the pool
aliased in place), instead of by the separate `write_kv_pages` scatter before
it. No program reads a slot another program writes: a program takes its
sequence's cached context (positions below kv_len - q_len) from the pool and
the step's new positions straight from the rows of `k_TKH` / `v_TKH`, and the
new rows of one sequence and KV head are written by one program only (KV
split 0 of the item that owns them). It exists to be measured against the
separate scatter (tools/bench_kernels.py); the engine does not use it.

Axis letters beyond jserve/shapes.py, local to the kernels: M rows of a tile
(query token x query head of one KV head), W work items of a launch, 1 an
axis of size one kept for broadcasting; X is the KV positions of one block.
"""

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention import hopper, reference, tuning

_MASKED = -1e30  # finite, as in the reference: a fully masked row must not make NaNs
FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))  # pool dtypes read up to the queries' dtype
_LOG2E = math.log2(math.e)
_F16_MAX = 65504.0


def supports(q_TNH, kv_pages_PSCH) -> str | None:
  """None when this kernel handles these shapes; otherwise why not."""
  head_dim = q_TNH.shape[-1]
  page_size = kv_pages_PSCH.shape[1]
  if head_dim & (head_dim - 1) or head_dim < 16:
    return f"head_dim={head_dim}: Triton tiles need a power of two >= 16"
  if page_size & (page_size - 1):
    return f"page_size={page_size}: need a power of two"
  if q_TNH.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype={q_TNH.dtype}: need float32, bfloat16 or float16"
  pool = jnp.dtype(kv_pages_PSCH.dtype)
  if pool not in (jnp.float32, jnp.bfloat16, jnp.float16, *FP8):
    return f"KV pool dtype {pool}: need a 16- or 32-bit float, float8_e4m3fn or float8_e5m2"
  if pool in FP8 and jax.default_backend() == "gpu":
    cc = getattr(jax.devices()[0], "compute_capability", "9.0")
    if tuple(map(int, cc.split("."))) < (8, 9):
      return f"an fp8 KV pool needs compute capability 8.9 or newer (Triton's fp8 loads); this GPU is {cc}"
  return None


def _attention_kernel(item_seq_ref, item_q0_ref, kv_lens_ref, page_indices_ref, cu_q_lens_ref,
                      q_ref, kv_ref, *rest, group, block_q, block_m, block_n, page_size, num_splits,
                      sm_scale, sliding_window, soft_cap, split_out, fused, f16_dot=False):
  """One program: query rows of one item x all query heads of one KV head x one KV split.

  fused: the refs after the pool are the step's new keys, values and slots
  (`k_TKH`, `v_TKH`, `slots_T`), and the last output is the pool itself
  (aliased): the program reads its sequence's new positions from those rows
  and, in KV split 0, writes its own rows into their slots.
  """
  if fused:
    k_new_ref, v_new_ref, slots_ref, *rest = rest
  if split_out:
    o_ref, lse_ref, *rest = rest
  else:
    _, o_ref, *rest = rest  # the aliased output passed in; the output ref is the same buffer
  kv_out_ref = rest[0] if fused else None
  item = pl.program_id(0)
  kv_head = pl.program_id(1)
  split = pl.program_id(2)
  seq = item_seq_ref[item]
  num_tokens = q_ref.shape[0]
  pages_per_seq = page_indices_ref.shape[1]
  f32_dot = q_ref.dtype == jnp.float32
  precision = lax.Precision.HIGHEST if f32_dot else None

  @pl.when(seq >= 0)
  def _():
    q0 = item_q0_ref[item]
    q_end = cu_q_lens_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    m_M = jnp.arange(block_m, dtype=jnp.int32)
    r_M = m_M // group
    t_M = q0 + r_M
    row_ok_M = (r_M < block_q) & (t_M < q_end)
    n_M = kv_head * group + m_M % group
    pos_M = kv_len - q_end + t_M
    # Every index is an integer array (no slices): the interpreter's masked
    # loads take only that form, and Triton still sees the head dim contiguous.
    h_1H = jnp.arange(q_ref.shape[-1], dtype=jnp.int32)[None, :]
    # Loads clamp dead rows into range; the store must not (the interpreter
    # stores masked rows back, and a clamped duplicate would overwrite a live one).
    t_in_M = jnp.minimum(t_M, num_tokens - 1)
    q_MH = plgpu.load(q_ref.at[t_in_M[:, None], n_M[:, None], h_1H], mask=row_ok_M[:, None], other=0)
    # The products' dtype (K, V and P are cast to it): the queries', or float16 for an fp8 pool with
    # `f16_dot` (see tuning.GpuBlocks).
    if f16_dot and jnp.dtype(kv_ref.dtype) in FP8 and q_MH.dtype == jnp.bfloat16:
      q_MH = jnp.clip(q_MH.astype(jnp.float32), -_F16_MAX, _F16_MAX).astype(jnp.float16)

    # Positions below ctx_end come from the pool. Fused, the step's own
    # positions [ctx_end, kv_len) come from rows new_row0 + x of k_TKH / v_TKH;
    # otherwise the whole context is in the pool.
    if fused:
      ctx_end = kv_len - (q_end - cu_q_lens_ref[seq])
      new_row0 = q_end - kv_len
      num_pages = kv_out_ref.shape[0]
      lead_M = row_ok_M & (m_M % group == 0)  # one lane per token: head 0 of its group

      def write_new_rows():
        # Only slots inside the pool: the engine points padding rows past it,
        # and write_kv_pages drops those too.
        slot_M = plgpu.load(slots_ref.at[t_in_M], mask=lead_M, other=-1)
        write_M = lead_M & (slot_M >= 0) & (slot_M < num_pages * page_size)
        # Lanes that do not write get a page past the pool, not a clamped
        # duplicate: the interpreter stores every lane and drops only those.
        page_M1 = jnp.where(write_M, slot_M // page_size, num_pages)[:, None]
        off_M1 = jnp.where(write_M, slot_M % page_size, 0)[:, None]
        for new_ref, c in ((k_new_ref, 2 * kv_head), (v_new_ref, 2 * kv_head + 1)):
          row_MH = plgpu.load(new_ref.at[t_in_M[:, None], kv_head, h_1H], mask=write_M[:, None], other=0)
          plgpu.store(kv_out_ref.at[page_M1, off_M1, c, h_1H], row_MH.astype(kv_out_ref.dtype),
                      mask=write_M[:, None])

      if num_splits > 1:
        pl.when(split == 0)(write_new_rows)
      else:
        write_new_rows()
    else:
      ctx_end = kv_len

    # KV positions this item needs: up to its last row's position, and from
    # its first row's window start.
    pos_first = kv_len - q_end + q0
    pos_last = kv_len - q_end + jnp.minimum(q0 + block_q, q_end) - 1
    blk_lo = 0
    if sliding_window is not None:
      blk_lo = jnp.maximum(pos_first - sliding_window + 1, 0) // block_n
    blk_hi = (pos_last + block_n) // block_n
    if num_splits > 1:
      per_split = (blk_hi - blk_lo + num_splits - 1) // num_splits
      b0 = jnp.minimum(blk_lo + split * per_split, blk_hi)
      b1 = jnp.minimum(b0 + per_split, blk_hi)
    else:
      b0, b1 = blk_lo, blk_hi
    # Blocks in [safe_lo, safe_hi) need no mask: below every row's diagonal
    # (so also inside the context) and inside every row's window.
    safe_hi = jnp.maximum(pos_first + 1, 0) // block_n
    safe_lo = 0
    if sliding_window is not None:
      safe_lo = (jnp.maximum(pos_last - sliding_window + 1, 0) + block_n - 1) // block_n
    a = jnp.clip(safe_lo, b0, b1)
    b = jnp.clip(safe_hi, a, b1)

    def load_pool(ref, mask):
      """Masked rows read as zero. An fp8 pool's are zeroed after the cast up (Triton has no integer
      to fp8 cast for the fill value), before a garbage value can reach the P x V product."""
      if jnp.dtype(kv_ref.dtype) in FP8:
        return jnp.where(mask, plgpu.load(ref, mask=mask).astype(q_MH.dtype), 0)
      return plgpu.load(ref, mask=mask, other=0)

    def body(j, carry, masked, source):
      """One KV block; `source`: "pool" (all cached), "new" (all the step's rows) or "both" (masked loads)."""
      m_M, l_M, acc_MH = carry
      x_X = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
      if source == "pool":
        page_X1 = page_indices_ref[seq, x_X // page_size][:, None]
        off_X1 = (x_X % page_size)[:, None]
        k_XH = kv_ref[page_X1, off_X1, 2 * kv_head, h_1H]
        v_XH = kv_ref[page_X1, off_X1, 2 * kv_head + 1, h_1H]
      elif source == "new":
        t_X1 = (new_row0 + x_X)[:, None]
        k_XH = k_new_ref[t_X1, kv_head, h_1H].astype(kv_ref.dtype)
        v_XH = v_new_ref[t_X1, kv_head, h_1H].astype(kv_ref.dtype)
      else:
        pool_X = x_X < ctx_end
        slot_X = jnp.minimum(x_X // page_size, pages_per_seq - 1)
        page_X = plgpu.load(page_indices_ref.at[seq, slot_X], mask=pool_X, other=0)
        page_X1, off_X1 = page_X[:, None], (x_X % page_size)[:, None]
        k_XH = load_pool(kv_ref.at[page_X1, off_X1, 2 * kv_head, h_1H], pool_X[:, None])
        v_XH = load_pool(kv_ref.at[page_X1, off_X1, 2 * kv_head + 1, h_1H], pool_X[:, None])
        if fused:
          new_X1 = ((x_X >= ctx_end) & (x_X < kv_len))[:, None]
          t_X1 = jnp.clip(new_row0 + x_X, 0, num_tokens - 1)[:, None]
          kn_XH = plgpu.load(k_new_ref.at[t_X1, kv_head, h_1H], mask=new_X1, other=0)
          vn_XH = plgpu.load(v_new_ref.at[t_X1, kv_head, h_1H], mask=new_X1, other=0)
          k_XH = jnp.where(new_X1, kn_XH.astype(k_XH.dtype), k_XH)
          v_XH = jnp.where(new_X1, vn_XH.astype(v_XH.dtype), v_XH)
      s_MX = lax.dot_general(q_MH, k_XH.astype(q_MH.dtype), (((1,), (1,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
      if soft_cap is not None:
        s_MX = jnp.tanh(s_MX * (sm_scale / soft_cap)) * (soft_cap * _LOG2E)
      else:
        s_MX = s_MX * (sm_scale * _LOG2E)
      if masked:
        visible_MX = (x_X[None, :] <= pos_M[:, None]) & (x_X[None, :] < kv_len)
        if sliding_window is not None:
          visible_MX &= x_X[None, :] > pos_M[:, None] - sliding_window
        s_MX = jnp.where(visible_MX, s_MX, _MASKED)
      m_new_M = jnp.maximum(m_M, jnp.max(s_MX, axis=1))
      alpha_M = jnp.exp2(m_M - m_new_M)
      p_MX = jnp.exp2(s_MX - m_new_M[:, None])
      l_M = l_M * alpha_M + jnp.sum(p_MX, axis=1)
      pv_MH = lax.dot_general(p_MX.astype(q_MH.dtype), v_XH.astype(q_MH.dtype), (((1,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=jnp.float32)
      return m_new_M, l_M, acc_MH * alpha_M[:, None] + pv_MH

    head_dim = q_ref.shape[-1]
    carry = (jnp.full((block_m,), _MASKED, jnp.float32), jnp.zeros((block_m,), jnp.float32),
             jnp.zeros((block_m, head_dim), jnp.float32))
    carry = lax.fori_loop(b0, a, functools.partial(body, masked=True, source="both"), carry)
    if fused:
      # The unmasked blocks: wholly cached ones from the pool, the one that
      # holds ctx_end from both, the rest from the step's rows.
      p = jnp.clip(ctx_end // block_n, a, b)
      r = jnp.clip((ctx_end + block_n - 1) // block_n, p, b)
      carry = lax.fori_loop(a, p, functools.partial(body, masked=False, source="pool"), carry)
      carry = lax.fori_loop(p, r, functools.partial(body, masked=False, source="both"), carry)
      carry = lax.fori_loop(r, b, functools.partial(body, masked=False, source="new"), carry)
    else:
      carry = lax.fori_loop(a, b, functools.partial(body, masked=False, source="pool"), carry)
    m_M, l_M, acc_MH = lax.fori_loop(b, b1, functools.partial(body, masked=True, source="both"), carry)

    if split_out:
      empty_M = l_M == 0  # a split with no block of this item
      l_M = jnp.where(empty_M, 1.0, l_M)
      o_ref[...] = acc_MH / l_M[:, None]
      lse_ref[...] = jnp.where(empty_M, _MASKED, m_M + jnp.log2(l_M))
    else:
      o_MH = (acc_MH / l_M[:, None]).astype(o_ref.dtype)
      plgpu.store(o_ref.at[t_M[:, None], n_M[:, None], h_1H], o_MH, mask=row_ok_M[:, None])


def _launch(items, q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, out_TNH, *,
            blocks, num_splits, sm_scale, sliding_window, soft_cap, interpret, new_kv=None):
  """One pallas_call over `items` (seq, first query row; seq -1 for none).

  Returns `out_TNH` (one split) or the splits' (o, lse); with `new_kv`
  (k_TKH, v_TKH, slots_T) also the pool, with the items' new rows written.
  """
  item_seq_W, item_q0_W = items
  num_items = item_seq_W.shape[0]
  num_tokens, num_heads, head_dim = q_TNH.shape
  num_kv_heads = kv_pages_PSCH.shape[2] // 2
  group = num_heads // num_kv_heads
  split_out = num_splits > 1
  fused = new_kv is not None
  kernel = functools.partial(
      _attention_kernel, group=group, block_q=blocks.block_m // group, block_m=blocks.block_m,
      block_n=blocks.block_n, page_size=kv_pages_PSCH.shape[1], num_splits=num_splits, sm_scale=sm_scale,
      sliding_window=sliding_window, soft_cap=soft_cap, split_out=split_out, fused=fused,
      f16_dot=blocks.f16_dot and jnp.dtype(kv_pages_PSCH.dtype) in FP8)
  whole = pl.BlockSpec()
  args = [item_seq_W, item_q0_W, kv_lens_B, page_indices_BP, cu_q_lens_E, q_TNH, kv_pages_PSCH]
  if fused:
    args += list(new_kv)
  if split_out:
    out_shape = [jax.ShapeDtypeStruct((num_splits, num_items, num_kv_heads, blocks.block_m, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, num_items, num_kv_heads, blocks.block_m), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, blocks.block_m, head_dim), lambda w, k, s: (s, w, k, 0, 0)),
                 pl.BlockSpec((None, None, None, blocks.block_m), lambda w, k, s: (s, w, k, 0))]
    aliases = {}
  else:
    out_shape = [jax.ShapeDtypeStruct(out_TNH.shape, out_TNH.dtype)]
    out_specs = [whole]
    aliases = {len(args): 0}
    args.append(out_TNH)
  if fused:  # the pool, updated in place
    aliases[6] = len(out_shape)
    out_shape.append(jax.ShapeDtypeStruct(kv_pages_PSCH.shape, kv_pages_PSCH.dtype))
    out_specs.append(whole)
  outs = pl.pallas_call(
      kernel,
      grid=(num_items, num_kv_heads, num_splits),
      in_specs=[whole] * len(args),
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name=(f"ragged_paged_attention{'_write' if fused else ''}_m{blocks.block_m}_n{blocks.block_n}_s{num_splits}"
            f"{'_f16' if kernel.keywords['f16_dot'] else ''}"),
  )(*args)
  return outs[0] if len(outs) == 1 else tuple(outs)


def _items(kv_lens_B, cu_q_lens_E, num_seqs, *, num_tokens, decode_q, prefill_q, align=1):
  """Work items of both launches: (sequence or -1, first query row), each [W] int32.

  `align`: a prefill item's first row is a multiple of it, so a sequence's
  first item may begin up to `align - 1` rows before the sequence does
  (rows of the sequence before it, which the kernel computes and does not
  store). The Hopper kernel needs 8: its query copies move whole 8-row tiles.
  """
  max_seqs = kv_lens_B.shape[0]
  b_B = jnp.arange(max_seqs, dtype=jnp.int32)
  live_B = b_B < num_seqs
  q_len_B = jnp.where(live_B, cu_q_lens_E[1:] - cu_q_lens_E[:-1], 0)
  decode_B = live_B & (q_len_B >= 1) & (q_len_B <= decode_q)
  decode = (jnp.where(decode_B, b_B, -1), cu_q_lens_E[:-1])

  # Query blocks of the longer sequences, latest blocks first: they have the
  # longest causal context, so the launch ends with short items (a crude
  # longest-first order for load balance).
  num_prefill_seqs = min(max_seqs, num_tokens // (decode_q + 1))
  num_items = -(-(num_tokens + (align - 1) * num_prefill_seqs) // prefill_q) + num_prefill_seqs
  start_B = cu_q_lens_E[:-1] // align * align
  blocks_B = jnp.where(live_B & ~decode_B, (cu_q_lens_E[1:] - start_B + prefill_q - 1) // prefill_q, 0)
  ends_B = jnp.cumsum(blocks_B).astype(jnp.int32)
  idx_W = ends_B[-1] - 1 - jnp.arange(num_items, dtype=jnp.int32)
  # searchsorted(ends_B, idx_W, side="right") as one comparison: jnp.searchsorted
  # is a loop, and an XLA loop on a GPU costs a few microseconds per trip.
  seq_W = jnp.sum(ends_B[None, :] <= idx_W[:, None], axis=1, dtype=jnp.int32)
  seq_W = jnp.minimum(seq_W, max_seqs - 1)
  block_W = idx_W - (ends_B[seq_W] - blocks_B[seq_W])
  prefill = (jnp.where(idx_W >= 0, seq_W, -1), start_B[seq_W] + block_W * prefill_q)
  return decode, prefill


def _use_hopper(q_TNH, kv_pages_PSCH, config, interpret, fused) -> bool:
  """Whether the Hopper kernel runs the prefill launch (see `GpuConfig.prefill_kernel`)."""
  if config.prefill_kernel == "triton" or fused or (config.prefill_kernel == "auto" and interpret):
    return False
  if config.prefill_kernel == "auto" and q_TNH.shape[0] < config.hopper_min_tokens:
    return False
  why_not = hopper.supports(q_TNH, kv_pages_PSCH, config.hopper) or (None if interpret else hopper.device_supports())
  if why_not and config.prefill_kernel == "hopper":  # asked for by name: say why it did not run
    logging.log_first_n(logging.WARNING, "Hopper prefill kernel unavailable (%s); using the Triton one", 1, why_not)
  return why_not is None


def _combine(o_SWKMH, lse_SWKM, items, cu_q_lens_E, out_TNH, *, group, block_q):
  """Merges the KV splits of the decode launch and writes their live rows into `out_TNH`."""
  item_seq_W, item_q0_W = items
  num_tokens = out_TNH.shape[0]
  _, _, num_kv_heads, block_m, _ = o_SWKMH.shape
  lse_max_WKM = jnp.max(lse_SWKM, axis=0)
  w_SWKM = jnp.exp2(lse_SWKM - lse_max_WKM[None])
  o_WKMH = jnp.sum(w_SWKM[..., None] * o_SWKMH, axis=0) / jnp.sum(w_SWKM, axis=0)[..., None]
  m_M = jnp.arange(block_m, dtype=jnp.int32)
  t_WM = item_q0_W[:, None] + m_M[None, :] // group
  q_end_W = cu_q_lens_E[jnp.maximum(item_seq_W, 0) + 1]
  ok_WM = (item_seq_W[:, None] >= 0) & (m_M[None, :] // group < block_q) & (t_WM < q_end_W[:, None])
  t_WM = jnp.where(ok_WM, t_WM, num_tokens)  # out of range: dropped by the scatter
  n_KM = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None] * group + m_M[None, :] % group
  t_WKM = jnp.broadcast_to(t_WM[:, None, :], o_WKMH.shape[:3])
  n_WKM = jnp.broadcast_to(n_KM[None], o_WKMH.shape[:3])
  return out_TNH.at[t_WKM, n_WKM].set(o_WKMH.astype(out_TNH.dtype), mode="drop")


_STATIC = ("sm_scale", "sliding_window", "soft_cap", "interpret", "config", "num_splits")


@functools.partial(jax.jit, static_argnames=_STATIC + ("decode_only",))
def ragged_paged_attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, out_TNH=None, interpret=False,
                           config=None, num_splits=None, decode_only=False):
  """Same semantics as `reference.ragged_paged_attention`, with the KV pool layout documented there.

  Rows outside the live query rows keep the value they have in `out_TNH`
  (zeros when it is None): the kernels never write them.
  `config` (a `tuning.GpuConfig`) and `num_splits` override the tuned choice.
  `decode_only`: the caller promises every sequence has at most
  `config.decode.block_m // G` query rows (one, in the engine's decode
  bursts), and only the decode launch runs: no prefill launch whose programs
  all find no work. A longer sequence's rows would be left unwritten.
  """
  out_TNH, _ = _attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs, None,
                          sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, out_TNH=out_TNH,
                          interpret=interpret, config=config, num_splits=num_splits, decode_only=decode_only)
  return out_TNH


@functools.partial(jax.jit, static_argnames=_STATIC)
def ragged_paged_attention_write(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                                 k_TKH, v_TKH, slots_T, *, sm_scale, sliding_window=None, soft_cap=None,
                                 out_TNH=None, interpret=False, config=None, num_splits=None):
  """`write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, slots_T)` and then attention, in the attention kernel.

  Returns (out_TNH, kv_pages_PSCH): the same attention output and the same
  pool as the two-step path, when the inputs are what the engine sends:
  - `slots_T[t]` of a live row is the pool slot of that row's position
    under the page table (the step's positions kv_len - q_len .. kv_len - 1
    of each sequence; the kernel reads them from `k_TKH` / `v_TKH`, not back
    from the pool), and no sequence's cached context lies in one of them;
  - rows from `cu_q_lens_E[num_seqs]` on are padding, with slots outside
    the pool. The kernel writes only live rows whose slot is inside
    [0, num_pages * page_size); write_kv_pages would also write a padding
    row with a slot inside the pool.
  The pool is an in-place output of the kernels (input_output_aliases):
  donate it to the enclosing jit, or XLA copies the whole pool first.
  """
  num_tokens, num_kv_heads = q_TNH.shape[0], kv_pages_PSCH.shape[2] // 2
  want = (num_tokens, num_kv_heads, q_TNH.shape[2])
  if k_TKH.shape != want or v_TKH.shape != want or slots_T.shape != (num_tokens,):
    raise ValueError(f"k_TKH {k_TKH.shape}, v_TKH {v_TKH.shape}, slots_T {slots_T.shape}: expected {want}, "
                     f"{want} and ({num_tokens},)")
  if jnp.dtype(kv_pages_PSCH.dtype) in FP8:
    raise ValueError(f"the fused write takes a 16- or 32-bit pool, not {kv_pages_PSCH.dtype}")
  return _attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                    (k_TKH, v_TKH, slots_T.astype(jnp.int32)), sm_scale=sm_scale, sliding_window=sliding_window,
                    soft_cap=soft_cap, out_TNH=out_TNH, interpret=interpret, config=config, num_splits=num_splits)


def _attention(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs, new_kv, *,
               sm_scale, sliding_window, soft_cap, out_TNH, interpret, config, num_splits, decode_only=False):
  """Both launches (and the split combine); returns (out_TNH, the pool after the fused write or None)."""
  num_tokens, num_heads, head_dim = q_TNH.shape
  _, page_size, num_combined, _ = kv_pages_PSCH.shape
  num_kv_heads = num_combined // 2
  group = reference.query_group(q_TNH, kv_pages_PSCH, supports)
  if config is None:
    config = tuning.gpu_config(head_dim, page_size, group)
  max_seqs, pages_per_seq = page_indices_BP.shape
  if num_splits is None:
    max_blocks = -(-pages_per_seq * page_size // config.decode.block_n)
    num_splits = tuning.gpu_num_splits(max_seqs, num_kv_heads, max_blocks, config.max_splits)
  if out_TNH is None:
    out_TNH = jnp.zeros(q_TNH.shape, q_TNH.dtype)
  kv_lens_B = kv_lens_B.astype(jnp.int32)
  page_indices_BP = page_indices_BP.astype(jnp.int32)
  cu_q_lens_E = cu_q_lens_E.astype(jnp.int32)
  decode_q = config.decode.block_m // group
  fused = new_kv is not None
  use_hopper = not decode_only and _use_hopper(q_TNH, kv_pages_PSCH, config, interpret, fused)
  prefill_q = hopper.BLOCK_Q if use_hopper else config.prefill.block_m // group
  decode, prefill = _items(kv_lens_B, cu_q_lens_E, jnp.reshape(num_seqs, ()).astype(jnp.int32),
                           num_tokens=num_tokens, decode_q=decode_q, prefill_q=prefill_q,
                           align=hopper.ROW_ALIGN if use_hopper else 1)
  common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                new_kv=new_kv)
  meta = (kv_lens_B, page_indices_BP, cu_q_lens_E)
  # The prefill launch writes its sequences' new rows before the decode
  # launch runs; the decode launch reads only its own sequences' cached
  # slots, which are not among them.
  # (`decode_only`: no prefill launch at all.)
  if use_hopper:
    out_TNH = hopper.prefill(prefill, q_TNH, kv_pages_PSCH, *meta, out_TNH, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap, blocks=config.hopper,
                             interpret=interpret)
  elif not decode_only:
    out = _launch(prefill, q_TNH, kv_pages_PSCH, *meta, out_TNH, blocks=config.prefill, num_splits=1, **common)
    out_TNH, kv_pages_PSCH = out if fused else (out, kv_pages_PSCH)
  if num_splits == 1:
    out = _launch(decode, q_TNH, kv_pages_PSCH, *meta, out_TNH, blocks=config.decode, num_splits=1, **common)
    return out if fused else (out, None)
  out = _launch(decode, q_TNH, kv_pages_PSCH, *meta, None, blocks=config.decode, num_splits=num_splits, **common)
  o_SWKMH, lse_SWKM, kv_pages_PSCH = out if fused else (*out, None)
  return _combine(o_SWKMH, lse_SWKM, decode, cu_q_lens_E, out_TNH, group=group, block_q=decode_q), kv_pages_PSCH

"""The GPU and TPU ragged paged attention kernels, run in Pallas' interpreters, against the reference.

Every case poisons what a kernel must not touch (see rpa_cases): padding
query rows and unused KV slots are NaN, page-table entries past a sequence's
pages point far outside the pool, and the output starts as NaN. A kernel
passes when the live rows match the reference and every other row is still
NaN. Shapes are small so the interpreters finish in seconds; the tiles are
shrunk to match, so that sequences span several KV blocks and splits.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import gpu, ragged_paged_attention, reference, tpu, tuning
from tests.kernels.rpa_cases import SEQS, SEQS_SHAPE, make_case, relative_error, with_new_kv

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative, ||out - ref|| / ||ref||

# Small tiles: 16 KV positions a step (two pages of 8), so the cases below
# cross block boundaries, the causal diagonal and the window edge.
GPU_TILES = tuning.GpuConfig(decode=tuning.GpuBlocks(block_m=16, block_n=16, num_warps=4, num_stages=2),
                             prefill=tuning.GpuBlocks(block_m=32, block_n=16, num_warps=4, num_stages=2))
TPU_TILES = tuning.TpuConfig(block_q=8, pages_per_block=2)

KERNELS = {
    "gpu": functools.partial(gpu.ragged_paged_attention, interpret=True, config=GPU_TILES),
    "tpu": functools.partial(tpu.ragged_paged_attention, interpret=True, config=TPU_TILES),
}


def check(kernel, case, dtype, *, head_dim, **attn_kw):
  """Runs `kernel` over `case` into a NaN output and checks it against the reference."""
  sm_scale = head_dim**-0.5
  ref_kw = {k: v for k, v in attn_kw.items() if k in ("sliding_window", "soft_cap")}
  ref = reference.ragged_paged_attention(*case.reference_args(), sm_scale=sm_scale, **ref_kw)
  poison = jnp.full(case.q_TNH.shape, jnp.nan, dtype)
  out = np.asarray(kernel(*case.args(), sm_scale=sm_scale, out_TNH=poison, **attn_kw), np.float32)
  check_output(out, ref, case, dtype)


def check_output(out, ref, case, dtype):
  """Live rows match the reference, padding rows are still the NaN they started as."""
  out = np.asarray(out, np.float32)
  live = case.live_rows
  assert not np.isnan(out[:live]).any(), "a live row was left unwritten or read poison"
  assert np.isnan(out[live:]).all(), "a padding row was written"
  err = relative_error(out[:live], np.asarray(ref, np.float32)[:live])
  assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,dtype", [(name, jnp.float32) for name in SEQS] + [("mixed", jnp.bfloat16)])
def test_kernel_matches_reference_and_writes_only_live_rows(kernel, name, dtype):
  case = make_case(0, SEQS[name], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=dtype,
                   shape=SEQS_SHAPE)
  check(KERNELS[kernel], case, dtype, head_dim=64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 1)])  # GQA 1 and 8 (4 is above)
def test_kernel_handles_head_dim_128_and_gqa_ratios(kernel, num_heads, num_kv_heads):
  case = make_case(1, SEQS["mixed"], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=128, page_size=8,
                   dtype=jnp.bfloat16, shape=SEQS_SHAPE)
  check(KERNELS[kernel], case, jnp.bfloat16, head_dim=128)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("attn_kw", [dict(sliding_window=7), dict(soft_cap=2.0)], ids=["window", "soft_cap"])
def test_kernel_applies_sliding_window_and_soft_cap(kernel, attn_kw):
  case = make_case(2, SEQS["mixed"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32,
                   shape=SEQS_SHAPE)
  check(KERNELS[kernel], case, jnp.float32, head_dim=64, **attn_kw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_writes_the_last_row_when_nothing_is_padding(kernel):
  # No padding rows or sequences: the last sequence's rows end the array.
  seqs = [(5, 21), (1, 30), (1, 9)]
  case = make_case(3, seqs, num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32,
                   extra_seqs=0, extra_tokens=0, permute=False)
  check(KERNELS[kernel], case, jnp.float32, head_dim=64)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_gpu_split_k_decode_matches_reference(num_splits):
  seqs = [(1, 70), (2, 45), (1, 3), (1, 128)]
  case = make_case(4, seqs, num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32)
  check(KERNELS["gpu"], case, jnp.float32, head_dim=64, num_splits=num_splits, sliding_window=40)


def test_gpu_tuned_tiles_match_reference():
  seqs = [(1, 200), (150, 150), (1, 77), (40, 90)]
  case = make_case(5, seqs, num_heads=8, num_kv_heads=2, head_dim=64, page_size=16, dtype=jnp.bfloat16)
  check(functools.partial(gpu.ragged_paged_attention, interpret=True), case, jnp.bfloat16, head_dim=64)


def test_dispatcher_uses_the_reference_on_cpu_and_a_kernel_when_asked():
  case = make_case(6, SEQS["mixed"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32,
                   shape=SEQS_SHAPE)
  clean = case.reference_args()
  ref = reference.ragged_paged_attention(*clean, sm_scale=0.125)
  auto = ragged_paged_attention(*clean, sm_scale=0.125)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))  # rows past the live ones are zero
  out = ragged_paged_attention(*clean, sm_scale=0.125, impl="gpu", interpret=True)
  assert relative_error(out, ref) <= 1e-5
  assert not np.asarray(out[case.live_rows:]).any()


def test_dispatcher_rejects_an_unknown_impl():
  case = make_case(7, SEQS["decode_only"], num_heads=4, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"impl='cuda'; expected one of \('auto', 'gpu', 'tpu', 'reference'\)"):
    ragged_paged_attention(*case.args(), sm_scale=0.125, impl="cuda")


@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_decode_only_call_runs_the_decode_launch_alone_and_matches_reference(num_splits):
  case = make_case(11, SEQS["decode_only"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8,
                   dtype=jnp.float32, shape=SEQS_SHAPE)
  check(functools.partial(KERNELS["gpu"], decode_only=True), case, jnp.float32, head_dim=64, num_splits=num_splits)


def test_gpu_decode_only_call_lowers_to_one_triton_launch():
  fn = functools.partial(gpu.ragged_paged_attention, sm_scale=0.1, decode_only=True)
  text = jax.jit(fn).trace(*_abstract_args(jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1  # no prefill launch


@pytest.mark.parametrize("pool_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("name", ["mixed", "decode_only"])
def test_gpu_kernel_reads_an_fp8_pool_under_bf16_queries(name, pool_dtype):
  # An fp8 KV cache: the reference reads the same 8-bit pool, so only the kernel's handling is compared.
  case = make_case(8, SEQS[name], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.bfloat16,
                   shape=SEQS_SHAPE, pool_dtype=pool_dtype)
  assert case.kv_pages_PSCH.dtype == pool_dtype
  check(KERNELS["gpu"], case, jnp.bfloat16, head_dim=64)


F16_DOT_TILES = tuning.GpuConfig(decode=dataclasses.replace(GPU_TILES.decode, f16_dot=True),
                                 prefill=dataclasses.replace(GPU_TILES.prefill, f16_dot=True))


@pytest.mark.parametrize("pool_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_kernel_multiplies_an_fp8_pool_in_float16_when_asked(pool_dtype, num_splits):
  case = make_case(8, SEQS["mixed"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.bfloat16,
                   shape=SEQS_SHAPE, pool_dtype=pool_dtype)
  kernel = functools.partial(gpu.ragged_paged_attention, interpret=True, config=F16_DOT_TILES)
  check(kernel, case, jnp.bfloat16, head_dim=64, num_splits=num_splits)


def test_f16_dot_clips_queries_past_float16s_range_instead_of_making_inf():
  # Queries of 1e5 overflow float16: clipped, they still give finite scores and the right softmax winner.
  case = make_case(8, SEQS["decode_only"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8,
                   dtype=jnp.bfloat16, shape=SEQS_SHAPE, pool_dtype=jnp.float8_e4m3fn)
  q = case.q_TNH * 0 + jnp.asarray(1e5, jnp.bfloat16)
  args = (q,) + tuple(case.args()[1:])
  out = gpu.ragged_paged_attention(*args, sm_scale=64**-0.5, interpret=True, config=F16_DOT_TILES)
  assert np.isfinite(np.asarray(out[:case.live_rows], np.float32)).all()


def test_gpu_split_k_decode_reads_an_fp8_pool():
  seqs = [(1, 70), (2, 45), (1, 3), (1, 128)]
  case = make_case(9, seqs, num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.bfloat16,
                   pool_dtype=jnp.float8_e4m3fn)
  check(KERNELS["gpu"], case, jnp.bfloat16, head_dim=64, num_splits=4)


def test_fp8_pool_falls_back_to_the_reference_where_a_kernel_cannot_read_it():
  case = make_case(10, SEQS["mixed"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.bfloat16,
                   shape=SEQS_SHAPE, pool_dtype=jnp.float8_e4m3fn)
  assert "KV pool dtype float8_e4m3fn" in tpu.supports(case.q_TNH, case.kv_pages_PSCH)
  assert gpu.supports(case.q_TNH, case.kv_pages_PSCH) is None
  clean = case.reference_args()
  ref = reference.ragged_paged_attention(*clean, sm_scale=0.125)
  out = ragged_paged_attention(*clean, sm_scale=0.125, impl="tpu", interpret=True)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("pool_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_write_to_an_fp8_pool_clips_to_the_format_instead_of_making_nan(pool_dtype):
  pool_PSCH = jnp.zeros((2, 4, 2, 4), pool_dtype)
  top = float(jnp.finfo(pool_dtype).max)
  k_TKH = jnp.array([[[1.0, -2.5, 3 * top, -1e6]]], jnp.float32)  # one token, one KV head
  v_TKH = jnp.array([[[0.5, 1e6, -3 * top, 7.0]]], jnp.float32)
  out = np.asarray(reference.write_kv_pages(pool_PSCH, k_TKH, v_TKH, jnp.array([5])), np.float32)
  np.testing.assert_array_equal(out[1, 1, 0], [1.0, -2.5, top, -top])
  np.testing.assert_array_equal(out[1, 1, 1], [0.5, top, -top, 7.0])
  assert not out[0].any() and not np.delete(out[1], 1, axis=0).any()


def check_fused(case, dtype, *, head_dim, seed=0, config=GPU_TILES, **attn_kw):
  """The GPU kernel's fused write against write_kv_pages followed by the reference attention.

  The step's slots are NaN in the pool given to the kernel, so reading a new
  position back from the pool instead of from k_TKH / v_TKH shows up as NaN.
  """
  step, k_TKH, v_TKH, slots_T = with_new_kv(case, seed)
  written_PSCH = reference.write_kv_pages(step.kv_pages_PSCH, k_TKH, v_TKH, slots_T)
  sm_scale = head_dim**-0.5
  ref_kw = {k: v for k, v in attn_kw.items() if k in ("sliding_window", "soft_cap")}
  ref = reference.ragged_paged_attention(step.q_TNH, jnp.nan_to_num(written_PSCH, nan=0.0), *step.args()[2:],
                                         sm_scale=sm_scale, **ref_kw)
  poison = jnp.full(case.q_TNH.shape, jnp.nan, dtype)
  out, pool_PSCH = gpu.ragged_paged_attention_write(*step.args(), k_TKH, v_TKH, slots_T, sm_scale=sm_scale,
                                                    out_TNH=poison, interpret=True, config=config, **attn_kw)
  # Equal bit for bit, NaN where NaN: the step's rows written, nothing else touched.
  np.testing.assert_array_equal(np.asarray(pool_PSCH, np.float32), np.asarray(written_PSCH, np.float32))
  check_output(out, ref, case, dtype)


@pytest.mark.parametrize("name,dtype", [(name, jnp.float32) for name in SEQS] + [("mixed", jnp.bfloat16)])
def test_gpu_fused_write_matches_separate_write(name, dtype):
  case = make_case(0, SEQS[name], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=dtype,
                   shape=SEQS_SHAPE)
  check_fused(case, dtype, head_dim=64)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 1)])
def test_gpu_fused_write_handles_head_dim_128_and_gqa_ratios(num_heads, num_kv_heads):
  case = make_case(1, SEQS["mixed"], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=128, page_size=8,
                   dtype=jnp.bfloat16, shape=SEQS_SHAPE)
  check_fused(case, jnp.bfloat16, head_dim=128)


@pytest.mark.parametrize("attn_kw", [dict(sliding_window=7), dict(soft_cap=2.0)], ids=["window", "soft_cap"])
def test_gpu_fused_write_applies_sliding_window_and_soft_cap(attn_kw):
  case = make_case(2, SEQS["mixed"], num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32,
                   shape=SEQS_SHAPE)
  check_fused(case, jnp.float32, head_dim=64, **attn_kw)


def test_gpu_fused_write_with_split_k_writes_each_row_once():
  # Four KV splits per decode item: only split 0 writes, the others read only cached slots.
  seqs = [(1, 70), (2, 45), (1, 3), (1, 128)]
  case = make_case(4, seqs, num_heads=8, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32)
  check_fused(case, jnp.float32, head_dim=64, num_splits=4, sliding_window=40)


def test_gpu_fused_write_with_no_padding_and_tuned_tiles():
  # No padding rows or sequences, the tuned tiles (64-position blocks: the
  # step's positions share a block with cached ones at kv_len 64 and 65).
  seqs = [(5, 21), (1, 64), (1, 65), (40, 90)]
  case = make_case(3, seqs, num_heads=8, num_kv_heads=2, head_dim=64, page_size=16, dtype=jnp.bfloat16,
                   extra_seqs=0, extra_tokens=0, permute=False)
  check_fused(case, jnp.bfloat16, head_dim=64, config=None)


def test_gpu_fused_write_rejects_mismatched_new_rows():
  case = make_case(7, SEQS["decode_only"], num_heads=4, num_kv_heads=2, head_dim=64, page_size=8, dtype=jnp.float32)
  _, k_TKH, v_TKH, slots_T = with_new_kv(case, 0)
  with pytest.raises(ValueError, match="expected"):
    gpu.ragged_paged_attention_write(*case.args(), k_TKH[:, :1], v_TKH, slots_T, sm_scale=0.1, interpret=True)


def _abstract_args(dtype, num_tokens=256, num_heads=32, num_kv_heads=8, head_dim=128, page_size=16):
  shape = jax.ShapeDtypeStruct
  return (shape((num_tokens, num_heads, head_dim), dtype), shape((1024, page_size, 2 * num_kv_heads, head_dim), dtype),
          shape((64,), jnp.int32), shape((64, 128), jnp.int32), shape((65,), jnp.int32), shape((1,), jnp.int32))


@pytest.mark.parametrize("attn_kw", [dict(), dict(num_splits=4, sliding_window=64, soft_cap=30.0)])
def test_gpu_kernel_lowers_to_triton_for_cuda(attn_kw):
  # Cross-platform lowering runs the Pallas Triton lowering on the CPU: it
  # catches what the interpreter accepts and Triton cannot express.
  fn = functools.partial(gpu.ragged_paged_attention, sm_scale=0.1, **attn_kw)
  text = jax.jit(fn).trace(*_abstract_args(jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # the prefill launch and the decode launch


@pytest.mark.parametrize("attn_kw", [dict(), dict(num_splits=4, sliding_window=64, soft_cap=30.0)])
def test_gpu_fused_write_lowers_to_triton_for_cuda(attn_kw):
  args = _abstract_args(jnp.bfloat16)
  num_tokens, kv_shape = args[0].shape[0], args[1].shape
  new_TKH = jax.ShapeDtypeStruct((num_tokens, kv_shape[2] // 2, kv_shape[3]), jnp.bfloat16)
  new_kv = (new_TKH, new_TKH, jax.ShapeDtypeStruct((num_tokens,), jnp.int32))
  fn = functools.partial(gpu.ragged_paged_attention_write, sm_scale=0.1, **attn_kw)
  text = jax.jit(fn, donate_argnums=1).trace(*args, *new_kv).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_gpu_kernel_with_an_fp8_pool_lowers_to_triton_for_cuda():
  q, kv, *meta = _abstract_args(jnp.bfloat16)
  kv = jax.ShapeDtypeStruct(kv.shape, jnp.float8_e4m3fn)
  fn = functools.partial(gpu.ragged_paged_attention, sm_scale=0.1, num_splits=2)
  text = jax.jit(fn).trace(q, kv, *meta).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_gpu_kernel_with_an_fp8_pool_and_f16_dot_lowers_to_triton_for_cuda():
  q, kv, *meta = _abstract_args(jnp.bfloat16)
  fp8 = jax.ShapeDtypeStruct(kv.shape, jnp.float8_e4m3fn)
  # The table's own decode tiles (no config passed) take f16_dot for an fp8 pool, as measured on an
  # H100 (tuning._DECODE); a bfloat16 pool ignores it.
  fn = functools.partial(gpu.ragged_paged_attention, sm_scale=0.1, decode_only=True)
  text = jax.jit(fn).trace(q, fp8, *meta).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 and "_f16" in text
  text = jax.jit(fn).trace(q, kv, *meta).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 and "_f16" not in text
  config = dataclasses.replace(tuning.gpu_config(128, 16, 4), decode=dataclasses.replace(tuning._DECODE, f16_dot=False))
  off = functools.partial(fn, config=config)
  text = jax.jit(off).trace(q, fp8, *meta).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 and "_f16" not in text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_lowers_to_mosaic(dtype):
  fn = functools.partial(tpu.ragged_paged_attention, sm_scale=0.1, sliding_window=64, soft_cap=30.0)
  text = jax.jit(fn).trace(*_abstract_args(dtype)).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 1

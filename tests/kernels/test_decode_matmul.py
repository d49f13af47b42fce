"""The decode matmul kernel, run in Pallas' interpreter, against the reference; its dispatcher and tiles.

Shapes are small and the tiles shrunk to match (16 x 32 tiles, 32 deep), so
every case has several N tiles and K steps; splits, rows past M and columns
past N are each covered by a case of their own.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_matmul import decode_matmul, decode_matmul_nt, gate_up_silu, gpu, reference, tuning
from tests.kernels.rpa_cases import relative_error

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative, ||out - ref|| / ||ref||

SMALL = tuning.GpuConfig(block_m=16, block_n=32, block_k=32, num_splits=1, num_warps=4, num_stages=2)


def _operands(m, k, n, dtype, seed=0, num_w=1):
  keys = jax.random.split(jax.random.key(seed), 1 + num_w)
  x_MK = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  ws = [(jax.random.normal(kk, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype) for kk in keys[1:]]
  return x_MK, ws


def _check(out, ref, dtype, out_dtype=None):
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert out.dtype == (out_dtype or dtype)
  err = relative_error(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_kernel_matches_jnp_dot_for_decode_row_counts(m, dtype):
  x_MK, (w_KN,) = _operands(m, 128, 128, dtype)
  cfg = SMALL if m < 64 else dataclasses.replace(SMALL, block_m=32)
  out = gpu.matmul(x_MK, w_KN, config=cfg, interpret=True)
  _check(out, reference.matmul(x_MK, w_KN), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_masks_rows_past_m_and_columns_past_n(dtype):
  # 5 rows in a 16-row tile, 200 columns in 32-column tiles (the last one 8 wide).
  x_MK, (w_KN,) = _operands(5, 128, 200, dtype, seed=1)
  out = gpu.matmul(x_MK, w_KN, config=SMALL, interpret=True)
  _check(out, reference.matmul(x_MK, w_KN), dtype)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_split_k_partial_sums_add_up(num_splits):
  x_MK, (w_KN,) = _operands(3, 256, 96, jnp.float32, seed=2)
  cfg = dataclasses.replace(SMALL, num_splits=num_splits)
  out = gpu.matmul(x_MK, w_KN, config=cfg, interpret=True)
  _check(out, reference.matmul(x_MK, w_KN), jnp.float32)


def test_bfloat16_inputs_can_give_a_float32_output():
  x_MK, (w_KN,) = _operands(16, 128, 64, jnp.bfloat16, seed=3)
  out = gpu.matmul(x_MK, w_KN, out_dtype=jnp.float32, config=SMALL, interpret=True)
  _check(out, reference.matmul(x_MK, w_KN, out_dtype=jnp.float32), jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_weight_kernel_matches_the_tied_lm_head(dtype):
  x_MK, (w_KN,) = _operands(7, 128, 200, dtype, seed=4)
  w_NK = w_KN.T.copy()
  out = gpu.matmul_nt(x_MK, w_NK, config=SMALL, interpret=True)
  _check(out, reference.matmul_nt(x_MK, w_NK), dtype)


@pytest.mark.parametrize("dtype,num_splits", [(jnp.float32, 1), (jnp.bfloat16, 1), (jnp.float32, 2)])
def test_fused_gate_up_matches_silu_of_two_products(dtype, num_splits):
  x_MK, (w_gate_KN, w_up_KN) = _operands(9, 128, 80, dtype, seed=5, num_w=2)
  cfg = dataclasses.replace(SMALL, num_splits=num_splits)
  out = gpu.gate_up_silu(x_MK, w_gate_KN, w_up_KN, config=cfg, interpret=True)
  _check(out, reference.gate_up_silu(x_MK, w_gate_KN, w_up_KN), dtype)


def test_tuned_tiles_match_reference():
  # The config the dispatcher would pick for a 16-row product, not the test tiles.
  x_MK, (w_KN,) = _operands(16, 512, 192, jnp.bfloat16, seed=6)
  assert tuning.gpu_config(16, 512, 192).block_m == 16
  out = gpu.matmul(x_MK, w_KN, interpret=True)
  _check(out, reference.matmul(x_MK, w_KN), jnp.bfloat16)


def test_dispatcher_uses_xla_on_cpu_and_the_kernel_when_asked():
  x_MK, (w_KN,) = _operands(4, 128, 64, jnp.float32, seed=7)
  ref = reference.matmul(x_MK, w_KN)
  np.testing.assert_array_equal(np.asarray(decode_matmul(x_MK, w_KN)), np.asarray(ref))  # auto on CPU: XLA
  np.testing.assert_array_equal(np.asarray(decode_matmul(x_MK, w_KN, impl="xla")), np.asarray(ref))
  _check(decode_matmul(x_MK, w_KN, impl="gpu", interpret=True), ref, jnp.float32)
  _check(decode_matmul_nt(x_MK, w_KN.T, impl="gpu", interpret=True), ref, jnp.float32)
  w2_KN = w_KN[:, ::-1]
  _check(gate_up_silu(x_MK, w_KN, w2_KN, impl="gpu", interpret=True),
         reference.gate_up_silu(x_MK, w_KN, w2_KN), jnp.float32)


def test_dispatcher_falls_back_to_xla_for_shapes_the_kernel_does_not_take():
  # 300 rows (prefill-sized) and K = 24 (not a multiple of 16): XLA, bit for bit.
  for m, k in [(300, 64), (4, 24)]:
    x_MK, (w_KN,) = _operands(m, k, 32, jnp.float32, seed=8)
    out = decode_matmul(x_MK, w_KN, impl="gpu", interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.matmul(x_MK, w_KN)))


def test_dispatcher_rejects_an_unknown_impl():
  x_MK, (w_KN,) = _operands(4, 32, 32, jnp.float32)
  with pytest.raises(ValueError, match=r"impl='cuda'; expected one of \('auto', 'gpu', 'hopper', 'xla'\)"):
    decode_matmul(x_MK, w_KN, impl="cuda")


def test_kernel_names_what_it_cannot_take():
  shape = jax.ShapeDtypeStruct
  assert "M=300" in gpu.supports(shape((300, 64), jnp.bfloat16), shape((64, 32), jnp.bfloat16))
  assert "K=24" in gpu.supports(shape((4, 24), jnp.bfloat16), shape((24, 32), jnp.bfloat16))
  assert "contracted dims differ (64 != 32)" in gpu.supports(shape((4, 64), jnp.bfloat16),
                                                               shape((32, 64), jnp.bfloat16))
  assert "dtypes" in gpu.supports(shape((4, 64), jnp.float32), shape((64, 32), jnp.bfloat16))
  with pytest.raises(ValueError, match="M=300"):
    gpu.matmul(jnp.zeros((300, 64), jnp.bfloat16), jnp.zeros((64, 32), jnp.bfloat16))


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 6144), (64, 14336, 4096), (1, 2048, 128256),
                                   (256, 4096, 14336), (100, 8192, 2048)])
def test_fitted_tiles_are_legal_and_split_k_until_the_gpu_is_full(m, k, n):
  # The bucket's default (measured table entries fix their own split count; checked below).
  cfg = tuning.fit(tuning._DEFAULTS[min(tuning.m_bucket(m), tuning.MAX_M)], m, k, n)
  z = cfg.num_splits
  assert k % (cfg.block_k * z) == 0
  assert cfg.block_m <= tuning.m_bucket(m)
  assert tuning.smem_bytes(cfg) <= tuning.SMEM_BUDGET
  programs = -(-m // cfg.block_m) * -(-n // cfg.block_n) * z
  # Splitting stopped for one of its reasons: the grid is full, the split cap, too few K steps left,
  # or partial sums that would cost more than a quarter of the weight traffic.
  assert (programs >= tuning.NUM_SMS or z == tuning.MAX_SPLITS or k // (2 * z * cfg.block_k) < 2
          or 2 * z * m * 16 > k)


@pytest.mark.parametrize("itemsize,gate_up", [(4, False), (2, True), (4, True)])
def test_fitted_tiles_keep_the_pipeline_within_shared_memory(itemsize, gate_up):
  for m in (1, 16, 64, 128, 256):
    cfg = tuning.gpu_config(m, 4096, 14336, gate_up=gate_up, itemsize=itemsize)
    assert tuning.smem_bytes(cfg, itemsize, 2 if gate_up else 1) <= tuning.SMEM_BUDGET
    assert cfg.num_stages >= 2


@pytest.mark.parametrize("m", [1, 256])
def test_kernels_lower_to_triton_for_cuda(m):
  # Cross-platform lowering runs the Pallas Triton lowering on the CPU: it
  # catches what the interpreter accepts and Triton cannot express.
  shape = jax.ShapeDtypeStruct
  bf16 = jnp.bfloat16
  calls = [(gpu.matmul, (shape((m, 4096), bf16), shape((4096, 6144), bf16))),
           (gpu.matmul_nt, (shape((m, 2048), bf16), shape((128256, 2048), bf16))),
           (gpu.gate_up_silu, (shape((m, 4096), bf16), shape((4096, 14336), bf16), shape((4096, 14336), bf16))),
           (functools.partial(gpu.matmul, config=dataclasses.replace(SMALL, num_splits=4)),
            (shape((m, 512), jnp.float32), shape((512, 200), jnp.float32)))]
  for fn, args in calls:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1



def test_auto_leaves_shapes_where_xla_measured_faster_to_xla(monkeypatch):
  monkeypatch.setitem(tuning.GPU_TABLE, (16, 128, 64), None)
  assert tuning.xla_is_faster(3, 128, 64) and not tuning.xla_is_faster(3, 128, 96)
  assert tuning.gpu_config(3, 128, 64).block_m == 16  # impl="gpu" still has tiles for it
  x_MK, (w_KN,) = _operands(3, 128, 64, jnp.float32, seed=9)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  from pallas_kernels.decode_matmul import _use_kernel
  assert not _use_kernel("auto", x_MK, w_KN, False)
  assert _use_kernel("gpu", x_MK, w_KN, False)
  x_MK, (w_KN,) = _operands(3, 128, 96, jnp.float32, seed=9)
  assert _use_kernel("auto", x_MK, w_KN, False)


def test_measured_table_entries_are_legal_for_their_shapes():
  assert tuning.GPU_TABLE, "the table holds the H200 measurements"
  for (bucket, k, n), entry in tuning.GPU_TABLE.items():
    if entry is None:
      continue
    cfg = tuning.gpu_config(bucket, k, n)
    assert k % (cfg.block_k * cfg.num_splits) == 0
    assert cfg.block_m <= bucket
    assert tuning.smem_bytes(cfg) <= tuning.SMEM_BUDGET

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
  bf16, f8 = jnp.bfloat16, jnp.float8_e4m3fn
  calls = [(gpu.matmul, (shape((m, 4096), bf16), shape((4096, 6144), bf16))),
           (gpu.matmul_nt, (shape((m, 2048), bf16), shape((128256, 2048), bf16))),
           (gpu.gate_up_silu, (shape((m, 4096), bf16), shape((4096, 14336), bf16), shape((4096, 14336), bf16))),
           (functools.partial(gpu.matmul, config=dataclasses.replace(SMALL, num_splits=4)),
            (shape((m, 512), jnp.float32), shape((512, 200), jnp.float32))),
           # fp8 weights (the 8B shapes' fp8 tiles), converted in the kernel and scaled per column
           (lambda x, w, s: gpu.matmul(x, w, w_scale_N=s),
            (shape((m, 4096), bf16), shape((4096, 6144), f8), shape((6144,), jnp.float32))),
           (lambda x, g, u, gs, us: gpu.gate_up_silu(x, g, u, w_gate_scale_N=gs, w_up_scale_N=us),
            (shape((m, 4096), bf16), shape((4096, 14336), f8), shape((4096, 14336), f8), shape((14336,), jnp.float32),
             shape((14336,), jnp.float32)))]
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


# ---------------------------------------------------------------- fp8 weights with a scale per column

FP8_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}  # by x's dtype, against x @ (w * scale) in float32


def _fp8_operands(m, k, n, x_dtype, w_dtype=jnp.float8_e4m3fn, seed=0, num_w=1):
  """x and `num_w` (fp8 weight, float32 scale) pairs whose columns span three orders of magnitude, so a
  scale dropped, or taken from the wrong column, moves the product far past the tolerance."""
  keys = jax.random.split(jax.random.key(seed), 1 + 2 * num_w)
  x_MK = jax.random.normal(keys[0], (m, k), jnp.float32).astype(x_dtype)
  pairs = []
  for i in range(num_w):
    magnitude_N = 10.0 ** jax.random.uniform(keys[1 + 2 * i], (n,), jnp.float32, -2, 1)
    w_KN = jax.random.normal(keys[2 + 2 * i], (k, n), jnp.float32) / np.sqrt(k) * magnitude_N
    scale_N = jnp.max(jnp.abs(w_KN), axis=0) / float(jnp.finfo(w_dtype).max)
    pairs.append(((w_KN / scale_N).astype(w_dtype), scale_N))
  return x_MK, pairs


def _dequantized(w8, scale_N):
  return w8.astype(jnp.float32) * scale_N


def _check_fp8(out, x_MK, want_f32, out_dtype=None):
  """`out` against the float32 product of x and the dequantized weight(s), at x's dtype's tolerance."""
  assert out.dtype == (out_dtype or x_MK.dtype)
  err = relative_error(np.asarray(out, np.float32), np.asarray(want_f32, np.float32))
  tol = FP8_TOLERANCE[x_MK.dtype.name]
  assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _exact(x_MK, w_KN):
  return jnp.dot(x_MK.astype(jnp.float32), w_KN, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("m,k,n,num_splits,x_dtype,w_dtype", [
    (5, 128, 200, 1, jnp.bfloat16, jnp.float8_e4m3fn),  # rows past M, columns past N (the last tile 8 wide)
    (5, 128, 200, 1, jnp.float32, jnp.float8_e4m3fn),
    (3, 256, 96, 4, jnp.bfloat16, jnp.float8_e4m3fn),  # split-K: the partial sums are scaled, then added
    (16, 128, 64, 2, jnp.float32, jnp.float8_e5m2),
])
def test_fp8_kernel_is_the_product_of_the_dequantized_weight(m, k, n, num_splits, x_dtype, w_dtype):
  x_MK, [(w8_KN, scale_N)] = _fp8_operands(m, k, n, x_dtype, w_dtype, seed=m + n)
  cfg = dataclasses.replace(SMALL, num_splits=num_splits)
  out = gpu.matmul(x_MK, w8_KN, w_scale_N=scale_N, config=cfg, interpret=True)
  want = _exact(x_MK, _dequantized(w8_KN, scale_N))
  _check_fp8(out, x_MK, want)
  _check_fp8(reference.matmul(x_MK, w8_KN, w_scale_N=scale_N), x_MK, want)  # the spec says the same


def test_fp8_kernel_with_its_default_tiles_and_a_float32_output():
  # The doubled block_k of fp8's defaults (here 256 deep over K = 512, split in two).
  x_MK, [(w8_KN, scale_N)] = _fp8_operands(16, 512, 192, jnp.bfloat16, seed=11)
  assert gpu._config(x_MK, w8_KN, 192, False).block_k == 2 * gpu._config(x_MK, x_MK.T, 192, False).block_k
  out = gpu.matmul(x_MK, w8_KN, w_scale_N=scale_N, out_dtype=jnp.float32, interpret=True)
  _check_fp8(out, x_MK, _exact(x_MK, _dequantized(w8_KN, scale_N)), jnp.float32)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_fused_gate_up_scales_each_weight_by_its_own_scale(num_splits):
  x_MK, [(g8, g_scale), (u8, u_scale)] = _fp8_operands(9, 128, 80, jnp.bfloat16, seed=12, num_w=2)
  cfg = dataclasses.replace(SMALL, num_splits=num_splits)
  out = gpu.gate_up_silu(x_MK, g8, u8, w_gate_scale_N=g_scale, w_up_scale_N=u_scale, config=cfg, interpret=True)
  g_MN, u_MN = _exact(x_MK, _dequantized(g8, g_scale)), _exact(x_MK, _dequantized(u8, u_scale))
  _check_fp8(out, x_MK, jax.nn.silu(g_MN) * u_MN)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_fused_gate_up_of_nk_weights(num_splits):
  # Weights stored [N, K] (quant.Fp8WeightNK): the same products, through the transposed loads; N = 80 masks
  # the last column tile.
  x_MK, [(g8, g_scale), (u8, u_scale)] = _fp8_operands(9, 128, 80, jnp.bfloat16, seed=15, num_w=2)
  cfg = dataclasses.replace(SMALL, num_splits=num_splits)
  g_NK, u_NK = g8.T.copy(), u8.T.copy()
  out = gpu.gate_up_silu(x_MK, g_NK, u_NK, w_gate_scale_N=g_scale, w_up_scale_N=u_scale, config=cfg,
                         interpret=True, transposed=True)
  want = jax.nn.silu(_exact(x_MK, _dequantized(g8, g_scale))) * _exact(x_MK, _dequantized(u8, u_scale))
  _check_fp8(out, x_MK, want)
  scales = dict(w_gate_scale_N=g_scale, w_up_scale_N=u_scale)
  _check_fp8(reference.gate_up_silu(x_MK, g_NK, u_NK, transposed=True, **scales), x_MK, want)
  # The dispatcher: the kernel when asked, the spec on a CPU and for "hopper" (which takes no fp8).
  _check_fp8(gate_up_silu(x_MK, g_NK, u_NK, impl="gpu", interpret=True, transposed=True, **scales), x_MK, want)
  for impl in ("auto", "hopper"):
    _check_fp8(gate_up_silu(x_MK, g_NK, u_NK, impl=impl, transposed=True, **scales), x_MK, want)


def test_fp8_transposed_weight_kernel():
  x_MK, [(w8_KN, scale_N)] = _fp8_operands(7, 128, 200, jnp.bfloat16, seed=13)
  out = gpu.matmul_nt(x_MK, w8_KN.T.copy(), w_scale_N=scale_N, config=SMALL, interpret=True)
  _check_fp8(out, x_MK, _exact(x_MK, _dequantized(w8_KN, scale_N)))


def test_an_fp8_weight_without_its_scale_is_refused():
  x_MK, [(w8_KN, scale_N)] = _fp8_operands(4, 64, 32, jnp.bfloat16)
  no_scale = "w is float8_e4m3fn without w_scale_N: an fp8 weight needs its float32 scale per output column"
  assert gpu.supports(x_MK, w8_KN) == no_scale
  assert gpu.supports(x_MK, w8_KN, w_scale_N=scale_N) is None
  assert "need float32 of shape (32,)" in gpu.supports(x_MK, w8_KN, w_scale_N=scale_N[:16])
  assert "need float32 of shape (32,)" in gpu.supports(x_MK, w8_KN, w_scale_N=scale_N.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=no_scale):
    gpu.matmul(x_MK, w8_KN, interpret=True)
  for impl in ("xla", "gpu", "hopper", "auto"):  # never an unscaled product, whichever path
    with pytest.raises(ValueError, match=no_scale):
      decode_matmul(x_MK, w8_KN, impl=impl, interpret=True)
  with pytest.raises(ValueError, match="give both or neither"):
    gpu.gate_up_silu(x_MK, x_MK.T, x_MK.T, w_gate_scale_N=jnp.ones((4,), jnp.float32), interpret=True)
  # The Hopper kernel's wgmma takes fp8 only with fp8 activations: it names that, and the Triton kernel.
  from pallas_kernels.decode_matmul import hopper
  why = hopper.supports(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((256, 256), jnp.float8_e4m3fn))
  assert "takes no fp8 weights" in why and "impl='gpu'" in why


def test_dispatcher_sends_fp8_weights_to_the_triton_kernel_and_their_fallbacks_to_xla():
  x_MK, [(g8, g_scale), (u8, u_scale)] = _fp8_operands(6, 128, 64, jnp.float32, seed=14, num_w=2)
  want = _exact(x_MK, _dequantized(g8, g_scale))
  ref = reference.matmul(x_MK, g8, w_scale_N=g_scale)
  _check_fp8(decode_matmul(x_MK, g8, w_scale_N=g_scale, impl="gpu", interpret=True), x_MK, want)
  _check_fp8(decode_matmul_nt(x_MK, g8.T, w_scale_N=g_scale, impl="gpu", interpret=True), x_MK, want)
  # XLA on a CPU ("auto") and off a Hopper GPU ("hopper", which takes no fp8 anyway): the spec, bit for bit.
  for impl in ("auto", "xla", "hopper"):
    np.testing.assert_array_equal(np.asarray(decode_matmul(x_MK, g8, w_scale_N=g_scale, impl=impl)), np.asarray(ref))
  scales = dict(w_gate_scale_N=g_scale, w_up_scale_N=u_scale)
  want_gu = jax.nn.silu(want) * _exact(x_MK, _dequantized(u8, u_scale))
  _check_fp8(gate_up_silu(x_MK, g8, u8, impl="gpu", interpret=True, **scales), x_MK, want_gu)
  # An fp8 gate beside a float32 up: no kernel streams the pair, XLA multiplies it.
  u_KN = _dequantized(u8, u_scale)
  mixed = gate_up_silu(x_MK, g8, u_KN, impl="gpu", interpret=True, w_gate_scale_N=g_scale)
  np.testing.assert_array_equal(np.asarray(mixed),
                                np.asarray(reference.gate_up_silu(x_MK, g8, u_KN, w_gate_scale_N=g_scale)))


def test_fp8_tiles_move_the_weight_bytes_of_bfloat16_tiles_and_fit_shared_memory(monkeypatch):
  for m in (1, 16, 64, 128, 256):
    for gate_up in (False, True):
      num_w = 2 if gate_up else 1
      bf16 = tuning.gpu_config(m, 4096, 14336, gate_up=gate_up)
      fp8 = tuning.gpu_config(m, 4096, 14336, gate_up=gate_up, w_itemsize=1)
      assert tuning.smem_bytes(fp8, 2, num_w, 1) <= tuning.SMEM_BUDGET
      # Twice as deep, unless shared memory cut it back (never below bfloat16's depth).
      assert bf16.block_k <= fp8.block_k <= 2 * bf16.block_k
  assert tuning.gpu_config(16, 4096, 6144, w_itemsize=1).block_k == 2 * tuning.gpu_config(16, 4096, 6144).block_k
  # fp8 weights have tables of their own: a bfloat16 measurement of XLA winning does not carry over,
  # and an fp8 shape takes the kernel only where its table names a tile (XLA won every measured one).
  monkeypatch.setitem(tuning.GPU_TABLE, (16, 128, 64), None)
  assert tuning.xla_is_faster(3, 128, 64) and tuning.xla_is_faster(3, 128, 64, fp8=True)
  assert not tuning.xla_is_faster(3, 128, 96) and tuning.xla_is_faster(3, 128, 96, fp8=True)
  monkeypatch.setitem(tuning.GPU_TABLE_FP8, (16, 128, 96), tuning._DEFAULTS[16])
  assert not tuning.xla_is_faster(3, 128, 96, fp8=True)
  assert tuning.xla_is_faster(3, 4096, 6144, fp8=True)  # the measured 8B table
  for bucket, cands in tuning.GPU_SWEEP_FP8.items():
    assert cands[0].block_k == 2 * tuning.GPU_SWEEP[bucket][0].block_k


def _lower_for_cuda(fn, *args):
  """Lowers `fn` for an NVIDIA GPU on this CPU-only machine: the Pallas Triton lowering runs in Python, so a
  kernel the GPU's compiler would refuse to lower fails here too (the interpreter runs no lowering at all)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("w_dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_kernel_lowers_for_cuda_with_masked_rows_and_columns(w_dtype):
  # M=5 and N=200 need both masks; the first GPU run of fp8 weights failed here: Triton cannot fill a
  # masked fp8 load with an integer zero.
  x = jax.ShapeDtypeStruct((5, 256), jnp.bfloat16)
  w_KN, w_NK = jax.ShapeDtypeStruct((256, 200), w_dtype), jax.ShapeDtypeStruct((200, 256), w_dtype)
  s = jax.ShapeDtypeStruct((200,), jnp.float32) if w_dtype != jnp.bfloat16 else None
  split = dataclasses.replace(SMALL, num_splits=2)
  texts = [
      _lower_for_cuda(lambda x, w, s: gpu.matmul(x, w, w_scale_N=s), x, w_KN, s),
      _lower_for_cuda(lambda x, w, s: gpu.matmul(x, w, w_scale_N=s, config=split), x, w_KN, s),
      _lower_for_cuda(lambda x, w, s: gpu.matmul_nt(x, w, w_scale_N=s), x, w_NK, s),
      _lower_for_cuda(lambda x, g, u, s: gpu.gate_up_silu(x, g, u, w_gate_scale_N=s, w_up_scale_N=s),
                      x, w_KN, w_KN, s),
      _lower_for_cuda(lambda x, g, u, s: gpu.gate_up_silu(x, g, u, w_gate_scale_N=s, w_up_scale_N=s, transposed=True),
                      x, w_NK, w_NK, s),
  ]
  for text in texts:
    assert "decode_matmul" in text  # the Pallas call is in the module, not an XLA fallback


# ---- w8a8: fp8 rows of x (a scale per row) by fp8 weights [N, K] (a scale per column)

SMALL_A8 = dataclasses.replace(SMALL, block_k=64)  # fp8 tiles are at least 32 deep


def _a8_operands(m, k, n, seed=0, stacked=False):
  """(x8 [M, K], x_scale [M], w8 [N, K] or [2, N, K], w_scale [N] or [2, N]): rows and columns of many magnitudes,
  quantized as jserve's quant.quantize_rows and quantize_fp8 do (amax / 448 per row and per column)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 1, (m, 1))
  w = rng.standard_normal((2 if stacked else 1, n, k)) * 10.0 ** rng.uniform(-3, 0, (2 if stacked else 1, n, 1))
  x_scale = np.abs(x).max(1) / 448.0
  w_scale = np.abs(w).max(-1) / 448.0
  x8 = jnp.asarray(x / x_scale[:, None], jnp.float8_e4m3fn)
  w8 = jnp.asarray(w / w_scale[..., None], jnp.float8_e4m3fn)
  x_scale, w_scale = jnp.asarray(x_scale, jnp.float32), jnp.asarray(w_scale, jnp.float32)
  return (x8, x_scale, w8, w_scale) if stacked else (x8, x_scale, w8[0], w_scale[0])


def _exact_a8(x8, x_scale, w8, w_scale):
  """The float64 product of the dequantized operands ([N, K] weight)."""
  x = np.asarray(x8, np.float64) * np.asarray(x_scale, np.float64)[:, None]
  w = np.asarray(w8, np.float64) * np.asarray(w_scale, np.float64)[:, None]
  return x @ w.T


@pytest.mark.parametrize("m,n,num_splits", [(1, 96, 1), (5, 200, 2), (16, 64, 1), (40, 96, 4)])
def test_a8_kernel_is_the_product_of_the_dequantized_operands(m, n, num_splits):
  # M=5 and 40 mask rows, N=96 and 200 mask columns, splits add float32 partial sums; each row and column has
  # its own scale, so one scale misapplied moves that row or column by orders of magnitude.
  k = 512
  x8, xs, w8, ws = _a8_operands(m, k, n, seed=m)
  cfg = dataclasses.replace(SMALL_A8, num_splits=num_splits)
  out = gpu.matmul_a8_nt(x8, xs, w8, ws, config=cfg, interpret=True)
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  want = _exact_a8(x8, xs, w8, ws)
  # Per row, against that row's own magnitude (rows span four orders): bfloat16's rounding of the output.
  err = np.abs(np.asarray(out, np.float64) - want).max(1) / np.abs(want).max(1)
  assert err.max() < 1e-2, err
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference.matmul_a8_nt(x8, xs, w8, ws),
                                                                     np.float32), rtol=1e-2, atol=0)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_a8_fused_gate_up_reads_gate_then_up_from_the_stacked_pair(num_splits):
  m, k, n = 9, 256, 80
  x8, xs, w8, ws = _a8_operands(m, k, n, seed=3, stacked=True)
  cfg = dataclasses.replace(SMALL_A8, num_splits=num_splits)
  out = np.asarray(gpu.gate_up_silu_a8(x8, xs, w8, ws, config=cfg, interpret=True), np.float64)
  g, u = (_exact_a8(x8, xs, w8[i], ws[i]) for i in range(2))
  want = g / (1 + np.exp(-g)) * u
  assert relative_error(out, want) < 1e-2
  swapped = u / (1 + np.exp(-u)) * g  # the halves the other way round
  assert relative_error(swapped, want) > 0.1
  np.testing.assert_allclose(out, np.asarray(reference.gate_up_silu_a8(x8, xs, w8, ws), np.float64), rtol=2e-2,
                             atol=1e-2 * np.abs(want).max())


def test_a8_kernel_names_what_it_cannot_take():
  x8, xs, w8, ws = _a8_operands(4, 256, 64)
  assert gpu.supports_a8(x8, xs, w8, ws) is None
  assert "float8_e4m3fn [M, K]" in gpu.supports_a8(x8.astype(jnp.bfloat16), xs, w8, ws)
  assert "one per row" in gpu.supports_a8(x8, xs[:3], w8, ws)
  assert "[2, N, K]" in gpu.supports_a8(x8, xs, w8, ws, halves=True)
  assert "need float32 of shape (64,)" in gpu.supports_a8(x8, xs, w8, ws[:10])
  assert "multiple of 32" in gpu.supports_a8(x8[:, :48], xs, w8[:, :48], ws)
  assert "more rows" in gpu.supports_a8(jnp.zeros((257, 256), jnp.float8_e4m3fn), jnp.ones(257), w8, ws)
  with pytest.raises(ValueError, match="contracted dims differ"):
    gpu.matmul_a8_nt(x8, xs, w8[:, :128], ws, interpret=True)


def test_a8_kernel_goes_where_impl_and_the_w8a8_table_say(monkeypatch):
  from pallas_kernels.decode_matmul import use_a8_kernel
  assert use_a8_kernel("gpu", 16, 4096, 14336, interpret=True)  # the interpreter: any backend
  assert not use_a8_kernel("gpu", 16, 4096, 14336)  # the kernel itself needs a GPU
  assert not use_a8_kernel("gpu", 300, 4096, 14336, interpret=True)  # prompt-sized rows: XLA
  assert not use_a8_kernel("xla", 16, 4096, 14336, interpret=True)
  assert not use_a8_kernel("auto", 16, 4096, 14336, interpret=True)  # off a GPU "auto" is XLA
  with pytest.raises(ValueError, match="expected one of"):
    use_a8_kernel("cuda", 16, 4096, 14336)
  # On a GPU "auto" takes a shape only where the (measured) w8a8 table names a tile.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not use_a8_kernel("auto", 16, 4096, 14336)
  monkeypatch.setitem(tuning.GPU_TABLE_A8, (16, 4096, 14336), SMALL_A8)
  assert use_a8_kernel("auto", 16, 4096, 14336) and use_a8_kernel("auto", 1, 4096, 14336)
  assert not use_a8_kernel("auto", 64, 4096, 14336) and not use_a8_kernel("auto", 16, 4096, 14336, gate_up=True)
  monkeypatch.setitem(tuning.GPU_TABLE_A8, (16, 4096, 14336), None)  # measured: XLA faster
  assert not use_a8_kernel("auto", 16, 4096, 14336)


@pytest.mark.parametrize("m", [1, 5, 64])
def test_a8_kernels_lower_for_cuda(m):
  # Triton cannot fill a masked fp8 load: rows past M (M=1, 5) must be loaded unfilled. The 8B shapes' default
  # tiles, and a masked N with split-K.
  shape = jax.ShapeDtypeStruct
  f8, f32 = jnp.float8_e4m3fn, jnp.float32
  texts = [
      _lower_for_cuda(gpu.matmul_a8_nt, shape((m, 14336), f8), shape((m,), f32), shape((4096, 14336), f8),
                      shape((4096,), f32)),
      _lower_for_cuda(functools.partial(gpu.matmul_a8_nt, config=dataclasses.replace(SMALL_A8, num_splits=2)),
                      shape((m, 256), f8), shape((m,), f32), shape((200, 256), f8), shape((200,), f32)),
      _lower_for_cuda(gpu.gate_up_silu_a8, shape((m, 4096), f8), shape((m,), f32), shape((2, 14336, 4096), f8),
                      shape((2, 14336), f32)),
  ]
  # Every w8a8 sweep candidate of the bucket (tools/bench_matmul.py times them on a GPU) lowers too.
  for cfg in tuning.GPU_SWEEP_A8[tuning.m_bucket(m)]:
    texts.append(_lower_for_cuda(functools.partial(gpu.matmul_a8_nt, config=cfg), shape((m, 2048), f8),
                                 shape((m,), f32), shape((512, 2048), f8), shape((512,), f32)))
  for text in texts:
    assert "decode_matmul_a8_nt" in text


def test_fp8_by_fp8_dots_say_how_far_they_may_accumulate_so_triton_takes_hopper_fp8_tensor_cores():
  # Without maxNumImpreciseAcc Triton refuses wgmma for an fp8 x fp8 dot and widens both operands to float16
  # (tools/kernel_sass.py: HMMA and F2FP in place of QGMMA). gpu.set_fp8_accumulation gives every fp8 x fp8 dot
  # of the lowering FP8_IMPRECISE_ACC, and nothing else: a bf16 dot, and weight-only fp8 (widened before its
  # dot), keep Triton's default.
  from tools.kernel_sass import capture
  shape = jax.ShapeDtypeStruct
  f8, f32, bf16 = jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16
  from jax._src.lib.triton import dialect
  assert getattr(dialect.dot, "sets_fp8_accumulation", False)  # set when the kernel module is imported
  assert gpu.set_fp8_accumulation() and gpu.set_fp8_accumulation()  # idempotent: one wrapper
  assert not getattr(dialect.dot.__closure__[0].cell_contents, "sets_fp8_accumulation", False)
  a8 = capture(gpu.gate_up_silu_a8, shape((64, 256), f8), shape((64,), f32), shape((2, 128, 256), f8),
               shape((2, 128), f32))
  others = capture(lambda x, w, w8, s: (gpu.matmul(x, w), gpu.matmul(x, w8, w_scale_N=s)), shape((64, 256), bf16),
                   shape((256, 128), bf16), shape((256, 128), f8), shape((128,), f32))
  assert [k["ttir"].count(f"maxNumImpreciseAcc = {gpu.FP8_IMPRECISE_ACC}") for k in a8] == [2]  # gate and up
  assert len(others) == 2 and not any("maxNumImpreciseAcc" in k["ttir"] for k in others)
  # Tiles of under 64 rows multiply swapped, w_tile @ x_tile.T, so that the 64-row operand wgmma needs is the
  # weight's: a 16-row tile's dots give [block_n, 16]; a 64-row tile's give [64, block_n] as before.
  cfg = tuning.GpuConfig(block_m=16, block_n=64, block_k=128, num_splits=1, num_warps=4, num_stages=3)
  [small] = capture(functools.partial(gpu.matmul_a8_nt, config=cfg), shape((5, 256), f8), shape((5,), f32),
                    shape((128, 256), f8), shape((128,), f32))
  dots = lambda ttir: [line.rsplit("->", 1)[1].strip() for line in ttir.splitlines() if "tt.dot " in line]
  assert dots(small["ttir"]) == ["tensor<64x16xf32>"]
  cfg64 = dataclasses.replace(cfg, block_m=64, block_n=128, block_k=64)
  [large] = capture(functools.partial(gpu.matmul_a8_nt, config=cfg64), shape((64, 256), f8), shape((64,), f32),
                    shape((128, 256), f8), shape((128,), f32))
  assert dots(large["ttir"]) == ["tensor<64x128xf32>"]

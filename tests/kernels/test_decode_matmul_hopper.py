"""The Hopper (Mosaic GPU) decode matmul kernel: interpreted against the reference, lowered for CUDA.

The interpreter simulates the producer and consumer warpgroups, the TMA copies
and the barrier ring, so these cases cover the K walk of each split, the row
tiles of x, the split-K sum and the gate/up epilogue. Its wgmma takes no
accumulator carried through a loop, so there the products are plain dots of
the same shared-memory tiles; the lowering tests compile the real form.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.decode_matmul import hopper
from tests.sharding.subprocess_util import run_worker

B = hopper.HopperMatmulBlocks

# (kind, M, K, N, blocks): each has 2 or more column tiles and 4 or more K steps.
CASES = {
    "one_row_tile": ("kn", 5, 256, 256, B(num_splits=1)),
    "two_row_tiles_split_k": ("kn", 100, 256, 256, B(num_splits=2, num_stages=2)),  # ring wraps
    "four_row_tiles_n64": ("kn", 256, 256, 128, B(block_n=64, num_splits=1, num_stages=3)),
    "gate_up": ("gate_up", 5, 256, 128, B(block_n=64, num_splits=1)),
    "gate_up_split_k": ("gate_up", 70, 256, 128, B(num_splits=2)),
    "transposed_split_k": ("nk", 20, 256, 256, B(num_splits=2, num_stages=3)),  # w stored [N, K]
}


def test_hopper_matmul_matches_reference_in_the_interpreter():
  report = run_worker("tests.kernels.matmul_interpret_worker", 8, timeout=400)
  assert sorted(r["case"] for r in report) == sorted(CASES)
  for r in report:
    assert r["shape"] == r["want_shape"] and r["dtype"] == "bfloat16", r
    assert r["relative_error"] <= 1e-2, r


@pytest.mark.parametrize("m,k,n,blocks,kind", [
    (16, 4096, 6144, B(), "kn"),  # split-K, 6 stages
    (256, 14336, 4096, B(block_n=64), "kn"),  # four row tiles (64 columns: their registers), stages cut
    (64, 4096, 14336, B(block_n=64), "gate_up"),
    (32, 2048, 128256, B(), "nk"),  # the 1B shape's tied LM head
])
def test_hopper_matmul_lowers_to_mosaic_gpu_for_cuda(m, k, n, blocks, kind):
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
  if kind == "gate_up":
    f, args = (lambda x, w, u: hopper.gate_up_silu(x, w, u, blocks=blocks)), (x, w, w)
  elif kind == "nk":
    f, args = (lambda x, w: hopper.matmul_nt(x, w, blocks=blocks)), (x, jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
  else:
    f, args = (lambda x, w: hopper.matmul(x, w, blocks=blocks)), (x, w)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_plan_fills_the_gpu_and_fits_shared_memory():
  # 48 column tiles of the 8B QKV shape: split K until the grid covers the 132 SMs.
  consumers, splits, stages = hopper.plan(16, 4096, 6144, B())
  assert (consumers, splits) == (1, 4) and 48 * splits >= hopper.NUM_SMS
  # 256 rows: four consumers, and the stage count drops until the buffers fit.
  consumers, splits, stages = hopper.plan(256, 14336, 4096, B())
  assert consumers == 4 and (14336 // 64) % splits == 0
  assert hopper.smem_bytes(B(num_stages=stages), consumers, 1, 4) <= hopper.SMEM_LIMIT < hopper.smem_bytes(
      B(num_stages=stages + 1), consumers, 1, 4)


@pytest.mark.parametrize("consumers", [1, 2, 3, 4])
def test_register_shares_fit_what_the_block_starts_with(consumers):
  """`setmaxnreg` moves registers between a block's warpgroups; asking for more than the block started
  with waits forever. The starting share is the SM's 64K over the block's threads, in steps of 8."""
  warpgroups = consumers + 1
  start = min(255, 65536 // (128 * warpgroups)) // 8 * 8
  regs = hopper.consumer_registers(consumers)
  assert regs % 8 == 0 and regs <= 232
  assert hopper.PRODUCER_REGISTERS + consumers * regs <= start * warpgroups
  assert hopper.PRODUCER_REGISTERS + consumers * (regs + 8) > start * warpgroups or regs == 232


def test_hopper_supports_names_what_it_cannot_take():
  x = jnp.zeros((8, 256), jnp.bfloat16)
  w = jnp.zeros((256, 256), jnp.bfloat16)
  assert hopper.supports(x, w) is None
  assert "dtypes" in hopper.supports(x.astype(jnp.float32), w.astype(jnp.float32))
  assert "M=300" in hopper.supports(jnp.zeros((300, 256), jnp.bfloat16), w)
  assert "N=200" in hopper.supports(x, jnp.zeros((256, 200), jnp.bfloat16))
  assert "block_k" in hopper.supports(x, w, B(block_k=128))
  # Four consumers get 104 registers each: 128-wide accumulators (64 per thread, plus 48) do not fit.
  assert "registers" in hopper.supports(jnp.zeros((256, 256), jnp.bfloat16), w, B(block_n=128))
  assert hopper.default_blocks(256).block_n == 64
  assert hopper.supports(jnp.zeros((256, 256), jnp.bfloat16), w) is None
  # gate/up over 128 rows: the default narrows to 64 columns so both accumulators fit three consumers'
  # 152 registers; four consumers' 104 hold not even that (the dispatch then leaves it to XLA).
  assert hopper.default_blocks(150, num_weights=2).block_n == 64
  assert hopper.supports(jnp.zeros((150, 256), jnp.bfloat16), w, num_weights=2) is None
  assert "registers" in hopper.supports(jnp.zeros((200, 256), jnp.bfloat16), w, num_weights=2)
  with pytest.raises(ValueError, match="N=200"):
    hopper.matmul(x, jnp.zeros((256, 200), jnp.bfloat16))
  assert hopper.supports(x, jnp.zeros((512, 256), jnp.bfloat16), transposed=True) is None  # w[N, K]
  assert "w[N, K]" in hopper.supports(x, jnp.zeros((256, 512), jnp.bfloat16), transposed=True)


def test_impl_hopper_off_a_hopper_gpu_gives_xlas_product():
  # Not interpreted and not on a Hopper GPU: every entry point falls back to XLA's product.
  from pallas_kernels.decode_matmul import decode_matmul, decode_matmul_nt, gate_up_silu, reference
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (8, 256), jnp.bfloat16)
  w, u = (jax.random.normal(k, (256, 128), jnp.bfloat16) for k in keys[1:])
  assert (decode_matmul(x, w, impl="hopper") == reference.matmul(x, w)).all()
  assert (decode_matmul_nt(x, w.T, impl="hopper") == reference.matmul_nt(x, w.T)).all()
  assert (gate_up_silu(x, w, u, impl="hopper") == reference.gate_up_silu(x, w, u)).all()

"""The packed step inputs: one int32 buffer, every array on a 256-byte boundary, round trip exact."""

import jax
import jax.numpy as jnp
import numpy as np

from jserve.engine.step import ALIGN_WORDS, pack_host_inputs, unpack_host, unpack_inputs


def _tree(rng):
  return dict(cu_q_lens_E=rng.integers(0, 1000, 17).astype(np.int32),
              temperature_B=rng.random(5).astype(np.float32),
              ok_B=rng.random(3) < 0.5,
              bitmask_BV=rng.integers(0, 256, (2, 7)).astype(np.uint8),
              seed_B=rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32),
              page_indices_BP=rng.integers(0, 99, (4, 65)).astype(np.int32))


def test_every_array_starts_on_a_256_byte_boundary():
  # Mosaic GPU kernels take slices of this buffer as operands and refuse unaligned ones.
  tree = _tree(np.random.default_rng(0))
  buf_N, (_, metas) = pack_host_inputs(tree)
  offset = 0
  for (shape, _), leaf in zip(metas, jax.tree_util.tree_leaves(tree)):
    assert offset % ALIGN_WORDS == 0 and ALIGN_WORDS * 4 == 256
    bits = leaf.astype(np.int32) if leaf.dtype in (np.bool_, np.uint8) else leaf.view(np.int32)
    np.testing.assert_array_equal(buf_N[offset:offset + leaf.size], bits.ravel())
    offset += -(-int(np.prod(shape)) // ALIGN_WORDS) * ALIGN_WORDS
  assert buf_N.size == offset


def test_round_trip_on_host_and_device_is_exact():
  tree = _tree(np.random.default_rng(1))
  buf_N, layout = pack_host_inputs(tree)
  for out in (unpack_host(buf_N, layout), jax.jit(lambda b: unpack_inputs(b, layout))(jnp.asarray(buf_N))):
    for key, want in tree.items():
      got = np.asarray(out[key])
      assert got.dtype == want.dtype and got.shape == want.shape, key
      np.testing.assert_array_equal(got, want)

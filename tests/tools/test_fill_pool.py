"""tools/multi_gpu_timing.fill_pool (what bench_e2e's step sweep fills the KV pool with): it frees each layer's
old pool before making the new one and makes it without temporaries, so a pool that fills the device fits."""

import jax
import jax.numpy as jnp
import numpy as np

from tools.multi_gpu_timing import fill_pool


class _Runner:
  def __init__(self, pools):
    self.kv_caches = pools


def test_fill_replaces_every_pool_in_place_with_values_in_range():
  pools = [jnp.zeros((8, 16, 4, 32), jnp.float8_e4m3fn), jnp.zeros((8, 16, 4, 32), jnp.float8_e4m3fn),
           jnp.zeros((3, 16, 2, 64), jnp.bfloat16)]
  old = list(pools)
  runner = _Runner(pools)
  fill_pool(runner)
  assert all(x.is_deleted() for x in old)
  for before, after in zip(old, runner.kv_caches):
    assert (after.shape, after.dtype, after.sharding) == (before.shape, before.dtype, before.sharding)
    a = np.asarray(after.astype(jnp.float32))
    assert -1 <= a.min() < -0.9 and 0.9 < a.max() <= 1 and abs(a.mean()) < 0.05
    assert (a == 0).mean() < 0.01
  # Two layers of one shape get different values.
  assert not np.array_equal(np.asarray(runner.kv_caches[0].astype(jnp.float32)),
                            np.asarray(runner.kv_caches[1].astype(jnp.float32)))


def test_fill_program_needs_no_temporary_the_size_of_the_pool(monkeypatch):
  shape = (64, 16, 16, 128)  # 2 MiB in fp8
  runner = _Runner([jnp.zeros(shape, jnp.float8_e4m3fn)])
  jitted = []
  real_jit = jax.jit

  def spy(fn, **kw):
    jitted.append(real_jit(fn, **kw))
    return jitted[-1]

  monkeypatch.setattr(jax, "jit", spy)
  fill_pool(runner)
  monkeypatch.undo()
  (fill,) = jitted
  mem = fill.lower(jnp.uint32(0)).compile().memory_analysis()
  assert mem.output_size_in_bytes == 64 * 16 * 16 * 128
  assert mem.temp_size_in_bytes < mem.output_size_in_bytes // 8, mem.temp_size_in_bytes

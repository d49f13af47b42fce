"""The memory-bandwidth ceiling of a GPU, measured in the run that compares against it."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def copy_ceilings(nbytes: int) -> dict:
  """TB/s (bytes read plus written) of a PyTorch device copy and of a JAX elementwise pass over
  `nbytes`; `ceiling_TBps` is the larger. Without a CUDA PyTorch only the JAX figure is given."""
  res = {}
  try:
    import torch
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
      dst.copy_(src)
    times = []
    for _ in range(10):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      dst.copy_(src)
      end.record()
      end.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    res["torch_copy_TBps"] = 2 * nbytes / float(np.median(times)) / 1e12
    del src, dst
    torch.cuda.empty_cache()
  except Exception as e:  # noqa: BLE001 - a missing torch leaves the JAX figure
    res["torch_copy_error"] = repr(e)[:200]
  x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
  negate = jax.jit(lambda x: -x)
  jax.block_until_ready(negate(x))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(10):
      out = negate(x)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / 10)
  del x, out
  res["jax_elementwise_TBps"] = 2 * nbytes / float(np.median(times)) / 1e12
  res["ceiling_TBps"] = max(v for k, v in res.items() if k.endswith("TBps"))
  return res


def matmul_rate(n: int = 8192, *, fp8: bool = False) -> dict:
  """TFLOP/s of a bfloat16 [n, n] x [n, n] `jnp.dot` (2 n^3 FLOPs per call), median of 5 rounds of 10
  calls dispatched back to back: the compute ceiling that a FLOP bound is measured against. Under a
  CPU `n` is cut to 512 (an 8192^3 product there takes minutes).

  fp8: instead the product that an engine with fp8 activations runs (`quant.fp8_dot_a8`'s GEMM): two
  float8 e4m3 operands, the second stored [N, K], accumulated in float32 and written as bfloat16 —
  about twice the bfloat16 rate on Hopper's tensor cores. Returned under the same keys, with
  "matmul_dtype" saying which."""
  if jax.default_backend() == "cpu":
    n = min(n, 512)
  k_a, k_b = jax.random.split(jax.random.key(1))
  a_NN = jax.random.normal(k_a, (n, n), jnp.bfloat16)
  b_NN = jax.random.normal(k_b, (n, n), jnp.bfloat16)
  if fp8:
    a_NN, b_NN = a_NN.astype(jnp.float8_e4m3fn), b_NN.astype(jnp.float8_e4m3fn)
    dot = jax.jit(lambda a, b_NK: jax.lax.dot_general(a, b_NK, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.bfloat16))
  else:
    dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a_NN, b_NN))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(10):
      out_NN = dot(a_NN, b_NN)
    jax.block_until_ready(out_NN)
    times.append((time.perf_counter() - t0) / 10)
  del a_NN, b_NN, out_NN
  return {"matmul_n": n, "matmul_dtype": "float8_e4m3fn" if fp8 else "bfloat16",
          "matmul_TFLOPs": 2 * n ** 3 / float(np.median(times)) / 1e12}

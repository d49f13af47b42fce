"""The Llama forward pass with the Hopper matmul kernel in the Mosaic GPU interpreter, against XLA's.

In a fresh process with 8 simulated CPU devices (see tests/kernels/hopper_interpret_worker.py);
prints a JSON report for test_llama_matmul_impl.py.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import get_model_preset
from jserve.models.llama import compute_logits, forward, init_params
from pallas_kernels.decode_matmul import hopper
from tests.kernels.rpa_cases import relative_error
from tests.models.test_llama_matmul_impl import PAGE_SIZE, _step


def main():
  # tiny-qwen3 in bfloat16: q, o, gate/up, down and the tied LM head fit the kernel; k and v
  # (32 columns) fall back to XLA, as a shape it does not take must.
  cfg = get_model_preset("tiny-qwen3")
  params = init_params(cfg, jax.random.key(1), dtype=jnp.bfloat16)
  kv = [jax.random.normal(jax.random.key(2 + i), (5, PAGE_SIZE, 2 * cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
        for i in range(cfg.num_layers)]
  inputs = _step(cfg)

  @functools.partial(jax.jit, static_argnames="impl")
  def run(params, kv, impl):
    x_BD, new_kv = forward(params, kv, inputs, cfg, matmul_impl=impl)
    return compute_logits(params, x_BD, cfg, matmul_impl=impl), new_kv

  launches = []  # the kernel's launches, counted as the step is traced
  launch = hopper._launch
  hopper._launch = lambda *a, **k: launches.append(k.get("transposed", False)) or launch(*a, **k)
  logits_xla, kv_xla = run(params, kv, "xla")
  logits_kernel, kv_kernel = run(params, kv, "interpret_hopper")
  print(json.dumps(dict(
      logits_error=relative_error(logits_kernel, logits_xla),
      kv_errors=[relative_error(np.asarray(a, np.float32), np.asarray(b, np.float32))
                 for a, b in zip(kv_kernel, kv_xla)],
      kernel_launches=len(launches), transposed_launches=sum(launches))))


if __name__ == "__main__":
  main()

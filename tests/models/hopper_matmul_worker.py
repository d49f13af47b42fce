"""The Llama forward pass with the Hopper matmul kernel in the Mosaic GPU interpreter, against XLA's.

In a fresh process with 8 simulated CPU devices (see tests/kernels/hopper_interpret_worker.py);
prints a JSON report for test_llama_matmul_impl.py.
"""

import json

import jax.numpy as jnp

from pallas_kernels.decode_matmul import hopper
from tests.models.test_llama_matmul_impl import forward_errors


def main():
  launches = []  # the kernel's launches, counted as the step is traced
  launch = hopper._launch
  hopper._launch = lambda *a, **k: launches.append(k.get("transposed", False)) or launch(*a, **k)
  # tiny-qwen3 in bfloat16: q, o, gate/up, down and the tied LM head fit the kernel; k and v
  # (32 columns) fall back to XLA, as a shape it does not take must.
  logits_error, kv_errors = forward_errors("tiny-qwen3", jnp.bfloat16, "interpret_hopper")
  print(json.dumps(dict(logits_error=logits_error, kv_errors=kv_errors, kernel_launches=len(launches),
                        transposed_launches=sum(launches))))


if __name__ == "__main__":
  main()

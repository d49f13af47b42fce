"""Runs test_decode_matmul_hopper.CASES in the Mosaic GPU interpreter and prints a JSON report.

In a fresh process with 8 simulated CPU devices, for the reason given in
hopper_interpret_worker.py (the interpreter's blocked barrier waits can take
every host-callback thread of a one-device CPU runtime on 2 cores).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_matmul import hopper, reference
from tests.kernels import test_decode_matmul_hopper as cases
from tests.kernels.rpa_cases import relative_error


def check(name: str) -> dict:
  kind, m, k, n, blocks = cases.CASES[name]
  keys = jax.random.split(jax.random.key(m), 3)
  x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
  w, w2 = [(jax.random.normal(kk, (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16) for kk in keys[1:]]
  params = hopper.interpret_params()
  if kind == "gate_up":
    out = hopper.gate_up_silu(x, w, w2, blocks=blocks, interpret=params)
    ref = reference.gate_up_silu(x, w, w2)
  elif kind == "nk":
    out = hopper.matmul_nt(x, w.T, blocks=blocks, interpret=params)
    ref = reference.matmul_nt(x, w.T)
  else:
    out = hopper.matmul(x, w, blocks=blocks, interpret=params)
    ref = reference.matmul(x, w)
  return dict(case=name, shape=list(out.shape), want_shape=list(ref.shape), dtype=str(out.dtype),
              relative_error=relative_error(np.asarray(out, np.float32), np.asarray(ref, np.float32)))


if __name__ == "__main__":
  print(json.dumps([check(name) for name in sorted(cases.CASES)]))

"""Runs one of test_hopper_prefill.CASES in the Mosaic GPU interpreter and prints a JSON report.

Why a separate process with 8 simulated CPU devices: the interpreter runs each
simulated warpgroup as a compiled XLA computation whose barrier waits block
inside host callbacks, and XLA's CPU runtime runs those callbacks on a small
pool of threads. On a 2-core machine with one CPU device the test hung in
every run (with and without ping-pong, with async dispatch off too); the
stack dumps showed two warpgroups blocked in barrier waits and the others
waiting to execute, which reads as a waiter holding the thread the producer
needed (our reading of the dumps, not proven). With 8 simulated
devices it has not hung in repeated runs; the test also bounds the process's
time, so a hang would fail instead of stalling the suite.
"""

import dataclasses
import json
import sys

import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import gpu, reference
from tests.kernels import test_hopper_prefill as cases
from tests.kernels.rpa_cases import make_case, relative_error

GARBAGE = 100.0  # in unused pool slots: any unmasked read of one would swamp the output
TOLERANCE = 1e-2  # bfloat16, ||out - ref|| / ||ref||


def check(name: str) -> dict:
  seqs, page_size, hopper_kw, attn_kw = cases.CASES[name]
  case = make_case(0, seqs, num_heads=2, num_kv_heads=1, head_dim=64, page_size=page_size, dtype=jnp.bfloat16)
  case = dataclasses.replace(case, kv_pages_PSCH=jnp.nan_to_num(case.kv_pages_PSCH, nan=GARBAGE))
  sm_scale = 64 ** -0.5
  poisoned = jnp.full(case.q_TNH.shape, jnp.nan, case.q_TNH.dtype)
  out = gpu.ragged_paged_attention(*case.args(), sm_scale=sm_scale, out_TNH=poisoned, interpret=True,
                                   config=cases.config(**hopper_kw), **attn_kw)
  ref = reference.ragged_paged_attention(*case.reference_args(), sm_scale=sm_scale, **attn_kw)
  live = case.live_rows
  return dict(case=name, relative_error=float(relative_error(out[:live], ref[:live])), tolerance=TOLERANCE,
              padding_rows_untouched=bool(jnp.all(jnp.isnan(out[live:]))))


if __name__ == "__main__":
  print(json.dumps(check(sys.argv[1])))

"""The Llama forward pass with its projections on the decode matmul kernel (in Pallas' interpreter) equals XLA's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import get_model_preset
from jserve.models.llama import StepInputs, compute_logits, forward, init_params
from tests.kernels.rpa_cases import relative_error

PAGE_SIZE = 8


def _step(cfg):
  """One ragged step: a 5-token prefill chunk of sequence 0 and one decode token of sequence 1 at position 9."""
  positions = np.array([0, 1, 2, 3, 4, 9], np.int32)
  pages = np.array([[1, 2], [3, 4]], np.int32)
  seq = np.array([0, 0, 0, 0, 0, 1])
  slots = pages[seq, positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, 6).astype(np.int32)
  return StepInputs(token_ids_T=ids, positions_T=positions, slots_T=slots.astype(np.int32),
                    cu_q_lens_E=np.array([0, 5, 6], np.int32), kv_lens_B=np.array([5, 10], np.int32),
                    page_indices_BP=pages, num_seqs=np.array([2], np.int32),
                    logits_indices_B=np.array([4, 5], np.int32))


def forward_errors(preset, dtype, impl):
  """One step's logits and new KV pool with `impl` against "xla": (logits error, [KV error per layer])."""
  cfg = get_model_preset(preset)
  params = init_params(cfg, jax.random.key(1), dtype=dtype)
  kv = [jax.random.normal(jax.random.key(2 + i), (5, PAGE_SIZE, 2 * cfg.num_kv_heads, cfg.head_dim), dtype)
        for i in range(cfg.num_layers)]
  inputs = _step(cfg)

  @functools.partial(jax.jit, static_argnames="impl")
  def run(params, kv, impl):
    x_BD, new_kv = forward(params, kv, inputs, cfg, matmul_impl=impl)
    return compute_logits(params, x_BD, cfg, matmul_impl=impl), new_kv

  logits_xla, kv_xla = run(params, kv, "xla")
  logits_kernel, kv_kernel = run(params, kv, impl)
  # keys and values come out of the q/k/v projections
  return relative_error(logits_kernel, logits_xla), [
      relative_error(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(kv_kernel, kv_xla)]


@pytest.mark.parametrize("preset,dtype,tol", [("tiny-llama", jnp.float32, 1e-5), ("tiny-qwen3", jnp.bfloat16, 2e-2)])
def test_forward_on_the_kernel_matches_xla(preset, dtype, tol):
  # tiny-qwen3 ties its embeddings, so its LM head takes the transposed-weight kernel.
  logits_error, kv_errors = forward_errors(preset, dtype, "interpret")
  assert logits_error <= tol
  assert all(e <= tol for e in kv_errors), kv_errors


def test_forward_on_the_hopper_kernel_matches_xla():
  from tests.sharding.subprocess_util import run_worker
  report = run_worker("tests.models.hopper_matmul_worker", 8, timeout=400)
  assert report["logits_error"] <= 2e-2, report
  assert all(e <= 2e-2 for e in report["kv_errors"]), report
  # q, o, gate/up and down, and the tied LM head (transposed), went through the kernel. The layer is
  # one jitted function traced once for both layers (forward_layers), so its launches count once.
  assert report["kernel_launches"] == 4 + 1 and report["transposed_launches"] == 1, report

"""The Llama forward pass with its projections on the decode matmul kernel (in Pallas' interpreter) equals XLA's,
with bfloat16 or float32 weights and with fp8 ones (`quantization="fp8"`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import get_model_preset
from jserve.models import llama
from jserve.models.llama import StepInputs, compute_logits, forward, init_params
from jserve.errors import ShapeError
from jserve.models.quant import (Fp8Weight, Fp8WeightNK, activation_layout, fp8_dot, fp8_dot_nk, kernel_layout,
                                 quantize_fp8, quantize_params)
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


def _pallas_calls(jaxpr) -> list[str]:
  """The names of the Pallas calls of `jaxpr`, one per call site (a jitted callee's once per call)."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      # the parameter is "name" in JAX 0.10, "name_and_src_info" in earlier versions
      names.append(str(eqn.params.get("name") or eqn.params["name_and_src_info"].name))
      continue
    for v in eqn.params.values():
      sub = getattr(v, "jaxpr", v)
      if hasattr(sub, "eqns"):
        names += _pallas_calls(sub)
  return names


def forward_errors(preset, dtype, impl, *, fp8=False, nk=False, a8=False, launches=None):
  """One step's logits and new KV pool with `impl` against "xla": (logits error, [KV error per layer]).
  `fp8`: the layers' projections quantized; `nk`: and stored for the kernel (`kernel_layout`) in the `impl`
  run, while "xla" keeps `Fp8Weight`s; `a8`: stored for fp8 activations (`activation_layout`) in both runs.
  `launches`: a list that gets the names of the step's Pallas calls."""
  cfg = get_model_preset(preset)
  params = init_params(cfg, jax.random.key(1), dtype=dtype)
  if fp8 or a8:
    params = quantize_params(params, delete_originals=False)
  if a8:
    params = activation_layout(params)
  kernel_params = kernel_layout(jax.tree.map(jnp.copy, params)) if nk else params
  kv = [jax.random.normal(jax.random.key(2 + i), (5, PAGE_SIZE, 2 * cfg.num_kv_heads, cfg.head_dim), dtype)
        for i in range(cfg.num_layers)]
  inputs = _step(cfg)

  @functools.partial(jax.jit, static_argnames="impl")
  def run(params, kv, impl):
    x_BD, new_kv = forward(params, kv, inputs, cfg, matmul_impl=impl)
    return compute_logits(params, x_BD, cfg, matmul_impl=impl), new_kv

  if launches is not None:
    launches += _pallas_calls(jax.make_jaxpr(functools.partial(run, impl=impl))(kernel_params, kv).jaxpr)
  logits_xla, kv_xla = run(params, kv, "xla")
  logits_kernel, kv_kernel = run(kernel_params, kv, impl)
  # keys and values come out of the q/k/v projections
  return relative_error(logits_kernel, logits_xla), [
      relative_error(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(kv_kernel, kv_xla)]


@pytest.mark.parametrize("preset,dtype,tol", [("tiny-llama", jnp.float32, 1e-5), ("tiny-qwen3", jnp.bfloat16, 2e-2)])
def test_forward_on_the_kernel_matches_xla(preset, dtype, tol):
  # tiny-qwen3 ties its embeddings, so its LM head takes the transposed-weight kernel.
  logits_error, kv_errors = forward_errors(preset, dtype, "interpret")
  assert logits_error <= tol
  assert all(e <= tol for e in kv_errors), kv_errors


@pytest.mark.parametrize("preset,dtype,tol", [("tiny-llama", jnp.float32, 1e-5), ("tiny-qwen3", jnp.bfloat16, 2e-2)])
def test_forward_with_fp8_weights_on_the_kernel_matches_xlas_fp8_dot(preset, dtype, tol):
  # In float32 the two differ only in the order of float32 rounding; in bfloat16 XLA's gate and up are
  # rounded to bfloat16 before the silu, the kernel's are not.
  launches = []
  logits_error, kv_errors = forward_errors(preset, dtype, "interpret", fp8=True, launches=launches)
  assert logits_error <= tol
  assert all(e <= tol for e in kv_errors), kv_errors
  # q, k, v, o, gate/up and down of both layers took the fp8 kernel; the LM head is not quantized and
  # took the bfloat16 one.
  assert sum(name.startswith("decode_matmul_fp8") for name in launches) == 2 * 6, launches
  assert len(launches) == 2 * 6 + 1, launches


@pytest.mark.parametrize("preset,dtype,tol", [("tiny-llama", jnp.float32, 1e-5), ("tiny-qwen3", jnp.bfloat16, 2e-2)])
def test_forward_with_fp8_weights_stored_nk_on_the_kernel_matches_xlas_fp8_dot(preset, dtype, tol):
  # kernel_layout stores each fp8 weight [N, K] (Fp8WeightNK); the kernel then takes its transposed entry
  # points, and the step computes what fp8_dot does on the [K, N] weights.
  launches = []
  logits_error, kv_errors = forward_errors(preset, dtype, "interpret", fp8=True, nk=True, launches=launches)
  assert logits_error <= tol
  assert all(e <= tol for e in kv_errors), kv_errors
  assert sum(name.startswith("decode_matmul_fp8_nt_") for name in launches) == 2 * 6, launches


def test_forward_with_fp8_activations_on_the_kernel_matches_xlas_w8a8_product():
  # activation_layout stores q, o and down as [N, K] Fp8WeightA8s and k/v and gate/up stacked [2, N, K]. With the
  # kernel, each product's rows are quantized as fp8_dot_a8 quantizes them and multiplied fp8 by fp8 in the
  # Triton kernel; gate/up is one kernel with its silu. XLA's w8a8 GEMM writes bfloat16 before its scales, the
  # kernel scales its float32 sum: they differ by bfloat16 rounding, which a later quantization can move to a
  # neighbouring e4m3 value.
  launches = []
  logits_error, kv_errors = forward_errors("tiny-qwen3", jnp.bfloat16, "interpret", a8=True, launches=launches)
  assert logits_error <= 3e-2
  assert all(e <= 3e-2 for e in kv_errors), kv_errors
  # q, k and v (one stacked product), o, gate/up (fused) and down of both layers: 5 w8a8 launches per layer;
  # the LM head is not quantized and took the bfloat16 kernel.
  assert sum(name.startswith("decode_matmul_a8_nt_") for name in launches) == 2 * 5, launches
  assert len(launches) == 2 * 5 + 1, launches


@pytest.mark.parametrize("eq,a_shape,w_shape,num_contracted", [
    ("...D,DNH->...NH", (7, 64), (64, 4, 16), 1),   # wq
    ("...NH,NHD->...D", (7, 4, 16), (4, 16, 64), 2),  # wo
    ("...F,FD->...D", (7, 96), (96, 64), 1),        # w_down
])
def test_an_nk_weight_multiplies_as_its_kn_original(eq, a_shape, w_shape, num_contracted):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
  q = quantize_fp8(jnp.asarray(rng.standard_normal(w_shape) * 0.1, jnp.float32), num_contracted)
  want = np.asarray(fp8_dot(eq, a, q))
  nk = kernel_layout({"layers": [{"wq": Fp8Weight(jnp.copy(q.w), jnp.copy(q.scale))}]})["layers"][0]["wq"]
  assert isinstance(nk, Fp8WeightNK) and nk.w_NK.shape == (want.size // a_shape[0], a.size // a_shape[0])
  np.testing.assert_allclose(np.asarray(fp8_dot_nk(a, nk, num_contracted)), want, rtol=1e-5, atol=1e-6)
  for impl in ("xla", "interpret"):  # the kernel's transposed entry point, and XLA's einsum
    np.testing.assert_allclose(np.asarray(llama._dot(eq, a, nk, impl)), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ShapeError, match="last 1 axes"):
    fp8_dot_nk(a[:, :3], nk, 1)


def test_fp8_prefill_rows_and_mixed_gate_up_pairs_multiply_through_xla():
  # Rows past the kernel's limit take fp8_dot itself, bit for bit as with "xla"; so does a gate/up pair
  # of which one is fp8 (as a pre-quantized checkpoint may leave it), whatever the row count.
  rng = np.random.default_rng(0)
  h_TD = jnp.asarray(rng.standard_normal((300, 64)), jnp.bfloat16)
  wq = quantize_fp8(jnp.asarray(rng.standard_normal((64, 4, 16)) * 0.1, jnp.float32), 1)
  got = llama._dot("...D,DNH->...NH", h_TD, wq, "interpret")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(fp8_dot("...D,DNH->...NH", h_TD, wq)))
  w_gate = quantize_fp8(jnp.asarray(rng.standard_normal((64, 96)) * 0.1, jnp.float32), 1)
  w_up = jnp.asarray(rng.standard_normal((64, 96)) * 0.1, jnp.bfloat16)
  for lp in ({"w_gate": w_gate, "w_up": w_up}, {"w_gate": w_gate, "w_up": w_gate}):
    for rows in (h_TD[:6], h_TD):
      if isinstance(lp["w_up"], Fp8Weight) and rows.shape[0] <= 256:
        continue  # the kernel's case
      np.testing.assert_array_equal(np.asarray(llama._gate_up(rows, lp, "interpret")),
                                    np.asarray(llama._gate_up(rows, lp, "xla")))


def test_forward_on_the_hopper_kernel_matches_xla():
  from tests.sharding.subprocess_util import run_worker
  report = run_worker("tests.models.hopper_matmul_worker", 8, timeout=400)
  assert report["logits_error"] <= 2e-2, report
  assert all(e <= 2e-2 for e in report["kv_errors"]), report
  # q, o, gate/up and down, and the tied LM head (transposed), went through the kernel. The layer is
  # one jitted function traced once for both layers (forward_layers), so its launches count once.
  assert report["kernel_launches"] == 4 + 1 and report["transposed_launches"] == 1, report

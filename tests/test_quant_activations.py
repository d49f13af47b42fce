"""fp8 activations (`activation_quantization="fp8"`, w8a8): each token's input to a projection rounds to e4m3
with a scale of its own, the product is the fp8 by fp8 one (checked against ml_dtypes' e4m3 rounding and a
float64 matmul), and the model and engine stay close to transformers' unquantized model."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jserve import LLM, SamplingParams
from jserve.config import load_model_config
from jserve.engine.engine import DEFAULT_MODEL_DIR, EngineConfig
from jserve.errors import ConfigError
from jserve.models.llama import forward_dense
from jserve.models.quant import (CONTRACTED_AXES, STACKED_PAIRS, Fp8WeightA8, activation_layout, fp8_dot_a8,
                                 quantize_fp8, quantize_params, quantize_rows, quantizes_activations)
from jserve.weights import load_params
from tests.quant_tp_worker import ENGINE, PROMPTS
from tests.test_quant import _channels_of_many_magnitudes, _cli, _close_to, _token_ids


def _rows_of_many_magnitudes(m, k, seed=2):
  """Activations whose rows (tokens) span six orders of magnitude: more than e4m3's range from 448 down to
  its smallest normal (2^-6), so one scale for all of them would flush the small rows."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-5, 1, size=(m, 1))).astype(np.float32)


def _a8_layer(w, num_contracted):
  q = quantize_fp8(jnp.asarray(w), num_contracted)
  return q, activation_layout({"layers": [{"w": jax.tree.map(jnp.copy, q)}]})["layers"][0]["w"]


@pytest.mark.parametrize("a_shape,w_shape,num_contracted", [
    ((2, 5, 64), (64, 4, 16), CONTRACTED_AXES["wq"]),
    ((7, 4, 16), (4, 16, 64), CONTRACTED_AXES["wo"]),
    ((9, 96), (96, 80), CONTRACTED_AXES["w_down"]),
])
def test_fp8_dot_a8_is_the_float64_product_of_per_token_e4m3_activations_and_the_weight(a_shape, w_shape,
                                                                                         num_contracted):
  k = int(np.prod(w_shape[:num_contracted]))
  a = _rows_of_many_magnitudes(int(np.prod(a_shape)) // k, k).reshape(a_shape)
  q, a8 = _a8_layer(_channels_of_many_magnitudes(w_shape, num_contracted), num_contracted)
  assert isinstance(a8, Fp8WeightA8) and a8.w_NK.shape == (int(np.prod(w_shape)) // k, k)
  w_KN = np.asarray(q.w, np.float64).reshape(k, -1)

  def product_and_reference(dtype):
    """fp8_dot_a8 of `a` in `dtype` (float64, flattened to [M, N]) and its reference: ml_dtypes rounds
    each row, scaled by its amax / 448, to e4m3; float64 multiplies."""
    a_in = jnp.asarray(a, dtype)
    got = fp8_dot_a8(a_in, a8, num_contracted)
    assert got.dtype == dtype and got.shape == a_shape[:len(a_shape) - num_contracted] + w_shape[num_contracted:]
    a_MK = np.asarray(a_in, np.float64).reshape(-1, k)
    row_scale = np.abs(a_MK).max(axis=1, keepdims=True) / 448
    a_e4m3 = (a_MK / row_scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    ref = (a_e4m3 @ w_KN) * row_scale * np.asarray(q.scale, np.float64).reshape(1, -1)
    return np.asarray(got, np.float64).reshape(ref.shape), ref

  def row_errors(got, ref):
    return np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)

  # Within float32 rounding of each row's own largest output (rows differ by six orders of magnitude).
  assert row_errors(*product_and_reference(jnp.float32)).max() < 1e-5
  # bfloat16 activations: the product comes out of the GEMM in bfloat16 and is scaled after, two
  # roundings to 8 bits (float32 accumulation: one accumulated in bfloat16 would be off by far more).
  assert row_errors(*product_and_reference(jnp.bfloat16)).max() < 2 * 2.0**-8
  # float16 activations: the unscaled fp8 sum (up to 448 x 448 per term) is beyond float16's range, so
  # it must not come out of the GEMM in float16; the scaled result is within float16's rounding.
  got, ref = product_and_reference(jnp.float16)
  live = np.abs(ref).max(axis=1) > 1e-3  # rows float16 keeps normal (it flushes the smallest to subnormals)
  assert np.isfinite(got).all() and row_errors(got, ref)[live].max() < 2.0**-10


def test_each_token_keeps_its_own_precision_and_a_zero_token_stays_zero():
  a = _rows_of_many_magnitudes(32, 128)
  a[5] = 0.0  # a padding token
  q, a8 = _a8_layer(_channels_of_many_magnitudes((128, 64), 1), 1)
  exact = a.astype(np.float64) @ (np.asarray(q.w, np.float64) * np.asarray(q.scale, np.float64))
  got = np.asarray(fp8_dot_a8(jnp.asarray(a), a8, 1))
  assert np.all(got[5] == 0) and np.isfinite(got).all()

  def row_errors(out):
    live = np.arange(32) != 5
    return (np.abs(out - exact).max(axis=1) / np.abs(exact).max(axis=1).clip(1e-30))[live]

  assert row_errors(got).max() < 0.08  # e4m3's 3 mantissa bits, every row alike
  # Guards the bound: one scale for the whole tensor (its amax / 448) leaves the small rows a few
  # subnormal steps of e4m3 or none, far outside it.
  one_scale = np.abs(a).max() / 448
  a_e4m3 = (a / one_scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * one_scale
  per_tensor = a_e4m3 @ (np.asarray(q.w, np.float64) * np.asarray(q.scale, np.float64))
  assert row_errors(per_tensor).max() > 0.5
  a8_MK, scale_M = quantize_rows(jnp.asarray(a))
  assert a8_MK.dtype == jnp.float8_e4m3fn and scale_M.shape == (32,)
  assert float(np.abs(np.asarray(a8_MK, np.float32)).max()) == 448  # each row's amax maps to e4m3's largest


@pytest.fixture(scope="module")
def logits():
  """The default model's logits over the test text (float32): fp8 weights, fp8 weights and activations, and
  transformers' unquantized model."""
  import torch
  import transformers
  cfg = load_model_config(DEFAULT_MODEL_DIR)
  ids = jnp.asarray([_token_ids()])
  q = quantize_params(load_params(DEFAULT_MODEL_DIR, cfg, "float32"))
  run = jax.jit(lambda p: forward_dense(p, ids, cfg)[0])
  out = {"fp8": run(q)}
  assert not quantizes_activations(q)  # what the runner asks before it picks its compile options
  a8 = activation_layout(q)
  assert quantizes_activations(a8)
  out["w8a8"] = run(a8)
  hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
  with torch.no_grad():
    out["transformers"] = hf(torch.tensor(np.asarray(ids))).logits[0].numpy()
  return {k: np.asarray(v) for k, v in out.items()}


def test_w8a8_model_stays_close_to_transformers(logits):
  assert len(logits["transformers"]) > 100
  assert not np.array_equal(logits["w8a8"], logits["fp8"])  # the activations did change
  assert _close_to(logits["w8a8"], logits["transformers"])
  assert _close_to(logits["w8a8"], logits["fp8"])


def test_w8a8_engine_generates_what_the_w8a8_model_does():
  kw = {k: v for k, v in ENGINE.items() if k != "quantization"}
  llm = LLM(None, quantization="fp8", activation_quantization="fp8", **kw)
  params = llm.engine.params
  # Every projection w8a8; gate and up, k and v stacked: [2, F, D], [2, KV * H, D] (quant.stack_pairs).
  names = ["wq", "wo", "w_down", "w_gate_up", "wkv"]
  assert all(set(layer) & (set(CONTRACTED_AXES) | set(STACKED_PAIRS)) == set(names) for layer in params["layers"])
  assert all(isinstance(layer[name], Fp8WeightA8) for layer in params["layers"] for name in names)
  assert {str(layer[name].w_NK.dtype) for layer in params["layers"] for name in names} == {"float8_e4m3fn"}
  cfg = llm.engine.model_config
  assert params["layers"][0]["w_gate_up"].w_NK.shape == (2, cfg.intermediate_size, cfg.hidden_size)
  assert params["layers"][0]["wkv"].w_NK.shape == (2, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
  greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  got = llm.generate(PROMPTS, greedy, use_tqdm=False)
  # The reference: greedy decoding by the dense forward (no KV pool, no paging, no chunking) over the
  # engine's own weights, each step over the whole sequence so far, padded at the end to one length (the
  # model is causal, so the padding changes no earlier position).
  length = max(len(out.prompt_token_ids) for out in got) + 8
  run = jax.jit(lambda ids, last: forward_dense(params, ids, cfg)[0][last].argmax())
  for out in got:
    ids = list(out.prompt_token_ids)
    for _ in range(8):
      ids.append(int(run(jnp.asarray([ids + [0] * (length - len(ids))]), len(ids) - 1)))
    assert list(out.outputs[0].token_ids) == ids[len(out.prompt_token_ids):]


def test_activation_quantization_config_errors():
  with pytest.raises(ConfigError, match=r"activation_quantization='int8': use None"):
    EngineConfig(activation_quantization="int8")
  # The Triton kernel has w8a8 entries (tests/models/test_llama_matmul_impl.py runs them): "gpu" is allowed.
  assert EngineConfig(quantization="fp8", activation_quantization="fp8", matmul_impl="gpu").matmul_impl == "gpu"
  # Any layout: tensor and pipeline meshes are tests/test_quant.py's.
  EngineConfig(quantization="fp8", activation_quantization="fp8", tensor_parallel_size=2, pipeline_parallel_size=2)
  with pytest.raises(ConfigError, match=r"needs fp8 weights: set quantization='fp8'"):
    LLM(None, activation_quantization="fp8", **{k: v for k, v in ENGINE.items() if k != "quantization"})


def test_activation_quantization_flag_reaches_the_engine_config():
  code = ("import sys; from jserve.cli.flags import FLAGS, engine_config; FLAGS(sys.argv); "
          "print(engine_config().activation_quantization)")
  assert _cli("-c", code, "--activation_quantization=fp8").stdout.split() == ["fp8"]
  assert _cli("-c", code).stdout.split() == ["None"]


def test_only_an_engine_with_fp8_activations_compiles_its_steps_with_the_fp8_options(monkeypatch):
  # On a GPU the runner asks programs.compiler_options for XLA's options (no dot merger) with whether
  # the weights take fp8 activations. Here an option no XLA knows stands in for them: the w8a8 engine's
  # first step compile must meet it, and an engine with fp8 weights alone must not.
  from jserve.engine import runner
  asked = []
  monkeypatch.setattr(runner, "compiler_options",
                      lambda fp8: asked.append(fp8) or ({"xla_no_such_option": 0} if fp8 else None))
  with pytest.raises(Exception, match="No such compile option: 'xla_no_such_option'"):
    LLM(None, activation_quantization="fp8", **ENGINE)
  LLM(None, **ENGINE)  # fp8 weights only: compiles without it
  assert asked == [True, False]


def test_auto_multiplies_small_decode_products_weight_only_from_the_same_store(monkeypatch):
  # quant.a8_weight_only under matmul_impl="auto": at most A8_WEIGHT_ONLY_MAX_ROWS rows on a weight of at most
  # A8_WEIGHT_ONLY_MAX_ELEMENTS take fp8_dot_nk (activations unquantized); more rows, a larger weight, or "xla"
  # keep fp8_dot_a8. Both are deterministic, so each path is recognized by equality.
  from jserve.models import llama, quant
  from pallas_kernels.decode_matmul import gate_up_silu
  _, a8 = _a8_layer(_channels_of_many_magnitudes((96, 80), 1), 1)
  nk = quant.Fp8WeightNK(a8.w_NK, a8.scale)
  rows_max = quant.A8_WEIGHT_ONLY_MAX_ROWS
  for rows, impl, weight_only in ((1, "auto", True), (rows_max, "auto", True), (rows_max + 1, "auto", False),
                                  (1, "xla", False)):
    x = jnp.asarray(_rows_of_many_magnitudes(rows, 96, seed=rows)).astype(jnp.bfloat16)
    got = llama._dot("...D,DF->...F", x, a8, impl)
    want = quant.fp8_dot_nk(x, nk, 1) if weight_only else fp8_dot_a8(x, a8, 1)
    other = fp8_dot_a8(x, a8, 1) if weight_only else quant.fp8_dot_nk(x, nk, 1)
    assert np.array_equal(np.asarray(got), np.asarray(want)), (rows, impl)
    assert not np.array_equal(np.asarray(got), np.asarray(other)), (rows, impl)
    if weight_only:  # gate and up alike
      got = llama._gate_up(x, {"w_gate": a8, "w_up": a8}, impl)
      want = gate_up_silu(x, a8.w_NK, a8.w_NK, w_gate_scale_N=a8.scale, w_up_scale_N=a8.scale, transposed=True,
                          impl="xla")  # the fused weight-only product's reference
      assert np.array_equal(np.asarray(got), np.asarray(want)), rows
  monkeypatch.setattr(quant, "A8_WEIGHT_ONLY_MAX_ELEMENTS", 96 * 80 - 1)  # the weight is now too large
  x = jnp.asarray(_rows_of_many_magnitudes(1, 96)).astype(jnp.bfloat16)
  assert np.array_equal(np.asarray(llama._dot("...D,DF->...F", x, a8, "auto")), np.asarray(fp8_dot_a8(x, a8, 1)))


@pytest.mark.parametrize("qwen_like", [False, True])  # True: q/k/v biases and q/k norms after the stacked product
def test_stacked_pairs_multiply_as_the_two_apart(qwen_like):
  # quant.stack_pairs stacks a layer's w8a8 gate and up into one [2, F, K] weight, and k and v into one
  # [2, KV * H, K], each multiplied by one GEMM. Each output is the same K-sum of the same fp8 values with the
  # same two scales, so the stacked layer must give what the pairs give apart (up to summation order), w8a8 and
  # (under "auto", small products) weight-only alike.
  from jserve.models import llama, quant
  shapes = {"wq": (96, 4, 16), "wk": (96, 2, 16), "wv": (96, 2, 16), "wo": (4, 16, 96), "w_gate": (96, 80),
            "w_up": (96, 80), "w_down": (80, 96)}
  ws = {name: _channels_of_many_magnitudes(shape, CONTRACTED_AXES[name], seed=i)
        for i, (name, shape) in enumerate(shapes.items())}
  cfg = dataclasses.replace(load_model_config(DEFAULT_MODEL_DIR), num_layers=1, hidden_size=96, num_heads=4,
                            num_kv_heads=2, head_dim=16, intermediate_size=80, attention_bias=qwen_like,
                            qk_norm=qwen_like)
  unquantized = {"attn_norm": jnp.ones(96), "mlp_norm": jnp.ones(96)}
  if qwen_like:
    rng = np.random.default_rng(0)
    unquantized.update({name: jnp.asarray(rng.standard_normal(shape), jnp.float32)
                  for name, shape in (("bq", (4, 16)), ("bk", (2, 16)), ("bv", (2, 16)))})
    unquantized.update(q_norm=jnp.full(16, 1.5), k_norm=jnp.full(16, 0.5))
  apart = dict(_store_apart(ws), **unquantized)
  copies = jax.tree.map(jnp.copy, apart)
  stacked = quant.stack_pairs({"layers": [copies]})["layers"][0]
  assert set(stacked) == {"wq", "wo", "w_down", "w_gate_up", "wkv"} | set(unquantized)
  assert stacked["w_gate_up"].w_NK.shape == (2, 80, 96) and stacked["w_gate_up"].scale.shape == (2, 80)
  assert stacked["wkv"].w_NK.shape == (2, 32, 96) and stacked["wkv"].scale.shape == (2, 2, 16)
  assert copies["w_gate"].w_NK.is_deleted() and copies["wv"].scale.is_deleted()  # freed once stacked

  def attend(q, k, v):  # the layer's attention stand-in: its inputs' sums, so k and v reach the output
    return q + (k.sum(-2, keepdims=True) + 2 * v.sum(-2, keepdims=True)), None

  for rows, impl in ((5, "xla"), (5, "auto"), (quant.A8_WEIGHT_ONLY_MAX_ROWS + 1, "auto")):
    x = jnp.asarray(_rows_of_many_magnitudes(rows, 96, seed=rows)).astype(jnp.bfloat16)
    pos = jnp.arange(rows)
    want = np.asarray(llama._layer(apart, x, pos, attend, cfg, impl)[0], np.float32)
    got = np.asarray(llama._layer(stacked, x, pos, attend, cfg, impl)[0], np.float32)
    # A GEMM over the stacked weight may sum in another order than two apart, and the layer's later
    # quantized products can round such a difference to a neighbouring e4m3 value: a tolerance, not equality.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2 * np.abs(want).max())
  # One product per stacked pair: 5 dots in the layer (q, k and v, o, gate and up, down) where apart there are 7.
  x = jnp.asarray(_rows_of_many_magnitudes(5, 96, seed=5)).astype(jnp.bfloat16)
  dots = {name: jax.jit(lambda lp, x: llama._layer(lp, x, jnp.arange(5), attend, cfg, "xla")[0]).lower(
      lp, x).as_text().count("stablehlo.dot_general") for name, lp in (("stacked", stacked), ("apart", apart))}
  assert dots == {"stacked": 5, "apart": 7}, dots
  # Swapped halves would not pass: gate and up, k and v enter the layer differently.
  x = jnp.asarray(_rows_of_many_magnitudes(5, 96, seed=5)).astype(jnp.bfloat16)
  want = np.asarray(llama._layer(apart, x, jnp.arange(5), attend, cfg, "xla")[0], np.float32)
  for name in STACKED_PAIRS:
    w = stacked[name]
    swapped = dict(stacked, **{name: quant.Fp8WeightA8(w.w_NK[::-1], w.scale[::-1])})
    got = np.asarray(llama._layer(swapped, x, jnp.arange(5), attend, cfg, "xla")[0], np.float32)
    assert not np.allclose(got, want, rtol=2e-2, atol=1e-2 * np.abs(want).max()), name


def _store_apart(ws):
  """w8a8 stores of float weights, each apart ([N, K] `Fp8WeightA8`s), as activation_layout makes them unstacked."""
  from jserve.models import quant
  qs = {name: quantize_fp8(jnp.asarray(w), CONTRACTED_AXES[name]) for name, w in ws.items()}
  return quant._store_nk({"layers": [qs]}, Fp8WeightA8)["layers"][0]


def test_stack_pairs_keeps_a_pair_that_differs_apart():
  from jserve.models import quant
  _, gate = _a8_layer(_channels_of_many_magnitudes((96, 80), 1, seed=5), 1)
  q_up = quantize_fp8(jnp.asarray(_channels_of_many_magnitudes((96, 80), 1, seed=6)), 1)  # weight-only fp8
  layer = quant.stack_pairs({"layers": [{"w_gate": gate, "w_up": q_up}]})["layers"][0]
  assert set(layer) == {"w_gate", "w_up"} and not gate.w_NK.is_deleted()

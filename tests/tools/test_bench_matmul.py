"""tools/matmul_cases.py (what tools/bench_matmul.py times): the w8a8 products are the model's, and the shapes
it picks."""

import jax.numpy as jnp

from tools.matmul_cases import (Shape, a8_shapes, dequantized, entry_ops, exact, kernel_mix, kn_pairs, make_weights,
                                make_x, rel_err, shapes_to_run, xla_fn, xla_weight_only_fn)


def test_w8a8_shapes_time_the_fp8_activation_product_and_the_weight_only_one_from_one_store():
  for shape in a8_shapes([Shape("tiny qkv", 256, 192), Shape("tiny gate_up fused", 256, 64, "gate_up")]):
    ws = make_weights(shape, 2, seed=3)
    w0 = ws[0][0] if shape.kind == "gate_up" else ws[0]
    assert w0[0].dtype == jnp.float8_e4m3fn and w0[0].shape == (shape.n, shape.k)  # stored [N, K]
    x = make_x(5, shape.k, seed=4)
    ref = exact(x, dequantized(kn_pairs(ws[1])), shape.kind)
    a8 = float(rel_err(xla_fn(shape)(x, ws)[1], ref))
    wo = float(rel_err(xla_weight_only_fn(shape)(x, ws)[1], ref))
    # Weight-only: bf16 rounding of the product; w8a8 adds the activations' e4m3 rounding (about 2^-4 / 2).
    assert wo < 0.01 < a8 < 0.06, (shape.name, wo, a8)


def test_shapes_are_picked_by_model_dtype_and_name():
  names = [s.name for s in shapes_to_run(False, ["8b", "8b-split"], ["bf16", "w8a8"], ["down", "k or v"])]
  assert names == ["8B down", "8B w8a8 down", "8B k or v", "8B w8a8 k or v"]
  assert all("lm_head" not in s.name for s in shapes_to_run(False, ["8b"], ["w8a8"]))


def test_kernel_mix_counts_the_entry_computation_per_copy():
  shape = Shape("tiny qkv", 256, 192)
  ws = make_weights(shape, 3, seed=1)
  x = make_x(4, shape.k, seed=2)
  mix = kernel_mix(xla_fn(shape).lower(x, ws).compile().as_text(), 3)
  assert "dot 1" in mix or "fusion" in mix, mix  # CPU: a dot per copy, possibly fused
  hlo = """HloModule m

%fused_computation (p: f32[2]) -> f32[2] {
  %d = f32[2] dot(%a, %b)
}

ENTRY %main (x: f8e4m3fn[1,4]) -> bf16[1,8] {
  %c = (bf16[1,8], s8[0]) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul$f8"
  %c2 = (bf16[1,8], s8[0]) custom-call(%x, %w2), custom_call_target="__cublas$lt$matmul$f8"
  %f = bf16[1,8] fusion(%c), kind=kLoop, calls=%fused_computation
  %g = bf16[1,8] fusion(%x, %w), kind=kCustom, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}
"""
  assert kernel_mix(hlo, 2) == "__cublas$lt$matmul$f8 1, fusion 0.5, triton_gemm 0.5"
  assert kernel_mix("no module", 2) == "none"
  ops = entry_ops(hlo.replace("calls=%fused_computation\n",
                              'calls=%fused_computation, metadata={op_name="x"}, backend_config={"a":{}}\n'))
  assert ops[0] == '%c = (bf16[1,8], s8[0]) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul$f8"'
  assert ops[2] == "%f = bf16[1,8] fusion(%c), kind=kLoop, calls=%fused_computation"  # metadata, config dropped
  assert ops[-1] == "%g = bf16[1,8] fusion(%x, %w), kind=kCustom, __triton_gemm"  # only the entry computation
  assert len(ops) == 4 and entry_ops(hlo, limit=2) == ops[:2]

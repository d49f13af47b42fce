"""tools/matmul_cases.py (what tools/bench_matmul.py times): the w8a8 products are the model's, and the shapes
it picks."""

import jax.numpy as jnp

from tools.matmul_cases import (Shape, a8_shapes, dequantized, exact, kn_pairs, make_weights, make_x, rel_err,
                                shapes_to_run, xla_fn, xla_weight_only_fn)


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

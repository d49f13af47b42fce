"""tools/matmul_cases.py (what tools/bench_matmul.py times): the w8a8 products are the model's (gate and up
stacked), the Pallas w8a8 kernels' entry points give the same product, and the shapes it picks; the report's
tuning tables keep w8a8 winners apart; tools/bench_matmul.py sweeps and times the w8a8 kernels."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from pallas_kernels.decode_matmul import gpu, reference, tuning
from tools.matmul_cases import (A8_TOL, Shape, a8_shapes, dequantized, entry_a8, entry_ops, exact, kernel_mix,
                                kn_pairs, make_weights, make_x, over_copies, rel_err, shapes_to_run, xla_fn,
                                xla_weight_only_fn)
from tools.matmul_report import markdown, tuning_tables

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_w8a8_shapes_time_the_fp8_activation_product_and_the_weight_only_one_from_one_store():
  for shape in a8_shapes([Shape("tiny qkv", 256, 192), Shape("tiny gate_up fused", 256, 64, "gate_up")]):
    ws = make_weights(shape, 2, seed=3)
    w, scale = ws[0]  # stored [N, K]; gate and up stacked, [2, N, K], as quant.stack_pairs stores them
    lead = (2,) if shape.kind == "gate_up" else ()
    assert w.dtype == jnp.float8_e4m3fn and w.shape == lead + (shape.n, shape.k), w.shape
    assert scale.dtype == jnp.float32 and scale.shape == lead + (shape.n,), scale.shape
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


def test_w8a8_kernel_entries_give_the_xla_w8a8_product():
  # Masked rows (M=5), masked columns (N=192 and 80 against block_n=128 and 64), split-K, the stacked pair.
  tiles = lambda block_n, splits: tuning.GpuConfig(block_m=16, block_n=block_n, block_k=64, num_splits=splits,
                                                   num_warps=4, num_stages=2)
  shapes = a8_shapes([Shape("tiny qkv", 256, 192), Shape("tiny gate_up fused", 256, 80, "gate_up")])
  for shape, cfg in zip(shapes, [tiles(128, 2), tiles(64, 1)]):
    ws = make_weights(shape, 2, seed=5)
    x = make_x(5, shape.k, seed=6)
    xla = xla_fn(shape)(x, ws)[1].astype(jnp.float32)
    ref = exact(x, dequantized(kn_pairs(ws[1])), shape.kind)
    for module, kw in ((gpu, dict(config=cfg, interpret=True)), (reference, {})):
      out = over_copies(entry_a8(module, shape.kind, **kw))(x, ws)[1]
      assert out.shape == (5, shape.n) and out.dtype == x.dtype
      # The same e4m3 rows by the same weights: bfloat16 rounding apart (XLA rounds gate and up to bfloat16
      # before the silu; the kernel does not), far inside the activations' e4m3 rounding against the exact one.
      assert float(rel_err(out, xla)) < 1e-2, (shape.name, module.__name__, float(rel_err(out, xla)))
      assert 0.01 < float(rel_err(out, ref)) < A8_TOL, (shape.name, module.__name__, float(rel_err(out, ref)))


def _row(shape, m, kind, k, n, pallas_s=1e-5, xla_s=2e-5, **kw):
  return dict(shape=shape, m=m, kind=kind, k=k, n=n, pallas_s=pallas_s, pallas_TBps=1.0, xla_s=xla_s, xla_TBps=0.5,
              pallas_cfg=dict(block_m=16, block_n=64, block_k=256, num_splits=2, num_warps=4, num_stages=4),
              pallas_config="m16 n64 k256 z2 w4 st4", weight_bytes=k * n, **kw)


def test_tuning_tables_keep_w8a8_winners_in_their_own_tables():
  rows = [_row("8B qkv", 16, "kn", 4096, 6144, fp8=False, a8=False),
          _row("8B fp8 qkv", 16, "kn", 4096, 6144, fp8=True, a8=False, xla_s=5e-6),
          _row("8B w8a8 qkv", 16, "kn", 4096, 6144, fp8=True, a8=True),
          _row("8B w8a8 gate_up fused", 64, "gate_up", 4096, 14336, fp8=True, a8=True, xla_s=5e-6)]
  tables = {}
  exec(tuning_tables(rows), {"GpuConfig": tuning.GpuConfig}, tables)  # noqa: S102 - the source for tuning.py
  tiles = tuning.GpuConfig(block_m=16, block_n=64, block_k=256, num_splits=2, num_warps=4, num_stages=4)
  assert tables == {"GPU_TABLE": {(16, 4096, 6144): tiles}, "GPU_TABLE_GATE_UP": {},
                    "GPU_TABLE_FP8": {(16, 4096, 6144): None},  # XLA was faster
                    "GPU_TABLE_A8": {(16, 4096, 6144): tiles}, "GPU_TABLE_GATE_UP_A8": {(64, 4096, 14336): None}}
  tables = {}
  exec(tuning_tables(rows[:2]), {"GpuConfig": tuning.GpuConfig}, tables)  # noqa: S102
  assert "GPU_TABLE_A8" not in tables and "GPU_TABLE_GATE_UP_A8" not in tables  # empty: left out
  meta = dict(device="cpu", jax=jax.__version__, date="today")
  md = markdown(meta, {}, [], rows)
  assert "gpu.matmul_a8_nt" in md and "no Pallas" not in md


_BENCH_SHAPE = """
import json, sys
from absl import flags
from tools import bench_matmul
from tools.matmul_cases import Shape, a8_shapes
flags.FLAGS(["bench_matmul", "--smoke"])
rows = []
for shape in a8_shapes([Shape("tiny qkv", 256, 192), Shape("tiny gate_up fused", 256, 64, "gate_up")]):
  rows += bench_matmul.bench_shape(shape, [1, 16], {}, interpret=True, sweep=True)
with open(sys.argv[1], "w") as f:
  json.dump(rows, f, default=str)
"""


def test_bench_shape_sweeps_and_times_the_w8a8_kernels(tmp_path):
  out = tmp_path / "rows.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _BENCH_SHAPE, str(out)], capture_output=True, text=True, env=env,
                        timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r["shape"], r["m"]) for r in rows] == [("tiny w8a8 qkv", 1), ("tiny w8a8 qkv", 16),
                                                   ("tiny w8a8 gate_up fused", 1), ("tiny w8a8 gate_up fused", 16)]
  for r in rows:
    assert r["a8"] and r["pallas_s"] > 0 and r["pallas_config"] == r["sweep"][0]["config"], r
    assert sum("s" in c for c in r["sweep"]) >= (1 if r["m"] == 1 else 2), r["sweep"]  # M = 1: round 2 only
    # The kernel's product is the w8a8 one (the activations' e4m3 rounding, as XLA's), not weight-only's.
    assert 0.01 < r["pallas_err"] < A8_TOL and abs(r["pallas_err"] - r["xla_err"]) < 0.01, r
    if importlib.util.find_spec("torch"):  # the anchor multiplies the stacked pair's halves
      assert r["torch_s"] > 0, r.get("torch_error")

"""The workload bounds of tools/bench_e2e.py, against the arithmetic done by hand."""

import pytest

from tools.bench_e2e import markdown
from tools.workload_bounds import decode_steps, step_serial_s, workload_bounds


def test_equal_lengths_by_hand():
  # 512 requests of 1000/1000 on 256 slots: two waves of 1000 decode steps; 1000 x 512 prompt tokens
  # in steps of 2048: 250 prefill steps.
  kw = dict(max_num_seqs=256, max_num_batched_tokens=2048, weight_bytes=10**10, kv_per_token=10**5,
            bandwidth=10**12, matmul_params=5 * 10**9, flop_rate=10**15)
  b = workload_bounds([1000] * 512, [1000] * 512, **kw)
  assert decode_steps([1000] * 512, 256) == 2000
  kv_read = 512 * 1000 * 1500 * 10**5
  assert b["memory_s"] == pytest.approx(((2000 + 250) * 10**10 + kv_read) / 10**12)
  assert b["compute_s"] == pytest.approx(2 * 5e9 * 1024 * 1000 / 1e15)
  assert b["roofline_s"] == max(b["memory_s"], b["compute_s"])
  # Serial: decode's memory time (no prefill weight reads) plus prefill's compute time.
  prefill_compute = 2 * 5e9 * 512 * 1000 / 1e15
  assert b["serial_s"] == pytest.approx((2000 * 10**10 + kv_read) / 10**12 + prefill_compute)
  assert b["serial_s"] > b["roofline_s"]


def test_serial_bound_is_never_below_the_roofline():
  for ins, outs in (([1] * 10, [2000] * 10), ([4000] * 300, [1] * 300), ([128] * 1000, [128] * 1000)):
    b = workload_bounds(ins, outs, max_num_seqs=256, max_num_batched_tokens=2048, weight_bytes=16e9,
                        kv_per_token=131072, bandwidth=4.2e12, matmul_params=7.5e9, flop_rate=7.8e14)
    assert b["serial_s"] >= b["roofline_s"] * (1 - 1e-12), (ins[0], outs[0])


def test_a_compute_bound_decode_batch_adds_its_flops_to_the_serial_bound():
  # 256 slots, flops per step 2 x 5e9 x 256 / 1e14 = 25.6 ms against 10 ms of weight reads: the matmuls
  # are compute-bound while the batch is over 100 sequences. 300 requests of 10/100: slots 0..43 run two
  # requests (200 steps), the other 212 one (100 steps); the last 100 steps run 44 sequences, whose
  # FLOPs (4.4 ms) are under the weight reads.
  kw = dict(max_num_seqs=256, max_num_batched_tokens=4096, weight_bytes=10**10, kv_per_token=10**5,
            bandwidth=10**12, matmul_params=5 * 10**9, flop_rate=10**14)
  b = workload_bounds([10] * 300, [100] * 300, **kw)
  kv_read = 300 * 100 * (10 + 50) * 10**5
  matmuls = 100 * 2 * 5e9 * 256 / 1e14 + 100 * 10**10 / 10**12
  prefill = max(1 * 10**10 / 10**12, 2 * 5e9 * 3000 / 1e14)
  assert b["serial_s"] == pytest.approx(kv_read / 10**12 + matmuls + prefill)
  # The memory-only serial bound of before would be below it.
  assert b["serial_s"] > (200 * 10**10 + kv_read) / 10**12 + prefill


def test_step_serial_bound_adds_compute_bound_matmuls_to_the_kv_reads():
  # The 8B shape at batch 256, context 1,024 on the H200 of the twelfth session: 34.4 GB of KV at
  # 4,237 GB/s (8.11 ms), then 3.84 TFLOP at 764 TFLOP/s (5.03 ms; the weight reads, 3.54 ms, are less).
  ceilings = dict(weight_bytes=15_009_849_344, bandwidth=4.237e12, matmul_params=7.5e9, flop_rate=7.636e14)
  serial = step_serial_s(256, 1024, kv_per_token=131072, **ceilings)
  assert serial == pytest.approx(256 * 1024 * 131072 / 4.237e12 + 2 * 7.5e9 * 256 / 7.636e14)
  assert 13.0e-3 < serial < 13.3e-3
  # At batch 1 the matmuls are memory-bound: the bound is the roofline, weights plus KV.
  assert step_serial_s(1, 1024, kv_per_token=131072, **ceilings) == pytest.approx(
      (15_009_849_344 + 1024 * 131072) / 4.237e12)


def test_step_sweep_table_gives_the_serial_bound_and_its_fraction():
  row = dict(batch=256, context=1024, step_ms=16.13, single_step_ms=16.96, roofline_ms=11.68, flop_bound_ms=5.03,
             fraction=0.72, serial_ms=13.14, serial_fraction=0.81)
  results = dict(device="H200", jax="0.11.2", date="2026-12-07", preset="llama-3.1-8b",
                 ceiling=dict(best_GBps=4237.0, matmul_TFLOPs=764.0, matmul_n=8192),
                 step_sweep=dict(num_decode_steps=8, kv_pool_GiB=98.8, rows=[row]))
  lines = markdown(results)
  header = next(line for line in lines if line.startswith("| batch | context"))
  assert header.split("|")[8:10] == [" serial ms ", " fraction "]
  assert "| 256 | 1024 | 16.13 | 16.96 | 11.68 | 5.03 | 0.72 | 13.14 | 0.81 |  |" in lines
  assert "matmul 764 TFLOP/s (bf16 8192^3)" in lines[0]


def test_an_engine_with_fp8_activations_is_bounded_by_the_fp8_matmul_rate():
  # The fp8 product that the ceiling times is fp8_dot_a8's GEMM: e4m3 by e4m3 [N, K], bf16 out.
  from tools.ceilings import matmul_rate
  rate = matmul_rate(64, fp8=True)
  assert rate["matmul_dtype"] == "float8_e4m3fn" and rate["matmul_n"] == 64 and rate["matmul_TFLOPs"] > 0
  results = dict(device="H100", jax="0.11.2", date="2026-12-07", preset="llama-3.1-8b",
                 ceiling=dict(best_GBps=3020.0, matmul_TFLOPs=1510.0, matmul_n=8192, matmul_dtype="float8_e4m3fn",
                              matmul_bf16_TFLOPs=800.0))
  assert "matmul 1.51e+03 TFLOP/s (fp8 8192^3)" in markdown(results)[0]

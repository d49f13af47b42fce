"""The workload bounds of tools/bench_e2e.py, against the arithmetic done by hand."""

import pytest

from tools.bench_e2e import decode_steps, workload_bounds


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

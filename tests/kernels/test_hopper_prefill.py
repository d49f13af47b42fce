"""The Mosaic GPU (Hopper) prefill kernel, in the Mosaic GPU interpreter on the CPU, against the reference.

The interpreter simulates the kernel's three warpgroups, its TMA copies and
its barriers (it checks that every barrier phase is observed), so these tests cover
the page-table walk, the producer/consumer protocol, the masks and the
chunked stores of live rows. Its wgmma takes no transposed or register
operand, so both matmuls run as plain dots there: the lowering tests compile
the real form for CUDA, and tools/bench_kernels.py checks its numbers on an
H200. The kernel reads whole pages, so the slots past each context hold a
large finite value here instead of rpa_cases' NaN (see hopper.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import gpu, hopper, reference, tuning
from tests.kernels.rpa_cases import make_case, relative_error
from tests.sharding.subprocess_util import run_worker


def config(**hopper_kw):
  return tuning.GpuConfig(decode=tuning.GpuBlocks(block_m=16, block_n=16, num_warps=4, num_stages=2),
                          prefill=tuning.GpuBlocks(block_m=32, block_n=16, num_warps=4, num_stages=2),
                          prefill_kernel="hopper", hopper=tuning.HopperBlocks(**hopper_kw))


# (seqs, page_size, hopper blocks, attention options) of each interpreted case.
CASES = {
    # 150 tokens after a 20-token prefix: two items, the second with 22 live rows
    # (stored as 16 + 4 + 2); 9 tokens after 91 cached; decodes go to the Triton launch.
    "mixed": ([(150, 170), (1, 37), (40, 40), (9, 100), (3, 17)], 16, dict(block_kv=64, num_stages=2), {}),
    # Pages of 128 positions, blocks of 64: each copy is half a page; no ping-pong.
    "window_softcap_large_pages": ([(100, 230), (70, 70)], 128, dict(block_kv=64, num_stages=3, ping_pong=False),
                                   dict(sliding_window=70, soft_cap=20.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hopper_prefill_matches_reference_in_the_interpreter(name):
  # In a fresh process with 8 simulated devices: see hopper_interpret_worker.py for why.
  report = run_worker("tests.kernels.hopper_interpret_worker", 8, name, timeout=400)
  assert report["relative_error"] <= report["tolerance"], report
  assert report["padding_rows_untouched"], "a padding row was written"


def _abstract(head_dim, page_size, num_heads=32, num_kv_heads=8, num_tokens=512):
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  q = jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((256, page_size, 2 * num_kv_heads, head_dim), jnp.bfloat16)
  return i32(8), i32(8), i32(4), i32(4, 64), i32(5), q, kv, q


@pytest.mark.parametrize("head_dim,page_size,blocks,attn_kw", [
    (128, 16, tuning.HopperBlocks(), dict()),
    (64, 32, tuning.HopperBlocks(block_kv=64, num_stages=4, ping_pong=False), dict(sliding_window=64, soft_cap=30.0)),
])
def test_hopper_prefill_lowers_to_mosaic_gpu_for_cuda(head_dim, page_size, blocks, attn_kw):
  def f(seq, q0, kv_lens, pages, cu, q, kv, out):
    return hopper.prefill((seq, q0), q, kv, kv_lens, pages, cu, out, sm_scale=0.1, blocks=blocks,
                          sliding_window=attn_kw.get("sliding_window"), soft_cap=attn_kw.get("soft_cap"))
  text = jax.jit(f).trace(*_abstract(head_dim, page_size)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_hopper_supports_names_what_it_cannot_take():
  q = jnp.zeros((8, 4, 128), jnp.bfloat16)
  assert hopper.supports(q, jnp.zeros((4, 16, 2, 128), jnp.bfloat16)) is None
  assert "dtypes" in hopper.supports(q.astype(jnp.float32), jnp.zeros((4, 16, 2, 128), jnp.float32))
  assert "head_dim=96" in hopper.supports(jnp.zeros((8, 4, 96), jnp.bfloat16), jnp.zeros((4, 16, 2, 96), jnp.bfloat16))
  assert "page_size=4" in hopper.supports(q, jnp.zeros((4, 4, 2, 128), jnp.bfloat16))
  too_big = tuning.HopperBlocks(block_kv=256, num_stages=4)
  assert "shared memory" in hopper.supports(q, jnp.zeros((4, 16, 2, 128), jnp.bfloat16), too_big)


def test_gpu_falls_back_to_triton_prefill_where_hopper_cannot_run():
  # float32: the Hopper kernel declines, and the Triton launch gives the same answer.
  case = make_case(0, [(20, 30), (1, 9)], num_heads=2, num_kv_heads=1, head_dim=64, page_size=8,
                   dtype=jnp.float32)
  out = gpu.ragged_paged_attention(*case.args(), sm_scale=0.125, interpret=True, config=config())
  ref = reference.ragged_paged_attention(*case.reference_args(), sm_scale=0.125)
  assert relative_error(out[:case.live_rows], ref[:case.live_rows]) <= 1e-5
  assert np.isfinite(np.asarray(out[:case.live_rows])).all()


@pytest.mark.parametrize("seed", range(4))
def test_aligned_prefill_items_start_on_tiles_and_cover_every_prefill_row(seed):
  # The Hopper launch's items start on multiples of 8 rows (its query copies move
  # whole tiles): each prefill row must still fall in exactly one item of its
  # sequence, within the fixed item count, and the padding items must be -1.
  rng = np.random.default_rng(seed)
  q_lens = rng.choice([1, 2, 3, 5, 7, 9, 13, 63, 64, 65, 127, 128, 129, 200], size=12)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  num_tokens = int(cu[-1]) + int(rng.integers(0, 9))
  max_seqs = 16
  cu_E = np.full(max_seqs + 1, cu[-1], np.int32)
  cu_E[:len(cu)] = cu
  kv_lens = np.full(max_seqs, 1 << 20, np.int32)
  kv_lens[:len(q_lens)] = q_lens + rng.integers(0, 50, size=len(q_lens))
  decode_q = 4
  _, (seq_W, q0_W) = gpu._items(jnp.asarray(kv_lens), jnp.asarray(cu_E), jnp.int32(len(q_lens)),
                                num_tokens=num_tokens, decode_q=decode_q, prefill_q=hopper.BLOCK_Q,
                                align=hopper.ROW_ALIGN)
  seq_W, q0_W = np.asarray(seq_W), np.asarray(q0_W)
  assert (q0_W[seq_W >= 0] % hopper.ROW_ALIGN == 0).all()
  covered = np.zeros(num_tokens, np.int32)
  for s, q0 in zip(seq_W, q0_W):
    if s < 0:
      continue
    lo, hi = max(q0, cu[s]), min(q0 + hopper.BLOCK_Q, cu[s + 1])
    assert q0 > cu[s] - hopper.ROW_ALIGN and lo < hi, (s, q0)  # no item without rows of its sequence
    covered[lo:hi] += 1
  for s, q_len in enumerate(q_lens):
    want = 1 if q_len > decode_q else 0
    assert (covered[cu[s]:cu[s + 1]] == want).all(), (s, q_len, covered[cu[s]:cu[s + 1]])


def test_a_cpu_is_not_a_hopper_gpu_and_the_dispatcher_falls_back():
  # Compiled (not interpreted) on this CPU, the dispatcher must not pick the Hopper kernel:
  # device_supports names the device. Interpreted, the device does not matter.
  assert "is not a Hopper GPU" in hopper.device_supports()
  q, kv = jnp.zeros((8, 4, 128), jnp.bfloat16), jnp.zeros((4, 16, 2, 128), jnp.bfloat16)
  assert gpu._use_hopper(q, kv, config(), interpret=False, fused=False) is False
  assert gpu._use_hopper(q, kv, config(), interpret=True, fused=False) is True
  assert gpu._use_hopper(q, kv, config(), interpret=True, fused=True) is False  # the fused write is Triton's


def test_auto_prefill_kernel_is_hopper_only_on_a_hopper_gpu(monkeypatch):
  # The default config takes the Hopper kernel where the device is a Hopper GPU, the shapes fit and
  # the call has hopper_min_tokens query tokens or more; interpreted, or asked for "triton", it keeps
  # the Triton launch.
  auto = tuning.gpu_config(128, 16, 4)
  q, kv = jnp.zeros((auto.hopper_min_tokens, 4, 128), jnp.bfloat16), jnp.zeros((4, 16, 2, 128), jnp.bfloat16)
  assert auto.prefill_kernel == "auto"
  assert gpu._use_hopper(q, kv, auto, interpret=False, fused=False) is False  # this CPU
  monkeypatch.setattr(hopper, "device_supports", lambda: None)  # as on an H100 / H200
  assert gpu._use_hopper(q, kv, auto, interpret=False, fused=False) is True
  # A smaller bucket keeps the Triton launch (its Mosaic GPU lowering would cost every start), unless
  # the Hopper kernel is asked for by name.
  small = q[:auto.hopper_min_tokens - 1]
  assert gpu._use_hopper(small, kv, auto, interpret=False, fused=False) is False
  named = dataclasses.replace(auto, prefill_kernel="hopper")
  assert gpu._use_hopper(small, kv, named, interpret=False, fused=False) is True
  assert gpu._use_hopper(q.astype(jnp.float32), kv.astype(jnp.float32), auto, interpret=False, fused=False) is False
  assert gpu._use_hopper(q, kv, auto, interpret=True, fused=False) is False
  triton = dataclasses.replace(auto, prefill_kernel="triton")
  assert gpu._use_hopper(q, kv, triton, interpret=False, fused=False) is False
  with pytest.raises(ValueError, match="prefill_kernel='cuda'"):
    tuning.GpuConfig(decode=auto.decode, prefill=auto.prefill, prefill_kernel="cuda")

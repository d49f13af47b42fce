"""tools/kernel_sass.py: the Triton IR it catches from jserve's kernels, and how it reads nvdisasm's listing.

Compiling to machine code needs the `triton` package, which the test extra does not install (its wheel
is 285 MB); these tests cover what runs without it: catching the IR, and counting a listing."""


import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.decode_matmul import gpu, tuning
from tools import kernel_sass

# The shape of nvdisasm -c output: a prologue, a loop (label .L_x_0, branched to from below), an exit.
LISTING = """
        .global         k
k:
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0020*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR4][R4.64+0x80] ;
        /*0040*/                   LDS R8, [R9] ;
        /*0050*/                   F2FP.F16.E4M3.UNPACK_B R10, R8 ;
        /*0060*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*0070*/              @P1 BRA `(.L_x_0) ;
        /*0080*/                   STG.E desc[UR4][R6.64], R12 ;
        /*0090*/                   EXIT ;
.L_x_1:
        /*00a0*/                   BRA `(.L_x_1);
"""


def test_listing_gives_instructions_loops_and_the_streaming_loops_mix():
  instrs, labels = kernel_sass.parse_sass(LISTING)
  assert [i.opcode for i in instrs] == ["LDC", "S2R", "LDGSTS", "LDGSTS", "LDS", "F2FP", "HMMA", "BRA", "STG", "EXIT",
                                        "BRA"]
  assert labels == {".L_x_0": 0x20, ".L_x_1": 0xA0}
  # Both backward branches are loops: the K loop (6 instructions) and the one-instruction trap at the end.
  assert kernel_sass.loops(instrs, labels) == [(2, 7), (10, 10)]
  s = kernel_sass.summarize(LISTING, bytes_per_iter=4096, num_warps=4)
  assert s["instructions"] == 11
  assert s["streaming_loop"]["instructions"] == 6  # the loop with the async copies, not the trap
  assert s["streaming_loop"]["mix"] == {"LDGSTS": 2, "LDS": 1, "F2FP": 1, "HMMA": 1, "BRA": 1}
  assert s["warp_instructions_per_byte"] == pytest.approx(6 * 4 / 4096)
  assert s["issue_share"] == pytest.approx(kernel_sass.issue_share(6 * 4 / 4096))


def test_issue_share_is_one_where_a_loop_needs_every_issue_slot_at_full_bandwidth():
  # 4 warp instructions per clock over ~18.4 bytes per SM per clock: ~0.218 instructions per byte.
  per_byte = kernel_sass.ISSUE_PER_SM_CLOCK / kernel_sass.H200_BYTES_PER_SM_CLOCK
  assert kernel_sass.issue_share(per_byte) == pytest.approx(1.0)
  assert 0.21 < per_byte < 0.23


def test_capture_returns_each_pallas_kernel_with_its_warps_and_stages():
  cfg = tuning.GpuConfig(block_m=16, block_n=64, block_k=128, num_splits=2, num_warps=4, num_stages=3)
  x = jax.ShapeDtypeStruct((1, 512), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((512, 256), jnp.float8_e4m3fn)
  s = jax.ShapeDtypeStruct((256,), jnp.float32)
  [kernel] = kernel_sass.capture(lambda x, w, s: gpu.matmul(x, w, w_scale_N=s, config=cfg), x, w, s)
  assert kernel["name"] == "decode_matmul_fp8_m16_n64_k128_z2"
  assert (kernel["num_warps"], kernel["num_stages"]) == (4, 3)
  assert kernel["ttir"].startswith("module @decode_matmul_fp8") and "tt.dot" in kernel["ttir"]
  assert "f8E4M3FN" in kernel["ttir"]  # the one-byte weight reaches the kernel as such


def test_report_names_the_machine_jax_triton_and_date_it_was_made_with():
  meta = dict(machine="x86_64 CPU, cpu backend (no GPU used)", jax="0.10.2", triton="3.9.0", cc=90, date="2026-12-07")
  head = kernel_sass.markdown([], meta)[0]
  assert head.startswith("Device: x86_64 CPU, cpu backend (no GPU used); JAX 0.10.2; Triton 3.9.0; 2026-12-07.")
  assert "compute capability 9.0" in head

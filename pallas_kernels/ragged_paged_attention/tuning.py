"""Block sizes of the ragged paged attention kernels, as data.

GPU table: keyed by (head_dim, page_size, query heads per KV head). How it was
produced: `tools/bench_kernels.py --sweep` on one H200 (JAX 0.11.2, 2026-11-28)
timed the candidates in `GPU_SWEEP_DECODE` x {1, 2, 4} KV splits on decode
64 x 2048 (head dim 128, page 16) and decode 256 x 1024 (head dim 64), and the
candidates in `GPU_SWEEP_PREFILL` on prefill 4 x 4096, each checked against an
exact float32 attention on the GPU before timing; the fastest is kept. Raw
output: docs/benchmarks/raw/h200_run{1,2}.*. Pages 32 and 64 were not swept
separately: they take the page-16 tiles (run 1 timed them with the old
default, within 15% of page 16). Shapes not in the table take
`_default_gpu`, which is the same winners keyed by head dim only.

TPU table: block sizes chosen for VMEM budget on paper (not tuned on a TPU,
none was available): a KV block of 128 positions and a query block of 32
tokens keep two K and two V buffers plus the score tile well under 16 MiB.
"""

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuBlocks:
  """One launch's tiles: `block_m` query rows (tokens x query heads of one KV head), `block_n` KV positions.

  f16_dot: with an fp8 pool, widen its rows to float16 rather than to the queries' bfloat16 and take
  both products in float16 (queries clipped to float16's range, float32 accumulation). Triton widens
  e4m3 to float16 in one instruction per two values on Ada and Hopper, and to bfloat16 in three (the
  same instruction, then two float16-to-bfloat16 converts): the decode loop's conversion work drops
  by two thirds. float16 keeps more mantissa bits than bfloat16, so only the clip can lose anything,
  on query values beyond 65,504. Only for bfloat16 queries and fp8 pools; ignored otherwise.
  """
  block_m: int
  block_n: int
  num_warps: int
  num_stages: int
  f16_dot: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopperBlocks:
  """The Mosaic GPU prefill kernel (hopper.py): KV positions per pipeline step, steps in flight, ping-pong.

  ping_pong: the two consumer warpgroups take turns on the tensor cores (a
  shared barrier between them), so one's softmax runs while the other's
  matmul does, as in FlashAttention-3. Measured on an H100 (2026-12-06, block
  aligned shapes): the defaults were fastest, ping-pong worth 6-9%.
  """
  block_kv: int = 128
  num_stages: int = 2
  ping_pong: bool = True


# The candidates tools/bench_prefill.py times for the Hopper prefill kernel. On an H100
# (docs/benchmarks/kernels.md, 2026-12-06) the first, the default, was fastest on every case.
HOPPER_SWEEP = (HopperBlocks(block_kv=128, num_stages=2), HopperBlocks(block_kv=128, num_stages=2, ping_pong=False),
                HopperBlocks(block_kv=64, num_stages=4), HopperBlocks(block_kv=64, num_stages=4, ping_pong=False),
                HopperBlocks(block_kv=64, num_stages=3), HopperBlocks(block_kv=128, num_stages=3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuConfig:
  """Decode launch (short query runs, split over the context) and prefill launch (query-block tiling)."""
  decode: GpuBlocks
  prefill: GpuBlocks
  # Most KV splits of one decode sequence; the split count itself follows from
  # how many programs the decode launch has (see `gpu_num_splits`).
  max_splits: int = 8
  # Which kernel runs the prefill launch: "triton" (gpu.py, with `prefill`'s
  # tiles), "hopper" (hopper.py, Mosaic GPU, with `hopper`'s; in interpret
  # mode too), or "auto": the Hopper kernel on a Hopper GPU where it takes the
  # shapes, the Triton one elsewhere and in interpret mode. Measured on an H100
  # (docs/benchmarks/kernels.md, run 4): Hopper at 86% of cuDNN on 4 x 4096
  # (H128) and 72% on 8 x 2048 (H64), Triton at 51% and 47%.
  prefill_kernel: str = "auto"
  hopper: HopperBlocks = HopperBlocks()
  # "auto" takes the Hopper kernel only in calls of at least this many query tokens (static: the
  # step's token bucket). Lowering a Mosaic GPU kernel on a Hopper GPU builds it there and then,
  # outside the persistent compilation cache: 2.1 s per step program for the 8B shape on an H100
  # (tools/time_lowering.py, 2026-12-07), against 0.25 s with the Triton launch, every start. Below
  # 1,024 tokens a step's prefill attention is a small share of its time, so the small buckets keep
  # the Triton launch and a warm start skips most of that lowering.
  hopper_min_tokens: int = 1024

  def __post_init__(self):
    if self.prefill_kernel not in ("auto", "triton", "hopper"):
      raise ValueError(f"prefill_kernel={self.prefill_kernel!r}: expected 'auto', 'triton' or 'hopper'")


# Decode: 16 rows (Triton's smallest tensor-core tile) x 64 positions, two warps
# and four stages: 160 us on decode 64 x 2048 against 224-337 us for the other
# candidates (a decode program is latency-bound, so more stages in flight per
# warp beat more warps). Prefill: 128 x 64 tiles with four warps (2013 us on
# 4 x 4096) beat eight warps (2498 us) and 128 x 128 (2352 us). `f16_dot`
# (fp8 pools only): on an H100 (tools/sweep_decode.py, 2026-12-07, page 16)
# 116 us against 148 us on decode 64 x 2048 and 318 us against 388 us on
# 256 x 1536, the fp8 pool's decode at 77-85% of the copy rate instead of 60-69%.
_DECODE = GpuBlocks(block_m=16, block_n=64, num_warps=2, num_stages=4, f16_dot=True)
_PREFILL = GpuBlocks(block_m=128, block_n=64, num_warps=4, num_stages=3)


def _default_gpu(head_dim: int, page_size: int, group: int) -> GpuConfig:
  del head_dim, page_size
  return GpuConfig(decode=dataclasses.replace(_DECODE, block_m=max(16, _next_pow2(group))), prefill=_PREFILL)


# (head_dim, page_size, group) -> config, from the H200 sweep.
GPU_TABLE: dict[tuple[int, int, int], GpuConfig] = {
    (128, 16, 4): GpuConfig(decode=_DECODE, prefill=_PREFILL),  # decode 160.7 us, prefill 2013 us
    (128, 32, 4): GpuConfig(decode=_DECODE, prefill=_PREFILL),
    (128, 64, 4): GpuConfig(decode=_DECODE, prefill=_PREFILL),
    (64, 16, 4): GpuConfig(decode=_DECODE, prefill=_PREFILL),  # decode 156.4 us (256 x 1024)
}

# The candidates `tools/bench_kernels.py --sweep` tries.
GPU_SWEEP_DECODE = (
    GpuBlocks(block_m=16, block_n=64, num_warps=2, num_stages=4),
    GpuBlocks(block_m=16, block_n=32, num_warps=4, num_stages=4),
    GpuBlocks(block_m=16, block_n=128, num_warps=4, num_stages=2),
    GpuBlocks(block_m=16, block_n=32, num_warps=2, num_stages=4),
)
# The decode sweep of tools/sweep_decode.py (and tools/kernel_sass.py's fp8 cases): GPU_SWEEP_DECODE and
# wider KV blocks, which an fp8 pool (128-byte rows at head dim 128) may want for wide loads.
GPU_SWEEP_DECODE_WIDE = GPU_SWEEP_DECODE + (
    GpuBlocks(block_m=16, block_n=64, num_warps=4, num_stages=3),
    GpuBlocks(block_m=16, block_n=128, num_warps=4, num_stages=3),
    GpuBlocks(block_m=16, block_n=128, num_warps=8, num_stages=3),
    GpuBlocks(block_m=16, block_n=256, num_warps=4, num_stages=2),
)
GPU_SWEEP_PREFILL = (
    GpuBlocks(block_m=128, block_n=64, num_warps=4, num_stages=3),
    GpuBlocks(block_m=128, block_n=64, num_warps=4, num_stages=4),
    GpuBlocks(block_m=128, block_n=32, num_warps=4, num_stages=4),
    GpuBlocks(block_m=128, block_n=128, num_warps=4, num_stages=2),
)


def gpu_config(head_dim: int, page_size: int, group: int) -> GpuConfig:
  cfg = GPU_TABLE.get((head_dim, page_size, group))
  if cfg is None:
    cfg = _default_gpu(head_dim, page_size, group)
  if cfg.decode.block_m < group:  # a decode tile holds all query heads of one KV head
    cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, block_m=_next_pow2(group)))
  if cfg.prefill.block_m < group:
    cfg = dataclasses.replace(cfg, prefill=dataclasses.replace(cfg.prefill, block_m=_next_pow2(group)))
  return cfg


# Programs a decode launch should have to fill an H200 (132 SMs, two or more
# resident programs each); fewer sequence slots x KV heads than this get split.
# At 512 programs (64 x 2048) splitting lost: 161 us unsplit, 171 us with 2
# splits, 182 us with 4 (the combine pass costs more than the tail it saves).
GPU_TARGET_PROGRAMS = 264


def gpu_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, max_splits: int) -> int:
  """Static split count of the decode launch: a power of two, at most one split per KV block."""
  splits = 1
  while (splits * 2 <= max_splits and splits * 2 <= max_blocks
         and num_seqs * num_kv_heads * splits < GPU_TARGET_PROGRAMS):
    splits *= 2
  return splits


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuConfig:
  block_q: int  # query tokens per program (all query heads of one KV head ride along)
  pages_per_block: int  # KV pages fetched per asynchronous copy step


def tpu_config(head_dim: int, page_size: int, group: int) -> TpuConfig:
  del head_dim, group
  return TpuConfig(block_q=32, pages_per_block=max(1, 128 // page_size))


def _next_pow2(n: int) -> int:
  p = 1
  while p < n:
    p *= 2
  return p

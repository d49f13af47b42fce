"""The cases that tools/bench_matmul.py times: the weight shapes, their operands as each weight format stores
them, the products under test (XLA's, as the model runs them, and the Pallas kernels' entry points: `entry`, and
`entry_a8` for w8a8, whose kernels take fp8 activations) and the exact product they are checked against.

The bench (timing, kernel sweeps, edge checks, the report) lives in tools/bench_matmul.py; this module has no
flags, so tests import it.
"""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

from jserve.engine import programs
from jserve.models.quant import (Fp8Weight, Fp8WeightA8, Fp8WeightNK, dequantize, fp8_dot, fp8_dot_a8, fp8_dot_nk,
                                 quantize_fp8, quantize_rows)
from pallas_kernels.decode_matmul import reference


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  k: int
  n: int
  kind: str = "kn"  # kn: x @ w[K, N]; nk: x @ w[N, K].T (tied LM head); gate_up: silu(x @ wg) * (x @ wu)
  fp8: bool = False  # weights in float8 e4m3, each with a float32 scale per column
  # w8a8: fp8 weights stored [N, K], activations quantized per row (implies fp8); gate_up's pair stacked [2, N, K]
  a8: bool = False

  @property
  def num_weights(self):
    return 2 if self.kind == "gate_up" else 1

  @property
  def itemsize(self):
    """Bytes per element of x as the kernel reads it: 1 for w8a8 (e4m3 rows), else 2 (bfloat16)."""
    return 1 if self.a8 else 2

  @property
  def w_itemsize(self):
    return 1 if self.fp8 else 2

  @property
  def weight_bytes(self):
    return self.k * self.n * self.w_itemsize * self.num_weights

  @property
  def bf16_name(self):
    return self.name.replace(" fp8", "").replace(" w8a8", "")


SHAPES = {
    "8b": [Shape("8B gate_up", 4096, 28672), Shape("8B down", 14336, 4096), Shape("8B qkv", 4096, 6144),
           Shape("8B o", 4096, 4096), Shape("8B lm_head", 4096, 128256),
           Shape("8B gate_up fused", 4096, 14336, "gate_up")],
    # The products of an engine whose dot merger is off (fp8 activations: programs.compiler_options): q (o's
    # shape), k and v, gate and up each on its own; with "8b" (down, o), every product of its layers. Such an
    # engine now stacks k and v (quant.stack_pairs), as "k and v" here, and gate and up, as "8b"'s gate_up.
    "8b-split": [Shape("8B gate", 4096, 14336), Shape("8B k or v", 4096, 1024), Shape("8B q", 4096, 4096),
                 Shape("8B k and v", 4096, 2048)],
    "1b": [Shape("1B gate_up", 2048, 16384), Shape("1B down", 8192, 2048), Shape("1B qkv", 2048, 3072),
           Shape("1B o", 2048, 2048), Shape("1B lm_head (tied)", 2048, 128256, "nk"),
           Shape("1B gate_up fused", 2048, 8192, "gate_up")],
}
SMOKE_SHAPES = [Shape("tiny qkv", 128, 192), Shape("tiny lm_head (tied)", 128, 200, "nk"),
                Shape("tiny gate_up fused", 128, 64, "gate_up")]


def fp8_shapes(shapes):
  """The quantized ones of `shapes` with fp8 weights: "8B gate_up" -> "8B fp8 gate_up" (no LM heads)."""
  return [dataclasses.replace(s, name=s.name.replace(" ", " fp8 ", 1), fp8=True) for s in shapes
          if "lm_head" not in s.name]


def a8_shapes(shapes):
  """The w8a8 ones of `shapes`: "8B gate_up" -> "8B w8a8 gate_up" (no LM heads)."""
  return [dataclasses.replace(s, name=s.name.replace(" ", " w8a8 ", 1), fp8=True, a8=True) for s in shapes
          if "lm_head" not in s.name]


def shapes_to_run(smoke, models, weights, names=None):
  """Per model, its bfloat16 shapes, then its fp8 and w8a8 ones (so all of a model run before the time budget
  ends); with `names`, only the shapes so named after the model's prefix ("8B down" is "down")."""
  out = []
  for group in ([SMOKE_SHAPES] if smoke else [SHAPES[m] for m in models]):
    group = [s for s in group if names is None or s.name.split(" ", 1)[1] in names]
    out += group if "bf16" in weights else []
    out += fp8_shapes(group) if "fp8" in weights else []
    out += a8_shapes(group) if "w8a8" in weights else []
  return out


def entry(module, kind, fp8=False, **kw):
  """`module`'s entry point for a shape kind (gpu, hopper or reference), as f(x, w); w is a
  (gate, up) pair for gate_up, and with `fp8` each weight is a (float8 weight, scale) pair."""
  if fp8:
    if kind == "kn":
      return lambda x, w: module.matmul(x, w[0], w_scale_N=w[1], **kw)
    if kind == "gate_up":
      return lambda x, w: module.gate_up_silu(x, w[0][0], w[1][0], w_gate_scale_N=w[0][1], w_up_scale_N=w[1][1],
                                              **kw)
    raise ValueError(f"kind={kind!r}: no fp8 entry (LM heads are not quantized)")
  if kind == "kn":
    return functools.partial(module.matmul, **kw)
  if kind == "nk":
    return functools.partial(module.matmul_nt, **kw)
  return lambda x, w: module.gate_up_silu(x, *w, **kw)


def entry_a8(module, kind, **kw):
  """`module`'s w8a8 entry point for a shape kind (gpu or reference), as f(x, w): x quantized per row by
  `quant.quantize_rows` inside f (a timed call pays for it, as for XLA's w8a8 product), then `matmul_a8_nt`
  ("kn"; w an (fp8 weight [N, K], scale [N]) pair) or `gate_up_silu_a8` (gate_up; w the stacked pair, an
  (fp8 weight [2, N, K], scale [2, N]) pair); the output in x's dtype."""
  names = {"kn": "matmul_a8_nt", "gate_up": "gate_up_silu_a8"}
  if kind not in names:
    raise ValueError(f"kind={kind!r}: no w8a8 entry (LM heads are not quantized)")
  fn = getattr(module, names[kind])

  def f(x, w):
    x8, x_scale = quantize_rows(x)
    return fn(x8, x_scale, *w, out_dtype=x.dtype, **kw)
  return f


def over_copies(one, compiler_options=None):
  """Jitted: x and a tuple of weight copies (pairs for gate_up) -> a tuple of outputs."""
  return jax.jit(lambda x, ws: tuple(one(x, w) for w in ws), compiler_options=compiler_options)


def compiler_options(shape):
  """The XLA options a shape's products compile with: for w8a8 those of a w8a8 engine's step programs
  (`programs.compiler_options(True)`; on a GPU no dot merger, which would otherwise join the copies that share
  x by concatenating their weights, a copy the engine never makes), else none."""
  return programs.compiler_options(True) if shape.a8 else None


def _silu_gate_times_up(gu_M2N):
  """silu(gate) * up from a stacked pair's product [M, 2, N] (gate at 0, up at 1)."""
  return jax.nn.silu(gu_M2N[:, 0]) * gu_M2N[:, 1]


def _over_copies_of(shape, dot):
  """`over_copies` of one quantized weight's product `dot(x, w)`: itself for "kn"; for gate_up silu(gate) * up,
  of two products (fp8 weights) or, for w8a8, of the one product over the stacked pair ([M, 2, N]), as
  jserve/models/llama.py's `_gate_up` multiplies a w8a8 engine's `w_gate_up`."""
  options = compiler_options(shape)
  if shape.kind == "kn":
    return over_copies(dot, options)
  if shape.a8:
    return over_copies(lambda x, w: _silu_gate_times_up(dot(x, w)), options)
  return over_copies(lambda x, w: jax.nn.silu(dot(x, w[0])) * dot(x, w[1]), options)


def xla_fn(shape):
  if not shape.fp8:
    return over_copies(entry(reference, shape.kind))
  # The model's own XLA path for fp8 weights: quant.fp8_dot per weight (quant.fp8_dot_a8 for w8a8, over the
  # stacked pair for gate_up), as jserve/models/llama.py runs it.
  if shape.a8:
    return _over_copies_of(shape, lambda x, w: fp8_dot_a8(x, Fp8WeightA8(*w), 1))
  return _over_copies_of(shape, lambda x, w: fp8_dot("MK,KN->MN", x, Fp8Weight(*w)))


def xla_weight_only_fn(shape):
  """For a w8a8 shape: its [N, K] fp8 weights (gate_up's stacked pair as one [2, N, K] weight) multiplied
  weight-only (`quant.fp8_dot_nk`: the weight widened to the activations' dtype inside XLA's dot), the
  activations left unquantized."""
  return _over_copies_of(shape, lambda x, w: fp8_dot_nk(x, Fp8WeightNK(*w), 1))


def _entry_lines(hlo_text: str) -> list[str]:
  """The instruction lines of an optimized program's entry computation (`compiled.as_text()`)."""
  entry = re.search(r"^ENTRY .*?^}", hlo_text, re.M | re.S)
  return entry.group(0).splitlines()[1:] if entry else []


def entry_ops(hlo_text: str, limit: int = 40) -> list[str]:
  """The first `limit` instructions of the optimized program's entry computation, each shortened to its name,
  shape, opcode, fusion kind (a custom fusion's too, e.g. __triton_gemm) or custom-call target (metadata and
  backend configs dropped): what the bench's JSON keeps so that a GPU run shows which passes surround a GEMM
  without a dump of the whole program."""
  out = []
  for line in _entry_lines(hlo_text)[:limit]:
    fusion_kind = re.search(r'"kind":"(__[a-z_]+)"', line)  # a custom fusion's kind, e.g. __triton_gemm
    line = re.split(r",? (?:metadata|backend_config|frontend_attributes)=", line)[0]  # those come last
    line += f", {fusion_kind.group(1)}" if fusion_kind else ""
    out.append(re.sub(r"\s+", " ", line).strip()[:200])
  return [x for x in out if x and x != "}"]


def kernel_mix(hlo_text: str, copies: int) -> str:
  """What one product compiled to, from the optimized program over `copies` weights (`compiled.as_text()`): the
  entry computation's GEMM custom calls by target, XLA's Triton GEMM fusions, other fusions and plain dots, each
  per copy, e.g. "__cublas$lt$matmul$f8 1, fusion 2". Shows whether XLA's fp8 GEMM went to cuBLASLt or to a
  Triton GEMM, and how many passes surround it."""
  counts = collections.Counter()
  for line in _entry_lines(hlo_text):
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if target:
      counts[target.group(1)] += 1
    elif re.search(r"\sfusion\(", line):
      counts["triton_gemm" if "__triton_gemm" in line else "fusion"] += 1
    elif re.search(r"\sdot\(", line):
      counts["dot"] += 1
  return ", ".join(f"{k} {v / copies:g}" for k, v in sorted(counts.items())) or "none"


def fp8_pair(w_KN):
  """(float8 weight, float32 scale per column): `w_KN` as `quantization="fp8"` stores it."""
  q = quantize_fp8(w_KN, 1)
  return q.w, q.scale


def a8_pair(w_KN):
  """(float8 weight [N, K], float32 scale per output channel): `w_KN` as `activation_quantization="fp8"`
  stores it."""
  q = quantize_fp8(w_KN, 1)
  return jnp.transpose(q.w), q.scale


def stacked(gate, up):
  """A w8a8 (gate, up) pair of (fp8 weight [N, K], scale [N]) pairs as a w8a8 engine stores it
  (`quant.stack_pairs`): one (fp8 weight [2, N, K], scale [2, N]) pair."""
  return jnp.stack([gate[0], up[0]]), jnp.stack([gate[1], up[1]])


def kn_pairs(w):
  """A w8a8 weight as [K, N] (weight, scale) pairs, for `dequantized`: an [N, K] pair as one, a stacked
  [2, N, K] pair (gate_up) as a (gate, up) pair of them."""
  w_NK, scale = w
  if w_NK.ndim == 3:
    return tuple((w_NK[i].T, scale[i]) for i in range(2))
  return w_NK.T, scale


@jax.jit
def dequantized(w):
  """The float32 weight(s) of (fp8 weight, scale) pairs (or of a (gate, up) pair of them)."""
  if isinstance(w[0], tuple):
    return tuple(dequantized(p) for p in w)
  return dequantize(Fp8Weight(*w))


@functools.partial(jax.jit, static_argnames="kind")
def exact(x_MK, w, kind):
  """The product in float32 at highest precision: what every output is checked against."""
  x = x_MK.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  if kind == "kn":
    return jnp.dot(x, w.astype(jnp.float32), precision=hi)
  if kind == "nk":
    return jnp.dot(x, w.astype(jnp.float32).T, precision=hi)
  g = jnp.dot(x, w[0].astype(jnp.float32), precision=hi)
  return jax.nn.silu(g) * jnp.dot(x, w[1].astype(jnp.float32), precision=hi)


# The relative error (`rel_err`) a w8a8 product may have against `exact`: quantizing x's rows to e4m3 (3
# mantissa bits) puts a "kn" product about 0.026 off it, and silu(gate) * up, where both products' errors
# meet, about 0.038 (at most 0.049 over 20 seeds of M = 1, K = 128, N = 64); 16-bit operands stay under 1e-2.
A8_TOL = 0.06


@jax.jit
def rel_err(out, ref):
  out = out.astype(jnp.float32)
  return jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)


def make_weights(shape, copies, seed):
  """`copies` distinct weight arrays (pairs for gate_up), scaled so products are O(1); fp8 shapes get
  each weight as (float8 weight, float32 scale per column), quantized as `quantization="fp8"` does, and
  w8a8 shapes as `a8_pair`s, a gate_up's two `stacked`."""
  key = jax.random.key(seed)
  per = 2 if shape.kind == "gate_up" else 1
  wshape = (shape.n, shape.k) if shape.kind == "nk" else (shape.k, shape.n)
  gen = jax.jit(lambda k: (jax.random.normal(k, wshape, jnp.float32) * shape.k**-0.5).astype(jnp.bfloat16))
  if shape.fp8:
    bf16 = gen
    gen = jax.jit(lambda k: (a8_pair if shape.a8 else fp8_pair)(bf16(k)))
  if shape.a8 and per == 2:  # gate and up quantized each on its own, then stacked (one program: no extra copy)
    one = gen
    gen_pair = jax.jit(lambda k0, k1: stacked(one(k0), one(k1)))
  else:
    gen_pair = lambda k0, k1: (gen(k0), gen(k1))
  ws = []
  for i in range(copies):
    keys = [jax.random.fold_in(key, per * i + j) for j in range(per)]
    ws.append(gen_pair(*keys) if per == 2 else gen(keys[0]))
  jax.block_until_ready(ws)
  return tuple(ws)


def make_x(m, k, seed):
  return jax.random.normal(jax.random.key(seed), (m, k), jnp.float32).astype(jnp.bfloat16)

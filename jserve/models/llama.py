"""The Llama family (Llama, Mistral, Qwen2, Qwen3) as pure functions over a params pytree.

Why pure functions and not Flax modules: the serving step is one `jax.jit` of
params, KV pool and step inputs, with the pool donated and replaced; a params
dict and a list of per-layer pool arrays are exactly that, with nothing hidden
in module state. What Flax does well is used where it fits: every parameter is
declared once in `param_specs` with its logical axis names (`vocab`, `embed`,
`heads`, `kv_heads`, `head_dim`, `mlp`), and `sharding.rules` turns those names
into `PartitionSpec`s through `flax.linen.logical_to_mesh_axes`.

Layers are a Python list, unrolled at trace time: each layer's weights and KV
pages are separate buffers, so the donated pool is updated in place and no
layer slice is ever copied. The `layers` logical axis is therefore the list
index; pipeline stages split the list.

A layer's projections may be `quant.Fp8Weight`s (`EngineConfig.quantization="fp8"`, see
jserve/models/quant.py, or an fp8 checkpoint's, jserve/prequantized.py) instead of arrays. `_dot` and
`_gate_up` multiply those through `quant.fp8_dot` (an XLA einsum) with `matmul_impl="xla"` and for
prefill-sized rows; decode-sized rows with another `matmul_impl` go to the decode matmul kernel with
the fp8 weight and its scale (the Triton kernel converts the weight in registers; the Hopper one
takes no fp8 and leaves it to XLA). A `quant.Fp8WeightA8` (`activation_quantization="fp8"`) multiplies
through `quant.fp8_dot_a8`, fp8 activations by fp8 weights, except under `matmul_impl="auto"` where
`quant.a8_weight_only` sends decode-sized products of small weights down the `Fp8WeightNK` path, and
except where the decode matmul's w8a8 kernel takes the product (`matmul_impl="gpu"`, or "auto" where its
table names the shape): the rows are quantized as `fp8_dot_a8` quantizes them, and the Triton kernel
multiplies and scales them, gate/up with its silu in the same kernel.
"""

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jserve.config import ModelConfig
from jserve.models.quant import (Fp8Weight, Fp8WeightA8, Fp8WeightNK, a8_weight_only, fp8_dot, fp8_dot_a8, fp8_dot_nk,
                                 quantize_rows)
from pallas_kernels import ragged_paged_attention, write_kv_pages
from pallas_kernels.decode_matmul import (MAX_M, decode_matmul, decode_matmul_nt, gate_up_silu, gate_up_silu_a8,
                                          matmul_a8_nt, use_a8_kernel)
from sharding.tensor import head_parallel


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter: its shape, logical axes, and where it lives in a Hugging Face checkpoint."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  hf_name: str
  init: str = "normal"  # "normal" (std 0.02) or "ones"

  def from_hf(self, a: np.ndarray) -> np.ndarray:
    """Converts the checkpoint's tensor (torch layout) to ours."""
    if len(self.shape) == 1 or self.hf_name.endswith(("embed_tokens.weight", ".bias")):
      return a.reshape(self.shape)
    return a.T.reshape(self.shape)  # Linear [out, in] -> [in, out...]; o_proj [D, N*H] -> [N, H, D]

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    """Inverse of `from_hf`."""
    if len(self.shape) == 1 or self.hf_name.endswith(("embed_tokens.weight", ".bias")):
      return a.reshape(-1) if self.hf_name.endswith(".bias") else a
    if self.hf_name.endswith("o_proj.weight"):
      return a.reshape(-1, self.shape[-1]).T
    return a.reshape(self.shape[0], -1).T


def param_specs(cfg: ModelConfig) -> dict:
  """The params pytree of `cfg`, with a `ParamSpec` at every leaf."""
  d, f, h, v = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
  n, k = cfg.num_heads, cfg.num_kv_heads
  layers = []
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    layer = {
        "attn_norm": ParamSpec((d,), ("embed",), p + "input_layernorm.weight", "ones"),
        "wq": ParamSpec((d, n, h), ("embed", "heads", "head_dim"), p + "self_attn.q_proj.weight"),
        "wk": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim"), p + "self_attn.k_proj.weight"),
        "wv": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim"), p + "self_attn.v_proj.weight"),
        "wo": ParamSpec((n, h, d), ("heads", "head_dim", "embed"), p + "self_attn.o_proj.weight"),
        "mlp_norm": ParamSpec((d,), ("embed",), p + "post_attention_layernorm.weight", "ones"),
        "w_gate": ParamSpec((d, f), ("embed", "mlp"), p + "mlp.gate_proj.weight"),
        "w_up": ParamSpec((d, f), ("embed", "mlp"), p + "mlp.up_proj.weight"),
        "w_down": ParamSpec((f, d), ("mlp", "embed"), p + "mlp.down_proj.weight"),
    }
    if cfg.attention_bias:
      layer["bq"] = ParamSpec((n, h), ("heads", "head_dim"), p + "self_attn.q_proj.bias")
      layer["bk"] = ParamSpec((k, h), ("kv_heads", "head_dim"), p + "self_attn.k_proj.bias")
      layer["bv"] = ParamSpec((k, h), ("kv_heads", "head_dim"), p + "self_attn.v_proj.bias")
    if cfg.qk_norm:
      layer["q_norm"] = ParamSpec((h,), ("head_dim",), p + "self_attn.q_norm.weight", "ones")
      layer["k_norm"] = ParamSpec((h,), ("head_dim",), p + "self_attn.k_norm.weight", "ones")
    layers.append(layer)
  specs = {
      "embed": ParamSpec((v, d), ("vocab", "embed"), "model.embed_tokens.weight"),
      "layers": layers,
      "final_norm": ParamSpec((d,), ("embed",), "model.norm.weight", "ones"),
  }
  if not cfg.tie_word_embeddings:
    specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"), "lm_head.weight")
  return specs


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> dict:
  """Random params (normal, std 0.02; norms at one), for tests, benchmarks and training."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  out = []
  for spec, k in zip(leaves, keys):
    if spec.init == "ones":
      out.append(jnp.ones(spec.shape, dtype=dtype))
    else:
      out.append((0.02 * jax.random.normal(k, spec.shape, dtype=jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["token_ids_T", "positions_T", "slots_T", "cu_q_lens_E", "kv_lens_B",
                                "page_indices_BP", "num_seqs", "logits_indices_B"],
                   meta_fields=[])
@dataclasses.dataclass
class StepInputs:
  """One ragged step, padded to a bucket. All int32.

  token_ids_T, positions_T: the step's tokens and their positions in their sequence.
  slots_T: flat KV slot (page * page_size + offset) each token's K/V is written to;
    padding rows point past the pool so their writes are dropped.
  cu_q_lens_E: [B + 1] start of each sequence's rows; entries past num_seqs repeat the total.
  kv_lens_B: context length of each sequence after this step (0 for padding).
  page_indices_BP: each sequence's pages, padded with any valid page id.
  num_seqs: [1] live sequences.
  logits_indices_B: the row whose hidden state is turned into logits, per sequence.
  """

  token_ids_T: jax.Array
  positions_T: jax.Array
  slots_T: jax.Array
  cu_q_lens_E: jax.Array
  kv_lens_B: jax.Array
  page_indices_BP: jax.Array
  num_seqs: jax.Array
  logits_indices_B: jax.Array


def rms_norm(x, w, eps):
  """Hugging Face's RMSNorm: normalize in float32, cast back, then scale."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w * x32.astype(x.dtype)


def apply_rope(x_TNH, positions_T, cfg: ModelConfig):
  """Rotates query or key heads by their positions (the rotate-half convention of Llama)."""
  inv_freq = jnp.asarray(cfg.rope.inv_freq(cfg.head_dim), dtype=jnp.float32)
  freqs_TF = positions_T.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_TF, freqs_TF], axis=-1)[..., None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x_TNH.astype(jnp.float32)
  half = cfg.head_dim // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_TNH.dtype)


# How the projections multiply: "xla" (einsum), or through the decode matmul
# kernel with "auto" (the Pallas kernel on GPUs, XLA elsewhere), "gpu", "hopper" (the
# Mosaic GPU kernel), or, for tests, "interpret" / "interpret_hopper" (those kernels in
# Pallas' interpreters). Rows past the kernel's limit (prefill) go to XLA
# either way. "xla" until tools/bench_matmul.py shows a kernel ahead of cuBLAS.
MATMUL_IMPL = "xla"


def _matmul_kw(impl):
  if impl == "interpret":
    return dict(impl="gpu", interpret=True)
  if impl == "interpret_hopper":
    return dict(impl="hopper", interpret=True)
  return dict(impl=impl)


def _xla_dot(eq, a, b, num_contracted):
  """`einsum(eq, a, b)` in `a`'s dtype for any projection weight: an array or one of quant's fp8 weights."""
  if isinstance(b, Fp8WeightA8):
    return fp8_dot_a8(a, b, num_contracted)
  if isinstance(b, Fp8WeightNK):
    return fp8_dot_nk(a, b, num_contracted)
  if isinstance(b, Fp8Weight):
    return fp8_dot(eq, a, b)
  return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _kernel_operand(b, k: int):
  """A projection weight as the decode matmul kernel takes it: (its 2-D weight, its flattened scale or None,
  whether that weight is stored [N, K]). The scale covers the weight's output axes in order, so it
  flattens as they do ([N, H] -> [N * H])."""
  if isinstance(b, Fp8WeightNK):
    return b.w_NK, b.scale.reshape(-1), True
  if isinstance(b, Fp8Weight):
    return b.w.reshape(k, -1), b.scale.reshape(-1), False
  return b.reshape(k, -1), None, False


def _maybe_weight_only(b, rows: int, impl):
  """An `Fp8WeightA8` that `quant.a8_weight_only` sends weight-only (under "auto") as the `Fp8WeightNK` of the same
  store; any other weight as it is."""
  if isinstance(b, Fp8WeightA8) and impl == "auto" and a8_weight_only(rows, b):
    return Fp8WeightNK(b.w_NK, b.scale)
  return b


def _a8_kernel(b, rows: int, impl, gate_up: bool = False) -> bool:
  """Whether `b`, an `Fp8WeightA8` (a stacked pair [2, N, K] too), multiplies `rows` rows in the Triton kernel's
  w8a8 entries (`decode_matmul.use_a8_kernel`: "gpu", or "auto" where its table says so)."""
  if not isinstance(b, Fp8WeightA8):
    return False
  n = b.w_NK.shape[-2] if gate_up else math.prod(b.w_NK.shape[:-1])
  kw = _matmul_kw(impl)
  return use_a8_kernel(kw["impl"], rows, b.w_NK.shape[-1], n, gate_up=gate_up, interpret=kw.get("interpret", False))


def _a8_kernel_dot(a_MK, b: Fp8WeightA8, impl):
  """`fp8_dot_a8`'s product in the Triton kernel, [M, N] (N: the weight's output axes flattened; a stacked pair
  is one [2N, K] weight): the rows quantized here, as `fp8_dot_a8` quantizes them."""
  x8_MK, x_scale_M = quantize_rows(a_MK)
  k = b.w_NK.shape[-1]
  return matmul_a8_nt(x8_MK, x_scale_M, b.w_NK.reshape(-1, k), b.scale.reshape(-1), out_dtype=a_MK.dtype,
                      interpret=_matmul_kw(impl).get("interpret", False))


def _pair_dot(eq, a, pair, impl):
  """The product of a stacked pair (`quant.stack_pairs`: [2, N, K]) in one GEMM: through XLA, weight-only where
  `quant.a8_weight_only` says so under "auto", or in the Triton kernel where `_a8_kernel` says so."""
  rows = math.prod(a.shape[:-1])
  pair = _maybe_weight_only(pair, rows, impl)
  if _a8_kernel(pair, rows, impl):
    return _a8_kernel_dot(a.reshape(rows, -1), pair, impl).reshape(a.shape[:-1] + pair.scale.shape)
  return _xla_dot(eq, a, pair, 1)


def _dot(eq, a, b, impl="xla"):
  # Every projection's equation is "...<a's named axes>,<same axes><out axes>": flatten to 2-D.
  n = len(eq.split(",")[0].replace("...", ""))
  k = math.prod(a.shape[a.ndim - n:])
  a_MK = a.reshape(-1, k)
  b = _maybe_weight_only(b, a_MK.shape[0], impl)
  if _a8_kernel(b, a_MK.shape[0], impl):
    return _a8_kernel_dot(a_MK, b, impl).reshape(a.shape[:a.ndim - n] + b.scale.shape)
  fp8 = isinstance(b, (Fp8Weight, Fp8WeightNK))
  # fp8 prefill rows too: XLA's einsum, exactly as with "xla"; and fp8 activations the w8a8 kernel did not take.
  if impl == "xla" or (fp8 and a_MK.shape[0] > MAX_M) or isinstance(b, Fp8WeightA8):
    return _xla_dot(eq, a, b, n)
  w, scale, nk = _kernel_operand(b, k)
  out = (decode_matmul_nt if nk else decode_matmul)(a_MK, w, w_scale_N=scale, **_matmul_kw(impl))
  return out.reshape(a.shape[:a.ndim - n] + (b.scale.shape if fp8 else b.shape[n:]))


def _gate_up(h_TD, lp: dict, impl):
  """silu(h @ w_gate) * (h @ w_up): two einsums with "xla", else the fused decode kernel (float32 activation);
  fp8 weights take the kernel for decode-sized rows when both are fp8 and stored alike. An engine with fp8
  activations stores the two stacked (`w_gate_up`, `quant.stack_pairs`): one product through XLA, or the
  Triton kernel's fused w8a8 gate/up where `_a8_kernel` says so."""
  h_MD = h_TD.reshape(-1, h_TD.shape[-1])
  if "w_gate_up" in lp:
    pair = _maybe_weight_only(lp["w_gate_up"], h_MD.shape[0], impl)
    if _a8_kernel(pair, h_MD.shape[0], impl, gate_up=True):  # one kernel: both products, silu and the product
      x8_MD, x_scale_M = quantize_rows(h_MD)
      act = gate_up_silu_a8(x8_MD, x_scale_M, pair.w_NK, pair.scale, out_dtype=h_TD.dtype,
                            interpret=_matmul_kw(impl).get("interpret", False))
      return act.reshape(h_TD.shape[:-1] + act.shape[-1:])
    gu = _pair_dot("...D,DTF->...TF", h_TD, lp["w_gate_up"], impl)
    return jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]
  w_gate, w_up = (_maybe_weight_only(lp[name], h_MD.shape[0], impl) for name in ("w_gate", "w_up"))
  fp8 = isinstance(w_gate, (Fp8Weight, Fp8WeightNK))
  # Either may be fp8 alone (a pre-quantized checkpoint can leave single projections unquantized): the
  # kernel streams two weights of one dtype and layout, so such a pair multiplies through XLA, as do fp8
  # prefill rows.
  stored_alike = (fp8 == isinstance(w_up, (Fp8Weight, Fp8WeightNK))
                  and isinstance(w_gate, Fp8WeightNK) == isinstance(w_up, Fp8WeightNK))
  a8 = isinstance(w_gate, Fp8WeightA8) or isinstance(w_up, Fp8WeightA8)
  if impl == "xla" or not stored_alike or a8 or (fp8 and h_MD.shape[0] > MAX_M):
    return jax.nn.silu(_dot("...D,DF->...F", h_TD, w_gate)) * _dot("...D,DF->...F", h_TD, w_up)
  (g, g_scale, nk), (u, u_scale, _) = (_kernel_operand(w, h_MD.shape[1]) for w in (w_gate, w_up))
  act = gate_up_silu(h_MD, g, u, w_gate_scale_N=g_scale, w_up_scale_N=u_scale, transposed=nk, **_matmul_kw(impl))
  return act.reshape(h_TD.shape[:-1] + act.shape[-1:])


def _layer(lp: dict, x_TD, positions_T, attend: Callable, cfg: ModelConfig, matmul_impl: str = "xla"):
  """One decoder layer on any leading token axes. `attend(q, k, v)` returns (o, aux)."""
  with jax.named_scope("attn"):
    h_TD = rms_norm(x_TD, lp["attn_norm"], cfg.rms_norm_eps)
    q_TNH = _dot("...D,DNH->...NH", h_TD, lp["wq"], matmul_impl)
    if "wkv" in lp:  # k and v stacked (quant.stack_pairs)
      kv = _pair_dot("...D,DSKH->...SKH", h_TD, lp["wkv"], matmul_impl)
      k_TKH, v_TKH = kv[..., 0, :, :], kv[..., 1, :, :]
    else:
      k_TKH = _dot("...D,DKH->...KH", h_TD, lp["wk"], matmul_impl)
      v_TKH = _dot("...D,DKH->...KH", h_TD, lp["wv"], matmul_impl)
    if cfg.attention_bias:
      q_TNH, k_TKH, v_TKH = q_TNH + lp["bq"], k_TKH + lp["bk"], v_TKH + lp["bv"]
    if cfg.qk_norm:
      q_TNH = rms_norm(q_TNH, lp["q_norm"], cfg.rms_norm_eps)
      k_TKH = rms_norm(k_TKH, lp["k_norm"], cfg.rms_norm_eps)
    q_TNH = apply_rope(q_TNH, positions_T, cfg)
    k_TKH = apply_rope(k_TKH, positions_T, cfg)
    o_TNH, aux = attend(q_TNH, k_TKH, v_TKH)
    x_TD = x_TD + _dot("...NH,NHD->...D", o_TNH, lp["wo"], matmul_impl)
  with jax.named_scope("mlp"):
    h_TD = rms_norm(x_TD, lp["mlp_norm"], cfg.rms_norm_eps)
    x_TD = x_TD + _dot("...F,FD->...D", _gate_up(h_TD, lp, matmul_impl), lp["w_down"], matmul_impl)
  return x_TD, aux


def forward(params: dict, kv_caches: list, inputs: StepInputs, cfg: ModelConfig, attn_impl: str = "auto",
            mesh: jax.sharding.Mesh | None = None, *, matmul_impl: str = MATMUL_IMPL):
  """The serving forward pass over one ragged step.

  Returns the final-normed hidden state of each `logits_indices_B` row, [B, D],
  and the KV pool (one [P, S, C, H] array per layer) with this step's keys and
  values written in. With `mesh` (params and pool placed by `sharding.rules`),
  attention runs per device on its own heads (`sharding.tensor.head_parallel`).
  """
  x_TD = params["embed"][inputs.token_ids_T]
  x_TD, new_caches = forward_layers(params["layers"], kv_caches, x_TD, inputs, cfg, attn_impl, mesh,
                                    matmul_impl=matmul_impl)
  x_BD = rms_norm(x_TD[inputs.logits_indices_B], params["final_norm"], cfg.rms_norm_eps)
  return x_BD, new_caches


def forward_layers(layers: list, kv_caches: list, x_TD, inputs: StepInputs, cfg: ModelConfig,
                   attn_impl: str = "auto", mesh: jax.sharding.Mesh | None = None, *,
                   matmul_impl: str = MATMUL_IMPL, decode_only: bool = False):
  """Runs a run of decoder layers (all of them, or one pipeline stage's) and their KV pools over a step.
  `decode_only`: every sequence of the step has one token (the attention kernel skips its prefill launch)."""
  if mesh is not None:
    # The kernel is one custom call on whole weights: given sharded ones, XLA would gather them first.
    matmul_impl = "xla"

  def paged_attention(q_TNH, k_TKH, v_TKH, kv_pages_PSCH, inputs):
    kv_pages_PSCH = write_kv_pages(kv_pages_PSCH, k_TKH, v_TKH, inputs.slots_T)
    o_TNH = ragged_paged_attention(
        q_TNH, kv_pages_PSCH, inputs.kv_lens_B, inputs.page_indices_BP, inputs.cu_q_lens_E,
        inputs.num_seqs, sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window,
        impl=attn_impl, decode_only=decode_only)
    return o_TNH, kv_pages_PSCH

  if mesh is not None:
    paged_attention = head_parallel(paged_attention, mesh)
  # Every layer is the same function of its weights, pool and activations: one jitted callee, traced
  # and lowered once for the whole stack and called per layer (XLA inlines the calls when it
  # compiles), instead of the stack traced and lowered layer by layer in every step program.
  @jax.jit
  def layer(layer_params, kv_pages_PSCH, x_TD, inputs):
    def attend(q_TNH, k_TKH, v_TKH):
      return paged_attention(q_TNH, k_TKH, v_TKH, kv_pages_PSCH, inputs)
    return _layer(layer_params, x_TD, inputs.positions_T, attend, cfg, matmul_impl)

  new_caches = []
  for layer_params, kv_pages_PSCH in zip(layers, kv_caches):
    x_TD, kv_pages_PSCH = layer(layer_params, kv_pages_PSCH, x_TD, inputs)
    new_caches.append(kv_pages_PSCH)
  return x_TD, new_caches


def compute_logits(params: dict, x_BD, cfg: ModelConfig, *, matmul_impl: str = "xla"):
  """LM head in float32: [B, D] -> [B, V].

  `matmul_impl` as for the projections (see MATMUL_IMPL); its default stays
  "xla" because this function does not know whether the head is sharded.
  """
  if matmul_impl != "xla":
    if cfg.tie_word_embeddings:
      return decode_matmul_nt(x_BD, params["embed"], out_dtype=jnp.float32, **_matmul_kw(matmul_impl))
    return decode_matmul(x_BD, params["lm_head"], out_dtype=jnp.float32, **_matmul_kw(matmul_impl))
  if cfg.tie_word_embeddings:
    return jnp.einsum("BD,VD->BV", x_BD, params["embed"], preferred_element_type=jnp.float32)
  return jnp.einsum("BD,DV->BV", x_BD, params["lm_head"], preferred_element_type=jnp.float32)


def forward_dense(params: dict, token_ids_BT, cfg: ModelConfig):
  """Causal forward over full sequences without a KV pool, for training and scoring: logits [B, T, V]."""
  _, seq_len = token_ids_BT.shape
  positions_T = jnp.arange(seq_len, dtype=jnp.int32)
  x_BTD = params["embed"][token_ids_BT]
  group = cfg.q_per_kv

  def attend(q_BTNH, k_BTKH, v_BTKH):
    k_BTNH = jnp.repeat(k_BTKH, group, axis=2)
    v_BTNH = jnp.repeat(v_BTKH, group, axis=2)
    s_BNTX = jnp.einsum("BTNH,BXNH->BNTX", q_BTNH, k_BTNH, preferred_element_type=jnp.float32)
    s_BNTX = s_BNTX * cfg.head_dim**-0.5
    causal_TX = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
    if cfg.sliding_window is not None:
      causal_TX &= ~jnp.tril(causal_TX, -cfg.sliding_window)
    s_BNTX = jnp.where(causal_TX, s_BNTX, -1e30)
    p_BNTX = jax.nn.softmax(s_BNTX, axis=-1).astype(v_BTNH.dtype)
    return jnp.einsum("BNTX,BXNH->BTNH", p_BNTX, v_BTNH, preferred_element_type=jnp.float32).astype(
        q_BTNH.dtype), None

  for layer_params in params["layers"]:
    x_BTD, _ = _layer(layer_params, x_BTD, positions_T, attend, cfg)
  x_BTD = rms_norm(x_BTD, params["final_norm"], cfg.rms_norm_eps)
  if cfg.tie_word_embeddings:
    return jnp.einsum("BTD,VD->BTV", x_BTD, params["embed"], preferred_element_type=jnp.float32)
  return jnp.einsum("BTD,DV->BTV", x_BTD, params["lm_head"], preferred_element_type=jnp.float32)

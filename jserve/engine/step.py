"""The device programs of one engine step, and the packing of their host inputs.

`_step` is the single-device or tensor-parallel step: embed, layers, logits,
sampling. `_last_stage` is its part after the embedding (also the last
pipeline stage). `_decode_burst` runs several decode steps in one call.
`_prompt_logprobs` is the separate pass for prompt log-probabilities. The
host packs a step's arrays into one int32 buffer (`pack_host_inputs`) that
the programs unpack (`unpack_inputs`). `ModelRunner` in runner.py compiles
and calls them.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jserve.config import ModelConfig
from jserve.engine.sampler import SamplingInputs, SlotState, record_tokens, sample, top_logprobs
from jserve.models.llama import StepInputs, compute_logits, forward_layers, rms_norm

PROMPT_LOGPROBS_ROWS = 128  # rows of [rows, V] logits computed at once for prompt_logprobs


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prompt_slot_T", "output_slot_T", "prompt_target_T", "prev_row_T"], meta_fields=[])
@dataclasses.dataclass
class TokenInputs:
  """Per-token extras of a step, all int32.

  prompt_slot_T / output_slot_T: the slot a prompt / generated input token is counted in (for
  penalties); past the slot table where not tracked. prompt_target_T: the next prompt token, whose
  log-probability this row's logits give (prompt_logprobs), or -1.
  prev_row_T: where >= 0, the token is the one the previous step sampled in that row, not yet known
  to the host when this step was built (overlapped scheduling, see `LLMEngine.step`); else -1.
  """

  prompt_slot_T: jax.Array
  output_slot_T: jax.Array
  prompt_target_T: jax.Array
  prev_row_T: jax.Array


def _prompt_logprobs(params, x_TD, target_T, cfg: ModelConfig):
  """Log-probability of each row's target and the top alternatives, computed in blocks of rows
  so that a long prefill never holds [T, V] logits at once."""
  num_tokens = x_TD.shape[0]
  rows = math.gcd(num_tokens, PROMPT_LOGPROBS_ROWS)
  h_TD = rms_norm(x_TD, params["final_norm"], cfg.rms_norm_eps)

  def block(args):
    h_BD, target_B = args
    logprobs_BV = jax.nn.log_softmax(compute_logits(params, h_BD, cfg), axis=-1)
    chosen_B = jnp.take_along_axis(logprobs_BV, jnp.maximum(target_B, 0)[:, None], axis=-1)[:, 0]
    ids_BA, vals_BA = top_logprobs(logprobs_BV)
    return chosen_B, ids_BA, vals_BA

  out = jax.lax.map(block, (h_TD.reshape(num_tokens // rows, rows, -1), target_T.reshape(num_tokens // rows, rows)))
  return tuple(a.reshape(num_tokens, *a.shape[2:]) for a in out)


# Each array starts a multiple of 64 words (256 bytes) into the packed buffer. XLA
# passes a slice of the buffer to a kernel as a view, and Mosaic GPU kernels (the
# Hopper prefill) refuse an operand that is not 256-byte aligned.
ALIGN_WORDS = 64


def _padded(size: int) -> int:
  return -(-size // ALIGN_WORDS) * ALIGN_WORDS


def pack_host_inputs(tree):
  """A step's host arrays as one int32 buffer (one host-to-device copy instead of one per array; on a
  GPU each copy costs tens of microseconds of host time) and its static layout for `unpack_inputs`.
  float32 and uint32 arrays travel as their bits, bools and uint8 as int32 values; each array starts
  on a multiple of `ALIGN_WORDS`."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  parts, layout = [], []
  for x in leaves:
    x = np.ascontiguousarray(x)
    parts.append((x.astype(np.int32) if x.dtype in (np.bool_, np.uint8) else x.view(np.int32)).ravel())
    layout.append((x.shape, x.dtype.name))
  buf_N = np.zeros(sum(_padded(p.size) for p in parts), np.int32)
  offset = 0
  for p in parts:
    buf_N[offset:offset + p.size] = p
    offset += _padded(p.size)
  return buf_N, (treedef, tuple(layout))


def unpack_host(buf_N, layout):
  """`unpack_inputs` on the host, in numpy."""
  treedef, metas = layout
  leaves, offset = [], 0
  for shape, dtype in metas:
    size = math.prod(shape)
    bits = np.asarray(buf_N[offset:offset + size], np.int32).reshape(shape)
    offset += _padded(size)
    leaves.append(bits.astype(dtype) if dtype in ("bool", "uint8") else bits.view(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def unpack_inputs(buf_N, layout):
  treedef, metas = layout
  leaves, offset = [], 0
  for shape, dtype in metas:
    size = math.prod(shape)
    bits = buf_N[offset:offset + size].reshape(shape)
    offset += _padded(size)
    if dtype == "bool":
      leaves.append(bits != 0)
    elif dtype == "uint8":
      leaves.append(bits.astype(jnp.uint8))
    elif dtype == "int32":
      leaves.append(bits)
    else:
      leaves.append(jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype)))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _step(params, kv_caches, slots: SlotState, mask_SW, last_S, buf_N, *, layout, cfg: ModelConfig, attn_impl: str,
          mesh: jax.sharding.Mesh | None = None, path: str | None = None, matmul_impl: str = "xla"):
  """One engine step. `buf_N`: the step's inputs packed by `pack_host_inputs`. `last_S`: the previous
  step's sampled tokens, padded to max_num_seqs; rows of this step whose token the host did not know
  yet (`tokens.prev_row_T`) read theirs from it. `path`: the sampler's path when the host chose it
  (`sampler.sample`)."""
  inputs, sampling, tokens = unpack_inputs(buf_N, layout)
  token_ids_T = jnp.where(tokens.prev_row_T >= 0, last_S[jnp.maximum(tokens.prev_row_T, 0)], inputs.token_ids_T)
  inputs = dataclasses.replace(inputs, token_ids_T=token_ids_T)
  x_TD = params["embed"][token_ids_T]
  out, prompt, kv_caches, slots = _last_stage(params, kv_caches, x_TD, slots, mask_SW, inputs, sampling, tokens,
                                              cfg=cfg, attn_impl=attn_impl, mesh=mesh, path=path,
                                              matmul_impl=matmul_impl)
  last_S = jnp.zeros_like(last_S).at[:out.tokens_B.shape[0]].set(out.tokens_B)
  return out, prompt, kv_caches, slots, last_S


def _last_stage(params, kv_caches, x_TD, slots: SlotState, mask_SW, inputs: StepInputs, sampling: SamplingInputs,
                tokens: TokenInputs, *, cfg: ModelConfig, attn_impl: str, mesh: jax.sharding.Mesh | None = None,
                path: str | None = None, matmul_impl: str = "xla", decode_only: bool = False):
  """The layers of `params` (all of them, or the last pipeline stage's), then logits and sampling.
  `decode_only`: one token per sequence (a decode burst's steps)."""
  x_TD, kv_caches = forward_layers(params["layers"], kv_caches, x_TD, inputs, cfg, attn_impl, mesh,
                                   matmul_impl=matmul_impl, decode_only=decode_only)
  x_BD = rms_norm(x_TD[inputs.logits_indices_B], params["final_norm"], cfg.rms_norm_eps)
  logits_BV = compute_logits(params, x_BD, cfg, matmul_impl="xla" if mesh is not None else matmul_impl)
  slots = record_tokens(slots, tokens.prompt_slot_T, tokens.output_slot_T, inputs.token_ids_T)
  # Grammar bitmask rows of this step's sequences, uploaded before the step (see `execute`). A host
  # callback here would overlap computing the mask with the forward pass, but JAX keeps no program
  # with a host callback in its persistent compilation cache: every start would compile again.
  mask_BW = mask_SW[:logits_BV.shape[0]]
  out = sample(logits_BV, sampling, slots, mask_BW, path=path)
  # The last hidden states: the host computes prompt logprobs from them in a separate call when a
  # request asks (a `lax.cond` here would cost every step: on a GPU a conditional waits for the device).
  return out, x_TD, kv_caches, slots


def _decode_burst(params, kv_caches, slots: SlotState, mask_SW, last_S, buf_N, *, layout, num_steps: int,
                  cfg: ModelConfig, attn_impl: str, page_size: int, mesh: jax.sharding.Mesh | None = None,
                  path: str | None = None, matmul_impl: str = "xla"):
  """`num_steps` decode steps of one decode-only batch in one device call: each step's sampled tokens
  are the next step's inputs, positions and context lengths advance by one, and the KV slots of the
  new positions are looked up in the page table on the device (the host reserved the pages).
  Returns the tokens of every step [K, B], the pool, the slots and the last step's tokens."""
  inputs, sampling, tokens = unpack_inputs(buf_N, layout)
  num_tokens, num_seqs = inputs.token_ids_T.shape[0], inputs.kv_lens_B.shape[0]
  live_T = inputs.slots_T < kv_caches[0].shape[0] * page_size  # padding rows point past the pool
  row_T = jnp.minimum(jnp.arange(num_tokens), num_seqs - 1)  # decode-only: token t is row t's
  token_ids_T = jnp.where(tokens.prev_row_T >= 0, last_S[jnp.maximum(tokens.prev_row_T, 0)], inputs.token_ids_T)
  tokens = dataclasses.replace(tokens, prev_row_T=jnp.full_like(tokens.prev_row_T, -1))

  def one(k, carry):
    kv_caches, slots, token_ids_T, out_KB = carry
    positions_T = inputs.positions_T + k
    pages_T = inputs.page_indices_BP[row_T, jnp.minimum(positions_T // page_size,
                                                         inputs.page_indices_BP.shape[1] - 1)]
    step_inputs = dataclasses.replace(
        inputs, token_ids_T=token_ids_T, positions_T=positions_T,
        slots_T=jnp.where(live_T, pages_T * page_size + positions_T % page_size, inputs.slots_T),
        kv_lens_B=jnp.where(inputs.kv_lens_B > 0, inputs.kv_lens_B + k, 0))
    step_sampling = dataclasses.replace(sampling, position_B=sampling.position_B + k)
    x_TD = params["embed"][token_ids_T]
    out, _, kv_caches, slots = _last_stage(params, kv_caches, x_TD, slots, mask_SW, step_inputs, step_sampling,
                                           tokens, cfg=cfg, attn_impl=attn_impl, mesh=mesh, path=path,
                                           matmul_impl=matmul_impl, decode_only=True)
    token_ids_T = jnp.zeros_like(token_ids_T).at[:num_seqs].set(out.tokens_B)
    return kv_caches, slots, token_ids_T, out_KB.at[k].set(out.tokens_B)

  out_KB = jnp.zeros((num_steps, num_seqs), jnp.int32)
  kv_caches, slots, _, out_KB = jax.lax.fori_loop(0, num_steps, one, (kv_caches, slots, token_ids_T, out_KB))
  last_S = jnp.zeros_like(last_S).at[:num_seqs].set(out_KB[-1])
  return out_KB, kv_caches, slots, last_S

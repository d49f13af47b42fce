"""Token sampling inside the jit-compiled step, with per-sequence parameter arrays.

No parameter value triggers a compile: every parameter is an array with one
entry per sequence, and the optional stages (grammar mask, logit bias,
penalties, top-k/top-p/min-p filtering, log-probabilities) sit in branches of
`lax.switch`/`lax.cond` that skip them when no sequence of the batch uses them.

The order of the stages is vLLM's: grammar mask, logit bias (and the ban on
stop tokens before `min_tokens`), repetition/presence/frequency penalties,
then greedy argmax or temperature, min-p, top-k, top-p (each filter applied to
what the previous left) and a draw. Reported log-probabilities are those of the
raw logits, before any of it (vLLM's default).

Draws are Gumbel-max: the token is the argmax of the filtered logits plus
Gumbel noise. The noise of a token is a hash of (seed, position, token id), so
the same request gives the same tokens whatever else shares its batch, on any
backend. A counter hash rather than `jax.random`: it is the same integer
arithmetic everywhere, computed inline from the token's index inside the argmax
(never stored), and costs a few integer operations per logit instead of
threefry's twenty rounds.

What a read of the [256, 128k] float32 logits costs (0.05 ms on an H200) sets
the budget, and so does each `lax.cond`: on a GPU it copies its predicate to
the host and waits for the device, and a [B, V] output would be a copy. So:

- One `lax.switch` picks the batch's path, so choosing costs one cond.
- A batch of greedy and temperature rows only (the common case) takes one
  read: the argmax of x / T + noise (x for greedy rows; no noise at all when
  every row is greedy), the noise hashed inline. No [B, V] array is written.
- Any optional stage sends the batch down a staged path. Every cond in it
  takes the logits as given and returns [B] or [B, A] arrays. Temperature, the
  grammar mask and the thresholds' comparison stay expressions of the logits,
  recomputed in each read; only logit bias (a scatter) and penalties (a read of
  the slots' counts) write one new [B, V] array.
- Thresholds for min-p, top-k and top-p come from a shortlist of the row's
  largest values, or, for rows it cannot settle, from an exact search over the
  float order that reads the logits 8 times; neither sorts the row
  (thresholds.py).
- Log-probabilities take two more reads, two plain reductions: per-chunk max,
  then per-chunk sum of exp, give the log-softmax normalizer and the top-20
  shortlist at once.

Per-request state that outlives a step (penalty counts, logit-bias tables)
lives on the device in `SlotState`, one row per slot; the runner assigns slots
and writes a slot once when its request arrives (`write_slots`), and every step
adds the step's input tokens to the counts (`record_tokens`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

# The thresholds and top-logprob helpers are part of the sampler's interface (the runner's prompt
# logprobs use top_logprobs); they live in thresholds.py.
from jserve.engine.thresholds import (  # noqa: F401
    MAX_LOGPROBS, SHORTLIST_CHUNK, SHORTLIST_CHUNKS, cut_thresholds, filter_logits, log_softmax_terms,
    search_thresholds, shortlist, thresholds, top_logprobs)

_NEG_INF = float("-inf")


def _dataclass(cls):
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_dataclass
@dataclasses.dataclass
class SamplingInputs:
  """Per-sequence sampling parameters, padded to the step's sequence bucket.

  temperature_B: 0 means greedy. top_k_B: 0 disables. top_p_B: 1 disables. min_p_B: 0 disables.
  *_penalty_B: 1 / 0 / 0 disable. slot_B: the sequence's row of `SlotState` (its null row when it
  has none). use_bias_B: apply the slot's logit-bias table. ban_stop_B: `min_tokens` is not reached,
  so the slot's stop-token entries apply. use_mask_B: apply the grammar bitmask row.
  logprobs_B: report log-probabilities. seed_B: uint32 seed. position_B: position of the token sampled.
  """

  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  min_p_B: jax.Array
  repetition_penalty_B: jax.Array
  presence_penalty_B: jax.Array
  frequency_penalty_B: jax.Array
  slot_B: jax.Array
  use_bias_B: jax.Array
  ban_stop_B: jax.Array
  use_mask_B: jax.Array
  logprobs_B: jax.Array
  seed_B: jax.Array
  position_B: jax.Array


@_dataclass
@dataclasses.dataclass
class SlotState:
  """Per-request sampling state on the device, one row per slot plus a last all-zero null row.

  prompt_RV: 1 where the token occurs in the prompt. counts_RV: times the token was generated.
  bias_ids_RJ / bias_vals_RJ: the logit-bias table (padding entries add 0 to token 0).
  bias_stop_RJ: entries that ban a stop token (-inf) only while `min_tokens` is not reached.
  """

  prompt_RV: jax.Array
  counts_RV: jax.Array
  bias_ids_RJ: jax.Array
  bias_vals_RJ: jax.Array
  bias_stop_RJ: jax.Array

  @classmethod
  def zeros(cls, num_slots: int, vocab: int, table_size: int) -> "SlotState":
    rows = num_slots + 1
    return cls(prompt_RV=jnp.zeros((rows, vocab), jnp.uint8), counts_RV=jnp.zeros((rows, vocab), jnp.int32),
               bias_ids_RJ=jnp.zeros((rows, table_size), jnp.int32),
               bias_vals_RJ=jnp.zeros((rows, table_size), jnp.float32),
               bias_stop_RJ=jnp.zeros((rows, table_size), jnp.bool_))


@_dataclass
@dataclasses.dataclass
class SamplerOutput:
  """tokens_B: sampled ids. logprob_B: their raw log-probability. top_ids_BA / top_logprobs_BA: the
  MAX_LOGPROBS most likely tokens of the raw distribution. The last three are zeros in rows that did
  not ask for logprobs."""

  tokens_B: jax.Array
  logprob_B: jax.Array
  top_ids_BA: jax.Array
  top_logprobs_BA: jax.Array


def write_slots(state: SlotState, slots_B, prompt_BV, counts_BV, bias_ids_BJ, bias_vals_BJ, bias_stop_BJ):
  """Overwrites whole slot rows (a request arriving or restarting). Out-of-range slots are dropped."""
  def put(table, rows):
    return table.at[slots_B].set(rows, mode="drop")

  return SlotState(prompt_RV=put(state.prompt_RV, prompt_BV), counts_RV=put(state.counts_RV, counts_BV),
                   bias_ids_RJ=put(state.bias_ids_RJ, bias_ids_BJ), bias_vals_RJ=put(state.bias_vals_RJ, bias_vals_BJ),
                   bias_stop_RJ=put(state.bias_stop_RJ, bias_stop_BJ))


def record_tokens(state: SlotState, prompt_slot_T, output_slot_T, token_ids_T) -> SlotState:
  """Adds a step's input tokens to their slots: prompt tokens to the prompt mask, generated ones to the counts.

  A slot index past the table (the host's "not tracked") drops the token. The token sampled in
  step t is an input of step t+1, before that step samples, so the counts are always current.
  """
  prompt_RV = state.prompt_RV.at[prompt_slot_T, token_ids_T].max(jnp.uint8(1), mode="drop")
  counts_RV = state.counts_RV.at[output_slot_T, token_ids_T].add(1, mode="drop")
  return dataclasses.replace(state, prompt_RV=prompt_RV, counts_RV=counts_RV)


# --- the stages ----------------------------------------------------------------------------------
def apply_bitmask(logits_BV, mask_BW, use_mask_B):
  """-inf where the row's bitmask (bit i of word i // 32 is token i) disallows the token."""
  batch, vocab = logits_BV.shape
  bits_BWI = (mask_BW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
  allowed_BV = bits_BWI.reshape(batch, -1)[:, :vocab] == 1
  return jnp.where(allowed_BV | ~use_mask_B[:, None], logits_BV, _NEG_INF)


def apply_bias(logits_BV, s: SamplingInputs, state: SlotState):
  ids_BJ = state.bias_ids_RJ[s.slot_B]
  vals_BJ = jnp.where(state.bias_stop_RJ[s.slot_B] & ~s.ban_stop_B[:, None], 0.0, state.bias_vals_RJ[s.slot_B])
  vals_BJ = jnp.where(s.use_bias_B[:, None], vals_BJ, 0.0)
  rows_B1 = jnp.arange(logits_BV.shape[0], dtype=jnp.int32)[:, None]
  return logits_BV.at[rows_B1, ids_BJ].add(vals_BJ)


def apply_penalties(logits_BV, s: SamplingInputs, state: SlotState):
  """vLLM's (and, for the repetition penalty, transformers') definitions.

  Repetition: a logit of a token seen in the prompt or the output is divided by the penalty if
  positive, multiplied if not. Frequency and presence: minus penalty x output count, minus penalty
  if the output contains the token.
  """
  counts_BV = state.counts_RV[s.slot_B]
  in_output_BV = counts_BV > 0
  seen_BV = in_output_BV | (state.prompt_RV[s.slot_B] > 0)
  rep_BV = jnp.where(seen_BV, s.repetition_penalty_B[:, None], 1.0)
  logits_BV = jnp.where(logits_BV > 0, logits_BV / rep_BV, logits_BV * rep_BV)
  logits_BV -= s.frequency_penalty_B[:, None] * counts_BV.astype(jnp.float32)
  return logits_BV - s.presence_penalty_B[:, None] * in_output_BV.astype(jnp.float32)


def _mix32(h):
  """murmur3's finalizer: a bijection of uint32 in which every input bit flips each output bit at ~1/2."""
  h ^= h >> 16
  h *= jnp.uint32(0x85EBCA6B)
  h ^= h >> 13
  h *= jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def gumbel_noise(seed_B, position_B, vocab: int):
  """[B, V] standard Gumbel noise, a function of (seed, position, token id) only."""
  row_key_B = _mix32(_mix32(seed_B.astype(jnp.uint32)) ^ position_B.astype(jnp.uint32))
  key2_B = _mix32(row_key_B ^ jnp.uint32(0x5BD1E995))
  token_V = jnp.arange(vocab, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
  h_BV = _mix32(_mix32(token_V[None, :] + row_key_B[:, None]) ^ key2_B[:, None])
  # 24 bits to a float strictly inside (0, 1): the tail beyond is cut at Gumbel 17.3 (p ~ 3e-8).
  u_BV = ((h_BV >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
  return -jnp.log(-jnp.log(u_BV))


# --- the draw ------------------------------------------------------------------------------------
def _draw(x_BV, t_B, s: SamplingInputs, greedy_B, noise: bool = True):
  """Argmax for greedy rows, Gumbel-max for the others, of the scaled logits x_BV at or above t_B (None: all).

  One read of x_BV: the noise is computed inline from the token index, never stored.
  """
  key_BV = x_BV
  if noise:
    key_BV = jnp.where(greedy_B[:, None], x_BV, x_BV + gumbel_noise(s.seed_B, s.position_B, x_BV.shape[1]))
  if t_B is not None:
    key_BV = jnp.where(x_BV >= t_B[:, None], key_BV, _NEG_INF)
  return jnp.argmax(key_BV, axis=-1).astype(jnp.int32)


def _inv_temperature(s: SamplingInputs, greedy_B):
  """1 / temperature (1 for greedy rows). The logits are multiplied by it rather than divided by T:
  each read of the scaled logits (thresholds, draw) must give the same float, and one multiply by a
  shared factor leaves no room for the compiler to round differently in different fusions. (XLA on
  the CPU compiled the earlier x / T into this multiply already: the tokens are the same.)"""
  return 1.0 / jnp.where(greedy_B, 1.0, s.temperature_B)


def _finish(base_BV, s: SamplingInputs, mask_BW, greedy_B, filtered_B, apply_mask, chunk, num_chunks):
  """Temperature, min-p / top-k / top-p (unless filtered_B is None) and the draw, on the processed
  logits base_BV (masked here if apply_mask).

  The scaled (and masked) logits stay an expression of base_BV, recomputed in each read; the
  thresholds are [B] numbers, not a filtered copy of the logits.
  """
  inv_temperature_B = _inv_temperature(s, greedy_B)

  def scale(b_BV):
    if apply_mask:
      b_BV = apply_bitmask(b_BV, mask_BW, s.use_mask_B)
    return b_BV * inv_temperature_B[:, None]

  t_B = None
  if filtered_B is not None:
    off_B = ~filtered_B
    t_B = cut_thresholds(base_BV, jnp.where(off_B, 0, s.top_k_B), jnp.where(off_B, 1.0, s.top_p_B),
                         jnp.where(off_B, 0.0, s.min_p_B), scale=scale, chunk=chunk, num_chunks=num_chunks)
  return _draw(scale(base_BV), t_B, s, greedy_B)


def _staged(logits_BV, s: SamplingInputs, state: SlotState, mask_BW, greedy_B, filtered_B, penalized_B, *,
            rewrite: bool, cut: bool, chunk, num_chunks):
  """A batch that uses an optional stage: (tokens, chosen logprob, top ids, top logprobs).

  rewrite: some row has a logit bias or penalties. cut: some row has min-p, top-k or top-p.
  """
  raw_BV = logits_BV.astype(jnp.float32)
  if rewrite:
    # Bias (a scatter) and penalties (a read of the slots' counts) are applied once, into one new
    # array. Rows without penalties read the all-zero null slot, which stays in cache. The bias
    # goes in before the mask: a masked logit stays -inf either way (biases are finite or -inf),
    # and the mask then fuses with the penalties instead of needing a copy of its own.
    null_slot = state.counts_RV.shape[0] - 1
    x_BV = apply_bitmask(apply_bias(raw_BV, s, state), mask_BW, s.use_mask_B)
    x_BV = apply_penalties(x_BV, dataclasses.replace(s, slot_B=jnp.where(penalized_B, s.slot_B, null_slot)), state)
    base_BV, apply_mask = jax.lax.optimization_barrier(x_BV), False
  else:
    base_BV, apply_mask = raw_BV, True
  tokens_B = _finish(base_BV, s, mask_BW, greedy_B, filtered_B if cut else None, apply_mask, chunk, num_chunks)
  return tokens_B, *_logprobs(logits_BV, tokens_B, s, chunk)


def _logprobs(logits_BV, tokens_B, s: SamplingInputs, chunk):
  """(chosen token's log-probability [B], top ids [B, A], top log-probabilities [B, A]) of the raw
  logits where some row asked for them, zeros otherwise. Two reads of the logits, under a cond whose
  operand is the logits as given (a converted copy would be one more [B, V] array written)."""
  batch, vocab = logits_BV.shape
  num = min(MAX_LOGPROBS, vocab)

  def terms(logits_BV):
    raw_BV = logits_BV.astype(jnp.float32)
    max_B, log_sum_B, ids_BA, top_BA = log_softmax_terms(raw_BV, chunk)
    chosen_B = jnp.take_along_axis(raw_BV, tokens_B[:, None], axis=1)[:, 0]
    # log_softmax's arithmetic: (x - max) - log(sum(exp(x - max))).
    return (chosen_B - max_B) - log_sum_B, ids_BA, (top_BA - max_B[:, None]) - log_sum_B[:, None]

  zeros = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, num), jnp.int32), jnp.zeros((batch, num), jnp.float32))
  return jax.lax.cond(jnp.any(s.logprobs_B), terms, lambda x: zeros, logits_BV)


PLAIN, STAGED = "plain", "staged"  # the paths a host may choose for a batch (see `sample`)


def _row_stages(s: SamplingInputs):
  """Per row: (greedy, filtered by min-p / top-k / top-p, penalized, uses any optional stage). Plain
  array operators, so the host (numpy) and the step (jax) take the same test."""
  greedy_B = s.temperature_B <= 0
  filtered_B = ~greedy_B & ((s.top_k_B > 0) | (s.top_p_B < 1) | (s.min_p_B > 0))
  penalized_B = (s.repetition_penalty_B != 1) | (s.presence_penalty_B != 0) | (s.frequency_penalty_B != 0)
  staged_B = s.use_mask_B | s.use_bias_B | penalized_B | filtered_B | s.logprobs_B
  return greedy_B, filtered_B, penalized_B, staged_B


def host_path(s: SamplingInputs) -> str:
  """The path `sample` takes for these (host, numpy) parameters: STAGED when some row uses an optional
  stage (grammar mask, logit bias or stop ban, penalties, min-p / top-k / top-p, logprobs), else PLAIN."""
  return STAGED if _row_stages(s)[3].any() else PLAIN


def request_path(params, constrained: bool = False) -> str:
  """`host_path` of one request's row, from its SamplingParams (min_tokens bans stop tokens through
  the bias table)."""
  filtered = params.temperature > 0 and (params.top_k > 0 or params.top_p < 1 or params.min_p > 0)
  penalized = params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0
  staged = (constrained or filtered or penalized or bool(params.logit_bias) or params.min_tokens > 0
            or params.logprobs is not None)
  return STAGED if staged else PLAIN


def sample(logits_BV, s: SamplingInputs, state: SlotState, mask_BW, *, path: str | None = None,
           chunk: int = SHORTLIST_CHUNK, num_chunks: int = SHORTLIST_CHUNKS) -> SamplerOutput:
  """Samples one token per sequence. mask_BW: grammar bitmask words, read where use_mask_B.

  path: None: one program for every batch, the path picked on the device by one `lax.switch`.
  PLAIN or STAGED: the host picked it (`host_path`), a program per path. On a GPU the switch copies
  its predicate to the host and waits for the device, so a step that holds one cannot be queued
  behind the step before it: the engine compiles both paths there, and a batch of greedy and
  temperature rows runs with no conditional at all.
  """
  batch, vocab = logits_BV.shape
  greedy_B, filtered_B, penalized_B, staged_B = _row_stages(s)
  num = min(MAX_LOGPROBS, vocab)

  def plain(logits_BV, noise):
    # Greedy and temperature only (no noise at all when every row is greedy): one read.
    raw_BV = logits_BV.astype(jnp.float32)
    tokens_B = _draw(raw_BV * _inv_temperature(s, greedy_B)[:, None], None, s, greedy_B, noise)
    return tokens_B, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, num), jnp.int32), jnp.zeros(
        (batch, num), jnp.float32)

  # One switch picks the path, so a batch pays one cond for the choice (on a GPU each executed cond
  # copies its predicate to the host and waits for the device). Every branch takes the logits as
  # given and returns [B] or [B, A] arrays: a [B, V] output would be a copy.
  rewrite, cut = jnp.any(s.use_bias_B | penalized_B), jnp.any(filtered_B)
  staged_paths = [functools.partial(_staged, s=s, state=state, mask_BW=mask_BW, greedy_B=greedy_B,
                                    filtered_B=filtered_B, penalized_B=penalized_B, rewrite=rewrite_, cut=cut_,
                                    chunk=chunk, num_chunks=num_chunks)
                  for rewrite_ in (False, True) for cut_ in (False, True)]
  staged_index = 2 * rewrite.astype(jnp.int32) + cut.astype(jnp.int32)
  if path == PLAIN:
    # Greedy rows skip the noise inside `_draw`; computing it for the others is a few integer
    # operations per logit in the same read.
    tokens_B, logprob_B, ids_BA, top_BA = plain(logits_BV, noise=True)
  elif path == STAGED:
    tokens_B, logprob_B, ids_BA, top_BA = jax.lax.switch(staged_index, staged_paths, logits_BV)
  elif path is None:
    index = jnp.where(jnp.any(staged_B), 2 + staged_index, jnp.any(~greedy_B).astype(jnp.int32))
    paths = [functools.partial(plain, noise=False), functools.partial(plain, noise=True)] + staged_paths
    tokens_B, logprob_B, ids_BA, top_BA = jax.lax.switch(index, paths, logits_BV)
  else:
    raise ValueError(f"path={path!r}: use None, {PLAIN!r} or {STAGED!r}")
  asked_B = s.logprobs_B
  return SamplerOutput(tokens_B=tokens_B, logprob_B=jnp.where(asked_B, logprob_B, 0.0),
                       top_ids_BA=jnp.where(asked_B[:, None], ids_BA, 0),
                       top_logprobs_BA=jnp.where(asked_B[:, None], top_BA, 0.0))


@functools.partial(jax.jit, static_argnames=("path", "chunk", "num_chunks"))
def sample_jit(logits_BV, s: SamplingInputs, state: SlotState, mask_BW, path: str | None = None,
               chunk: int = SHORTLIST_CHUNK, num_chunks: int = SHORTLIST_CHUNKS):
  """`sample` as its own program, for tests and benchmarks (the engine's step inlines `sample`)."""
  return sample(logits_BV, s, state, mask_BW, path=path, chunk=chunk, num_chunks=num_chunks)

"""Token sampling inside the jit-compiled step, with per-sequence parameter arrays.

No parameter value triggers a compile: every parameter is an array with one
entry per sequence, and each optional stage (grammar mask, logit bias,
penalties, top-k/top-p/min-p filtering, top logprobs) sits under a
`lax.cond` that skips it when no sequence of the batch uses it.

The order of the stages is vLLM's: grammar mask, logit bias (and the ban on
stop tokens before `min_tokens`), repetition/presence/frequency penalties,
then greedy argmax or temperature, min-p, top-k, top-p (each filter applied to
what the previous left) and a draw. Reported log-probabilities are those of the
raw logits, before any of it (vLLM's default).

Draws are Gumbel-max: the token is the argmax of the filtered logits plus
Gumbel noise. The noise of a token is a hash of (seed, position, token id), so
the same request gives the same tokens whatever else shares its batch, on any
backend. A counter hash rather than `jax.random`: it is the same integer
arithmetic everywhere, fuses into the argmax, and costs a few integer
operations per logit instead of threefry's twenty rounds.

Filtering needs per-row thresholds (the k-th largest logit, the smallest logit
of the top-p nucleus). A full sort of [256, 128k] costs 2.2 ms on an H200, so
rows are first resolved from a shortlist: the row is cut into chunks of 16
tokens, the 256 chunks with the largest maxima are gathered and their 4096
tokens sorted. Every token outside them is at most `bound` (the 257th largest
chunk maximum), so shortlist entries above `bound` are the exact head of the
sorted row (at least 256 tokens). When some row's threshold lies below that head
(a flat distribution under a wide top-p, or a large top_k), the batch falls back
to the full sort; both paths give the same thresholds. (A first version took
the top 16 of each 2048-token chunk with `lax.top_k`; on the H200 that cost
1.9 ms, nearly a full sort: see docs/benchmarks/sampler.md.)

A batch that uses none of the optional stages (greedy and temperature only,
the common case) takes one fused pass over the logits.

Per-request state that outlives a step (penalty counts, logit-bias tables)
lives on the device in `SlotState`, one row per slot; the runner assigns slots
and writes a slot once when its request arrives (`write_slots`), and every step
adds the step's input tokens to the counts (`record_tokens`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20
SHORTLIST_CHUNK = 16  # tokens per chunk: the chunk maxima take one read of the logits
SHORTLIST_CHUNKS = 256  # best chunks gathered into the shortlist: its exact head has >= 256 tokens

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
  """tokens_B: sampled ids. logprob_B: their raw log-probability. top_ids_BA / top_logprobs_BA:
  the MAX_LOGPROBS most likely tokens of the raw distribution (zeros where not asked for)."""

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


# --- thresholds for min-p, top-k and top-p -------------------------------------------------------
def shortlist(x_BV, chunk: int = SHORTLIST_CHUNK, num_chunks: int = SHORTLIST_CHUNKS):
  """The row's largest values, sorted descending, with their ids, and a bound no other value exceeds.

  Entries above the bound are exactly the head of the sorted row. A bound of -inf means every
  value left out is -inf.
  """
  batch, vocab = x_BV.shape
  total_chunks = -(-vocab // chunk)
  x_BUY = jnp.pad(x_BV, ((0, 0), (0, total_chunks * chunk - vocab)), constant_values=_NEG_INF).reshape(
      batch, total_chunks, chunk)
  offsets_Y = jnp.arange(chunk, dtype=jnp.int32)
  if num_chunks >= total_chunks:
    cand_BUY, ids_BUY = x_BUY, jnp.arange(total_chunks, dtype=jnp.int32)[:, None] * chunk + offsets_Y
    ids_BUY = jnp.broadcast_to(ids_BUY, x_BUY.shape)
    bound_B = jnp.full((batch,), _NEG_INF)
  else:
    best_BU, chunk_ids_BU = jax.lax.top_k(jnp.max(x_BUY, axis=2), num_chunks + 1)
    bound_B = best_BU[:, -1]
    chunk_ids_BU = chunk_ids_BU[:, :-1]
    cand_BUY = jnp.take_along_axis(x_BUY, chunk_ids_BU[:, :, None], axis=1)
    ids_BUY = chunk_ids_BU[:, :, None] * chunk + offsets_Y
  neg_BM, ids_BM = jax.lax.sort((-cand_BUY.reshape(batch, -1), ids_BUY.reshape(batch, -1)), num_keys=1)
  return -neg_BM, ids_BM, bound_B


def thresholds(x_BV, v_BM, bound_B, top_k_B, top_p_B, min_p_B):
  """Per-row smallest kept value after min-p, then top-k, then top-p; and whether `v_BM` settled it.

  x_BV: the (temperature-scaled) logits. v_BM: the head of each row sorted descending, exact where
  above bound_B (all of it where bound_B is -inf). Ties at a threshold are all kept.
  """
  num = v_BM.shape[1]
  exact_BM = (v_BM > bound_B[:, None]) | (bound_B == _NEG_INF)[:, None]
  num_exact_B = jnp.sum(exact_BM, axis=1)
  max_B = v_BM[:, 0]
  t_min_p_B = jnp.where(min_p_B > 0, max_B + jnp.log(jnp.maximum(min_p_B, 1e-30)), _NEG_INF)
  k_known_B = (top_k_B > 0) & (top_k_B <= num_exact_B)
  kth_B = jnp.take_along_axis(v_BM, jnp.clip(top_k_B - 1, 0, num - 1)[:, None], axis=1)[:, 0]
  t1_B = jnp.maximum(t_min_p_B, jnp.where(k_known_B, kth_B, _NEG_INF))
  # min-p alone keeps fewer than top_k tokens when its survivors are all inside the exact head.
  k_ok_B = (top_k_B <= 0) | k_known_B | (t_min_p_B > bound_B)

  # top-p on what min-p and top-k left, renormalized: keep while the mass ranked before is < p.
  mass_B = jnp.sum(jnp.where(x_BV >= t1_B[:, None], jnp.exp(x_BV - max_B[:, None]), 0.0), axis=1)
  in_s1_BM = (v_BM >= t1_B[:, None]) & exact_BM
  p_BM = jnp.where(in_s1_BM, jnp.exp(v_BM - max_B[:, None]), 0.0)
  before_BM = jnp.cumsum(p_BM, axis=1) - p_BM
  kept_BM = in_s1_BM & (before_BM < (top_p_B * mass_B)[:, None])
  kept_BM = kept_BM.at[:, 0].set(True)
  num_kept_B = jnp.sum(kept_BM, axis=1)
  t_p_B = jnp.take_along_axis(v_BM, (num_kept_B - 1)[:, None], axis=1)[:, 0]
  p_ok_B = (top_p_B >= 1) | (num_kept_B < jnp.sum(in_s1_BM, axis=1)) | (t1_B > bound_B)
  t_B = jnp.where(top_p_B < 1, t_p_B, t1_B)
  return t_B, k_ok_B & p_ok_B


def filter_logits(x_BV, top_k_B, top_p_B, min_p_B, chunk: int = SHORTLIST_CHUNK,
                  num_chunks: int = SHORTLIST_CHUNKS):
  """x_BV with -inf below each row's min-p / top-k / top-p threshold."""
  v_BM, _, bound_B = shortlist(x_BV, chunk, num_chunks)
  t_B, ok_B = thresholds(x_BV, v_BM, bound_B, top_k_B, top_p_B, min_p_B)

  def full_sort(x_BV):
    v_BV = -jnp.sort(-x_BV, axis=-1)
    return thresholds(x_BV, v_BV, jnp.full(x_BV.shape[:1], _NEG_INF), top_k_B, top_p_B, min_p_B)[0]

  t_B = jax.lax.cond(jnp.all(ok_B), lambda x: t_B, full_sort, x_BV)
  return jnp.where(x_BV >= t_B[:, None], x_BV, _NEG_INF)


def top_logprobs(logprobs_BV, chunk: int = SHORTLIST_CHUNK, num_chunks: int = SHORTLIST_CHUNKS):
  """The MAX_LOGPROBS largest entries of each row: (ids [B, A], values [B, A])."""
  num = min(MAX_LOGPROBS, logprobs_BV.shape[1])
  vals_BM, ids_BM, bound_B = shortlist(logprobs_BV, chunk, num_chunks)
  if vals_BM.shape[1] < num:
    vals_BA, ids_BA = jax.lax.top_k(logprobs_BV, num)
    return ids_BA, vals_BA
  exact_B = (vals_BM[:, num - 1] > bound_B) | (bound_B == _NEG_INF)

  def exact_top_k(x_BV):
    vals_BA, ids_BA = jax.lax.top_k(x_BV, num)
    return ids_BA, vals_BA

  return jax.lax.cond(jnp.all(exact_B), lambda x: (ids_BM[:, :num], vals_BM[:, :num]), exact_top_k, logprobs_BV)


# --- the sampler ---------------------------------------------------------------------------------
def _maybe(pred, fn, x):
  return jax.lax.cond(pred, fn, lambda x: x, x)


def _draw(scaled_BV, s: SamplingInputs, greedy_B):
  """Argmax for greedy rows, Gumbel-max for the others, of logits already divided by the temperature."""
  def noisy(x_BV):
    noise_BV = gumbel_noise(s.seed_B, s.position_B, x_BV.shape[1])
    return jnp.argmax(jnp.where(greedy_B[:, None], x_BV, x_BV + noise_BV), axis=-1)

  tokens_B = jax.lax.cond(jnp.all(greedy_B), lambda x: jnp.argmax(x, axis=-1), noisy, scaled_BV)
  return tokens_B.astype(jnp.int32)


def _scale(x_BV, s: SamplingInputs, greedy_B):
  return x_BV / jnp.where(greedy_B, 1.0, s.temperature_B)[:, None]


def _process(raw_BV, s: SamplingInputs, state: SlotState, mask_BW, greedy_B, filtered_B, chunk, num_chunks):
  """The optional stages, then the draw."""
  x_BV = _maybe(jnp.any(s.use_mask_B), lambda x: apply_bitmask(x, mask_BW, s.use_mask_B), raw_BV)
  x_BV = _maybe(jnp.any(s.use_bias_B), lambda x: apply_bias(x, s, state), x_BV)
  penalized_B = (s.repetition_penalty_B != 1) | (s.presence_penalty_B != 0) | (s.frequency_penalty_B != 0)
  x_BV = _maybe(jnp.any(penalized_B), lambda x: apply_penalties(x, s, state), x_BV)
  off_B = ~filtered_B
  x_BV = _maybe(jnp.any(filtered_B), lambda x: filter_logits(
      x, jnp.where(off_B, 0, s.top_k_B), jnp.where(off_B, 1.0, s.top_p_B), jnp.where(off_B, 0.0, s.min_p_B),
      chunk, num_chunks), _scale(x_BV, s, greedy_B))
  return _draw(x_BV, s, greedy_B)


def sample(logits_BV, s: SamplingInputs, state: SlotState, mask_BW, *, chunk: int = SHORTLIST_CHUNK,
           num_chunks: int = SHORTLIST_CHUNKS) -> SamplerOutput:
  """Samples one token per sequence. mask_BW: grammar bitmask words, read where use_mask_B."""
  raw_BV = logits_BV.astype(jnp.float32)
  batch, vocab = raw_BV.shape
  greedy_B = s.temperature_B <= 0
  filtered_B = ~greedy_B & ((s.top_k_B > 0) | (s.top_p_B < 1) | (s.min_p_B > 0))
  penalized_B = (s.repetition_penalty_B != 1) | (s.presence_penalty_B != 0) | (s.frequency_penalty_B != 0)
  optional = jnp.any(s.use_mask_B | s.use_bias_B | penalized_B | filtered_B)
  # Without optional stages the draw reads the raw logits once; each stage's cond would copy them.
  tokens_B = jax.lax.cond(
      optional, lambda x: _process(x, s, state, mask_BW, greedy_B, filtered_B, chunk, num_chunks),
      lambda x: _draw(_scale(x, s, greedy_B), s, greedy_B), raw_BV)

  def logprobs(raw_BV):
    logprobs_BV = jax.nn.log_softmax(raw_BV, axis=-1)
    chosen_B = jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
    ids_BA, vals_BA = top_logprobs(logprobs_BV, chunk, num_chunks)
    return chosen_B, ids_BA, vals_BA

  num = min(MAX_LOGPROBS, vocab)
  zeros = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, num), jnp.int32), jnp.zeros((batch, num), jnp.float32))
  chosen_B, ids_BA, vals_BA = jax.lax.cond(jnp.any(s.logprobs_B), logprobs, lambda x: zeros, raw_BV)
  return SamplerOutput(tokens_B=tokens_B, logprob_B=chosen_B, top_ids_BA=ids_BA, top_logprobs_BA=vals_BA)


@functools.partial(jax.jit, static_argnames=("chunk", "num_chunks"))
def sample_jit(logits_BV, s: SamplingInputs, state: SlotState, mask_BW, chunk: int = SHORTLIST_CHUNK,
               num_chunks: int = SHORTLIST_CHUNKS):
  """`sample` as its own program, for tests and benchmarks (the engine's step inlines `sample`)."""
  return sample(logits_BV, s, state, mask_BW, chunk=chunk, num_chunks=num_chunks)

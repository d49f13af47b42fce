"""Token sampling inside the jit-compiled step, with per-sequence parameter arrays.

No parameter value triggers a compile: temperature, top-k, top-p and min-p are
arrays with one entry per sequence. The random stream of a sequence depends only
on its seed and the position of the token being sampled, so a request draws the
same tokens whatever else shares its batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature_B", "top_k_B", "top_p_B", "min_p_B", "seed_B", "position_B"],
                   meta_fields=[])
@dataclasses.dataclass
class SamplingInputs:
  """Per-sequence sampling parameters, padded to the step's sequence bucket.

  temperature_B: 0 means greedy. top_k_B: 0 disables. top_p_B: 1 disables.
  min_p_B: 0 disables. seed_B: int32 seed. position_B: position of the token sampled.
  """

  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  min_p_B: jax.Array
  seed_B: jax.Array
  position_B: jax.Array


def _filter_mask(probs_BV, top_k_B, top_p_B, min_p_B):
  """True where a token survives top-k, top-p and min-p, each applied to the same distribution."""
  vocab = probs_BV.shape[-1]
  sorted_BV = -jnp.sort(-probs_BV, axis=-1)
  rank_V = jnp.arange(vocab, dtype=jnp.int32)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
  # A token at rank r is kept by top-p if the mass ranked strictly before it is below top_p.
  mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
  keep_sorted_BV = (rank_V[None, :] < k_B[:, None]) & (mass_before_BV < top_p_B[:, None])
  keep_sorted_BV &= sorted_BV >= min_p_B[:, None] * sorted_BV[:, :1]
  keep_sorted_BV = keep_sorted_BV.at[:, 0].set(True)
  # The smallest kept probability is the row's threshold.
  threshold_B = jnp.min(jnp.where(keep_sorted_BV, sorted_BV, jnp.inf), axis=-1)
  return probs_BV >= threshold_B[:, None]


def sample(logits_BV, s: SamplingInputs):
  """Returns sampled token ids [B] int32 and their log-probabilities under the raw logits [B]."""
  logits_BV = logits_BV.astype(jnp.float32)
  greedy_B = s.temperature_B <= 0
  scaled_BV = logits_BV / jnp.where(greedy_B, 1.0, s.temperature_B)[:, None]
  needs_filter = jnp.any((s.top_k_B > 0) | (s.top_p_B < 1) | (s.min_p_B > 0))

  def filtered(scaled_BV):
    keep_BV = _filter_mask(jax.nn.softmax(scaled_BV, axis=-1), s.top_k_B, s.top_p_B, s.min_p_B)
    return jnp.where(keep_BV, scaled_BV, -jnp.inf)

  # The sort is the sampler's dearest part; skip it when no sequence filters.
  scaled_BV = jax.lax.cond(needs_filter, filtered, lambda x: x, scaled_BV)

  def gumbel(seed, position):
    key = jax.random.fold_in(jax.random.key(seed.astype(jnp.uint32)), position)
    return jax.random.gumbel(key, (logits_BV.shape[-1],), dtype=jnp.float32)

  noise_BV = jax.vmap(gumbel)(s.seed_B, s.position_B)
  sampled_B = jnp.argmax(scaled_BV + noise_BV, axis=-1).astype(jnp.int32)
  tokens_B = jnp.where(greedy_B, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), sampled_B)
  logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  chosen_B = jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, chosen_B

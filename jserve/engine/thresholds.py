"""A row's largest values and its min-p / top-k / top-p thresholds, without sorting the row.

Filtering keeps the tokens at or above a per-row threshold: the k-th largest logit (top-k), the
smallest logit of the top-p nucleus, max + log(min_p) (min-p). A full sort of [256, 128k] costs
2.2 ms on an H200, forty reads of the logits, so thresholds come from two cheaper sources:

The shortlist (the common case). A plain reduction over the logits takes the maximum of every
16-token chunk; the 256 chunks with the largest maxima are gathered and their 4096 tokens sorted.
Every token outside them is at most `bound` (the 257th largest chunk maximum), so shortlist entries
above `bound` are exactly the head of the sorted row: at least 256 tokens, one per gathered chunk
(its maximum), fewer only where chunk maxima tie with the bound. A second plain reduction sums
exp(x - chunk max) per chunk, which gives the row's total probability mass: top-p alone needs no
further pass. A row is resolved from its head when its threshold lies inside the head.

Picking the 256 best of 8016 chunk maxima is a `top_k` with k = 257; XLA's GPU kernel for top_k
takes k <= 16 only, a larger k becomes a sort of the whole row, so the cost follows the row's
length. The chunks are therefore picked in two rounds over shorter rows (at 128k tokens): the 256
best of the 2004 maxima of 4-chunk groups, then the 256 best of the 1024 chunks of those groups.
The bound is the larger of the two rounds' 257th maxima: a chunk of another group is at most its
group's maximum, a chunk left in a chosen group at most the second round's. The chunks picked and
the bound are those of one round (ties aside): a chunk among the 256 best overall has at most 255
better chunks, so at most 255 other groups have a larger maximum, and its group is chosen. Larger
chunks would shorten the row as well (128 chunks of 32 tokens: 4008 maxima), but the guaranteed
head shrinks with the number of chunks gathered (to 128 tokens), and a top-k or a nucleus past
the head costs the search.

The search (rows the head does not resolve: a flat distribution under a wide top-p, a top-k past the
head). A threshold is the largest value c for which a monotone test holds: "at least k tokens >= c"
for top-k, "the mass of the tokens >= c is at least p times the mass kept by min-p and top-k" for
top-p. Float32 values map to uint32 keys in the same order, so the answer is found by a 16-ary
search over the keys: each pass tries 15 candidates at once (one read of the logits, one variadic
reduce with a sum per candidate) and keeps the sixteenth of the key range where the test flips;
after 8 passes the range is one key, an exact logit value. No sort, no gather, ~8 reads per search.

Both give the thresholds a full sort gives (`thresholds` on the whole sorted row), up to the order in
which float32 sums the probability mass. A row's result depends on that row only, not on which
other rows of the batch needed the search.
"""

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20
SHORTLIST_CHUNK = 16  # tokens per chunk: the chunk maxima take one read of the logits
SHORTLIST_CHUNKS = 256  # best chunks gathered into the shortlist: its exact head has >= 256 tokens
# Chunks per group of the first round that picks the best chunks: at 128k tokens, top_k runs over 2004
# group maxima, then over the 1024 chunks of the 256 best groups, instead of over 8016 chunk maxima.
SHORTLIST_GROUP = 4
# Top logprobs need only the 20 largest: 32 chunks (512 tokens) give an exact head of >= 32.
TOP_LOGPROBS_CHUNKS = 32
SEARCH_CANDIDATES = 15  # thresholds tried per pass: the key range shrinks 16-fold per read of the logits
SEARCH_PASSES = 8  # 16**8 = 2**32 keys: one float32 value is left

_NEG_INF = float("-inf")


# --- the shortlist ---------------------------------------------------------------------------------
def _chunked(x_BV, chunk):
  batch, vocab = x_BV.shape
  total = -(-vocab // chunk)
  padded_BV = jnp.pad(x_BV, ((0, 0), (0, total * chunk - vocab)), constant_values=_NEG_INF)
  return padded_BV.reshape(batch, total, chunk)


def _top_chunks(max_BU, num_chunks, group):
  """Ids of the num_chunks chunks with the largest maxima, and a bound no other chunk's maximum exceeds.

  In two rounds of top_k over shorter rows when there are more than num_chunks groups of `group`
  chunks (the module docstring says why the result is that of one round). Ids past the last chunk
  (the padding of the last group) have maximum -inf: one is taken only in place of an all -inf chunk.
  """
  batch, total = max_BU.shape
  num_groups = -(-total // group)
  if group <= 1 or num_groups <= num_chunks:
    best_BU, ids_BU = jax.lax.top_k(max_BU, num_chunks + 1)
    return ids_BU[:, :-1], best_BU[:, -1]
  padded_BU = jnp.pad(max_BU, ((0, 0), (0, num_groups * group - total)), constant_values=_NEG_INF)
  max_BOU = padded_BU.reshape(batch, num_groups, group)
  best_BO, group_ids_BO = jax.lax.top_k(jnp.max(max_BOU, axis=2), num_chunks + 1)
  group_ids_BO = group_ids_BO[:, :-1]
  in_best_BU = jnp.take_along_axis(max_BOU, group_ids_BO[:, :, None], axis=1).reshape(batch, -1)
  best_BU, at_BU = jax.lax.top_k(in_best_BU, num_chunks + 1)
  at_BU = at_BU[:, :-1]
  ids_BU = jnp.take_along_axis(group_ids_BO, at_BU // group, axis=1) * group + at_BU % group
  return ids_BU, jnp.maximum(best_BO[:, -1], best_BU[:, -1])


def _best_chunks(x_BUY, max_BU, num_chunks, group=SHORTLIST_GROUP):
  """The num_chunks chunks with the largest maxima (flattened), their token ids, and the next chunk maximum."""
  batch, total, chunk = x_BUY.shape
  offsets_Y = jnp.arange(chunk, dtype=jnp.int32)
  if num_chunks >= total:
    ids_BUY = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32)[:, None] * chunk + offsets_Y, x_BUY.shape)
    return x_BUY.reshape(batch, -1), ids_BUY.reshape(batch, -1), jnp.full((batch,), _NEG_INF, jnp.float32)
  chunk_ids_BU, bound_B = _top_chunks(max_BU, num_chunks, group)
  # A padding chunk (id past the last) is all -inf.
  cand_BUY = jnp.take_along_axis(x_BUY, chunk_ids_BU[:, :, None], axis=1, mode="fill", fill_value=_NEG_INF)
  ids_BUY = chunk_ids_BU[:, :, None] * chunk + offsets_Y
  return cand_BUY.reshape(batch, -1), ids_BUY.reshape(batch, -1), bound_B


def shortlist(x_BV, chunk: int = SHORTLIST_CHUNK, num_chunks: int = SHORTLIST_CHUNKS,
              group: int = SHORTLIST_GROUP):
  """The row's largest values, sorted descending (ties by id), with their ids, and a bound no other value exceeds.

  Entries above the bound are exactly the head of the sorted row. A bound of -inf means every
  value left out is -inf (-inf entries may then carry ids past the vocabulary: padding).
  """
  x_BUY = _chunked(x_BV, chunk)
  cand_BM, ids_BM, bound_B = _best_chunks(x_BUY, jnp.max(x_BUY, axis=2), num_chunks, group)
  neg_BM, ids_BM = jax.lax.sort((-cand_BM, ids_BM), num_keys=2)
  return -neg_BM, ids_BM, bound_B


def _sumexp(x_BUY, max_BU, axis: int):
  """sum(exp(x - max)) along `axis`, given max: 0 where max is -inf (every x -inf, e.g. padding or a grammar mask)."""
  # exp(-inf - -inf) would be nan; subtracting 0 there gives exp(-inf) = 0.
  shift_BU = jnp.where(max_BU > _NEG_INF, max_BU, 0.0)
  return jnp.sum(jnp.exp(x_BUY - jnp.expand_dims(shift_BU, axis)), axis=axis)


def max_and_sumexp(x_BUY, axis: int):
  """max(x) and sum(exp(x - max(x))) along `axis` (the sum is 0 where every x is -inf).

  Two plain reductions, each a read of x, rather than one variadic reduce with the online-softmax
  step: that reduce took 0.40 ms at [256, 128k] on an H200 where a plain read takes 0.044 ms (the
  two reductions are not yet measured on the GPU).
  """
  max_BU = jnp.max(x_BUY, axis=axis)
  return max_BU, _sumexp(x_BUY, max_BU, axis)


def _head(x_BV, chunk, num_chunks):
  """The shortlist's sorted values and bound, and the row's total mass sum(exp(x - max)), from two reads of x."""
  x_BUY = _chunked(x_BV, chunk)
  max_BU, sum_BU = max_and_sumexp(x_BUY, axis=2)
  cand_BM, _, bound_B = _best_chunks(x_BUY, max_BU, num_chunks)
  v_BM = -jnp.sort(-cand_BM, axis=1)
  rescaled_BU = sum_BU * jnp.exp(max_BU - v_BM[:, :1])
  total_B = jnp.sum(jnp.where(max_BU > _NEG_INF, rescaled_BU, 0.0), axis=1)
  return v_BM, bound_B, total_B


def _top_entries(x_BV, x_BUY, max_BU, num_chunks):
  """The MAX_LOGPROBS largest entries of each row of x_BV (chunked as x_BUY, chunk maxima max_BU)."""
  num = min(MAX_LOGPROBS, x_BV.shape[1])
  cand_BM, ids_BM, bound_B = _best_chunks(x_BUY, max_BU, num_chunks)
  neg_BM, ids_BM = jax.lax.sort((-cand_BM, ids_BM), num_keys=2)
  vals_BM = -neg_BM
  if vals_BM.shape[1] < num:
    vals_BA, ids_BA = jax.lax.top_k(x_BV, num)
    return ids_BA, vals_BA
  # A value tied with the bound may have a lower-id twin outside the shortlist: then ask top_k.
  exact_B = (vals_BM[:, num - 1] > bound_B) | (bound_B == _NEG_INF)

  def exact_top_k(x_BV):
    vals_BA, ids_BA = jax.lax.top_k(x_BV, num)
    return ids_BA, vals_BA

  return jax.lax.cond(jnp.all(exact_B), lambda x: (ids_BM[:, :num], vals_BM[:, :num]), exact_top_k, x_BV)


def top_logprobs(logprobs_BV, chunk: int = SHORTLIST_CHUNK, num_chunks: int = TOP_LOGPROBS_CHUNKS):
  """The MAX_LOGPROBS largest entries of each row, as (ids [B, A], values [B, A]); ties go to the lower id."""
  x_BUY = _chunked(logprobs_BV, chunk)
  return _top_entries(logprobs_BV, x_BUY, jnp.max(x_BUY, axis=2), num_chunks)


def log_softmax_terms(x_BV, chunk: int = SHORTLIST_CHUNK, num_chunks: int = TOP_LOGPROBS_CHUNKS):
  """From two reads of the logits (chunk maxima, chunk sums of exp): max_B, log_sum_B (log_softmax(x) =
  (x - max) - log_sum) and the ids and logits of the MAX_LOGPROBS largest (log_softmax is monotone: they
  are the top log-probabilities)."""
  x_BUY = _chunked(x_BV, chunk)
  max_BU, sum_BU = max_and_sumexp(x_BUY, axis=2)
  max_B = jnp.max(max_BU, axis=1)
  rescaled_BU = jnp.where(max_BU > _NEG_INF, sum_BU * jnp.exp(max_BU - max_B[:, None]), 0.0)
  ids_BA, top_BA = _top_entries(x_BV, x_BUY, max_BU, num_chunks)
  return max_B, jnp.log(jnp.sum(rescaled_BU, axis=1)), ids_BA, top_BA


# --- thresholds from a sorted head -----------------------------------------------------------------
def _head_thresholds(v_BM, bound_B, top_k_B, top_p_B, min_p_B, mass_fn):
  """(threshold, resolved, k-th largest, whether known) per row; see `thresholds`.

  mass_fn(t1_B, head_mass_B, s1_in_head_B) -> (mass of x >= t1, whether that mass is right).
  """
  num = v_BM.shape[1]
  all_exact_B = bound_B == _NEG_INF
  exact_BM = (v_BM > bound_B[:, None]) | all_exact_B[:, None]
  max_B = v_BM[:, 0]
  t_min_p_B = jnp.where(min_p_B > 0, max_B + jnp.log(jnp.maximum(min_p_B, 1e-30)), _NEG_INF)
  k_known_B = (top_k_B > 0) & (top_k_B <= jnp.sum(exact_BM, axis=1))
  kth_B = jnp.take_along_axis(v_BM, jnp.clip(top_k_B - 1, 0, num - 1)[:, None], axis=1)[:, 0]
  t1_B = jnp.maximum(t_min_p_B, jnp.where(k_known_B, kth_B, _NEG_INF))
  # min-p alone keeps fewer than top_k tokens when its survivors are all inside the exact head.
  k_ok_B = (top_k_B <= 0) | k_known_B | (t_min_p_B > bound_B)

  # top-p on what min-p and top-k left, renormalized: keep while the mass ranked before is < p.
  s1_in_head_B = (t1_B > bound_B) | all_exact_B
  in_s1_BM = (v_BM >= t1_B[:, None]) & exact_BM
  p_BM = jnp.where(in_s1_BM, jnp.exp(v_BM - max_B[:, None]), 0.0)
  mass_B, mass_ok_B = mass_fn(t1_B, jnp.sum(p_BM, axis=1), s1_in_head_B)
  before_BM = jnp.cumsum(p_BM, axis=1) - p_BM
  kept_BM = in_s1_BM & (before_BM < (top_p_B * mass_B)[:, None])
  kept_BM = kept_BM.at[:, 0].set(True)
  num_kept_B = jnp.sum(kept_BM, axis=1)
  t_p_B = jnp.take_along_axis(v_BM, (num_kept_B - 1)[:, None], axis=1)[:, 0]
  cut_in_head_B = (num_kept_B < jnp.sum(in_s1_BM, axis=1)) | s1_in_head_B
  p_ok_B = (top_p_B >= 1) | (mass_ok_B & cut_in_head_B)
  t_B = jnp.where(top_p_B < 1, t_p_B, t1_B)
  return t_B, k_ok_B & p_ok_B, kth_B, k_known_B


def thresholds(x_BV, v_BM, bound_B, top_k_B, top_p_B, min_p_B, total_B=None):
  """Per-row smallest kept value after min-p, then top-k, then top-p; and whether `v_BM` settled it.

  x_BV: the (temperature-scaled) logits. v_BM: the head of each row sorted descending, exact where
  above bound_B (all of it where bound_B is -inf). Ties at a threshold are all kept. total_B: the
  row's sum(exp(x - max)), from which top-p's mass is known without reading x when min-p and top-k
  keep everything or only head tokens; without it, the mass takes a pass over x_BV.
  """
  def mass_fn(t1_B, head_mass_B, s1_in_head_B):
    if total_B is None:
      e_BV = jnp.exp(x_BV - v_BM[:, :1])
      return jnp.sum(jnp.where(x_BV >= t1_B[:, None], e_BV, 0.0), axis=1), jnp.full(t1_B.shape, True)
    mass_B = jnp.where(s1_in_head_B, head_mass_B, total_B)
    return mass_B, s1_in_head_B | (t1_B == _NEG_INF)

  t_B, ok_B, _, _ = _head_thresholds(v_BM, bound_B, top_k_B, top_p_B, min_p_B, mass_fn)
  return t_B, ok_B


# --- the exact search ------------------------------------------------------------------------------
def _order_key(x):
  """float32 -> uint32 with the same order (-0.0 just below +0.0)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key):
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def masses_at(x_BV, w_BV, c_BZ):
  """sum(w where x >= c) for each row's candidates c: one read of x, one sum per candidate (a variadic reduce)."""
  num = c_BZ.shape[1]
  terms = tuple(jnp.where(x_BV >= c_BZ[:, z, None], w_BV, 0.0) for z in range(num))
  sums = jax.lax.reduce(terms, (jnp.float32(0),) * num, lambda a, b: tuple(p + q for p, q in zip(a, b)), (1,))
  return jnp.stack(sums, axis=1)


def _search(x_BV, weight_fn, target_fn, lo_B, hi_key_B):
  """The largest c in [lo, hi) with sum(w where x >= c) >= target, w = weight_fn(x): an exact value of x, or lo.

  The test is taken to hold at lo (where it does not, lo is the answer) and must fail at hi.
  target_fn(mass at lo) gives the target, read in the first pass (top-p's p x kept mass). The
  weights are computed inside the pass (as a loop input they would be one more [B, V] array). A
  fori_loop of static length: on the GPU no pass waits for the host.
  """
  steps_Z = jnp.arange(SEARCH_CANDIDATES + 1, dtype=jnp.uint32)

  def one_pass(i, carry):
    lo_B, hi_B, target_B, x_BV = carry
    # x rides in the carry through a barrier: to XLA it changes every pass, so the weights are not
    # hoisted out of the loop into one more [B, V] array that every pass would read.
    x_BV = jax.lax.optimization_barrier(x_BV)
    step_B = (hi_B - lo_B + SEARCH_CANDIDATES) // (SEARCH_CANDIDATES + 1)
    keys_BZ = jnp.minimum(lo_B[:, None] + step_B[:, None] * steps_Z, hi_B[:, None])
    mass_BZ = masses_at(x_BV, weight_fn(x_BV), _from_order_key(keys_BZ))
    target_B = jnp.where(i == 0, target_fn(mass_BZ[:, 0]), target_B)
    # The test is monotone in c, so it holds on a prefix of the candidates; candidate 0 is lo.
    holds_BZ = ((mass_BZ >= target_B[:, None]) & (keys_BZ < hi_B[:, None])).at[:, 0].set(True)
    ends_BZ = jnp.concatenate([keys_BZ, hi_B[:, None]], axis=1)
    num_B = jnp.sum(holds_BZ, axis=1)
    lo_B = jnp.take_along_axis(ends_BZ, (num_B - 1)[:, None], axis=1)[:, 0]
    hi_B = jnp.take_along_axis(ends_BZ, num_B[:, None], axis=1)[:, 0]
    return lo_B, hi_B, target_B, x_BV

  carry = (_order_key(lo_B), hi_key_B, jnp.zeros(lo_B.shape, jnp.float32), x_BV)
  lo_B, _, _, _ = jax.lax.fori_loop(0, SEARCH_PASSES, one_pass, carry)
  return _from_order_key(lo_B)


def _search_thresholds(x_BV, max_B, top_k_B, top_p_B, min_p_B, kth_B, k_known_B):
  """`thresholds` of every row by the search; kth_B is used where k_known_B."""
  hi_key_B = _order_key(max_B) + 1
  t_min_p_B = jnp.where(min_p_B > 0, max_B + jnp.log(jnp.maximum(min_p_B, 1e-30)), _NEG_INF)
  need_k_B = (top_k_B > 0) & ~k_known_B
  lowest_B = jnp.full(max_B.shape, _NEG_INF, jnp.float32)

  def search_k(x_BV):
    k_B = top_k_B.astype(jnp.float32)
    return _search(x_BV, jnp.ones_like, lambda _: k_B, lowest_B, hi_key_B)

  t_k_B = jax.lax.cond(jnp.any(need_k_B), search_k, lambda x: lowest_B, x_BV)
  t_k_B = jnp.where(k_known_B, kth_B, jnp.where(top_k_B > 0, t_k_B, _NEG_INF))
  t1_B = jnp.maximum(t_min_p_B, t_k_B)

  def search_p(x_BV):
    return _search(x_BV, lambda x: jnp.exp(x - max_B[:, None]), lambda mass_B: top_p_B * mass_B, t1_B, hi_key_B)

  t_p_B = jax.lax.cond(jnp.any(top_p_B < 1), search_p, lambda x: t1_B, x_BV)
  return jnp.where(top_p_B < 1, t_p_B, t1_B)


def search_thresholds(x_BV, top_k_B, top_p_B, min_p_B):
  """`thresholds` of every row by the search alone (no shortlist)."""
  unknown_B = jnp.full(x_BV.shape[:1], False)
  return _search_thresholds(x_BV, jnp.max(x_BV, axis=1), top_k_B, top_p_B, min_p_B,
                            jnp.full(x_BV.shape[:1], _NEG_INF, jnp.float32), unknown_B)


# --- both ------------------------------------------------------------------------------------------
def cut_thresholds(base_BV, top_k_B, top_p_B, min_p_B, *, scale=lambda b: b, chunk: int = SHORTLIST_CHUNK,
                   num_chunks: int = SHORTLIST_CHUNKS):
  """Each row's smallest kept value after min-p, top-k and top-p of the logits scale(base_BV).

  `scale` is elementwise and recomputed wherever the logits are read, so base_BV is the only [B, V]
  array in memory: a cond operand or a loop input must be materialized, an expression need not be.
  """
  v_BM, bound_B, total_B = _head(scale(base_BV), chunk, num_chunks)

  def mass_fn(t1_B, head_mass_B, s1_in_head_B):
    return jnp.where(s1_in_head_B, head_mass_B, total_B), s1_in_head_B | (t1_B == _NEG_INF)

  t_B, ok_B, kth_B, k_known_B = _head_thresholds(v_BM, bound_B, top_k_B, top_p_B, min_p_B, mass_fn)

  def search(base_BV):
    t_search_B = _search_thresholds(scale(base_BV), v_BM[:, 0], top_k_B, top_p_B, min_p_B, kth_B, k_known_B)
    return jnp.where(ok_B, t_B, t_search_B)

  return jax.lax.cond(jnp.all(ok_B), lambda b: t_B, search, base_BV)


def filter_logits(x_BV, top_k_B, top_p_B, min_p_B, chunk: int = SHORTLIST_CHUNK, num_chunks: int = SHORTLIST_CHUNKS):
  """x_BV with -inf below each row's min-p / top-k / top-p threshold."""
  t_B = cut_thresholds(x_BV, top_k_B, top_p_B, min_p_B, chunk=chunk, num_chunks=num_chunks)
  return jnp.where(x_BV >= t_B[:, None], x_BV, _NEG_INF)

"""The device sampler against plain numpy definitions: filtered distributions, penalties, bias, bitmask, seeds."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from jserve.engine import sampler, thresholds
from jserve.engine.request import BIAS_TABLE_SIZE

NUM_DRAWS = 20_000
VOCAB = 64
# A fit is rejected when the chi-square statistic exceeds the 99.9% quantile of chi2(support - 1):
# a correct sampler fails one such test in a thousand runs.
CHI2_QUANTILE = 0.999


def inputs(batch, **kw):
  f = lambda v, dt=np.float32: np.full(batch, v, dt)  # noqa: E731
  s = dict(temperature_B=f(1.0), top_k_B=f(0, np.int32), top_p_B=f(1.0), min_p_B=f(0.0),
           repetition_penalty_B=f(1.0), presence_penalty_B=f(0.0), frequency_penalty_B=f(0.0),
           slot_B=f(batch, np.int32), use_bias_B=f(False, bool), ban_stop_B=f(False, bool),
           use_mask_B=f(False, bool), logprobs_B=f(False, bool), seed_B=np.arange(batch, dtype=np.uint32),
           position_B=f(7, np.int32))
  for k, v in kw.items():
    s[k] = np.broadcast_to(np.asarray(v, s[k].dtype), (batch,)).copy()
  return sampler.SamplingInputs(**{k: jnp.asarray(v) for k, v in s.items()})


def empty_state(batch, vocab):
  return sampler.SlotState.zeros(batch, vocab, BIAS_TABLE_SIZE)


def no_mask(batch, vocab):
  return jnp.zeros((batch, (vocab + 31) // 32), jnp.int32)


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
  """vLLM's order: temperature, min-p, top-k, then top-p on what is left (renormalized)."""
  x = logits.astype(np.float64) / temperature
  if min_p > 0:
    x = np.where(softmax(x) >= min_p * softmax(x).max(), x, -np.inf)
  if top_k > 0:
    x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
  if top_p < 1:
    p = softmax(x)
    order = np.argsort(-x, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = before < top_p
    keep[0] = True
    x = np.where(x >= x[order][keep].min(), x, -np.inf)
  return softmax(x)


@pytest.fixture(scope="module")
def logits():
  return np.random.default_rng(0).normal(size=VOCAB).astype(np.float32) * 1.5


@pytest.mark.parametrize("params", [
    dict(temperature=0.7), dict(temperature=1.6), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.05),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02)], ids=str)
def test_draws_follow_the_exact_filtered_distribution(logits, params):
  expected = reference_probs(logits, **params)
  names = dict(temperature="temperature_B", top_k="top_k_B", top_p="top_p_B", min_p="min_p_B")
  s = inputs(NUM_DRAWS, **{names[k]: v for k, v in params.items()})
  batch_logits = jnp.broadcast_to(jnp.asarray(logits), (NUM_DRAWS, VOCAB))
  out = sampler.sample_jit(batch_logits, s, empty_state(NUM_DRAWS, VOCAB), no_mask(NUM_DRAWS, VOCAB))
  counts = np.bincount(np.asarray(out.tokens_B), minlength=VOCAB)
  support = expected > 0
  assert counts[~support].sum() == 0, "drew a token the filters remove"
  stat, _ = scipy.stats.chisquare(counts[support], expected[support] * NUM_DRAWS)
  bound = scipy.stats.chi2.ppf(CHI2_QUANTILE, support.sum() - 1)
  tv = 0.5 * np.abs(counts / NUM_DRAWS - expected).sum()
  assert stat < bound, f"chi2={stat:.1f} over {bound:.1f} (support {support.sum()}, TV {tv:.4f})"


def test_greedy_takes_the_argmax_whatever_the_seed(logits):
  # The statistical tests' shape, so their compiled program serves.
  s = inputs(NUM_DRAWS, temperature_B=0.0, top_k_B=3, top_p_B=0.5)
  out = sampler.sample_jit(jnp.broadcast_to(jnp.asarray(logits), (NUM_DRAWS, VOCAB)), s,
                           empty_state(NUM_DRAWS, VOCAB), no_mask(NUM_DRAWS, VOCAB))
  assert set(np.asarray(out.tokens_B).tolist()) == {int(np.argmax(logits))}


@jax.jit
def _both_thresholds(x, top_k, top_p, min_p):
  v, _, bound = sampler.shortlist(x, chunk=10, num_chunks=8)
  fast, ok = sampler.thresholds(x, v, bound, top_k, top_p, min_p)
  full, _ = sampler.thresholds(x, -jnp.sort(-x, axis=-1), jnp.full(x.shape[:1], -jnp.inf), top_k, top_p, min_p)
  return fast, ok, full


_filter = jax.jit(functools.partial(sampler.filter_logits, chunk=10, num_chunks=8))


def test_shortlist_thresholds_equal_full_sort_thresholds():
  rng = np.random.default_rng(1)
  batch, vocab = 64, 1000
  for scale in (0.3, 1.0, 4.0):
    x = jnp.asarray(rng.normal(size=(batch, vocab)).astype(np.float32) * scale)
    top_k = jnp.asarray(rng.choice([0, 1, 5, 40, 200], batch).astype(np.int32))
    top_p = jnp.asarray(rng.choice([1.0, 0.5, 0.9, 0.99], batch).astype(np.float32))
    min_p = jnp.asarray(rng.choice([0.0, 0.05, 0.3], batch).astype(np.float32))
    fast, ok, full = _both_thresholds(x, top_k, top_p, min_p)
    ok = np.asarray(ok)
    assert ok.any()
    np.testing.assert_array_equal(np.asarray(fast)[ok], np.asarray(full)[ok])
    # The filter as a whole (shortlist, falling back to the sort where unresolved) keeps what the sort keeps.
    kept = np.asarray(_filter(x, top_k, top_p, min_p)) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(x) >= np.asarray(full)[:, None])


@pytest.mark.parametrize("group", [4, 5])
def test_shortlist_picked_in_two_rounds_is_the_one_round_shortlist(group):
  # 1003 tokens in 126 chunks of 8: groups of 5 leave a padded last group. Rows 0-3 are 90% masked,
  # row 4 keeps 3 tokens (the bound is -inf: the whole shortlist is exact).
  rng = np.random.default_rng(11)
  batch, vocab, chunk, num_chunks = 16, 1003, 8, 12
  x = rng.normal(size=(batch, vocab)).astype(np.float32)
  x[:4][rng.random((4, vocab)) < 0.9] = -np.inf
  x[4, 3:] = -np.inf
  short = functools.partial(sampler.shortlist, chunk=chunk, num_chunks=num_chunks)
  v1, ids1, bound1 = (np.asarray(a) for a in jax.jit(functools.partial(short, group=1))(jnp.asarray(x)))
  v2, ids2, bound2 = (np.asarray(a) for a in jax.jit(functools.partial(short, group=group))(jnp.asarray(x)))
  np.testing.assert_array_equal(v2, v1)
  np.testing.assert_array_equal(bound2, bound1)
  head = v1 > bound1[:, None]
  np.testing.assert_array_equal(ids2[head], ids1[head])
  want = -np.sort(-x, axis=1)[:, :v1.shape[1]]
  for i in range(batch):
    exact = head[i] | (bound1[i] == -np.inf)
    np.testing.assert_array_equal(v2[i, exact], want[i, exact])
    assert bound1[i] == -np.inf or head[i].sum() >= num_chunks, (i, head[i].sum())
    real = ids2[i] < vocab
    np.testing.assert_array_equal(x[i, ids2[i, real]], v2[i, real])
    assert (v2[i, ~real] == -np.inf).all() and len(set(ids2[i].tolist())) == len(ids2[i])


def test_max_and_sumexp_equals_numpy_with_all_neg_inf_chunks():
  rng = np.random.default_rng(12)
  x = rng.normal(size=(3, 40, 16)).astype(np.float32) * 4
  x[0, :5] = -np.inf  # whole chunks masked: max -inf, sum 0
  x[1][rng.random((40, 16)) < 0.7] = -np.inf
  max_, sum_ = jax.jit(thresholds.max_and_sumexp, static_argnums=1)(jnp.asarray(x), 2)
  want_max = x.max(axis=2)
  with np.errstate(invalid="ignore"):
    want_sum = np.where(want_max > -np.inf, np.exp(x.astype(np.float64) - want_max[..., None]).sum(axis=2), 0.0)
  np.testing.assert_array_equal(np.asarray(max_), want_max)
  np.testing.assert_allclose(np.asarray(sum_), want_sum, rtol=1e-6)


def test_top_logprobs_are_the_largest_entries():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(8, 5000)).astype(np.float32))
  ids, vals = jax.jit(functools.partial(sampler.top_logprobs, chunk=16, num_chunks=24))(x)
  np.testing.assert_array_equal(np.asarray(ids), np.argsort(-np.asarray(x), axis=1)[:, :20])
  np.testing.assert_array_equal(np.asarray(vals), -np.sort(-np.asarray(x), axis=1)[:, :20])


def slot_state(prompts, outputs, vocab):
  """SlotState of one slot per row, written from the prompt and recorded from the output like the runner."""
  batch = len(prompts)
  state = empty_state(batch, vocab)
  prompt_BV = np.zeros((batch, vocab), np.uint8)
  for i, p in enumerate(prompts):
    prompt_BV[i, p] = 1
  z = np.zeros((batch, BIAS_TABLE_SIZE))
  state = jax.jit(sampler.write_slots)(state, np.arange(batch, dtype=np.int32), prompt_BV,
                                       np.zeros((batch, vocab), np.int32), z.astype(np.int32),
                                       z.astype(np.float32), z.astype(bool))
  toks = np.concatenate(outputs).astype(np.int32)
  slots = np.concatenate([np.full(len(o), i) for i, o in enumerate(outputs)]).astype(np.int32)
  return jax.jit(sampler.record_tokens)(state, np.full_like(slots, batch + 1), slots, toks)


def test_penalties_match_vllm_and_transformers_definitions():
  rng = np.random.default_rng(3)
  batch, vocab = 6, 50
  logits = rng.normal(size=(batch, vocab)).astype(np.float32) * 3
  prompts = [rng.integers(0, vocab, 12) for _ in range(batch)]
  outputs = [rng.integers(0, vocab, 9) for _ in range(batch)]
  rep, pres, freq = [1.0, 1.3, 0.7, 2.0, 1.0, 1.5], [0.0, 0.5, -1.0, 0.0, 2.0, 0.3], [0.0, 0.2, 0.0, -0.5, 1.0, 1.2]
  s = inputs(batch, slot_B=np.arange(batch), repetition_penalty_B=rep, presence_penalty_B=pres,
             frequency_penalty_B=freq)
  got = np.asarray(jax.jit(sampler.apply_penalties)(jnp.asarray(logits), s, slot_state(prompts, outputs, vocab)))
  for i in range(batch):
    counts = np.bincount(outputs[i], minlength=vocab)
    # Repetition penalty over prompt and output, by transformers' own processor.
    ids = torch.tensor(np.concatenate([prompts[i], outputs[i]])[None])
    want = RepetitionPenaltyLogitsProcessor(rep[i])(ids, torch.tensor(logits[i:i + 1]))[0].numpy()
    # Frequency and presence over the output only (vLLM's and OpenAI's definition).
    want = want - freq[i] * counts - pres[i] * (counts > 0)
    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def test_logit_bias_and_min_tokens_ban_apply_per_row():
  batch, vocab = 3, 40
  state = empty_state(batch, vocab)
  ids = np.zeros((batch, BIAS_TABLE_SIZE), np.int32)
  vals = np.zeros((batch, BIAS_TABLE_SIZE), np.float32)
  stop = np.zeros((batch, BIAS_TABLE_SIZE), bool)
  ids[0, :2], vals[0, :2] = [3, 7], [5.0, -2.0]
  ids[1, :1], vals[1, :1], stop[1, :1] = [9], [-np.inf], [True]
  state = jax.jit(sampler.write_slots)(state, np.arange(batch, dtype=np.int32), np.zeros((batch, vocab), np.uint8),
                              np.zeros((batch, vocab), np.int32), ids, vals, stop)
  logits = np.zeros((batch, vocab), np.float32)
  for ban in (True, False):
    s = inputs(batch, slot_B=[0, 1, 2], use_bias_B=[True, True, False], ban_stop_B=ban)
    got = np.asarray(jax.jit(sampler.apply_bias)(jnp.asarray(logits), s, state))
    want = logits.copy()
    want[0, 3], want[0, 7] = 5.0, -2.0
    if ban:
      want[1, 9] = -np.inf
    np.testing.assert_array_equal(got, want)


def test_bitmask_allows_exactly_its_bits():
  rng = np.random.default_rng(4)
  batch, vocab = 4, 70
  allowed = rng.random((batch, vocab)) < 0.3
  words = np.zeros((batch, 3), np.uint32)
  for b, t in zip(*np.nonzero(allowed)):
    words[b, t // 32] |= np.uint32(1 << (t % 32))
  use = np.array([True, True, False, True])
  got = np.asarray(jax.jit(sampler.apply_bitmask)(jnp.zeros((batch, vocab)), jnp.asarray(words.view(np.int32)),
                                         jnp.asarray(use)))
  np.testing.assert_array_equal(got > -np.inf, allowed | ~use[:, None])


def test_noise_depends_on_seed_and_position_only():
  seeds, positions = jnp.asarray([5, 5, 6], jnp.uint32), jnp.asarray([10, 11, 10], jnp.int32)
  noise_fn = jax.jit(sampler.gumbel_noise, static_argnums=2)
  noise = np.asarray(noise_fn(seeds, positions, 1000))
  again = np.asarray(noise_fn(seeds[::-1], positions[::-1], 1000))[::-1]
  np.testing.assert_array_equal(noise, again)
  assert not np.allclose(noise[0], noise[1]) and not np.allclose(noise[0], noise[2])
  # Standard Gumbel: mean is the Euler-Mascheroni constant, variance pi^2 / 6.
  assert abs(noise.mean() - 0.5772) < 0.06 and abs(noise.var() - np.pi**2 / 6) < 0.15


def test_search_finds_the_sort_thresholds():
  # Top-k and min-p thresholds are logit values picked by counting: equal to the sort's. Top-p sums
  # float32 probabilities in another order than the sort's cumsum: where the two differ, the float64
  # top-p test must be undecided at float32 precision (within 1e-4 of the kept mass, V * eps).
  rng = np.random.default_rng(6)
  batch, vocab = 48, 2000
  for trial, scale in enumerate((0.05, 1.0, 4.0, 20.0)):
    x = rng.normal(size=(batch, vocab)).astype(np.float32) * scale
    if trial == 1:
      x = np.array(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))  # many ties
    if trial == 2:
      x[rng.random((batch, vocab)) < 0.5] = -np.inf  # a grammar mask
    top_k = rng.choice([0, 1, 7, 300, vocab, vocab + 5], batch).astype(np.int32)
    top_p = rng.choice([1.0, 0.2, 0.9, 0.999], batch).astype(np.float32)
    min_p = rng.choice([0.0, 0.05, 0.5], batch).astype(np.float32)
    search, full = (np.asarray(t) for t in _search_and_sort(jnp.asarray(x), top_k, top_p, min_p))
    np.testing.assert_array_equal(search[top_p >= 1], full[top_p >= 1])
    for i in np.nonzero(search != full)[0]:
      e = np.exp(x[i].astype(np.float64) - x[i].max())
      t1 = max(np.log(min_p[i]) + x[i].max() if min_p[i] > 0 else -np.inf,
               np.sort(x[i])[::-1][top_k[i] - 1] if 0 < top_k[i] <= vocab else -np.inf)
      kept_mass = e[x[i] >= t1].sum()
      target = top_p[i] * kept_mass
      for t in (search[i], full[i]):
        margin = min(target - e[x[i] > t].sum(), e[x[i] >= t].sum() - target)
        assert margin > -1e-4 * kept_mass, (trial, i, top_k[i], top_p[i], min_p[i], search[i], full[i])


@jax.jit
def _search_and_sort(x, top_k, top_p, min_p):
  full, _ = sampler.thresholds(x, -jnp.sort(-x, axis=-1), jnp.full(x.shape[:1], -jnp.inf), top_k, top_p, min_p)
  return sampler.search_thresholds(x, top_k, top_p, min_p), full


def _kernels_reading(hlo, computation, shape):
  """Kernels of one computation of compiled HLO text that read a whole array of `shape` (not just gather from it)."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      name = line.replace("ENTRY ", "").split()[0].lstrip("%")
      bodies[name] = []
      if line.startswith("ENTRY"):
        bodies["ENTRY"] = bodies[name]
    elif name and line.startswith("  "):
      bodies[name].append(line.strip())
  found = []
  for ins in bodies[computation]:
    called = re.search(r"calls=%([\w.\-]+)", ins)
    if not called:
      continue
    body = bodies[called.group(1)]
    for p in (b.split(" = ")[0] for b in body if f"{shape}{{" in b.split(" parameter(")[0] and " parameter(" in b):
      users = [b for b in body if re.search(re.escape(p) + r"[,)]", b.split(" = ", 1)[1])]
      if any(" gather(" not in u for u in users):
        found.append(ins.split(" = ")[0])
  return bodies, found


# One compiled sampler at [16, 3000] for the tests below: its HLO and its results.
SMALL_BATCH, SMALL_VOCAB = 16, 3000


@pytest.fixture(scope="module")
def small_sampler():
  batch, vocab = SMALL_BATCH, SMALL_VOCAB
  return sampler.sample_jit.lower(jnp.zeros((batch, vocab)), inputs(batch), empty_state(batch, vocab),
                                  no_mask(batch, vocab)).compile()


def test_plain_batch_reads_the_logits_once_under_one_cond(small_sampler):
  # Greedy and temperature rows only: one conditional (the switch between paths), and in its first two
  # branches (all greedy; some temperature) a single kernel reading the logits and no [B, V] written
  # (the noise is computed inline).
  shape = f"f32[{SMALL_BATCH},{SMALL_VOCAB}]"
  hlo = small_sampler.as_text()
  bodies, entry_reads = _kernels_reading(hlo, "ENTRY", shape)
  conds = [i for i in bodies["ENTRY"] if " conditional(" in i]
  assert len(conds) == 1 and not entry_reads, (conds, entry_reads)
  for plain in re.search(r"branch_computations=\{([^}]*)\}", conds[0]).group(1).replace("%", "").split(", ")[:2]:
    _, plain_reads = _kernels_reading(hlo, plain, shape)
    assert len(plain_reads) == 1, plain_reads
    assert not any(" conditional(" in i or " while(" in i for i in bodies[plain])
    kernels = [i for i in bodies[plain] if re.search(r" (fusion|copy|custom-call)\(", i)]
    assert not any(shape in i.split(" = ")[1].split("(")[0] for i in kernels), "wrote [B, V]"


def test_stages_that_change_nothing_leave_every_token_unchanged(small_sampler):
  # The plain path, the staged path with an all-allowing grammar mask (logits kept as an expression),
  # and with a zero logit bias (logits rewritten into a new array) draw the same tokens.
  rng = np.random.default_rng(7)
  batch, vocab = SMALL_BATCH, SMALL_VOCAB
  x = jnp.asarray(rng.normal(size=(batch, vocab)).astype(np.float32) * 3)
  temperature = rng.choice([0.0, 0.6, 1.0, 1.7], batch)
  state = empty_state(batch, vocab)
  all_allowed = jnp.full((batch, (vocab + 31) // 32), -1, jnp.int32)
  plain = small_sampler(x, inputs(batch, temperature_B=temperature), state, all_allowed)
  for stage in (dict(use_mask_B=True), dict(use_bias_B=True)):
    staged = small_sampler(x, inputs(batch, temperature_B=temperature, **stage), state, all_allowed)
    np.testing.assert_array_equal(np.asarray(staged.tokens_B), np.asarray(plain.tokens_B))


def test_logprobs_are_the_raw_log_softmax(small_sampler):
  rng = np.random.default_rng(8)
  batch, vocab = SMALL_BATCH, SMALL_VOCAB
  x = rng.normal(size=(batch, vocab)).astype(np.float32) * 4
  asked = np.arange(batch) % 2 == 0
  out = small_sampler(jnp.asarray(x), inputs(batch, top_k_B=5, logprobs_B=asked), empty_state(batch, vocab),
                      no_mask(batch, vocab))
  want = np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=-1))
  tokens = np.asarray(out.tokens_B)
  np.testing.assert_allclose(np.asarray(out.logprob_B)[asked], want[np.arange(batch), tokens][asked], rtol=1e-5,
                             atol=1e-5)
  order = np.argsort(-x, axis=1)[:, :sampler.MAX_LOGPROBS]
  np.testing.assert_array_equal(np.asarray(out.top_ids_BA)[asked], order[asked])
  np.testing.assert_allclose(np.asarray(out.top_logprobs_BA)[asked], np.take_along_axis(want, order, 1)[asked],
                             rtol=1e-5, atol=1e-5)
  assert not np.asarray(out.top_logprobs_BA)[~asked].any() and not np.asarray(out.logprob_B)[~asked].any()


def test_host_plain_path_has_no_conditional_and_matches_the_device_switch(small_sampler):
  # The host picks PLAIN for greedy and temperature rows: that program holds no conditional (on a GPU
  # a conditional waits for the device) and draws what the one-program switch draws.
  batch, vocab = SMALL_BATCH, SMALL_VOCAB
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(batch, vocab)).astype(np.float32) * 3)
  s = inputs(batch, temperature_B=rng.choice([0.0, 0.6, 1.0, 1.7], batch))
  assert sampler.host_path(jax.tree.map(np.asarray, s)) == sampler.PLAIN
  state, mask = empty_state(batch, vocab), no_mask(batch, vocab)
  plain = sampler.sample_jit.lower(x, s, state, mask, path=sampler.PLAIN).compile()
  assert not re.search(r" (conditional|while)\(", plain.as_text())
  np.testing.assert_array_equal(np.asarray(plain(x, s, state, mask).tokens_B),
                                np.asarray(small_sampler(x, s, state, mask).tokens_B))


@pytest.mark.parametrize("stage", [dict(top_p_B=0.8), dict(top_k_B=4), dict(min_p_B=0.2), dict(logprobs_B=True),
                                   dict(repetition_penalty_B=1.3), dict(use_bias_B=True), dict(use_mask_B=True)])
def test_host_staged_path_matches_the_device_switch(small_sampler, stage):
  batch, vocab = SMALL_BATCH, SMALL_VOCAB
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(batch, vocab)).astype(np.float32) * 3)
  s = inputs(batch, temperature_B=0.9, **stage)
  assert sampler.host_path(jax.tree.map(np.asarray, s)) == sampler.STAGED
  state = empty_state(batch, vocab)
  mask = jnp.asarray(rng.integers(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=np.int64).astype(np.int32))
  staged = sampler.sample_jit(x, s, state, mask, path=sampler.STAGED)
  device = small_sampler(x, s, state, mask)
  for a, b in zip(jax.tree.leaves(staged), jax.tree.leaves(device)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""The page manager and scheduler under random traffic: invariants hold and nothing leaks."""

import numpy as np
from hypothesis import given, settings, strategies as st

from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import Request, RequestStatus, SamplingParams
from jserve.engine.scheduler import KV_ADMISSIONS, Scheduler, SchedulerConfig

PAGE = 4


def _request(rid, prompt, max_tokens, priority=0, t=0.0, ignore_eos=False):
  return Request(str(rid), prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), priority=priority,
                 arrival_time=t)


events = st.lists(st.tuples(
    st.sampled_from(["arrive", "arrive", "step", "step", "step", "abort"]),
    st.integers(1, 40),  # prompt length
    st.integers(1, 12),  # max tokens
    st.integers(0, 3),  # which shared prefix (0 = none)
    st.integers(0, 2),  # priority
), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(events=events, num_pages=st.integers(12, 40), budget=st.integers(4, 24), caching=st.booleans(),
       policy=st.sampled_from(["fcfs", "priority"]), admission=st.sampled_from(KV_ADMISSIONS),
       known_lengths=st.booleans())
def test_random_traffic_keeps_invariants_and_frees_every_page(events, num_pages, budget, caching, policy, admission,
                                                              known_lengths):
  kv = KVCacheManager(num_pages, PAGE, enable_prefix_caching=caching)
  sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, policy=policy,
                                    kv_admission=admission), kv)
  rng = np.random.default_rng(0)
  prefixes = {k: list(rng.integers(0, 50, size=12)) for k in range(1, 4)}
  live, finished, t = {}, set(), 0.0
  for i, (kind, plen, max_tokens, prefix, priority) in enumerate(events):
    t += 1.0
    if kind == "arrive":
      prompt = (prefixes[prefix] if prefix else []) + list(rng.integers(0, 50, size=plen))
      if kv.pages_for(len(prompt) + max_tokens) > kv.num_usable_pages:
        continue  # the engine refuses these at add_request
      req = _request(i, prompt, max_tokens, priority, t, ignore_eos=known_lengths)
      live[req.request_id] = req
      sched.add(req)
    elif kind == "abort" and live:
      req = live.pop(sorted(live)[plen % len(live)])
      sched.remove(req)
    else:
      batch = sched.schedule()
      assert batch.total_tokens <= budget and len(batch.requests) <= 4
      for req, n in zip(batch.requests, batch.num_new_tokens):
        assert len(kv.page_tables[req.request_id]) * PAGE >= req.num_computed_tokens + n
        req.num_computed_tokens += n
        kv.cache_full_pages(req)
        if req.num_computed_tokens == req.num_tokens:
          req.all_token_ids.append(int(rng.integers(0, 50)))
          if req.num_output_tokens >= req.params.max_tokens:
            req.status = RequestStatus.FINISHED
            sched.remove(req)
            finished.add(live.pop(req.request_id).request_id)
    kv.check_invariants()
  # Drain: everything still live must finish (no request is lost or stuck).
  for _ in range(10_000):
    if not live:
      break
    batch = sched.schedule()
    assert batch, "live requests but nothing schedulable"
    for req, n in zip(batch.requests, batch.num_new_tokens):
      req.num_computed_tokens += n
      kv.cache_full_pages(req)
      if req.num_computed_tokens == req.num_tokens:
        req.all_token_ids.append(1)
        if req.num_output_tokens >= req.params.max_tokens:
          sched.remove(req)
          live.pop(req.request_id)
    kv.check_invariants()
  assert not live
  assert kv.num_used_pages == 0 and not kv.page_tables
  if admission == "full" or (admission == "auto" and known_lengths):
    assert sched.num_preemptions == 0, "a request admitted with its whole length reserved was preempted"


def test_shared_prefix_pages_are_reused_and_evicted_last():
  kv = KVCacheManager(10, PAGE)
  a = _request("a", list(range(13)), 2)
  assert kv.allocate(a, 13)
  a.num_computed_tokens = 13
  kv.cache_full_pages(a)
  kv.free(a)
  b = _request("b", list(range(12)) + [99, 98], 2)
  hit = kv.find_cached_prefix(b)
  assert len(hit) == 3  # the three full pages of the shared 12 tokens
  c = _request("c", list(range(12)), 2)
  assert len(kv.find_cached_prefix(c)) == 2  # the last token is always recomputed


def test_allocation_failure_changes_nothing():
  kv = KVCacheManager(4, PAGE)
  a = _request("a", list(range(20)), 1)
  assert not kv.allocate(a, 20)
  assert kv.num_used_pages == 0 and "a" not in kv.page_tables
  kv.check_invariants()

"""Admission by KV budget: requests of known length are admitted only while the pool holds them to the end."""

import pytest

from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import Request, RequestStatus, SamplingParams
from jserve.engine.scheduler import Scheduler, SchedulerConfig
from jserve.errors import ConfigError

PAGE = 4


def _request(rid, prompt_len, max_tokens, ignore_eos=True, t=0.0, **params):
  return Request(str(rid), list(range(1, prompt_len + 1)),
                 SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **params), arrival_time=t)


def _run(admission, requests, num_pages=40, max_num_seqs=8, budget=64):
  """Runs the requests to the end (one token per decode); returns the scheduler and the most running at once."""
  kv = KVCacheManager(num_pages, PAGE, enable_prefix_caching=False)
  sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                    kv_admission=admission), kv)
  for req in requests:
    sched.add(req)
  peak, live = 0, {r.request_id for r in requests}
  for _ in range(10_000):
    if not live:
      break
    batch = sched.schedule()
    assert batch, "requests left but nothing schedulable"
    peak = max(peak, len(sched.running))
    assert kv.num_used_pages <= kv.num_usable_pages
    for req, n in zip(batch.requests, batch.num_new_tokens):
      req.num_computed_tokens += n
      if req.num_computed_tokens == req.num_tokens:
        req.all_token_ids.append(7)
        if req.num_output_tokens >= req.params.max_tokens:
          req.status = RequestStatus.FINISHED
          sched.remove(req)
          live.discard(req.request_id)
    kv.check_invariants()
  assert not live and kv.num_used_pages == 0
  return sched, peak


def _known(n=8, prompt_len=8, max_tokens=16):
  # 8 + 16 - 1 = 23 KV positions: 6 pages of 4 each; 39 usable pages hold 6 such sequences to their end.
  return [_request(i, prompt_len, max_tokens, t=float(i)) for i in range(n)]


def test_first_chunk_admission_preempts_sequences_of_known_length():
  sched, peak = _run("prompt", _known())
  assert sched.num_preemptions > 0
  assert peak == 8  # every prompt fit at once: admitted, then preempted as they grew


@pytest.mark.parametrize("admission", ["auto", "full"])
def test_whole_length_admission_never_preempts(admission):
  sched, peak = _run(admission, _known())
  assert sched.num_preemptions == 0
  assert peak == 39 // 6  # as many as the pool holds to their end, no more


def test_auto_reserves_nothing_for_requests_that_may_stop_early():
  """Without ignore_eos (or with stops) a request may end long before max_tokens: auto admits it like vLLM."""
  for extra in ({"ignore_eos": False}, {"ignore_eos": True, "stop": ["x"]}, {"ignore_eos": True,
                                                                           "stop_token_ids": [5]}):
    reqs = [_request(i, 8, 16, t=float(i), **extra) for i in range(8)]
    sched, peak = _run("auto", reqs)
    assert sched.num_preemptions > 0 and peak == 8, extra


def test_full_reserves_for_requests_that_may_stop_early_too():
  reqs = [_request(i, 8, 16, ignore_eos=False, t=float(i)) for i in range(8)]
  sched, peak = _run("full", reqs)
  assert sched.num_preemptions == 0 and peak == 6


def test_a_newcomer_of_unknown_length_leaves_the_reserve_alone():
  kv = KVCacheManager(12, PAGE, enable_prefix_caching=False)  # 11 usable pages
  sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, kv_admission="auto"), kv)
  known = _request("known", 8, 29)  # 36 positions: 9 pages, 2 taken by the prompt, 7 reserved
  sched.add(known)
  assert sched.schedule().requests == [known]
  known.num_computed_tokens = 8
  # 9 pages free, 7 of them reserved: a 12-token prompt (3 pages) must wait, an 8-token one (2 pages) fits.
  big = _request("big", 12, 4, ignore_eos=False, t=1.0)
  sched.add(big)
  assert big not in sched.schedule().requests and big in sched.waiting
  sched.remove(big)
  small = _request("small", 8, 4, ignore_eos=False, t=2.0)
  sched.add(small)
  assert small in sched.schedule().requests


def test_unknown_admission_is_a_config_error():
  with pytest.raises(ConfigError, match="kv_admission='greedy'"):
    SchedulerConfig(kv_admission="greedy")

"""Iteration-level scheduling: which requests run in the next step, and how many tokens each.

Every step is one ragged batch under two budgets, `max_num_seqs` sequences and
`max_num_batched_tokens` tokens. Running requests go first (a decode costs one
token; a request whose prompt is still being prefilled continues its chunk),
then waiting requests are admitted, their prompts chunked to fill what is left
of the token budget. When the page pool runs out, the running request that
sorts last (lowest priority, latest arrival) is preempted: its pages are freed
and it goes back to the front of the queue keeping its generated tokens, to be
recomputed (cheaply, where its prefix pages are still cached).

Admission (`kv_admission`) decides how much of the pool a waiting request must
find free before it starts. "prompt" asks only for its first chunk's pages, as
vLLM does: the batch is as large as the pool allows now, and preemption pays
for it later. "full" asks for pages for its whole length, prompt plus
`max_tokens`, on top of what every running request may still grow into: no
request it admits is ever preempted, at the cost of pages held back for tokens
not yet generated. "auto" (the default) reserves the whole length for requests
whose length is known (`ignore_eos` and no stop strings or stop tokens: they
run to `max_tokens`) and the first chunk for the rest. Preempting and
recomputing a sequence whose end was known all along is pure waste.
"""

import bisect
import dataclasses
import time

from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import Request, RequestStatus
from jserve.errors import ConfigError


KV_ADMISSIONS = ("auto", "full", "prompt")


def length_known(req: Request) -> bool:
  """Whether the request runs to `max_tokens`: nothing but its length can end it."""
  p = req.params
  return p.ignore_eos and not p.stop and not p.stop_token_ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
  max_num_seqs: int = 256
  max_num_batched_tokens: int = 8192
  max_model_len: int = 4096
  policy: str = "fcfs"  # "fcfs" or "priority"
  # A prompt chunk shorter than this waits for the next step rather than fill a sliver of budget.
  min_chunk_tokens: int = 1
  kv_admission: str = "auto"  # "auto", "full" or "prompt" (see the module docstring)

  def __post_init__(self):
    if self.policy not in ("fcfs", "priority"):
      raise ConfigError(f"policy={self.policy!r}: expected 'fcfs' or 'priority'")
    if self.kv_admission not in KV_ADMISSIONS:
      raise ConfigError(f"kv_admission={self.kv_admission!r}: expected one of {', '.join(KV_ADMISSIONS)}")
    if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
      raise ConfigError(f"max_num_seqs={self.max_num_seqs}, max_num_batched_tokens="
                        f"{self.max_num_batched_tokens}: both must be positive")


@dataclasses.dataclass
class ScheduledBatch:
  """The plan for one step: requests in batch order and the tokens each computes."""

  requests: list[Request]
  num_new_tokens: list[int]
  num_preempted: int = 0

  @property
  def total_tokens(self) -> int:
    return sum(self.num_new_tokens)

  def __bool__(self):
    return bool(self.requests)


class Scheduler:
  """Holds the waiting queue and the running set; decides every step's batch."""

  def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
    self.config = config
    self.kv = kv
    self.waiting: list[Request] = []  # sorted by _queue_key
    self.running: list[Request] = []
    self.num_preemptions = 0

  def _queue_key(self, req: Request):
    if self.config.policy == "priority":
      return (req.priority, req.arrival_time)
    return (req.arrival_time,)

  def add(self, req: Request):
    req.status = RequestStatus.WAITING
    keys = [self._queue_key(r) for r in self.waiting]
    self.waiting.insert(bisect.bisect_right(keys, self._queue_key(req)), req)

  def remove(self, req: Request):
    """Takes a request out of the queues and frees its pages (abort or finish)."""
    if req in self.running:
      self.running.remove(req)
    elif req in self.waiting:
      self.waiting.remove(req)
    self.kv.free(req)

  @property
  def num_unfinished(self) -> int:
    return len(self.waiting) + len(self.running)

  def _victim(self, candidates: list[Request]) -> Request:
    if self.config.policy == "priority":
      return max(candidates, key=lambda r: (r.priority, r.arrival_time))
    return max(candidates, key=lambda r: r.arrival_time)

  def _preempt(self, req: Request):
    self.running.remove(req)
    self.kv.free(req)
    req.num_computed_tokens = 0
    req.num_preemptions += 1
    self.num_preemptions += 1
    self.add(req)

  def _reserves(self, req: Request) -> bool:
    mode = self.config.kv_admission
    return mode == "full" or (mode == "auto" and length_known(req))

  def _final_tokens(self, req: Request) -> int:
    """KV positions the request fills once it has all its tokens (its last sampled token takes none)."""
    max_tokens = req.params.max_tokens or self.config.max_model_len
    return min(req.num_prompt_tokens + max_tokens, self.config.max_model_len) - 1

  def _pages_to_come(self, req: Request) -> int:
    """Pages the request may still take before its end, beyond those it holds."""
    held = len(self.kv.page_tables.get(req.request_id, ()))
    return max(self.kv.pages_for(self._final_tokens(req)) - held, 0)

  def _reserved_pages(self) -> int:
    """Pages running requests that reserve may still take: free pages a newcomer must leave them."""
    return sum(self._pages_to_come(r) for r in self.running if self._reserves(r))

  def _fits(self, num_tokens: int, cached: list[int], reserved: int) -> bool:
    """Whether pages for `num_tokens` tokens fit the pool and leave running requests their reserve."""
    if not self.running:
      return True  # nothing to protect; the engine refused any request longer than the pool
    reusable = sum(1 for p in cached if self.kv.ref_count[p] == 0)  # cached, unused: counted as free
    need = self.kv.pages_for(num_tokens) - len(cached) + reusable
    return need <= self.kv.num_free_pages - reserved

  def schedule(self) -> ScheduledBatch:
    budget = self.config.max_num_batched_tokens
    batch = ScheduledBatch([], [])
    preempted_before = self.num_preemptions

    # Decode (and unfinished prefill chunks) before new prefills: a stalled decode is visible to
    # users as inter-token latency; a delayed prefill only moves time-to-first-token.
    i = 0
    while i < len(self.running) and budget > 0:
      req = self.running[i]
      num_new = min(req.num_tokens - req.num_computed_tokens, budget)
      if num_new == 0:  # its last token is being sampled by the step in flight: nothing to compute
        i += 1
        continue
      while not self.kv.allocate(req, num_new):
        # Only requests not yet in this step's batch can give their pages back.
        victim = self._victim(self.running[i:])
        self._preempt(victim)
        if victim is req:
          break
      else:
        batch.requests.append(req)
        batch.num_new_tokens.append(num_new)
        budget -= num_new
        i += 1
        continue
      # req itself was preempted; the running list shifted, do not advance i.

    preempted_now = self.num_preemptions > preempted_before
    reserved = self._reserved_pages() if self.config.kv_admission != "prompt" else 0
    while (self.waiting and budget >= self.config.min_chunk_tokens and not preempted_now
           and len(self.running) < self.config.max_num_seqs):
      req = self.waiting[0]
      cached = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
      num_cached_tokens = len(cached) * self.kv.page_size
      num_new = min(req.num_tokens - num_cached_tokens, budget)
      whole = self._reserves(req)
      wanted = self._final_tokens(req) if whole else num_cached_tokens + num_new
      if (reserved or whole) and not self._fits(wanted, cached, reserved):
        break
      req.num_computed_tokens = num_cached_tokens
      if not self.kv.allocate(req, num_new, cached):
        req.num_computed_tokens = 0
        break
      if req.num_preemptions == 0:
        self.kv.record_prefix_query(req.num_prompt_tokens, num_cached_tokens)
        req.num_cached_tokens = num_cached_tokens
      self.waiting.pop(0)
      req.status = RequestStatus.RUNNING
      req.schedule_time = req.schedule_time or time.monotonic()
      self.running.append(req)
      batch.requests.append(req)
      batch.num_new_tokens.append(num_new)
      budget -= num_new
      if whole:
        reserved += self._pages_to_come(req)
    batch.num_preempted = self.num_preemptions - preempted_before
    return batch

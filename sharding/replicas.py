"""Data parallelism: independent engine replicas on disjoint sub-meshes, and the router in front of them.

Each replica (`mesh.replica_meshes`) is a whole engine with its own weights
and KV pool; replicas never talk to each other. The front end asks
`ReplicaRouter.route` where a request goes: to the replica that already holds
the longest cached prefix of its prompt (a shared system prompt is then
prefilled once per replica, not once per request), unless that replica is
busier than the least-loaded one by more than `max_imbalance` requests, in
which case the least-loaded replica wins. Ties go to the least loaded.

The router does not see the replicas' caches; it remembers which full pages
of which prompts it sent where (chained page hashes, as the engines' prefix
caches key them), forgetting the oldest beyond `max_pages_per_replica`. A
replica may have evicted a page the router still remembers: the cost of that
is a prefill, never a wrong answer.
"""

import collections
from typing import Sequence

from sharding.errors import ShardingError


def page_hashes(token_ids: Sequence[int], page_size: int) -> list[int]:
  """One key per full page of `token_ids`, each chained to the previous page's key."""
  out, parent = [], 0
  for start in range(0, len(token_ids) - page_size + 1, page_size):
    parent = hash((parent, tuple(token_ids[start:start + page_size])))
    out.append(parent)
  return out


class ReplicaRouter:
  """Chooses the replica for each request; host-side and single-threaded like the engine loop."""

  def __init__(self, num_replicas: int, page_size: int, *, max_imbalance: int = 8,
               max_pages_per_replica: int = 1 << 16):
    if num_replicas < 1:
      raise ShardingError(f"num_replicas={num_replicas}: need at least one replica")
    self._page_size = page_size
    self._max_imbalance = max_imbalance
    self._max_pages = max_pages_per_replica
    self._loads = [0] * num_replicas
    self._pages = [collections.OrderedDict() for _ in range(num_replicas)]  # page key -> None, oldest first

  @property
  def loads(self) -> tuple[int, ...]:
    return tuple(self._loads)

  def cached_pages(self, replica: int, token_ids: Sequence[int]) -> int:
    """How many leading full pages of `token_ids` the router believes `replica` holds."""
    n = 0
    for key in page_hashes(token_ids, self._page_size):
      if key not in self._pages[replica]:
        break
      n += 1
    return n

  def route(self, token_ids: Sequence[int]) -> int:
    """Picks a replica for a prompt and counts the request as in flight there until `release`."""
    least = min(self._loads)
    candidates = [r for r, load in enumerate(self._loads) if load <= least + self._max_imbalance]
    replica = max(candidates, key=lambda r: (self.cached_pages(r, token_ids), -self._loads[r], -r))
    self._loads[replica] += 1
    pages = self._pages[replica]
    for key in page_hashes(token_ids, self._page_size):
      pages[key] = None
      pages.move_to_end(key)
    while len(pages) > self._max_pages:
      pages.popitem(last=False)
    return replica

  def release(self, replica: int):
    """A request on `replica` finished, failed or was cancelled."""
    if self._loads[replica] <= 0:
      raise ShardingError(f"release of replica {replica}, which has no request in flight")
    self._loads[replica] -= 1

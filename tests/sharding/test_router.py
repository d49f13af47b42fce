"""Routing requests over data-parallel replicas: cached prefix first, then the least loaded."""

import pytest

from sharding.errors import ShardingError
from sharding.replicas import ReplicaRouter, page_hashes

SYSTEM = list(range(100, 132))  # two full pages of 16


def test_page_keys_chain_so_equal_pages_after_different_prefixes_differ():
  a = page_hashes([1] * 16 + [2] * 16, 16)
  b = page_hashes([3] * 16 + [2] * 16, 16)
  assert len(a) == 2 and a[1] != b[1]
  assert page_hashes([1] * 15, 16) == []


def test_requests_without_shared_prefix_spread_to_the_least_loaded():
  router = ReplicaRouter(3, page_size=16)
  assert [router.route([i] * 20) for i in range(6)] == [0, 1, 2, 0, 1, 2]
  assert router.loads == (2, 2, 2)


def test_requests_sharing_a_system_prompt_go_where_it_is_cached():
  router = ReplicaRouter(2, page_size=16)
  first = router.route(SYSTEM + [1, 2, 3])
  router.route([7] * 40)  # an unrelated request lands on the other replica
  assert [router.route(SYSTEM + [i]) for i in range(4)] == [first] * 4
  assert router.cached_pages(first, SYSTEM + [9]) == 2
  assert router.cached_pages(1 - first, SYSTEM + [9]) == 0


def test_cached_prefix_loses_to_a_replica_much_less_loaded():
  router = ReplicaRouter(2, page_size=16, max_imbalance=2)
  routed = [router.route(SYSTEM + [i]) for i in range(6)]
  assert routed == [0, 0, 0, 1, 1, 1]  # replica 0 gets 3 (imbalance 2 allowed), then 1 learns the prefix
  router.release(1)
  router.release(1)
  router.release(1)
  assert router.route(SYSTEM) == 1  # both hold the prefix: the less loaded wins


def test_router_forgets_the_oldest_pages_beyond_its_bound():
  router = ReplicaRouter(1, page_size=16, max_pages_per_replica=2)
  router.route(SYSTEM)
  router.route([5] * 32)
  assert router.cached_pages(0, SYSTEM) == 0
  assert router.cached_pages(0, [5] * 32) == 2


def test_release_without_a_request_in_flight_is_an_error():
  router = ReplicaRouter(2, page_size=16)
  with pytest.raises(ShardingError, match=r"release of replica 1, which has no request in flight"):
    router.release(1)

"""Online data parallelism: several engine replicas behind one asyncio front end.

`ReplicatedAsyncEngine` has the interface of `AsyncEngine` that the servers
use, over `data_parallel_size` `AsyncEngine`s. Each replica is a whole engine
(its own weights, KV pool and thread) on its own `tensor_parallel_size` x
`pipeline_parallel_size` devices of this host. Each request goes where
`sharding.replicas.ReplicaRouter` sends it: the replica that already holds the
longest cached prefix of its prompt, unless that replica has more than
`max_imbalance` requests in flight over the least-loaded one. The router counts
a request from `add_request` until its replica reports it done (finished,
aborted or failed).
"""

import asyncio
import functools
from collections.abc import Callable

import jax

from jserve.batch.replicas import replica_device_groups
from jserve.engine.async_engine import AsyncEngine, EngineStats, EngineUnavailableError, RequestStream
from jserve.engine.engine import EngineConfig, LLMEngine
from jserve.engine.request import SamplingParams
from sharding.replicas import ReplicaRouter


def _build_replica(config: EngineConfig, devices: list, per_replica: int) -> LLMEngine:
  with jax.default_device(devices[0]):
    return LLMEngine(config, devices=devices if per_replica > 1 else None)


class ReplicatedAsyncEngine:
  """Replicas of one model on disjoint devices, each request routed to one of them."""

  def __init__(self, config: EngineConfig, data_parallel_size: int, *, max_waiting_requests: int = 1024,
               on_request_done: Callable | None = None, devices=None, max_imbalance: int = 8):
    per_replica = config.tensor_parallel_size * config.pipeline_parallel_size
    groups = replica_device_groups(data_parallel_size, per_replica, devices)
    self.config = config
    self.max_waiting_requests = max_waiting_requests
    self.router = ReplicaRouter(data_parallel_size, config.page_size, max_imbalance=max_imbalance)
    self._on_request_done = on_request_done
    self.replicas = [
        AsyncEngine(config, max_waiting_requests=max_waiting_requests,
                    engine_factory=functools.partial(_build_replica, config, group, per_replica),
                    on_request_done=functools.partial(self._done, i))
        for i, group in enumerate(groups)]

  def _done(self, replica: int, times):
    self.router.release(replica)
    if self._on_request_done is not None:
      self._on_request_done(times)

  # --- what the servers use of AsyncEngine ----------------------------------------------------
  @property
  def engine(self) -> LLMEngine | None:
    """The first replica's engine (model, tokenizer and per-replica limits are the same in all)."""
    return self.replicas[0].engine

  @property
  def ready(self) -> bool:
    return all(r.ready for r in self.replicas)

  @property
  def num_in_flight(self) -> int:
    return sum(r.num_in_flight for r in self.replicas)

  def start(self):
    for r in self.replicas:
      r.start()

  async def wait_ready(self):
    await asyncio.gather(*(r.wait_ready() for r in self.replicas))

  def stop_accepting(self):
    for r in self.replicas:
      r.stop_accepting()

  async def abort_all(self, reason: str):
    await asyncio.gather(*(r.abort_all(reason) for r in self.replicas))

  async def stop(self):
    await asyncio.gather(*(r.stop() for r in self.replicas))

  def not_ready_reason(self) -> str:
    for i, r in enumerate(self.replicas):
      if not r.ready:
        return f"replica {i}: {r.not_ready_reason()}"
    return "ready"

  async def add_request(self, prompt: str | list[int], params: SamplingParams, *, priority: int = 0,
                        request_id: str | None = None) -> RequestStream:
    """Routes the request to a replica and queues it there (raises what `AsyncEngine.add_request` raises)."""
    if not self.ready:
      raise EngineUnavailableError(f"the engine is not serving: {self.not_ready_reason()}")
    token_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    replica = self.router.route(token_ids)
    try:
      return await self.replicas[replica].add_request(prompt, params, priority=priority, request_id=request_id)
    except asyncio.CancelledError:
      raise  # the replica aborts it, and reports it done
    except BaseException:
      self.router.release(replica)  # refused: the replica never counted it
      raise

  async def get_stats(self) -> EngineStats:
    """The replicas' numbers added up (the prefix-cache hit rate is their mean)."""
    stats = await asyncio.gather(*(r.get_stats() for r in self.replicas))
    total = {name: sum(getattr(s, name) for s in stats) for name in EngineStats.__dataclass_fields__}
    total["prefix_cache_hit_rate"] = sum(s.prefix_cache_hit_rate for s in stats) / len(stats)
    return EngineStats(**total)

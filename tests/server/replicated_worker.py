"""Worker for test_replicated_engine.py: two engine replicas on two CPU devices behind one front end.

Usage: python -m tests.server.replicated_worker MODEL_DIR   (with 2 simulated CPU devices)
"""

import asyncio
import json
import sys

ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_pages=96,
              compilation_cache_dir=None)


async def main(model_dir: str):
  import jax
  import numpy as np

  from jserve.engine.engine import EngineConfig
  from jserve.engine.replicated import ReplicatedAsyncEngine
  from jserve.engine.request import SamplingParams
  from jserve.errors import InvalidRequestError
  done = []
  engine = ReplicatedAsyncEngine(EngineConfig(model=model_dir, **ENGINE), 2, on_request_done=done.append)
  routes = []
  route = engine.router.route
  engine.router.route = lambda ids: routes.append(route(ids)) or routes[-1]
  engine.start()
  await engine.wait_ready()
  greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

  async def run(prompt):
    async with await engine.add_request(prompt, greedy) as stream:
      tokens = []
      async for out in stream:
        tokens += out.outputs[0].token_ids
      return tokens

  rng = np.random.default_rng(0)
  distinct = [rng.integers(3, 1000, size=int(n)).tolist() for n in rng.integers(5, 60, 8)]
  distinct_tokens = await asyncio.gather(*(run(p) for p in distinct))
  distinct_routes = list(routes)
  prefix = rng.integers(3, 1000, size=64).tolist()
  shared = [prefix + rng.integers(3, 1000, size=5).tolist() for _ in range(5)]
  shared_tokens = [await run(p) for p in shared]  # one after another: each sees the last one's pages
  shared_routes = routes[len(distinct_routes):]
  refused = ""
  try:
    await engine.add_request(list(range(3, 300)), greedy)
  except InvalidRequestError as e:
    refused = str(e)
  stats = await engine.get_stats()
  replica_steps = [r.engine.num_steps for r in engine.replicas]
  replica_devices = [str(r.engine.runner._home) for r in engine.replicas]
  loads = list(engine.router.loads)
  await engine.stop()
  print(json.dumps({
      "devices": jax.device_count(), "distinct": distinct, "distinct_tokens": distinct_tokens,
      "distinct_routes": distinct_routes, "shared": shared, "shared_tokens": shared_tokens,
      "shared_routes": shared_routes, "refused": refused, "loads_after": loads, "num_done": len(done),
      "replica_steps": replica_steps, "replica_devices": replica_devices, "kv_used_after": stats.kv_used_pages}))


if __name__ == "__main__":
  asyncio.run(main(sys.argv[1]))

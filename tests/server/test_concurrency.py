"""256 concurrent streams over gRPC and HTTP, a quarter cancelled at random points: the rest get exactly
the tokens they get alone (greedy), and afterwards no KV page is held."""

import asyncio
import random

import grpc
import openai

from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from tests.server.conftest import API_KEY, scrape, wait_idle

AUTH = (("authorization", f"Bearer {API_KEY}"),)
NUM_REQUESTS, NUM_HTTP, NUM_PROMPTS, MAX_TOKENS = 256, 64, 32, 24
# A shared first page makes the prefix cache serve part of every prompt; the suffixes make them differ.
# Prompts of 40-70 tokens plus up to 24 outputs need 4-6 pages each, so 16 running sequences want more
# than the 64-page pool and the scheduler preempts: outputs must not change for it.
PREFIX = "# Utilities for parsing configuration files and checking values.\n"
PROMPTS = [PREFIX + f"def function_{i}(value, count={i}):\n    total = value * {i} + count\n" + "    x = 1\n" * (i % 5)
           for i in range(NUM_PROMPTS)]


async def _grpc_tokens(stub, prompt, max_tokens, cancel_after=None) -> list[int] | None:
  """Tokens of a streamed request; None when cancelled (after `cancel_after` messages)."""
  call = stub.Generate(pb.GenerateRequest(text=prompt, sampling_params=pb.SamplingParams(
      max_tokens=max_tokens, temperature=0, ignore_eos=True)), metadata=AUTH, timeout=120)
  tokens, count = [], 0
  if cancel_after == 0:
    await asyncio.sleep(random.random() * 0.2)  # possibly still waiting in the queue
    call.cancel()
    return None
  async for msg in call:
    tokens += [t for c in msg.choices for t in c.token_ids]
    count += 1
    if cancel_after is not None and count >= cancel_after:
      call.cancel()
      return None
  return tokens


async def _http_tokens(client, prompt, max_tokens, cancel_after=None) -> list[int] | None:
  stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
  tokens, count = [], 0
  if cancel_after == 0:
    await asyncio.sleep(random.random() * 0.2)
    await stream.close()
    return None
  async for chunk in stream:
    for c in chunk.choices:
      tokens += c.model_extra.get("token_ids") or []
    count += 1
    if cancel_after is not None and count >= cancel_after:
      await stream.close()
      return None
  return tokens


def _finished_key(reason: str) -> str:
  return f'jserve_requests_total{{finish_reason="{reason}",model_name="tiny"}}'


def test_256_streams_with_a_quarter_cancelled(server):
  rng = random.Random(0)
  max_tokens = [rng.randint(4, MAX_TOKENS) for _ in range(NUM_REQUESTS)]
  cancelled = set(rng.sample(range(NUM_REQUESTS), NUM_REQUESTS // 4))
  cancel_after = {i: rng.randint(0, max_tokens[i] - 2) for i in cancelled}
  http_ids = set(rng.sample(range(NUM_REQUESTS), NUM_HTTP))
  before = scrape(server)

  async def main():
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
      stub = pb_grpc.GenerationStub(channel)
      alone = [await _grpc_tokens(stub, p, MAX_TOKENS) for p in PROMPTS]  # one at a time
      client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
      async with client:
        jobs = [(_http_tokens(client, *args) if i in http_ids else _grpc_tokens(stub, *args))
                for i, args in enumerate((PROMPTS[i % NUM_PROMPTS], max_tokens[i], cancel_after.get(i))
                                         for i in range(NUM_REQUESTS))]
        results = await asyncio.gather(*jobs)
    return alone, results

  alone, results = asyncio.run(asyncio.wait_for(main(), 300))
  assert all(len(a) == MAX_TOKENS for a in alone)
  for i, tokens in enumerate(results):
    # Deltas that pile up are merged, so a stream may end before its cancel point: then it is whole.
    if i not in cancelled or tokens is not None:
      assert tokens == alone[i % NUM_PROMPTS][:max_tokens[i]], f"request {i} ({'HTTP' if i in http_ids else 'gRPC'})"

  after = wait_idle(server)
  assert after["jserve_num_requests_running"] == 0 and after["jserve_num_requests_waiting"] == 0
  assert after["jserve_kv_cache_used_pages"] == 0, "pages still held after every request ended"
  assert after["jserve_kv_cache_cached_pages"] <= after["jserve_kv_cache_total_pages"]
  # A cancel that arrives after the last token finds the request finished (a slow client reads behind the
  # server), and one that arrives before the server took the call reaches no engine, so how many abort
  # depends on timing; that every uncancelled request ends at its length and none ends twice does not.
  # test_cancel_mid_stream_aborts pins the abort itself.
  ended = {r: after.get(_finished_key(r), 0) - before.get(_finished_key(r), 0) for r in ("abort", "length")}
  assert ended["length"] >= NUM_REQUESTS - len(cancelled) + NUM_PROMPTS, ended
  assert ended["abort"] + ended["length"] <= NUM_REQUESTS + NUM_PROMPTS, ended
  assert ended["abort"] <= sum(results[i] is None for i in cancelled), ended
  assert after["jserve_prefix_cache_hit_rate"] > 0
  print(f"preemptions: {after['jserve_num_preemptions_total'] - before['jserve_num_preemptions_total']:.0f}, "
        f"aborted: {ended['abort']:.0f}")


def test_cancel_mid_stream_aborts(server):
  """A stream cancelled after its first message, with 200 tokens still to come, ends as an abort: the
  counter moves by one and the request's pages come back. Up to three tries, in case a stalled client
  reads the first message only after the server has finished (the counter then moves under "length")."""
  async def one(stub):
    call = stub.Generate(pb.GenerateRequest(text="count:", sampling_params=pb.SamplingParams(
        max_tokens=200, temperature=0, ignore_eos=True)), metadata=AUTH, timeout=120)
    await call.read()
    call.cancel()

  async def main():
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
      await one(pb_grpc.GenerationStub(channel))

  for _ in range(3):
    before = wait_idle(server)
    asyncio.run(asyncio.wait_for(main(), 120))
    after = wait_idle(server)
    assert after["jserve_kv_cache_used_pages"] == 0 and after["jserve_num_requests_running"] == 0
    ended = {r: after.get(_finished_key(r), 0) - before.get(_finished_key(r), 0) for r in ("abort", "length")}
    assert ended["abort"] + ended["length"] == 1, ended
    if ended["abort"] == 1:
      return
  raise AssertionError("three streams cancelled after their first message all ran to their length")

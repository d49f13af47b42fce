"""Overload and graceful shutdown of the shared server (these run last: the second one ends it).

A full waiting queue refuses at once (RESOURCE_EXHAUSTED / 429). SIGTERM drains: NOT_SERVING, new
requests UNAVAILABLE / 503; in-flight requests complete or end with UNAVAILABLE / an error event; the
process exits 0 soon after the drain timeout."""

import asyncio
import time

import grpc
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from tests.server.conftest import API_KEY, MAX_WAITING, SHUTDOWN_TIMEOUT_S, scrape, wait_idle

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def _request(max_tokens=240, priority=0, text="count:"):
  return pb.GenerateRequest(text=text, priority=priority, sampling_params=pb.SamplingParams(
      max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def _wait_waiting(server, count, timeout_s=150):
  # Generous: at the end of a full run on 2 cores, with the other test worker busy, sending a few hundred
  # streams and the engine's admission of them took over 60 s three times.
  deadline = time.monotonic() + timeout_s
  while scrape(server)["jserve_num_requests_waiting"] < count:
    assert time.monotonic() < deadline, "the engine never filled up"
    await asyncio.sleep(0.05)


async def _first_refused(tasks, refused):
  """The first of `tasks` to end refused (by the predicate `refused` on its result or error), or None
  once all ended otherwise. Refusals come at once; an admitted request only ends after it ran."""
  pending = set(tasks)
  while pending:
    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    for t in done:
      outcome = t.exception() if t.exception() is not None else t.result()
      if refused(outcome):
        return outcome
  return None


def _is_grpc_refusal(e) -> bool:
  return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _is_http_refusal(r) -> bool:
  return getattr(r, "status_code", None) == 429


def test_full_waiting_queue_is_refused_at_once(server):
  # The queue is full only until a running request ends and one waiting takes its place, so each front end
  # is probed with a burst of 16 requests: while more than 16 slots have not opened, one is refused.
  async def main():
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
      stub = pb_grpc.GenerationStub(channel)
      # 240-token requests take 16 of the 64 KV pages each: 4 run, the rest wait. 64 more than the queue
      # holds: running ones finish (and waiting ones start) while the rest are still being sent, and on a
      # slow machine 12 spare requests were too few for the queue ever to fill; the surplus is refused.
      calls = [stub.Generate(_request(), metadata=AUTH) for _ in range(MAX_WAITING + 64)]
      firsts = [asyncio.ensure_future(c.read()) for c in calls]
      await _wait_waiting(server, MAX_WAITING)
      probes = [stub.Generate(_request(), metadata=AUTH) for _ in range(16)]
      calls += probes
      e = await _first_refused([asyncio.ensure_future(c.read()) for c in probes], _is_grpc_refusal)
      assert e is not None, "a burst of 16 requests into a full queue was admitted whole"
      assert f"the limit (--max_waiting_requests) is {MAX_WAITING}" in e.details()
      # Requests that ended since (running ones finish; the waiting count only falls) are replaced, so
      # the queue is full again for the HTTP burst.
      refill = [stub.Generate(_request(), metadata=AUTH) for _ in range(16)]
      calls += refill
      firsts += [asyncio.ensure_future(c.read()) for c in refill]
      async with httpx2.AsyncClient(base_url=server.http_url, timeout=120, limits=httpx2.Limits(max_connections=32),
                                    headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        await _wait_waiting(server, MAX_WAITING)
        posts = [asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "count:", "max_tokens": 4}))
                 for _ in range(16)]
        r = await _first_refused(posts, _is_http_refusal)
        for p in posts:
          p.cancel()
        await asyncio.gather(*posts, return_exceptions=True)
      assert r is not None, "a burst of 16 HTTP requests into a full queue was admitted whole"
      assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
      for c in calls:
        c.cancel()
      await asyncio.gather(*firsts, return_exceptions=True)
  asyncio.run(asyncio.wait_for(main(), 360))
  m = wait_idle(server, timeout_s=30)
  assert m["jserve_kv_cache_used_pages"] == 0 and m["jserve_num_requests_waiting"] == 0


def test_sigterm_drains_then_exits_0(server):
  outcomes = {}

  async def grpc_stream(stub, name, request, started=None):
    tokens = 0
    try:
      async for msg in stub.Generate(request, metadata=AUTH, timeout=60):
        tokens += sum(len(c.token_ids) for c in msg.choices)
        if started is not None and not started.done():
          started.set_result(True)
      outcomes[name] = ("done", tokens, time.monotonic())
    except grpc.aio.AioRpcError as e:
      outcomes[name] = (e.code(), e.details(), time.monotonic())

  async def http_stream(client, name):
    text = ""
    try:
      async for chunk in await client.completions.create(model="tiny", prompt="count:", max_tokens=240,
                                                         stream=True, temperature=0, extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text if chunk.choices else ""
      outcomes[name] = ("done", text, time.monotonic())
    except openai.APIError as e:
      outcomes[name] = ("error", str(e), time.monotonic())

  async def main():
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
      stub = pb_grpc.GenerationStub(channel)
      health = health_pb2_grpc.HealthStub(channel)
      client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
      # Two 60-token requests run first (priority -1) and can finish inside the drain; 240-token ones
      # take the rest of the pool (16 of 64 pages each), so most of them cannot.
      started = [loop.create_future() for _ in range(2)]
      tasks = [asyncio.ensure_future(grpc_stream(stub, f"short{i}", _request(60, priority=-1), started[i]))
               for i in range(2)]
      await asyncio.gather(*started)
      # Each wave of four takes 240 steps, so 40 of them outlast the drain on any machine.
      tasks += [asyncio.ensure_future(grpc_stream(stub, f"long{i}", _request())) for i in range(40)]
      tasks += [asyncio.ensure_future(http_stream(client, f"http{i}")) for i in range(4)]
      await _wait_waiting(server, 8)
      server.proc.send_signal(15)
      sent = time.monotonic()
      statuses = set()
      while time.monotonic() - sent < SHUTDOWN_TIMEOUT_S / 2:
        statuses.add((await health.Check(health_pb2.HealthCheckRequest(service="jserve.v1.Generation"))).status)
        if health_pb2.HealthCheckResponse.NOT_SERVING in statuses:
          break
      assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(_request(), metadata=AUTH).read()
      assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
      async with httpx2.AsyncClient(base_url=server.http_url, timeout=10,
                                    headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert (await http.get("/health")).status_code == 503
      await asyncio.gather(*tasks)
      await client.close()
      return sent

  sent = asyncio.run(asyncio.wait_for(main(), 120))
  code = server.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 15)
  elapsed = time.monotonic() - sent
  assert code == 0, server.log()[-3000:]
  assert elapsed < SHUTDOWN_TIMEOUT_S + 10, f"exit took {elapsed:.1f} s"
  for name, (kind, detail, _) in outcomes.items():
    if kind == "done":
      assert name.startswith("http") or detail == (240 if name.startswith("long") else 60), (name, detail)
    elif kind == "error":
      assert "shutting down" in detail, (name, detail)
    else:
      assert kind == grpc.StatusCode.UNAVAILABLE and "shutting down" in detail, (name, kind, detail)
  assert any(kind == "done" and at > sent for kind, _, at in outcomes.values()), "nothing finished in the drain"
  assert any(kind == grpc.StatusCode.UNAVAILABLE for kind, _, _ in outcomes.values()), (
      f"nothing was aborted: {outcomes}")
  assert "aborting" in server.log() and "shut down cleanly" in server.log()

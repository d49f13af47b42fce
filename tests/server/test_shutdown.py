"""Overload and graceful shutdown of a server of its own: a full waiting queue refuses at once
(RESOURCE_EXHAUSTED / 429); SIGTERM drains (NOT_SERVING, new requests UNAVAILABLE / 503), in-flight
requests complete or end with UNAVAILABLE / an error event, and the process exits 0 in time."""

import asyncio
import time

import grpc
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from tests.server.conftest import ServerProcess, scrape, wait_idle

SHUTDOWN_TIMEOUT_S = 1.0
MAX_WAITING = 24  # with max_num_seqs=16: 40 requests fill the engine


@pytest.fixture(scope="module")
def server2(tiny_model_dir, tmp_path_factory):
  log = str(tmp_path_factory.mktemp("server2") / "server.log")
  s = ServerProcess(tiny_model_dir, log, f"--max_waiting_requests={MAX_WAITING}", "--scheduling_policy=priority",
                    f"--shutdown_timeout_s={SHUTDOWN_TIMEOUT_S}")
  try:
    yield s.wait_ready()
  finally:
    s.terminate(timeout_s=5)


def _long(priority=0):
  return pb.GenerateRequest(text="count:", priority=priority,
                            sampling_params=pb.SamplingParams(max_tokens=240, temperature=0, ignore_eos=True))


async def _wait_waiting(server, count, timeout_s=30):
  deadline = time.monotonic() + timeout_s
  while scrape(server)["jserve_num_requests_waiting"] < count:
    assert time.monotonic() < deadline, "the engine never filled up"
    await asyncio.sleep(0.05)


def test_full_waiting_queue_is_refused_at_once(server2):
  async def main():
    async with grpc.aio.insecure_channel(server2.grpc_address) as channel:
      stub = pb_grpc.GenerationStub(channel)
      calls = [stub.Generate(_long()) for _ in range(16 + MAX_WAITING)]
      firsts = [asyncio.ensure_future(c.read()) for c in calls]
      await _wait_waiting(server2, MAX_WAITING)
      start = time.monotonic()
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(_long()).read()
      assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
      assert "--max_waiting_requests" in e.value.details()
      async with httpx2.AsyncClient(base_url=server2.http_url, timeout=30) as http:
        r = await http.post("/v1/completions", json={"prompt": "count:", "max_tokens": 4})
      assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
      assert r.headers["retry-after"] == "1"
      assert time.monotonic() - start < 5  # refused, not queued
      for c in calls:
        c.cancel()
      await asyncio.gather(*firsts, return_exceptions=True)
  asyncio.run(asyncio.wait_for(main(), 120))
  m = wait_idle(server2)
  assert m["jserve_kv_cache_used_pages"] == 0 and m["jserve_num_requests_waiting"] == 0


def test_sigterm_drains_then_exits_0(server2):
  outcomes = {}

  async def grpc_stream(stub, name, request):
    tokens = 0
    try:
      async for msg in stub.Generate(request, timeout=60):
        tokens += sum(len(c.token_ids) for c in msg.choices)
      outcomes[name] = ("done", tokens)
    except grpc.aio.AioRpcError as e:
      outcomes[name] = (e.code(), e.details())

  async def http_stream(client, name):
    text = ""
    try:
      async for chunk in await client.completions.create(model=None, prompt="count:", max_tokens=240, stream=True,
                                                         temperature=0, extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text if chunk.choices else ""
      outcomes[name] = ("done", text)
    except openai.APIError as e:
      outcomes[name] = ("error", str(e))

  async def main():
    async with grpc.aio.insecure_channel(server2.grpc_address) as channel:
      stub = pb_grpc.GenerationStub(channel)
      health = health_pb2_grpc.HealthStub(channel)
      client = openai.AsyncOpenAI(base_url=f"{server2.http_url}/v1", api_key="none", max_retries=0, timeout=60)
      # Short requests go first (priority -1) and finish inside the drain; three waves of 240-token
      # requests cannot all finish within it.
      jobs = [grpc_stream(stub, f"short{i}", pb.GenerateRequest(text="hi", priority=-1, sampling_params=pb.SamplingParams(
          max_tokens=2, temperature=0, ignore_eos=True))) for i in range(4)]
      jobs += [grpc_stream(stub, f"long{i}", _long()) for i in range(32)]
      jobs += [http_stream(client, f"http{i}") for i in range(4)]
      tasks = [asyncio.ensure_future(j) for j in jobs]
      await _wait_waiting(server2, 8)
      server2.proc.send_signal(15)
      sent = time.monotonic()
      # During the drain: NOT_SERVING, and new work is refused with UNAVAILABLE / 503.
      statuses = set()
      while time.monotonic() - sent < 0.5:
        statuses.add((await health.Check(health_pb2.HealthCheckRequest(service="jserve.v1.Generation"))).status)
        if health_pb2.HealthCheckResponse.NOT_SERVING in statuses:
          break
      assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(_long()).read()
      assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
      async with httpx2.AsyncClient(base_url=server2.http_url, timeout=10) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert (await http.get("/health")).status_code == 503
      await asyncio.gather(*tasks)
      await client.close()
      return sent

  sent = asyncio.run(asyncio.wait_for(main(), 120))
  code = server2.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 15)
  elapsed = time.monotonic() - sent
  assert code == 0, server2.log()[-3000:]
  assert elapsed < SHUTDOWN_TIMEOUT_S + 10, f"exit took {elapsed:.1f} s"
  assert all(outcomes[f"short{i}"] == ("done", 2) for i in range(4)), outcomes
  for name, (kind, detail) in outcomes.items():
    if kind == "done":
      assert name.startswith("http") or detail == (240 if name.startswith("long") else 2), (name, detail)
    elif kind == "error":
      assert "shutting down" in detail, (name, detail)
    else:
      assert kind == grpc.StatusCode.UNAVAILABLE and "shutting down" in detail, (name, kind, detail)
  assert any(kind == grpc.StatusCode.UNAVAILABLE for kind, _ in outcomes.values()), "nothing was aborted"
  assert "aborting" in server2.log() and "shut down cleanly" in server2.log()

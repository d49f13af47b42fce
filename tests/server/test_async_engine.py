"""AsyncEngine's plumbing with a fake engine: streaming, merging, cancellation, overload, failure, stop."""

import asyncio

import pytest

from jserve.engine.async_engine import AsyncEngine, EngineUnavailableError
from jserve.engine.engine import EngineConfig
from jserve.engine.request import SamplingParams
from jserve.errors import InvalidRequestError, OverloadedError
from tests.server.fake_engine import FakeEngine


def _run(coro):
  return asyncio.run(asyncio.wait_for(coro, 30))


async def _started(fake: FakeEngine, **kwargs) -> AsyncEngine:
  engine = AsyncEngine(EngineConfig(), engine_factory=lambda: fake, **kwargs)
  engine.start()
  await engine.wait_ready()
  return engine


def test_stream_delivers_every_token_once_then_finishes():
  async def main():
    engine = await _started(FakeEngine())
    async with await engine.add_request("hi", SamplingParams(max_tokens=5)) as stream:
      tokens, reasons = [], []
      async for out in stream:
        tokens += out.outputs[0].token_ids
        reasons.append(out.outputs[0].finish_reason)
    assert tokens == [0, 1, 2, 3, 4]
    assert reasons[-1] == "length" and stream.times.num_output_tokens == 5
    assert stream.times.first_token is not None and stream.times.scheduled is not None
    await engine.stop()
  _run(main())


def test_deltas_that_pile_up_are_merged():
  async def main():
    engine = await _started(FakeEngine())
    stream = await engine.add_request("hi", SamplingParams(max_tokens=6))
    await asyncio.sleep(0.3)  # the engine finishes while nobody reads
    outs = [out async for out in stream]
    assert len(outs) == 1 and outs[0].outputs[0].token_ids == list(range(6))
    assert outs[0].outputs[0].text == "t0 t1 t2 t3 t4 t5 " and outs[0].finished
    await engine.stop()
  _run(main())


def test_leaving_a_stream_early_aborts_the_request():
  async def main():
    fake = FakeEngine(step_s=0.01)
    done = []
    engine = await _started(fake, on_request_done=done.append)
    async with await engine.add_request("hi", SamplingParams(max_tokens=1000)) as stream:
      async for _ in stream:
        break
    for _ in range(100):
      if fake.aborted:
        break
      await asyncio.sleep(0.01)
    assert fake.aborted == [stream.request_id] and not fake.has_unfinished()
    await asyncio.sleep(0.05)
    assert [t.finish_reason for t in done] == ["abort"]
    await engine.stop()
  _run(main())


def test_cancelled_consumer_aborts_the_request():
  async def main():
    fake = FakeEngine(step_s=0.01)
    engine = await _started(fake)
    stream = await engine.add_request("hi", SamplingParams(max_tokens=1000))

    async def consume():
      async with stream:
        async for _ in stream:
          pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(100):
      if fake.aborted:
        break
      await asyncio.sleep(0.01)
    assert fake.aborted == [stream.request_id]
    await engine.stop()
  _run(main())


def test_full_waiting_queue_refuses_at_once():
  async def main():
    fake = FakeEngine(max_num_seqs=0, step_s=0.01)  # nothing runs: every request waits
    engine = await _started(fake, max_waiting_requests=2)
    streams = [await engine.add_request("hi", SamplingParams(max_tokens=1000)) for _ in range(2)]
    with pytest.raises(OverloadedError, match=r"2 requests are waiting, the limit \(--max_waiting_requests\) is 2"):
      await engine.add_request("hi", SamplingParams(max_tokens=1000))
    for s in streams:
      s.abort()
    await engine.stop()
  _run(main())


def test_bad_request_raises_from_add_request():
  async def main():
    engine = await _started(FakeEngine())
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
      await engine.add_request("", SamplingParams())
    assert engine.num_in_flight == 0
    await engine.stop()
  _run(main())


def test_engine_failure_fails_streams_and_refuses_new_requests():
  async def main():
    engine = await _started(FakeEngine(fail_at_step=3))
    stream = await engine.add_request("hi", SamplingParams(max_tokens=100))
    with pytest.raises(EngineUnavailableError, match="the engine failed: device lost"):
      async for _ in stream:
        pass
    with pytest.raises(EngineUnavailableError, match="device lost"):
      await engine.add_request("hi", SamplingParams())
    await engine.stop()
  _run(main())


def test_load_failure_is_raised_by_wait_ready():
  async def main():
    def fail():
      raise InvalidRequestError("no such checkpoint")
    engine = AsyncEngine(EngineConfig(), engine_factory=fail)
    engine.start()
    with pytest.raises(InvalidRequestError, match="no such checkpoint"):
      await engine.wait_ready()
    with pytest.raises(EngineUnavailableError, match="loading failed"):
      await engine.add_request("hi", SamplingParams())
  _run(main())


def test_stop_and_abort_all_end_streams_with_unavailable():
  async def main():
    fake = FakeEngine(step_s=0.01)
    engine = await _started(fake)
    first = await engine.add_request("a", SamplingParams(max_tokens=1000))
    await engine.abort_all("the server is shutting down")
    with pytest.raises(EngineUnavailableError, match="shutting down"):
      async for _ in first:
        pass
    second = await engine.add_request("b", SamplingParams(max_tokens=1000))
    engine.stop_accepting()
    with pytest.raises(EngineUnavailableError, match="shutting down"):
      await engine.add_request("c", SamplingParams())
    await engine.stop()
    with pytest.raises(EngineUnavailableError):
      async for _ in second:
        pass
    assert not fake.has_unfinished()
  _run(main())


def test_caller_cancelled_during_add_still_aborts_the_request():
  async def main():
    fake = FakeEngine(step_s=0.2)  # the add waits for the step in progress
    engine = await _started(fake)
    busy = await engine.add_request("a", SamplingParams(max_tokens=1000))
    await asyncio.sleep(0.05)
    task = asyncio.ensure_future(engine.add_request("b", SamplingParams(max_tokens=1000), request_id="late"))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    busy.abort()
    for _ in range(100):
      if not fake.has_unfinished():
        break
      await asyncio.sleep(0.02)
    assert any(rid.startswith("late-") for rid in fake.aborted) and not fake.has_unfinished()
    await engine.stop()
  _run(main())


def test_engine_thread_ends_quietly_when_its_loop_is_gone():
  fake = FakeEngine(step_s=0.01)
  holder = {}

  async def main():
    holder["engine"] = engine = await _started(fake)
    await engine.add_request("hi", SamplingParams(max_tokens=1000))  # left running on purpose
  _run(main())
  thread = holder["engine"]._thread
  thread.join(5)
  assert not thread.is_alive()


def test_calls_after_a_failure_do_not_hang():
  async def main():
    engine = await _started(FakeEngine(fail_at_step=1))
    stream = await engine.add_request("hi", SamplingParams(max_tokens=10))
    with pytest.raises(EngineUnavailableError):
      async for _ in stream:
        pass
    engine._thread.join(5)
    await engine.abort_all("shutting down")  # the drain after a failure returns at once
    assert (await engine.get_stats()).num_running == 0
    await engine.stop()
  _run(main())

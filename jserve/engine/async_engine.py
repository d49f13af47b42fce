"""AsyncEngine: the engine loop in its own thread, driven from asyncio.

`LLMEngine` is single-threaded and its `step()` blocks for the length of a
device step, so it gets a thread of its own. The asyncio side (the servers)
talks to it through two channels only:

  commands   a `queue.Queue` into the engine thread: add, abort, stats, stop.
             The thread drains it between steps, and blocks on it when idle.
  outputs    per request, an `asyncio.Queue` on the event loop. After each step
             the thread hands every new output to the loop in one
             `call_soon_threadsafe`, so a step costs one wake-up, not one per
             request.

Nothing else is shared: engine state (requests, pages, scheduler) is touched by
the engine thread alone, so it needs no locks.

    engine = AsyncEngine(EngineConfig(model=...), max_waiting_requests=1024)
    engine.start()
    await engine.wait_ready()
    async with await engine.add_request(prompt, params) as stream:
      async for out in stream:   # RequestOutput deltas (new tokens and text)
        ...
    # leaving the block early (break, cancel, error) aborts the request and frees its pages.
"""

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable

from absl import logging

from jserve.engine.engine import EngineConfig, LLMEngine
from jserve.engine.request import RequestOutput, SamplingParams
from jserve.errors import ConfigError, JserveError, OverloadedError

_STOP = object()


class EngineUnavailableError(JserveError):
  """The engine cannot take or finish requests now: it is loading, draining, stopped or failed."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """A consistent snapshot of the engine's queues and KV pool, taken in the engine thread."""

  num_running: int = 0
  num_waiting: int = 0
  kv_used_pages: int = 0
  kv_cached_pages: int = 0
  kv_total_pages: int = 0
  prefix_cache_hit_rate: float = 0.0
  num_preemptions: int = 0
  num_steps: int = 0


@dataclasses.dataclass
class RequestTimes:
  """Life of one request in `time.monotonic()` seconds, for latency metrics."""

  arrival: float
  scheduled: float | None = None
  first_token: float | None = None
  finished: float | None = None
  num_prompt_tokens: int = 0
  num_output_tokens: int = 0
  num_cached_tokens: int = 0
  finish_reason: str | None = None


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
  """Two consecutive stream deltas of one request as one delta."""
  by_index = {c.index: c for c in a.outputs}
  for c in b.outputs:
    prev = by_index.get(c.index)
    if prev is None:
      by_index[c.index] = c
      continue
    logprobs = None
    if prev.logprobs is not None or c.logprobs is not None:
      logprobs = list(prev.logprobs or []) + list(c.logprobs or [])
    by_index[c.index] = dataclasses.replace(
        c, text=prev.text + c.text, token_ids=list(prev.token_ids) + list(c.token_ids), logprobs=logprobs)
  return dataclasses.replace(b, outputs=[by_index[i] for i in sorted(by_index)],
                             prompt_logprobs=a.prompt_logprobs or b.prompt_logprobs)


class RequestStream:
  """The outputs of one request, as an async iterator of `RequestOutput` deltas.

  Deltas that pile up while the consumer is busy are merged into one. Use it as
  an async context manager (or call `abort()`): a stream left before its last
  output aborts the request in the engine.
  """

  def __init__(self, engine: "AsyncEngine", request_id: str, times: RequestTimes):
    self.request_id = request_id
    self.times = times
    self.finished = False
    self._engine = engine
    self._queue: asyncio.Queue = asyncio.Queue()
    self._held: BaseException | None = None  # an error that arrived behind merged deltas
    self._req = None  # the engine's Request: read in the engine thread only

  def _put(self, item):
    self._queue.put_nowait(item)

  def __aiter__(self):
    return self

  async def __anext__(self) -> RequestOutput:
    if self.finished:
      raise StopAsyncIteration
    item, self._held = self._held or await self._queue.get(), None
    while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
      nxt = self._queue.get_nowait()
      if not isinstance(nxt, RequestOutput):
        self._held = nxt
        break
      item = _merge(item, nxt)
    if isinstance(item, BaseException):
      self.finished = True
      raise item
    if item.finished:
      self.finished = True
    return item

  def abort(self):
    """Aborts the request unless it already finished; its pages are freed at the next engine turn."""
    if not self.finished:
      self.finished = True
      self._engine._abort(self.request_id)

  async def __aenter__(self):
    return self

  async def __aexit__(self, *exc):
    self.abort()


class AsyncEngine:
  """Runs one `LLMEngine` in a background thread and serves asyncio callers."""

  def __init__(self, config: EngineConfig, *, max_waiting_requests: int = 1024,
               engine_factory: Callable[[], LLMEngine] | None = None,
               on_request_done: Callable[[RequestTimes], None] | None = None):
    if max_waiting_requests < 1:
      raise ConfigError(f"max_waiting_requests={max_waiting_requests}: need at least 1")
    self.config = config
    self.max_waiting_requests = max_waiting_requests
    self._factory = engine_factory or (lambda: LLMEngine(config))
    self._on_request_done = on_request_done
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._streams: dict[str, RequestStream] = {}  # engine thread's view
    self._ids = itertools.count()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._thread: threading.Thread | None = None
    self._ready: asyncio.Future | None = None
    self._accepting = True
    self._error: BaseException | None = None
    self._orphaned = False
    self.engine: LLMEngine | None = None  # set once loaded; read-only from the asyncio side

  # --- lifecycle ------------------------------------------------------------------------------
  def start(self):
    """Starts the engine thread, which loads the model and compiles every step bucket."""
    self._loop = asyncio.get_running_loop()
    self._ready = self._loop.create_future()
    self._thread = threading.Thread(target=self._run, name="jserve-engine", daemon=True)
    self._thread.start()

  async def wait_ready(self):
    """Returns once the engine is loaded and compiled; raises what loading raised."""
    await asyncio.shield(self._ready)

  @property
  def ready(self) -> bool:
    return (self._ready is not None and self._ready.done() and not self._ready.exception()
            and self._error is None)

  @property
  def num_in_flight(self) -> int:
    """Requests added and not yet finished or aborted (asyncio side's count)."""
    return len(self._streams)

  def stop_accepting(self):
    """New `add_request` calls fail with EngineUnavailableError from now on (the drain)."""
    self._accepting = False

  async def abort_all(self, reason: str):
    """Aborts every request in flight; their streams raise EngineUnavailableError(reason)."""
    if self._thread is not None and self._thread.is_alive():
      await self._call("abort_all", reason)

  async def stop(self):
    """Aborts what is left, ends the engine thread and waits for it."""
    self._accepting = False
    if self._thread is None:
      return
    self._commands.put((_STOP, None, None))
    if self.ready:  # a thread still loading the model is a daemon: it dies with the process
      await asyncio.to_thread(self._thread.join)

  # --- requests -------------------------------------------------------------------------------
  async def add_request(self, prompt: str | list[int], params: SamplingParams, *, priority: int = 0,
                        request_id: str | None = None) -> RequestStream:
    """Validates and queues a request in the engine.

    Raises InvalidRequestError / CapacityError for a request that can never
    run, OverloadedError when the waiting queue is full, EngineUnavailableError
    while loading, draining or after a failure.
    """
    if not self._accepting:
      raise EngineUnavailableError("the server is shutting down")
    if not self.ready:
      raise EngineUnavailableError(f"the engine is not serving: {self.not_ready_reason()}")
    # Engine ids are unique whatever the clients send; the caller's id is kept as a prefix for logs.
    rid = f"{request_id}-{next(self._ids)}" if request_id else f"{uuid.uuid4().hex[:16]}-{next(self._ids)}"
    stream = RequestStream(self, rid, RequestTimes(arrival=time.monotonic()))
    try:
      await self._call("add", (stream, prompt, params, priority))
    except asyncio.CancelledError:
      # The caller left while the add was queued; it may still land, and the queue's order puts this
      # abort after it.
      self._abort(rid)
      raise
    return stream

  async def get_stats(self) -> EngineStats:
    """The engine's current numbers (zeros until it is loaded)."""
    if not self.ready or not self._thread.is_alive():
      return EngineStats()
    return await self._call("stats", None)

  def not_ready_reason(self) -> str:
    """Why the engine is not ready, in a few words."""
    if self._error is not None:
      return f"it failed ({self._error})"
    if self._ready is not None and self._ready.done() and self._ready.exception():
      return f"loading failed ({self._ready.exception()})"
    return "the model is still loading"

  async def _call(self, kind: str, payload):
    if not self._thread.is_alive():
      raise EngineUnavailableError(f"the engine is not running: {self.not_ready_reason()}")
    fut = self._loop.create_future()
    self._commands.put((kind, payload, fut))
    return await fut

  def _abort(self, request_id: str):
    self._commands.put(("abort", request_id, None))

  # --- the engine thread ----------------------------------------------------------------------
  def _post(self, fn, *args):
    """Runs fn(*args) on the event loop; once the loop is closed, the engine thread winds down instead."""
    try:
      self._loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed under us (its owner exited without stop())
      self._orphaned = True

  def _resolve(self, fut, result=None, error=None):
    def done():
      if not fut.done():
        fut.set_exception(error) if error is not None else fut.set_result(result)
    self._post(done)

  def _run(self):
    try:
      self.engine = self._factory()
    except BaseException as e:  # noqa: BLE001 - reported to whoever awaits wait_ready()
      logging.error("engine failed to start: %s", e)
      self._resolve(self._ready, error=e)
      return
    self._resolve(self._ready, result=True)
    logging.info("engine ready")
    try:
      self._loop_forever()
    except BaseException as e:  # noqa: BLE001 - a jserve bug or a device failure
      logging.exception("engine loop failed")
      self._error = e
      self._fail_all(EngineUnavailableError(f"the engine failed: {e}"))
    finally:
      self._reject_pending()
      try:
        self.engine.stop_followers()  # several processes: let the followers return
      except Exception:  # noqa: BLE001 - the engine may be what failed
        logging.exception("could not stop the follower processes")

  def _reject_pending(self):
    """Fails the commands still queued when the thread ends, so that no caller waits forever."""
    while True:
      try:
        _, _, fut = self._commands.get_nowait()
      except queue.Empty:
        return
      if fut is not None:
        self._resolve(fut, error=EngineUnavailableError("the engine has stopped"))

  def _loop_forever(self):
    engine = self.engine
    while not self._orphaned:
      block = not engine.has_unfinished()
      try:
        command = self._commands.get(block=block)
      except queue.Empty:
        command = None
      while command is not None:
        if command[0] is _STOP:
          self._fail_all(EngineUnavailableError("the server is shutting down"))
          return
        self._handle(*command)
        try:
          command = self._commands.get_nowait()
        except queue.Empty:
          command = None
      if engine.has_unfinished():
        self._deliver(engine.step())

  def _handle(self, kind, payload, fut):
    engine = self.engine
    if kind == "add":
      stream, prompt, params, priority = payload
      try:
        if len(engine.scheduler.waiting) >= self.max_waiting_requests:
          raise OverloadedError(f"{len(engine.scheduler.waiting)} requests are waiting, the limit "
                                f"(--max_waiting_requests) is {self.max_waiting_requests}; retry later")
        engine.add_request(stream.request_id, prompt, params, priority=priority,
                           arrival_time=stream.times.arrival, stream=True)
      except Exception as e:  # noqa: BLE001 - every rejection goes back to the caller
        self._resolve(fut, error=e)
        return
      # With n > 1 the engine runs children "<id>-<index>"; the first is scheduled first.
      stream._req = engine.requests.get(stream.request_id) or engine.requests[f"{stream.request_id}-0"]
      stream.times.num_prompt_tokens = stream._req.num_prompt_tokens
      self._streams[stream.request_id] = stream
      self._resolve(fut, result=True)
    elif kind == "abort":
      stream = self._streams.pop(payload, None)
      if stream is not None:
        out = engine.abort(payload)
        self._record_done(stream, out, time.monotonic())
    elif kind == "abort_all":
      self._fail_all(EngineUnavailableError(payload))
      self._resolve(fut, result=True)
    elif kind == "stats":
      kv, sched = engine.kv, engine.scheduler
      self._resolve(fut, result=EngineStats(
          num_running=len(sched.running), num_waiting=len(sched.waiting), kv_used_pages=kv.num_used_pages,
          kv_cached_pages=kv.num_cached_pages, kv_total_pages=kv.num_usable_pages,
          prefix_cache_hit_rate=kv.hit_rate, num_preemptions=sched.num_preemptions, num_steps=engine.num_steps))

  def _fail_all(self, error: JserveError):
    """Aborts every request; each stream gets `error` (engine thread)."""
    now = time.monotonic()
    batch = []
    for rid, stream in list(self._streams.items()):
      try:
        out = self.engine.abort(rid)
      except Exception:  # noqa: BLE001 - the engine may be the thing that failed
        out = None
      self._record_done(stream, out, now)
      batch.append((stream, error))
    self._streams.clear()
    if batch:
      self._post(self._dispatch, batch)

  def _deliver(self, outputs: list[RequestOutput]):
    now = time.monotonic()
    batch = []
    for out in outputs:
      stream = self._streams.get(out.request_id)
      if stream is None:
        continue  # aborted while the step ran
      times = stream.times
      if times.first_token is None and any(c.token_ids for c in out.outputs):
        times.first_token = now
        times.scheduled = stream._req.schedule_time
        times.num_cached_tokens = stream._req.num_cached_tokens
      times.num_output_tokens += sum(len(c.token_ids) for c in out.outputs)
      if out.finished:
        del self._streams[out.request_id]
        self._record_done(stream, out, now)
      batch.append((stream, out))
    if batch:
      self._post(self._dispatch, batch)

  def _record_done(self, stream: RequestStream, out: RequestOutput | None, now: float):
    times = stream.times
    times.finished = now
    reasons = [c.finish_reason for c in out.outputs if c.finish_reason] if out else []
    times.finish_reason = reasons[0] if reasons else "abort"
    if self._on_request_done is not None:
      self._post(self._on_request_done, times)

  @staticmethod
  def _dispatch(batch):
    for stream, item in batch:
      stream._put(item)


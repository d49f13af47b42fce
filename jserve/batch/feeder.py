"""Keeps an engine full: requests stream in as others finish, never in waves.

Before every engine step the feeder tops the engine up to `max_pending` unfinished requests
(running plus waiting), taking items from a queue shared by all replicas, so a replica that
runs ahead simply takes more. The waiting queue stays short (about `max_num_seqs`), which is
enough for the scheduler to fill every slot that frees up, and keeps the host's per-request
work (tokenizing, the scheduler's sorted insert) at the rate requests finish.
"""

import collections
import contextlib
import threading
from typing import Protocol

import jax

from jserve.batch.items import BatchItem
from jserve.errors import CapacityError, InvalidRequestError


class WorkQueue:
  """Items not yet handed to any engine, in the order they should start; shared by replica threads."""

  def __init__(self, items: list[BatchItem]):
    self._items = collections.deque(items)
    self._lock = threading.Lock()

  def pop(self) -> BatchItem | None:
    with self._lock:
      return self._items.popleft() if self._items else None

  def __len__(self) -> int:
    return len(self._items)


class Sink(Protocol):
  def result(self, item: BatchItem, out, engine): ...

  def error(self, item: BatchItem, message: str): ...


class EngineFeeder:
  """Runs one engine (one replica) until the shared queue is empty and its requests are done."""

  def __init__(self, engine, queue: WorkQueue, sink: Sink, device=None, max_pending: int | None = None):
    self.engine = engine
    self.queue = queue
    self.sink = sink
    self.device = device
    self.max_pending = max_pending or 2 * engine.config.max_num_seqs
    self._in_flight: dict[str, BatchItem] = {}

  def _prompt(self, item: BatchItem):
    if item.messages is None:
      return item.prompt
    tok = self.engine.tokenizer
    # The template already holds the special tokens (BOS); encoding must not add them again.
    return tok.encode(tok.apply_chat_template(item.messages), add_special_tokens=False)

  def _top_up(self):
    while self.engine.scheduler.num_unfinished < self.max_pending:
      item = self.queue.pop()
      if item is None:
        return
      try:
        self.engine.add_request(item.key, self._prompt(item), item.params)
      except (InvalidRequestError, CapacityError) as e:
        self.sink.error(item, f"line {item.line_no}: {e}")
        continue
      self._in_flight[item.key] = item

  def run(self, stop: threading.Event | None = None):
    """Feeds and steps the engine; returns when all work is done or `stop` is set."""
    # A replica's params and KV pool live on its device as uncommitted arrays: its jit step must
    # run with that device as the default, in this thread (jax.default_device is thread-local).
    scope = jax.default_device(self.device) if self.device is not None else contextlib.nullcontext()
    with scope:
      while stop is None or not stop.is_set():
        self._top_up()
        if not self.engine.has_unfinished():
          if len(self.queue) == 0:
            return
          continue
        for out in self.engine.step():
          if out.finished:
            self.sink.result(self._in_flight.pop(out.request_id), out, self.engine)

"""Progress of a batch job: a bar on a terminal, plain log lines otherwise, and the final summary."""

import dataclasses
import sys
import threading
import time

from absl import logging
from tqdm import tqdm

MODES = ("auto", "bar", "log", "none")


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class Progress:
  """Counts finished requests and generated tokens; shows completed/total, tokens/s and ETA."""

  def __init__(self, total: int, skipped: int, mode: str = "auto", log_every_s: float = 10.0):
    if mode == "auto":
      mode = "bar" if sys.stderr.isatty() else "log"
    self.mode = mode
    self.total = total
    self.done = skipped
    self.output_tokens = 0
    self.log_every_s = log_every_s
    self.start = self._last_log = time.monotonic()
    self._base = skipped  # requests done before the clock started: not part of the rate
    self._lock = threading.Lock()
    self._bar = None

  def start_clock(self):
    """Starts the rates' clock (and the bar) once the model is loaded, so that they measure generation."""
    with self._lock:
      self.start = self._last_log = time.monotonic()
      self._base = self.done
      self.output_tokens = 0
      if self.mode == "bar":
        self._bar = tqdm(total=self.total, initial=self.done, desc="batch", unit="req", file=sys.stderr,
                         smoothing=0.1)

  def update(self, num_requests: int = 1, output_tokens: int = 0):
    with self._lock:
      self.done += num_requests
      self.output_tokens += output_tokens
      now = time.monotonic()
      if self._bar is not None:
        self._bar.update(num_requests)
        self._bar.set_postfix_str(f"{self.output_tokens / max(now - self.start, 1e-9):.0f} tok/s", refresh=False)
      elif self.mode == "log" and now - self._last_log >= self.log_every_s:
        self._last_log = now
        logging.info("%s", self.line(now))

  def line(self, now: float | None = None) -> str:
    """`batch: 120/1000 (12.0%), 3.1 req/s, 410 tok/s, ETA 4m44s`."""
    now = now or time.monotonic()
    elapsed = max(now - self.start, 1e-9)
    rate = (self.done - self._base) / elapsed
    left = self.total - self.done
    eta = _duration(left / rate) if rate > 0 else "?"
    pct = 100.0 * self.done / self.total if self.total else 100.0
    return (f"batch: {self.done}/{self.total} ({pct:.1f}%), {rate:.1f} req/s, "
            f"{self.output_tokens / elapsed:.0f} tok/s, ETA {eta}")

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


@dataclasses.dataclass
class BatchSummary:
  """What one run of the job did. `elapsed_s` counts from the first request, after the model load."""

  total: int = 0
  skipped: int = 0  # already in the output when the job started
  finished: int = 0
  failed: int = 0  # error lines written by this run
  prompt_tokens: int = 0
  output_tokens: int = 0
  load_s: float = 0.0
  elapsed_s: float = 0.0
  num_replicas: int = 0
  verified: bool = False
  verification: str = ""

  @property
  def requests_per_s(self) -> float:
    return self.finished / self.elapsed_s if self.elapsed_s else 0.0

  @property
  def output_tokens_per_s(self) -> float:
    return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0

  @property
  def total_tokens_per_s(self) -> float:
    return (self.prompt_tokens + self.output_tokens) / self.elapsed_s if self.elapsed_s else 0.0

  def describe(self) -> str:
    if self.num_replicas == 0:
      return (f"batch done: nothing to generate; {self.failed} failed, {self.skipped} skipped (already in the "
              f"output) of {self.total}")
    return (f"batch done: {self.finished} finished, {self.failed} failed, {self.skipped} skipped (already in the "
            f"output) of {self.total}; {self.elapsed_s:.1f} s on {self.num_replicas} replica(s) after "
            f"{self.load_s:.1f} s of loading: {self.requests_per_s:.2f} req/s, "
            f"{self.output_tokens_per_s:.1f} output tok/s, {self.total_tokens_per_s:.1f} total tok/s")

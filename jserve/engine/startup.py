"""Where an engine's start-up time goes: seconds per phase, and XLA programs compiled or loaded.

The cold-start target (first token soon after the process starts, with a warm persistent
compilation cache) needs start-up broken down by phase: `LLMEngine` times its phases with a
`StartupClock` and keeps the result as `startup_s` and `startup_programs`;
tools/bench_cold_start.py adds the process's imports and first token around them.

Programs are counted from JAX's monitoring events: every XLA build, whether compiled or read
from the persistent cache, records '/jax/core/compile/backend_compile_duration', and a read from
the cache also records '/jax/compilation_cache/cache_hits'. The listeners are registered once per
process and only count; a clock takes the difference between its start and now, so compiles made
meanwhile by other threads (another engine) are counted too.
"""

import threading
import time

from jax import monitoring

_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # a compile or a cache read
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"

_lock = threading.Lock()
_totals = {"programs": 0, "from_cache": 0, "xla_s": 0.0, "trace_lower_s": 0.0}
_listening = False


def _on_event(event: str, **kwargs):
  if event == _CACHE_HIT:
    with _lock:
      _totals["from_cache"] += 1


def _on_duration(event: str, duration: float, **kwargs):
  if event == _BACKEND_COMPILE:
    with _lock:
      _totals["programs"] += 1
      _totals["xla_s"] += duration
  elif event in (_TRACE, _LOWER):
    with _lock:
      _totals["trace_lower_s"] += duration


def _listen():
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  monitoring.register_event_listener(_on_event)
  monitoring.register_event_duration_secs_listener(_on_duration)


class StartupClock:
  """Seconds per start-up phase (monotonic clock, each phase from the end of the one before) and the
  XLA programs built since the clock started."""

  def __init__(self):
    _listen()
    with _lock:
      self._start_totals = dict(_totals)
    self._start = self._last = time.monotonic()
    self.phases: dict[str, float] = {}

  def lap(self, phase: str):
    """Ends `phase`: the time since the previous lap (or the start) is its duration."""
    now = time.monotonic()
    self.phases[phase] = now - self._last
    self._last = now

  def programs(self) -> dict:
    """XLA programs since the start: `programs` built, `from_cache` of them read from the persistent
    cache, `compiled` the rest; `xla_s` seconds building them (compiling or reading), `trace_lower_s`
    seconds tracing and lowering to MLIR."""
    with _lock:
      now = {k: v - self._start_totals[k] for k, v in _totals.items()}
    now["compiled"] = now["programs"] - now["from_cache"]
    return now

  def summary(self) -> str:
    """One log line: each phase, the total, and the programs."""
    p = self.programs()
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())
    return (f"{phases}; total {self._last - self._start:.2f} s; {p['programs']} XLA programs "
            f"({p['from_cache']} from the persistent cache, {p['compiled']} compiled; {p['xla_s']:.2f} s)")

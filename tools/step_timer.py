"""Times the engine's scheduling, batch building and device step, for the benchmarks."""

import time


class StepTimer:
  """Wraps the engine's scheduler and batch builder to time them; with `block`, also the device step
  (which then stops the engine from overlapping steps). `starts`: when each step was scheduled, so
  successive differences are the wall time per step (per decode step where a call ran several)."""

  def __init__(self, engine, block: bool = True):
    import jax
    self.sched, self.build, self.device, self.seqs, self.starts, self.counts = [], [], [], [], [], []
    self.tokens = []
    # With overlapped steps the host schedules step i + 1 once step i - 1's tokens are back, so the
    # time between two schedules is the device time of the step before: breakdown() shifts by one.
    self.lag = 0 if block or not engine.config.overlap_steps else 1
    schedule, build, execute = engine.scheduler.schedule, engine.runner.build, engine.runner.execute

    def timed_schedule():
      t = time.perf_counter()
      self.starts.append(t)
      self.counts.append(engine.num_steps)  # a call may run several decode steps (num_decode_steps)
      out = schedule()
      self.sched.append(time.perf_counter() - t)
      self.seqs.append(len(out.requests))
      self.tokens.append(out.total_tokens)
      return out

    def timed_build(*a, **k):
      t = time.perf_counter()
      out = build(*a, **k)
      self.build.append(time.perf_counter() - t)
      return out

    def timed_execute(*a, **k):
      t = time.perf_counter()
      out = execute(*a, **k)
      if block:
        jax.block_until_ready(out)
        self.device.append(time.perf_counter() - t)
      return out

    engine.scheduler.schedule, engine.runner.build, engine.runner.execute = timed_schedule, timed_build, \
        timed_execute

  def summary(self, min_seqs):
    import numpy as np
    rows = [i for i, n in enumerate(self.seqs) if n >= min_seqs and i < len(self.build)]
    if not rows:
      return None
    pick = lambda xs: float(np.median([xs[i] for i in rows if i < len(xs)]) * 1e3)
    out = {"steps": len(rows), "schedule_ms": pick(self.sched), "build_ms": pick(self.build),
           "host_ms": pick([s + b for s, b in zip(self.sched, self.build)]),
           "wall_ms": pick(list(np.diff(self.starts) / np.maximum(np.diff(self.counts), 1)))}
    if self.device:
      out["device_ms"] = pick(self.device)
    return out

  def breakdown(self, full: int) -> dict:
    """Where a run's wall time went, by kind of step: {kind: {"steps", "decode_steps", "wall_s"}}.

    Kinds: "prefill" (the step computes prompt tokens, with or without decodes beside them),
    "decode_full" (decodes only, `full` or more sequences), "decode_partial" (decodes only, fewer).
    A step's wall time runs from its scheduling to the next one's, `lag` steps later (see
    __init__); "decode_steps" counts the decode steps of calls that ran several.
    """
    out = {k: {"steps": 0, "decode_steps": 0, "wall_s": 0.0} for k in ("prefill", "decode_full", "decode_partial")}
    for i in range(len(self.starts) - 1 - self.lag):
      if self.tokens[i] > self.seqs[i]:
        kind = "prefill"
      else:
        kind = "decode_full" if self.seqs[i] >= full else "decode_partial"
      out[kind]["steps"] += 1
      out[kind]["decode_steps"] += max(self.counts[i + 1] - self.counts[i], 1)
      out[kind]["wall_s"] += self.starts[i + 1 + self.lag] - self.starts[i + self.lag]
    return out

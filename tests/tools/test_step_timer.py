"""tools/step_timer.py: the benchmarks' split of a run's wall time by kind of step."""

import types

import pytest

from jserve.engine.scheduler import ScheduledBatch
from tools.step_timer import StepTimer


def _fake_engine(plan, clock):
  """An engine whose scheduler returns `plan`'s batches in turn: (seqs, tokens, decode steps, seconds the
  step takes until the next schedule)."""
  engine = types.SimpleNamespace(num_steps=0)
  steps = iter(plan)

  def schedule():
    seqs, tokens, decode_steps, seconds = next(steps)
    engine.num_steps += decode_steps
    clock.now += seconds
    per_seq = [tokens // seqs] * seqs
    per_seq[0] += tokens - sum(per_seq)
    return ScheduledBatch(requests=[object()] * seqs, num_new_tokens=per_seq)

  engine.scheduler = types.SimpleNamespace(schedule=schedule)
  engine.runner = types.SimpleNamespace(build=lambda *a: None, execute=lambda *a: None)
  return engine


def test_breakdown_splits_wall_time_by_step_kind(monkeypatch):
  clock = types.SimpleNamespace(now=0.0)
  monkeypatch.setattr("tools.step_timer.time.perf_counter", lambda: clock.now)
  # (seqs, tokens, decode steps the call runs, seconds until the next schedule() returns)
  plan = [(2, 300, 1, 0.25), (4, 260, 1, 0.5), (4, 4, 8, 0.25), (4, 4, 8, 0.125), (3, 3, 1, 0.0625), (1, 1, 1, 1.0)]
  engine = _fake_engine(plan, clock)
  timer = StepTimer(engine, block=False)
  for _ in plan:
    engine.scheduler.schedule()
  b = timer.breakdown(full=4)
  # A step's time runs to the next schedule; the last step has no end and is not counted.
  assert b["prefill"] == {"steps": 2, "decode_steps": 2, "wall_s": pytest.approx(0.75)}
  assert b["decode_full"] == {"steps": 2, "decode_steps": 16, "wall_s": pytest.approx(0.375)}
  assert b["decode_partial"] == {"steps": 1, "decode_steps": 1, "wall_s": pytest.approx(0.0625)}

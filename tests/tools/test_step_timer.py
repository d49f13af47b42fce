"""tools/step_timer.py: the benchmarks' split of a run's wall time by kind of step."""

import types

import pytest

from jserve.engine.scheduler import ScheduledBatch
from tools.step_timer import StepTimer

# (sequences, tokens, decode steps the call runs, seconds the device takes) per step
STEPS = [(2, 300, 1, 0.25), (4, 260, 1, 0.5), (4, 4, 8, 0.25), (4, 4, 8, 0.125), (3, 3, 1, 0.0625), (1, 1, 1, 1.0)]


def _fake_engine(batches, gaps, clock, overlapped):
  """An engine whose scheduler returns `batches` in turn; `gaps[i]`: seconds from schedule i to i + 1."""
  engine = types.SimpleNamespace(num_steps=0, config=types.SimpleNamespace(overlap_steps=overlapped))
  calls = iter(zip(batches, gaps))

  def schedule():
    (seqs, tokens, decode_steps), gap = next(calls)
    engine.num_steps += decode_steps
    clock.now += gap
    per_seq = [tokens // seqs] * seqs
    per_seq[0] += tokens - sum(per_seq)
    return ScheduledBatch(requests=[object()] * seqs, num_new_tokens=per_seq)

  engine.scheduler = types.SimpleNamespace(schedule=schedule)
  engine.runner = types.SimpleNamespace(build=lambda *a: None, execute=lambda *a: None)
  return engine


@pytest.mark.parametrize("overlapped", [False, True])
def test_breakdown_splits_wall_time_by_step_kind(monkeypatch, overlapped):
  clock = types.SimpleNamespace(now=0.0)
  monkeypatch.setattr("tools.step_timer.time.perf_counter", lambda: clock.now)
  batches = [s[:3] for s in STEPS]
  durations = [s[3] for s in STEPS]
  if overlapped:
    # The host schedules step i + 1 once step i - 1's tokens are back: the gap after schedule i is
    # step i - 1's time. One more schedule, as in the plain case, closes step 4's gap.
    batches, gaps = batches + [(1, 1, 1)], [0.0] + durations
  else:
    gaps = durations
  engine = _fake_engine(batches, gaps, clock, overlapped)
  timer = StepTimer(engine, block=False)
  for _ in batches:
    engine.scheduler.schedule()
  b = timer.breakdown(full=4)
  # Steps 0-4 are measured (the last step has no end); the first two compute prompt tokens.
  assert b["prefill"] == {"steps": 2, "decode_steps": 2, "wall_s": pytest.approx(0.75)}
  assert b["decode_full"] == {"steps": 2, "decode_steps": 16, "wall_s": pytest.approx(0.375)}
  assert b["decode_partial"] == {"steps": 1, "decode_steps": 1, "wall_s": pytest.approx(0.0625)}

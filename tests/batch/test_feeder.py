"""The engine is kept full (prompts stream in as others finish), optionally in shared-prefix order."""

import logging as std_logging

from jserve.batch import BatchConfig, Replica, run_batch
from jserve.batch.progress import Progress
from tests.batch.util import read_jsonl, write_jsonl


class _Spy:
  """The engine, recording the queue depth at each step and the order requests are added."""

  def __init__(self, engine):
    self._engine = engine
    self.added: list[tuple[int, str]] = []  # (step number, request id)
    self.unfinished_at_step: list[int] = []

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def add_request(self, request_id, prompt, params=None, **kw):
    self.added.append((len(self.unfinished_at_step), request_id))
    return self._engine.add_request(request_id, prompt, params, **kw)

  def step(self):
    self.unfinished_at_step.append(self._engine.scheduler.num_unfinished)
    return self._engine.step()


def test_requests_stream_in_as_others_finish_never_in_waves(tmp_path, batch_engine):
  rows = [{"id": f"r{i}", "prompt": f"x{i} = [", "max_tokens": 2 + (7 * i) % 13, "temperature": 0}
          for i in range(40)]
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  spy = _Spy(batch_engine)
  run_batch(BatchConfig(input_path=inp, output_path=str(tmp_path / "out.jsonl"), max_pending=8),
            lambda: [Replica(spy)])
  assert len(read_jsonl(tmp_path / "out.jsonl")) == 40
  # Until the last prompt is handed over, every step sees exactly max_pending requests in the engine.
  last_add_step = spy.added[-1][0]
  assert spy.unfinished_at_step[:last_add_step] == [8] * last_add_step
  # Top-ups happen at many different steps, a few requests at a time, as requests finish.
  steps_with_adds = {step for step, _ in spy.added}
  assert len(steps_with_adds) >= 10
  assert max(sum(1 for s, _ in spy.added if s == step) for step in steps_with_adds - {0}) < 8


def test_sort_by_prefix_starts_prompts_with_shared_prefixes_together(tmp_path, batch_engine):
  system_a = "You are a careful Python reviewer. " * 3
  system_b = "You translate shell to Python. " * 3
  rows = []
  for i in range(6):
    rows.append({"id": f"a{i}", "prompt": f"{system_a}Review: x{i} = {i}", "max_tokens": 2, "temperature": 0})
    rows.append({"id": f"b{i}", "prompt": f"{system_b}Translate: ls {i}", "max_tokens": 2, "temperature": 0})
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  spy = _Spy(batch_engine)
  run_batch(BatchConfig(input_path=inp, output_path=str(tmp_path / "out.jsonl"), sort_by_prefix=True),
            lambda: [Replica(spy)])
  order = [rid for _, rid in spy.added]
  assert order == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]


def test_progress_log_lines_show_done_total_rate_and_eta(caplog):
  progress = Progress(total=10, skipped=2, mode="log", log_every_s=0)
  progress.start_clock()
  with caplog.at_level(std_logging.INFO):
    progress.update(3, 120)
  line = progress.line()
  assert line.startswith("batch: 5/10 (50.0%), ") and " req/s, " in line and " tok/s, ETA " in line
  assert any("batch: 5/10 (50.0%)" in r.getMessage() for r in caplog.records)

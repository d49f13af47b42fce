"""Resume: killed with SIGKILL at random points and restarted, the job loses and duplicates nothing."""

import os
import random
import signal
import subprocess
import time

import pytest

from jserve.batch import BatchConfig, run_batch
from jserve.batch.errors import BatchOutputError
from jserve.batch.output_file import OutputFile, verify
from tests.batch.util import REPO, by_key, cli_args, cli_env, read_jsonl, run_cli, write_jsonl


def _count_lines(path) -> int:
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except FileNotFoundError:
    return 0


def test_sigkill_at_random_points_then_resume_gives_every_id_once_with_uninterrupted_text(
    tiny_model_dir, batch_cache_dir, tmp_path, replicas):
  rng = random.Random(20240611)  # fixed: a failure replays the same kill points
  rows = [{"id": f"q{i}", "prompt": f"def task_{i}(items):\n    ", "max_tokens": rng.randint(4, 24)}
          for i in range(64)]
  rows.insert(17, "{a bad line stays one error record through every restart")
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  ref = tmp_path / "reference.jsonl"  # uninterrupted, in this process, with the same engine settings
  run_batch(BatchConfig(input_path=inp, output_path=str(ref), defaults={"temperature": 0.0}), replicas)

  out = tmp_path / "out.jsonl"
  args = cli_args(tiny_model_dir, batch_cache_dir, f"--input={inp}", f"--output={out}", "--temperature=0")
  kills, logs = 0, []
  for attempt in range(3):
    before = _count_lines(out)
    target = before + rng.randint(1, 9)
    logs.append(tmp_path / f"attempt{attempt}.log")
    with open(logs[-1], "wb") as log:
      job = subprocess.Popen(args, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while _count_lines(out) < target and job.poll() is None and time.monotonic() < deadline:
      time.sleep(0.002)
    if job.poll() is not None:
      break  # it finished before this kill point
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    kills += 1
    if attempt == 1:
      # What a kill in the middle of writing a line leaves behind: the start of a record, no newline.
      with open(out, "ab") as f:
        f.write(b'{"id":"q0","text":"half a rec')
  assert kills == 3  # 64 prompts outlast three kills of at most 9 new lines each

  proc = run_cli(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  after_torn_write = "".join(p.read_text() for p in logs[2:]) + proc.stderr
  assert "is partly written" in after_torn_write and "removing it, its request runs again" in after_torn_write
  assert "all 65 input ids appear exactly once" in proc.stderr

  reference = by_key(read_jsonl(ref))
  resumed = by_key(read_jsonl(out))  # by_key fails on any id written twice
  assert set(resumed) == set(reference)
  assert {k: r.get("text", r.get("error")) for k, r in resumed.items()} == {
      k: r.get("text", r.get("error")) for k, r in reference.items()}


def test_partly_written_last_line_is_cut_off_and_its_request_runs_again(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_bytes(b'{"id":"a","text":"x"}\n{"id":"b","text":"y"}\n{"id":"c","te')
  counts = OutputFile(str(path)).recover()
  assert dict(counts) == {"a": 1, "b": 1}
  assert path.read_bytes() == b'{"id":"a","text":"x"}\n{"id":"b","text":"y"}\n'


def test_a_damaged_line_before_the_last_is_an_error_not_skipped(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_bytes(b'{"id":"a","text":"x"}\nGARBAGE\n{"id":"c","text":"z"}\n')
  with pytest.raises(BatchOutputError, match="line 2 is not an output record of jserve batch"):
    OutputFile(str(path)).recover()


def test_verification_names_missing_and_duplicated_ids(tmp_path):
  path = write_jsonl(tmp_path / "out.jsonl", [{"id": "a", "text": ""}, {"id": "a", "text": ""},
                                               {"id": "z", "error": "e"}])
  check = verify(path, ["a", "b"])
  assert not check.ok
  assert check.describe(path) == (f"{path} does not hold every input id exactly once: 1 missing (e.g. 'b'); "
                                  f"1 written more than once (e.g. 'a')")


def test_rerun_of_a_finished_job_skips_everything_without_loading_the_model(tmp_path, replicas):
  inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"n = {i}", "max_tokens": 3} for i in range(5)])
  out = tmp_path / "out.jsonl"
  first = run_batch(BatchConfig(input_path=inp, output_path=str(out)), replicas)
  assert (first.finished, first.skipped, len(replicas.calls)) == (5, 0, 1)
  lines = out.read_bytes()
  again = run_batch(BatchConfig(input_path=inp, output_path=str(out)), replicas)
  assert (again.finished, again.skipped, again.verified, len(replicas.calls)) == (0, 5, True, 1)
  assert out.read_bytes() == lines

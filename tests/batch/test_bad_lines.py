"""Bad input lines become error records; the good lines around them still run."""

import re
import sys

import pytest

from jserve.batch import BatchConfig, run_batch
from jserve.batch.errors import BatchInputError
from jserve.errors import ConfigError
from tests.batch.util import by_key, read_jsonl, run_cli, write_jsonl


def test_mixed_good_and_bad_lines_each_get_one_record_and_the_job_goes_on(tmp_path, replicas):
  rows = [
      {"id": "good-1", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0},
      "{this is not json",
      {"id": "no-prompt", "max_tokens": 4},
      {"id": "too-long", "prompt": "x = 1\n" * 200},
      {"id": "negative-temperature", "prompt": "hi", "temperature": -0.5},
      {"id": "wrong-type", "prompt": "hi", "top_p": "high"},
      {"id": "unknown-field", "prompt": "hi", "temprature": 0.3},
      {"id": "both", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
      {"id": "empty", "prompt": ""},
      ["a", "list"],
      {"id": 3.5, "prompt": "a float id"},
      {"prompt": "class Stack:", "max_tokens": 5},  # no id: one is made from the line number
      {"id": 7, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5},
      {"id": "good-2", "prompt": "import os\n", "max_tokens": 6, "stop": ["\n\n"]},
  ]
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  summary = run_batch(BatchConfig(input_path=inp, output_path=str(out), defaults={"temperature": 0.0}), replicas)

  records = by_key(read_jsonl(out))
  assert len(records) == len(rows)
  errors = {k: r["error"] for k, r in records.items() if "error" in r}
  assert errors == {
      "line-2": "line 2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
      "no-prompt": "line 3: needs exactly one of 'prompt', 'messages' or 'prompt_token_ids'",
      "too-long": errors["too-long"],
      "negative-temperature": "line 5: temperature=-0.5: must be >= 0 (0 means greedy)",
      "wrong-type": errors["wrong-type"],
      "unknown-field": "line 7: unknown field(s) 'temprature'; a line has 'id', 'prompt' or 'messages', and "
                       "SamplingParams fields",
      "both": "line 8: needs exactly one of 'prompt', 'messages' or 'prompt_token_ids', got prompt, messages",
      "empty": "line 9: prompt is empty",
      "line-10": 'line 10: expected a JSON object, got ["a", "list"]',
      "line-11": "line 11: id must be a string or an integer, got 3.5",
  }
  assert re.fullmatch(r"line 4: prompt has \d+ tokens; max_model_len=256 leaves no room for output",
                      errors["too-long"])
  # SamplingParams' own message (a type check, or the failed comparison we wrap): it names top_p and the value.
  assert errors["wrong-type"].startswith("line 6: ") and "top_p" in errors["wrong-type"]
  assert "'high'" in errors["wrong-type"]
  for key in ("good-1", "line-12", 7, "good-2"):
    rec = records[key]
    assert set(rec) == {"id", "text", "finish_reason", "usage"}, rec
    assert rec["finish_reason"] in ("stop", "length")
    assert rec["usage"]["completion_tokens"] >= 1
    assert rec["usage"]["total_tokens"] == rec["usage"]["prompt_tokens"] + rec["usage"]["completion_tokens"]
  assert records["good-1"]["usage"]["completion_tokens"] == 6
  assert (summary.finished, summary.failed, summary.skipped, summary.total) == (4, 10, 0, 14)
  assert summary.verified and "all 14 input ids appear exactly once" in summary.verification


def test_repeated_ids_stop_the_job_before_the_model_loads(tmp_path, replicas):
  inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                             {"id": "a", "prompt": "z"}])
  with pytest.raises(BatchInputError, match=r"ids must be unique, but these repeat: 'a' \(lines 1 and 3\)"):
    run_batch(BatchConfig(input_path=inp, output_path=str(tmp_path / "out.jsonl")), replicas)
  assert not replicas.calls


def test_bad_default_parameters_are_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"default sampling parameters: top_p=0: must be in \(0, 1\]"):
    BatchConfig(input_path="in.jsonl", output_path="out.jsonl", defaults={"top_p": 0})
  with pytest.raises(ConfigError, match="unknown field\\(s\\) 'top_q'"):
    BatchConfig(input_path="in.jsonl", output_path="out.jsonl", defaults={"top_q": 0.5})
  with pytest.raises(ConfigError, match="is the input file"):
    BatchConfig(input_path="x.jsonl", output_path="./x.jsonl")


def test_cli_usage_errors_are_one_line(tmp_path):
  proc = run_cli([sys.executable, "-m", "jserve", "batch", f"--output={tmp_path / 'out.jsonl'}",
                  "--sampling_params={\"min_p\": 0.1}"])
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "jserve batch: error: --input is required (or --merge to merge shard outputs)")

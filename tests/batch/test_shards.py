"""Multi-host runs: a deterministic split of the input, and `jserve batch --merge` to put it back together."""

import sys

import pytest

from jserve.batch import BatchConfig, merge_outputs, run_batch
from jserve.batch.errors import BatchOutputError
from jserve.batch.items import read_input
from tests.batch.util import by_key, read_jsonl, run_cli, write_jsonl


def _rows():
  rows = [{"id": f"p{i}", "prompt": f"def handler_{i}(event):", "max_tokens": 3 + i % 4, "temperature": 0}
          for i in range(10)]
  rows.insert(4, "{broken")
  return rows


def test_shard_split_is_deterministic_and_disjoint(tmp_path):
  inp = write_jsonl(tmp_path / "in.jsonl", _rows())
  shards = [read_input(inp, num_shards=3, shard_index=i)[1] for i in range(3)]
  keys = [[it.key for it in items] for items in shards]
  assert keys == [["p0", "p3", "p5", "p8"], ["p1", "line-5", "p6", "p9"], ["p2", "p4", "p7"]]
  assert keys == [[it.key for it in read_input(inp, num_shards=3, shard_index=i)[1]] for i in range(3)]


def test_sharded_runs_merge_into_the_unsharded_output(tmp_path, replicas):
  inp = write_jsonl(tmp_path / "in.jsonl", _rows())
  for i in range(3):
    summary = run_batch(BatchConfig(input_path=inp, output_path=str(tmp_path / f"out.{i}.jsonl"), num_shards=3,
                                    shard_index=i), replicas)
    assert summary.verified and summary.total == [4, 4, 3][i]
  run_batch(BatchConfig(input_path=inp, output_path=str(tmp_path / "whole.jsonl")), replicas)

  # The documented command: globs, written in input order, verified against the input.
  merged = tmp_path / "merged.jsonl"
  proc = run_cli([sys.executable, "-m", "jserve", "batch", f"--merge={tmp_path}/out.*.jsonl", f"--input={inp}",
                  f"--output={merged}"])
  assert proc.returncode == 0, proc.stderr
  assert "every input id appears exactly once" in proc.stderr
  records = read_jsonl(merged)
  assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3", "line-5", "p4", "p5", "p6", "p7", "p8", "p9"]
  whole = by_key(read_jsonl(tmp_path / "whole.jsonl"))
  assert {r["id"]: r.get("text", r.get("error")) for r in records} == {
      k: r.get("text", r.get("error")) for k, r in whole.items()}

  # A shard left out, or one merged twice, is refused with the reason.
  proc = run_cli([sys.executable, "-m", "jserve", "batch", f"--merge={tmp_path}/out.0.jsonl,{tmp_path}/out.1.jsonl",
                  f"--input={inp}", f"--output={tmp_path / 'partial.jsonl'}"])
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "jserve batch: error: merge: 3 input ids have no output line (e.g. 'p2', 'p4', 'p7'); "
      "finish or rerun those shards")
  with pytest.raises(BatchOutputError, match=r"id 'p0' is answered in both .*out.0.jsonl and .*copy.jsonl"):
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "out.0.jsonl").read_bytes())
    merge_outputs([str(tmp_path / "out.0.jsonl"), str(tmp_path / "copy.jsonl")], str(tmp_path / "x.jsonl"))


def test_merge_refuses_a_shard_with_a_partly_written_line(tmp_path):
  good = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "x"}])
  torn = tmp_path / "b.jsonl"
  torn.write_text('{"id": "b", "text": "x"}\n{"id": "c", "te')
  with pytest.raises(BatchOutputError, match="line 2 is partly written"):
    merge_outputs([good, str(torn)], str(tmp_path / "out.jsonl"))
  with pytest.raises(BatchOutputError, match="no file matches"):
    merge_outputs(f"{tmp_path}/nothing-*.jsonl", str(tmp_path / "out.jsonl"))

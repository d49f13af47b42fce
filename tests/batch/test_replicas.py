"""`--num_replicas`: independent engines on disjoint devices, sharing one work queue."""

import json
import os
import subprocess
import sys

from jserve.batch import BatchConfig, run_batch
from tests.batch.util import REPO, by_key, cli_env, read_jsonl, write_jsonl


def test_two_replicas_on_two_devices_give_the_single_engine_text(tiny_model_dir, batch_cache_dir, tmp_path, replicas):
  rows = [{"id": f"r{i}", "prompt": f"for item_{i} in range({i}):", "max_tokens": 3 + i % 9} for i in range(40)]
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  single = tmp_path / "single.jsonl"
  run_batch(BatchConfig(input_path=inp, output_path=str(single), defaults={"temperature": 0.0}), replicas)

  out = tmp_path / "out.jsonl"
  # The device count is read once when JAX starts, so two CPU devices need a fresh process.
  env = dict(cli_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "tests.batch.replica_worker", tiny_model_dir, batch_cache_dir, inp,
                         str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["num_devices"] == 2 and report["num_replicas"] == 2
  assert report["replica_devices"] == ["cpu:0", "cpu:1"]
  assert report["param_devices"] == [["cpu:0"], ["cpu:1"]]
  assert report["kv_devices"] == [["cpu:0"], ["cpu:1"]]
  assert all(steps > 0 for steps in report["steps"]), report  # both replicas did work
  assert report["finished"] == 40
  assert {k: r["text"] for k, r in by_key(read_jsonl(out)).items()} == {
      k: r["text"] for k, r in by_key(read_jsonl(single)).items()}
  assert os.path.getsize(out) > 0

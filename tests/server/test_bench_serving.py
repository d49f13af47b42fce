"""tools/bench_serving.py against the shared server: both APIs, every request completes, numbers add up."""

import json
import os
import subprocess
import sys

import pytest

from tests.server.conftest import API_KEY, REPO


@pytest.mark.parametrize("backend", ["grpc", "http", "http-chat"])
def test_bench_serving_reports_every_request(server, backend, tmp_path):
  target = server.grpc_address if backend == "grpc" else server.http_url
  out = tmp_path / "result.json"
  proc = subprocess.run(
      [sys.executable, "-m", "tools.bench_serving", f"--backend={backend}", f"--target={target}",
       f"--api_key={API_KEY}", "--num_prompts=12", "--random_input_len=16", "--random_output_len=6",
       "--request_rate=50", "--max_concurrency=8", "--vocab_size=1000", "--goodput=ttft:60000,tpot:60000",
       f"--result_json={out}"], capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  assert result["completed"] == 12 and result["failed"] == 0
  assert result["total_output_tokens"] == 12 * 6
  assert result["goodput"] == pytest.approx(result["request_throughput"])
  for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
    assert 0 < result[name]["p50"] <= result[name]["p99"]
  assert "TTFT" in proc.stdout and "goodput" in proc.stdout

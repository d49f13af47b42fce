"""tools/profile_step.py: the kernel statistics it reads from a trace (tools/trace_stats.py), and a CPU run of it."""

import json
import os
import subprocess
import sys

import pytest

from tools import trace_stats

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernel_stats_counts_idle_gaps_and_small_kernels():
  # Two steps of kernels (name, start ns, duration ns): a 1 us gap after "a", "c" overlaps "b" and ends with it.
  events = [("a", 0, 2_000), ("b", 3_000, 10_000), ("c", 12_000, 1_000), ("d", 20_000, 4_000)]
  stats = trace_stats.kernel_stats(events, steps=2)
  assert stats["kernels_per_step"] == 2.0
  # Span 0..24,000 ns; union 2,000 + 10,000 + 4,000 = 16,000: 8,000 ns idle (1,000 + 7,000), 4,000 per step.
  assert stats["idle_between_kernels_ms_per_step"] == pytest.approx(0.004)
  # Under 5 us: a, c and d (7,000 ns in all); b is not.
  assert stats["small_kernels_per_step"] == 1.5
  assert stats["small_kernels_ms_per_step"] == pytest.approx(0.0035)
  assert stats["median_kernel_us"] == 4.0  # of 1, 2, 4 and 10 us, the upper middle


def test_kernel_stats_of_back_to_back_kernels_has_no_idle_time():
  events = [(f"k{i}", i * 1_000, 1_000) for i in range(10)]
  stats = trace_stats.kernel_stats(events, steps=1)
  assert stats["idle_between_kernels_ms_per_step"] == 0.0
  assert stats["small_kernels_per_step"] == 10


def test_kernel_stats_of_no_kernels():
  assert trace_stats.kernel_stats([], steps=3)["kernels_per_step"] == 0.0


def test_profile_step_runs_on_the_cpu(tmp_path):
  """The documented CPU command: a tiny model's decode steps, traced, with the kernel statistics written."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  done = subprocess.run(
      [sys.executable, "-m", "tools.profile_step", "--preset=tiny-llama", "--batch=4", "--input_len=16", "--steps=2",
       "--max_num_batched_tokens=64", "--nopy_profile", f"--out_dir={tmp_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "profile.json") as f:
    result = json.load(f)
  assert result["batch"] == 4
  assert result["kernels_per_step"] > 0  # on the CPU the "kernels" are XLA's ops on the host plane
  assert result["idle_between_kernels_ms_per_step"] >= 0
  assert "kernels per step" in done.stdout

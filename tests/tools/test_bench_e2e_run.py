"""tools/bench_e2e.py run end to end on the CPU (tiny preset, random weights): its step sweep fills the pool and
times the engine's own steps, it reports XLA's memory analysis of the burst program, and --nostack_pairs runs a
w8a8 engine with gate and up, k and v apart (the A/B of quant.stack_pairs), which the JSON records."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_w8a8_step_sweep_with_the_pairs_apart(tmp_path):
  args = ["--preset=tiny-llama", "--dummy", "--max_num_batched_tokens=64", "--max_num_seqs=8", "--copy_gib=0.01",
          "--matmul_n=256", "--workloads=", "--step_sweep=1,4x32", "--step_iters=2", "--nostack_pairs",
          '--engine_args={"activation_quantization": "fp8", "quantization": "fp8", "num_decode_steps": 2, '
          '"precompile_staged_sampler": false}', f"--out_dir={tmp_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "tools.bench_e2e", *args], capture_output=True, text=True, env=env,
                        timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads((tmp_path / "e2e.json").read_text())
  assert got["stack_pairs"] is False
  assert {"w_gate", "w_up", "wk", "wv"} <= set(got["layer_params"]) and "w_gate_up" not in got["layer_params"]
  assert set(got["layer_params"].values()) >= {"Fp8WeightA8"}
  # XLA's memory analysis of the largest burst program (runner.program_memory): its arguments hold the
  # weights and the KV pool.
  mem = got["program_memory"]
  assert mem["program"] == "burst" and mem["tokens"] == 16, mem  # the smallest token bucket holds 8 rows
  assert mem["argument_bytes"] > got["weight_bytes_read_per_step"] and mem["temp_bytes"] >= 0
  rows = got["step_sweep"]["rows"]
  assert [r["batch"] for r in rows] == [1, 4] and all(r["step_ms"] > 0 for r in rows)

"""Runs a worker module in a fresh Python with N simulated CPU devices and returns its JSON report.

XLA reads `--xla_force_host_platform_device_count` once, when JAX starts, so
multi-device checks cannot run in the pytest process (which may already have
started JAX with one device). A worker computes everything it needs in one
process, so JAX starts and compiles once per worker, not once per test.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_worker(module: str, num_devices: int = 8, *args: str, timeout: int = 600) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode:
    pytest.fail(f"{module} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_processes(commands: list[list[str]], env: dict, timeout: int = 300) -> list[tuple[int, str, str]]:
  """Starts the commands together (processes that join one another) and waits for all of them;
  (return code, stdout, stderr) of each. Whatever still runs at the timeout is killed."""
  procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for cmd in commands]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]

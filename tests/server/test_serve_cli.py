"""`jserve serve` start-up failures and a stop during start-up, without a full compile."""

import os
import socket
import subprocess
import sys
import time

from tests.server.conftest import ENGINE_FLAGS, REPO, free_port


def _serve(*args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-m", "jserve", "serve", *ENGINE_FLAGS, *args], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _one_line_error(proc, fragment):
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1, out
  assert "Traceback" not in out
  assert out.strip().splitlines()[-1].startswith("jserve serve: error:") and fragment in out, out


def test_missing_model_is_a_one_line_error(tmp_path):
  _one_line_error(_serve(f"--model={tmp_path}/none", f"--port={free_port()}", f"--http_port={free_port()}"),
                  "does not exist")


def test_busy_port_is_a_one_line_error(tiny_model_dir):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    _one_line_error(_serve(f"--model={tiny_model_dir}", f"--port={free_port()}", f"--http_port={port}"),
                    f"HTTP cannot listen on 127.0.0.1:{port}")


def test_sigterm_while_compiling_exits_0(tiny_model_dir):
  proc = _serve(f"--model={tiny_model_dir}", f"--port={free_port()}", f"--http_port={free_port()}",
                "--compilation_cache_dir=")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "KV pool:" in line:  # the engine thread is about to compile
      break
  time.sleep(0.5)
  proc.terminate()
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, "".join(lines) + out
  assert "shut down cleanly" in out

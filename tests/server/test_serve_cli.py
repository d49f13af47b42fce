"""`jserve serve` start-up failures and a stop during start-up, without a full compile."""

import os
import socket
import subprocess
import sys

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
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


def test_not_serving_while_compiling_and_sigterm_then_exits_0(tiny_model_dir):
  grpc_port, http_port = free_port(), free_port()
  proc = _serve(f"--model={tiny_model_dir}", f"--port={grpc_port}", f"--http_port={http_port}",
                "--compilation_cache_dir=")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "KV pool:" in line:  # the engine thread is about to compile (seconds)
      break
  with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
      list(pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(text="hi"), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in e.value.details()
  r = httpx2.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
  assert r.status_code == 503 and r.json()["status"] == "loading"
  proc.terminate()
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, "".join(lines) + out
  assert "shut down cleanly" in out

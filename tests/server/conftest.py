"""Real `jserve serve` processes on free localhost ports with a tiny checkpoint, shared across tests."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "test-key"
# Small engine: three step buckets (16, 32, 64 tokens) compile in seconds, and JAX's persistent cache
# (jserve's default directory) makes later starts load them instead. The KV pool of 0.0005 GiB is 64
# pages of 16 tokens, less than 16 sequences of 100 tokens need, so the concurrency test preempts.
ENGINE_FLAGS = ["--dtype=float32", "--max_num_batched_tokens=64", "--max_num_seqs=16", "--max_model_len=256",
                "--kv_cache_gib=0.0005"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  """One `python -m jserve serve` subprocess; its log is kept in a file for failure messages."""

  def __init__(self, model_dir: str, log_path: str, *extra: str):
    self.grpc_port, self.http_port = free_port(), free_port()
    self.grpc_address = f"127.0.0.1:{self.grpc_port}"
    self.http_url = f"http://127.0.0.1:{self.http_port}"
    self.log_path = log_path
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    self.args = [sys.executable, "-m", "jserve", "serve", f"--model={model_dir}", f"--port={self.grpc_port}",
                 f"--http_port={self.http_port}", *ENGINE_FLAGS, *extra]
    self._log = open(log_path, "w")  # noqa: SIM115 - open as long as the process runs
    self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def wait_ready(self, timeout_s: float = 300):
    import httpx2
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
      try:
        if httpx2.get(f"{self.http_url}/health", timeout=2).status_code == 200:
          return self
      except httpx2.HTTPError:
        pass
      time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log()[-5000:]}")

  def terminate(self, timeout_s: float = 60) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()
    return self.proc.returncode


SHUTDOWN_TIMEOUT_S = 2.0
MAX_WAITING = 300  # above the 256 concurrent requests of the concurrency test


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
  """The one server of the session (a start compiles for tens of seconds on a busy 2-core machine).

  API key required, 64 KiB message limit, priority scheduling. test_shutdown.py sends it SIGTERM as the
  session's last test (see pytest_collection_modifyitems); otherwise the teardown does.
  """
  log = str(tmp_path_factory.mktemp("server") / "server.log")
  s = ServerProcess(tiny_model_dir, log, f"--api_key={API_KEY}", "--max_message_bytes=65536",
                    f"--max_waiting_requests={MAX_WAITING}", "--served_model_name=tiny",
                    "--scheduling_policy=priority", f"--shutdown_timeout_s={SHUTDOWN_TIMEOUT_S}")
  try:
    yield s.wait_ready()
  finally:
    code = s.terminate()
    assert code == 0, f"server exited with {code}:\n{s.log()[-3000:]}"


def pytest_collection_modifyitems(items):
  # The shutdown tests end the shared server: they run last, overload before SIGTERM.
  last = [i for i in items if i.module.__name__.endswith("test_shutdown")]
  items[:] = [i for i in items if i not in last] + last


def scrape(server: ServerProcess) -> dict[str, float]:
  """GET /metrics as {series (labels dropped): value}; histogram series keep their suffix."""
  import httpx2
  text = httpx2.get(f"{server.http_url}/metrics", timeout=10).text
  values = {}
  for line in text.splitlines():
    m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
    if m and "_bucket" not in m.group(1):
      key = m.group(1) + (m.group(2) or "") if "finish_reason" in (m.group(2) or "") else m.group(1)
      values[key] = float(m.group(3))
  return values


def wait_idle(server: ServerProcess, timeout_s: float = 10) -> dict[str, float]:
  """Metrics once no request runs or waits and no KV page is held (aborts land asynchronously)."""
  deadline = time.monotonic() + timeout_s
  while True:
    m = scrape(server)
    idle = (m["jserve_num_requests_running"] == 0 and m["jserve_num_requests_waiting"] == 0
            and m["jserve_kv_cache_used_pages"] == 0)
    if idle or time.monotonic() > deadline:
      return m
    time.sleep(0.1)

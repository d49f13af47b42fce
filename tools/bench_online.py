"""Online serving on one machine: starts `jserve serve`, sweeps request rates with tools/bench_serving.py.

    PYTHONPATH=. python -m tools.bench_online --preset=llama-3.1-8b --dummy --out_dir=$OUT

Writes a model directory for --preset (config and tokenizer; with --dummy the server makes random
weights on the device, else a random checkpoint is written first), starts the server in a child
process (gRPC and, where Starlette and uvicorn import, HTTP), waits until it serves, then for each
API in --backends and each rate in --rates runs `tools.bench_serving` in its own process: Poisson
arrivals at that rate (`inf`: all at once), --num_prompts random prompts of --input_len tokens,
--output_len output tokens each (`ignore_eos`); each run draws its own prompts (its seed is its
index), so no run finds an earlier run's prompts in the prefix cache. A run gets a wall-clock share of --budget_s
(a slow rate sends fewer requests, as many as arrive in 60% of its share: `prompts_for_run`); what
has finished is written to online.json and online.md under --out_dir as it goes, and the server's
log to server.log. Prints a table last: per API and rate, request and output token throughput and
TTFT / TPOT / ITL p50 and p99. tools/plot_e2e.py draws latency against rate from online.json.
This process never starts a JAX backend (the checkpoint and the device's name come from child
processes): on a GPU it would hold memory the server needs.
"""

import datetime
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
  """The script's flags, defined only when it runs as a script: tests import this module beside
  tools/bench_e2e.py, whose flags share some of these names."""
  flags.DEFINE_string("preset", "llama-3.1-8b", "model preset (random weights)")
  flags.DEFINE_bool("dummy", True, "random weights made on the device by the server (no checkpoint written)")
  flags.DEFINE_list("backends", ["grpc", "http"], "APIs to load: grpc, http, http-chat")
  flags.DEFINE_list("rates", ["1", "4", "16", "64", "inf"], "request rates in requests/s (inf: all at once)")
  flags.DEFINE_integer("num_prompts", 256, "requests per run (fewer at slow rates: see prompts_for_run)")
  flags.DEFINE_integer("input_len", 1000, "prompt tokens")
  flags.DEFINE_integer("output_len", 200, "output tokens per request")
  flags.DEFINE_float("budget_s", 540, "wall-clock budget of the whole run, server start included")
  flags.DEFINE_string("serve_flags", "--max_num_batched_tokens=2048",
                      "extra `jserve serve` flags, space separated")
  flags.DEFINE_string("out_dir", "/tmp/bench_online", "results directory")
  flags.DEFINE_float("start_timeout_s", 400, "longest wait for the server to serve")


_START = time.monotonic()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _http_available() -> bool:
  try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
  except ImportError:
    return False
  return True


def _remaining() -> float:
  return FLAGS.budget_s - (time.monotonic() - _START)


def start_server(model_dir: str, grpc_port: int, http_port: int, log_path: str) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "jserve", "serve", f"--model={model_dir}", f"--port={grpc_port}",
         f"--http_port={http_port}", "--served_model_name=bench", *FLAGS.serve_flags.split()]
  if FLAGS.dummy:
    cmd.append("--load_format=dummy")
  log = open(log_path, "w")
  print("server:", " ".join(cmd), flush=True)
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_serving(proc: subprocess.Popen, log_path: str, timeout_s: float) -> float:
  """Seconds until the server logs that it serves; raises if it exits or the wait runs out."""
  start = time.monotonic()
  while time.monotonic() - start < timeout_s:
    if proc.poll() is not None:
      with open(log_path) as f:
        last = " / ".join([line.strip() for line in f if line.strip()][-2:])
      raise RuntimeError(f"server exited with {proc.returncode} ({last}); see {log_path}")
    with open(log_path) as f:
      if "serving bench" in f.read():
        return time.monotonic() - start
    time.sleep(1.0)
  raise TimeoutError(f"server did not serve within {timeout_s:.0f} s; see {log_path}")


def _stop(server: subprocess.Popen):
  """Stops the server's process group: SIGTERM, then SIGKILL after 30 s (an exited server: nothing)."""
  try:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
  except ProcessLookupError:
    pass
  except subprocess.TimeoutExpired:
    os.killpg(server.pid, signal.SIGKILL)


def prompts_for_run(rate: str, share_s: float, num_prompts: int) -> int:
  """How many requests a run at `rate` sends in its `share_s` seconds: --num_prompts, or fewer where their
  Poisson arrivals alone would take more than 60% of the share (the rest is for the last requests to finish),
  so a slow rate gives a shorter valid run instead of one cut before its end."""
  if rate == "inf":
    return num_prompts
  return max(1, min(num_prompts, int(float(rate) * 0.6 * share_s)))


def run_client(backend: str, target: str, rate: str, tokenizer_dir: str, vocab: int, out_json: str,
               timeout_s: float, seed: int, num_prompts: int) -> dict:
  """One bench_serving run. Each run of a server needs its own `seed`: the prompts are drawn from it, and a
  run that sent an earlier run's prompts again would find them in the prefix cache (no prefill at all)."""
  cmd = [sys.executable, "-m", "tools.bench_serving", f"--backend={backend}", f"--target={target}",
         f"--vocab_size={vocab}",
         f"--num_prompts={num_prompts}", f"--request_rate={rate}", f"--random_input_len={FLAGS.input_len}",
         f"--random_output_len={FLAGS.output_len}", f"--result_json={out_json}", f"--seed={seed}"]
  if backend == "http-chat":
    cmd.append(f"--tokenizer={tokenizer_dir}")
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"cut at {timeout_s:.0f} s"}
  if not os.path.exists(out_json):
    return {"error": (done.stdout + done.stderr)[-2000:]}
  with open(out_json) as f:
    return json.load(f)


def table(results: dict) -> list[str]:
  lines = ["| API | rate req/s | requests | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
           "ITL p50 / p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for run in results["runs"]:
    s = run["summary"]
    if "error" in s or not s.get("completed"):
      error = s.get("error") or "; ".join(s.get("errors", [])[:1])
      lines.append(f"| {run['backend']} | {run['rate']} | {run.get('requests', '')} | failed: {error[:100]} | | | | |")
      continue
    pct = lambda k: f"{s[k]['p50']:.1f} / {s[k]['p99']:.1f}"  # noqa: E731
    failed = f" ({s['failed']} failed)" if s.get("failed") else ""
    lines.append(f"| {run['backend']} | {run['rate']} | {run.get('requests', '')} | "
                 f"{s['request_throughput']:.2f}{failed} | {s['output_token_throughput']:.0f} | "
                 f"{pct('ttft_ms')} | {pct('tpot_ms')} | {pct('itl_ms')} |")
  return lines


def save(results: dict):
  with open(os.path.join(FLAGS.out_dir, "online.json"), "w") as f:
    json.dump(results, f, indent=1)
  head = (f"{results['device']}, JAX {results['jax']}, {results['date']}; {FLAGS.preset} "
          f"{'random weights made on the device' if FLAGS.dummy else 'random checkpoint'}; "
          f"up to {FLAGS.num_prompts} requests of {FLAGS.input_len}/{FLAGS.output_len} per run; "
          f"server flags `{FLAGS.serve_flags}`; server ready in {results.get('server_start_s', float('nan')):.0f} s")
  with open(os.path.join(FLAGS.out_dir, "online.md"), "w") as f:
    f.write("\n".join([head, ""] + table(results)) + "\n")


def _device_info() -> tuple[str, str]:
  """(device kind, JAX version), asked of a child process: this one must not start a JAX backend,
  which on a GPU would hold most of the memory the server needs."""
  code = "import jax; print(jax.devices()[0].device_kind); print(jax.__version__)"
  kind, version = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-2:]
  return kind, version


def main(argv):
  del argv
  from jserve.config import load_model_config
  from tools.make_random_checkpoint import make_checkpoint_in_subprocess
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  backends = [b for b in FLAGS.backends if b == "grpc" or _http_available()]
  skipped = sorted(set(FLAGS.backends) - set(backends))
  device, jax_version = _device_info()
  results = {"date": datetime.date.today().isoformat(), "jax": jax_version, "device": device, "preset": FLAGS.preset,
             "input_len": FLAGS.input_len, "output_len": FLAGS.output_len, "num_prompts": FLAGS.num_prompts,
             "skipped_backends": {b: "starlette/uvicorn not importable" for b in skipped}, "runs": []}
  model_dir = os.path.join(tempfile.mkdtemp(), FLAGS.preset)
  make_checkpoint_in_subprocess(FLAGS.preset, model_dir, weights=not FLAGS.dummy)
  cfg = load_model_config(model_dir)
  vocab = min(cfg.vocab_size, 4000)  # random prompt ids the tokenizer also knows
  grpc_port, http_port = _free_port(), (_free_port() if any(b.startswith("http") for b in backends) else 0)
  log_path = os.path.join(FLAGS.out_dir, "server.log")
  server = start_server(model_dir, grpc_port, http_port, log_path)
  try:
    results["server_start_s"] = wait_serving(server, log_path, min(FLAGS.start_timeout_s, _remaining()))
    print(f"server ready in {results['server_start_s']:.0f} s", flush=True)
    runs = [(b, r) for b in backends for r in FLAGS.rates]
    for i, (backend, rate) in enumerate(runs):
      share = _remaining() / (len(runs) - i)
      if share < 10:
        results["runs"].append({"backend": backend, "rate": rate, "summary": {"error": "out of time"}})
        continue
      target = f"127.0.0.1:{grpc_port}" if backend == "grpc" else f"http://127.0.0.1:{http_port}"
      out_json = os.path.join(tempfile.mkdtemp(), "run.json")
      num_prompts = prompts_for_run(rate, share, FLAGS.num_prompts)
      summary = run_client(backend, target, rate, model_dir, vocab, out_json, share, seed=i, num_prompts=num_prompts)
      results["runs"].append({"backend": backend, "rate": float(rate) if rate != "inf" else math.inf,
                              "requests": num_prompts, "summary": summary})
      print(table(results)[-1], flush=True)
      save(results)
  finally:
    _stop(server)
  save(results)
  print("\n".join(table(results)))


if __name__ == "__main__":
  _define_flags()
  app.run(main)

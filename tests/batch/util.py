"""Helpers of the batch tests: JSONL files and the `jserve batch` command in a subprocess."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small enough that a job of a few dozen prompts takes about a second on a shared CPU. One token
# bucket (16): every engine start compiles a single step program (the step has a host callback, so
# JAX's persistent cache does not keep it and each process compiles it again).
ENGINE_KWARGS = {"kv_cache_gib": 0.02, "max_num_batched_tokens": 16, "max_num_seqs": 16, "max_model_len": 256,
                 "dtype": "float32"}


def write_jsonl(path, rows) -> str:
  """Writes dicts as JSON lines and strings as they are (for deliberately broken lines)."""
  with open(path, "w") as f:
    f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
  return str(path)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def by_key(records, key="id") -> dict:
  out = {}
  for r in records:
    assert r[key] not in out, f"{r[key]!r} appears twice"
    out[r[key]] = r
  return out


def cli_args(model_dir, cache_dir, *args):
  """`jserve batch` with the engine settings of ENGINE_KWARGS, so it loads the steps the in-process engine compiled."""
  return [sys.executable, "-m", "jserve", "batch", f"--model={model_dir}", "--kv_cache_gib=0.02",
          "--max_num_batched_tokens=16", "--max_num_seqs=16", "--max_model_len=256",
          "--dtype=float32", f"--compilation_cache_dir={cache_dir}", "--progress=log", *args]


def cli_env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")


def run_cli(args, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout,
                        check=False)

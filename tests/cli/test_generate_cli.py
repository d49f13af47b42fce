"""`jserve generate` end to end in a subprocess: output on success, one-line errors otherwise."""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--kv_cache_gib=0.01", "--max_num_batched_tokens=16", "--max_num_seqs=4", "--max_model_len=128",
         "--compilation_cache_dir=", "--dtype=float32"]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "jserve", "generate", *args], capture_output=True, text=True,
                        env=env, timeout=300, cwd=REPO)


def _assert_one_line_error(proc, pattern):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("jserve generate: error:") and pattern in last, proc.stderr


def test_generate_prints_prompt_and_completion(tiny_model_dir):
  proc = _run(f"--model={tiny_model_dir}", "--prompt=def add(a, b):", "--max_tokens=5", *SMALL)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("def add(a, b):")
  assert len(proc.stdout) > len("def add(a, b):")


def test_missing_model_directory(tmp_path):
  proc = _run(f"--model={tmp_path}/nothing", "--prompt=hi", *SMALL)
  _assert_one_line_error(proc, "does not exist")


def test_unknown_architecture(tiny_model_dir, tmp_path):
  d = shutil.copytree(tiny_model_dir, tmp_path / "m")
  cfg = json.load(open(d / "config.json"))
  cfg["architectures"] = ["FalconForCausalLM"]
  json.dump(cfg, open(d / "config.json", "w"))
  _assert_one_line_error(_run(f"--model={d}", "--prompt=hi", *SMALL), "'FalconForCausalLM' is not supported")


def test_truncated_weights(tiny_model_dir, tmp_path):
  d = shutil.copytree(tiny_model_dir, tmp_path / "m")
  with open(d / "model.safetensors", "r+b") as f:
    f.truncate(1000)
  _assert_one_line_error(_run(f"--model={d}", "--prompt=hi", *SMALL), "model.safetensors")


@pytest.mark.parametrize("prompt,message", [("", "prompt is empty"),
                                            ("x = 1\n" * 200, "max_model_len=128")])
def test_bad_prompts(tiny_model_dir, prompt, message):
  _assert_one_line_error(_run(f"--model={tiny_model_dir}", f"--prompt={prompt}", *SMALL), message)


def test_unknown_command_is_a_usage_error():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-m", "jserve", "frobnicate"], capture_output=True, text=True, env=env)
  assert proc.returncode != 0 and "unknown command 'frobnicate'" in proc.stderr


def test_two_processes_generate_what_one_process_does(tiny_model_dir):
  """`--num_processes=2`: process 0 prints the completion, process 1 follows and exits 0."""
  from tests.sharding.subprocess_util import run_processes
  from tests.sharding.test_multihost import free_port
  args = [f"--model={tiny_model_dir}", "--prompt=def add(a, b):", "--max_tokens=8", *SMALL]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = free_port()
  results = run_processes([[sys.executable, "-m", "jserve", "generate", *args, "--tensor_parallel_size=4",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
                           for i in (0, 1)], env)
  assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
  alone = _run(*args)
  assert alone.returncode == 0, alone.stderr
  # gloo, the CPU collectives library, prints its connections to stdout ("[Gloo] Rank 1 is connected to 1
  # peer ranks. Expected number of connected peer ranks is : 1"), from several threads whose pieces can
  # interleave and break lines anywhere; the completion comes last. The follower may print only gloo's words.
  gloo_words = set("Rank is connected to peer ranks. Expected number of connected peer ranks is :".split())
  assert results[0][1].splitlines()[-1:] == alone.stdout.splitlines()
  follower_words = results[1][1].replace("[Gloo]", " ").split()
  assert all(word in gloo_words or word.isdigit() for word in follower_words), results[1][1]


def test_bad_process_id_is_a_one_line_error(tiny_model_dir):
  proc = _run(f"--model={tiny_model_dir}", "--prompt=hi", "--num_processes=2", "--process_id=2",
              "--coordinator_address=localhost:1", *SMALL)
  _assert_one_line_error(proc, "process_id=2")

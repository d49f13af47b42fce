"""`jserve plan` and `jserve convert` end to end in a subprocess: output on success, one-line errors otherwise."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(command, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "jserve", command, *args], capture_output=True, text=True, env=env,
                        timeout=300, cwd=REPO)


def _assert_one_line_error(proc, command, pattern):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"jserve {command}: error:") and pattern in last, proc.stderr


def test_plan_ranks_tensor_8_first_for_70b_on_8_h100s():
  proc = _run("plan", "--model=llama-3.1-70b", "--num_devices=8", "--device=H100-80GB", "--num_plans=3")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("llama-3.1-70b on 8 x H100-80GB (80 GiB, 1 host(s)), max_model_len=4096, "
                             "concurrency=256:")
  rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
  assert len(rows) == 3
  assert rows[0].startswith("| 1 | 1 | 1 | 8 |")
  assert "data=1 stage=1 tensor=8 wins at" in proc.stdout


def test_plan_reads_a_checkpoint_directory_and_the_workload_flags(tiny_model_dir):
  proc = _run("plan", f"--model={tiny_model_dir}", "--num_devices=2", "--device=TPU-v5e", "--device_memory_gib=8",
              "--max_model_len=1024", "--concurrency=16", "--dtype=float32")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"{os.path.basename(tiny_model_dir)} on 2 x TPU-v5e (8 GiB, 1 host(s)), "
                                "max_model_len=1024, concurrency=16:")


def test_plan_with_fp8_weights_puts_405b_on_one_host_of_h100s():
  proc = _run("plan", "--model=llama-3.1-405b", "--num_devices=8", "--quantization=fp8", "--num_plans=1")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("llama-3.1-405b on 8 x H100-80GB (80 GiB, 1 host(s)), max_model_len=4096, "
                                "concurrency=256, fp8 weights:")
  assert "| 1 | 1 | 1 | 8 | 47.8 |" in proc.stdout  # in bfloat16 it needs 16 devices (test_planner.py)


def test_plan_counts_the_kv_cache_at_kv_cache_dtype():
  base = _run("plan", "--model=llama-3.1-8b", "--num_plans=1")
  fp8 = _run("plan", "--model=llama-3.1-8b", "--num_plans=1", "--kv_cache_dtype=fp8")
  assert base.returncode == 0 and fp8.returncode == 0, base.stderr + fp8.stderr
  assert "KV cache" not in base.stdout.splitlines()[0]
  assert fp8.stdout.splitlines()[0].endswith("concurrency=256, fp8 KV cache: 1 feasible plan(s)")
  # The same 54.7 GiB pool holds twice the tokens at one byte an element.
  assert "| 15.0 | 54.7 | 2.3 | 448,369 |" in base.stdout and "| 15.0 | 54.7 | 2.3 | 896,739 |" in fp8.stdout


def test_plan_counts_a_checkpoint_directory_as_the_engine_would_load_it(tmp_path):
  from configs.models import get_model_preset
  hf = get_model_preset("llama-3.1-70b").to_hf_dict()
  prequantized, bf16 = tmp_path / "llama-70b-fp8", tmp_path / "llama-70b"
  for path, config in ((prequantized, dict(hf, quantization_config={"quant_method": "fp8"})), (bf16, hf)):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
  # fp8 as stored, read from config.json by the engine's own reader: 67.7 GiB fits one H200.
  proc = _run("plan", f"--model={prequantized}", "--device=H200-141GB")
  assert proc.returncode == 0, proc.stderr
  assert "concurrency=256, fp8 weights: " in proc.stdout.splitlines()[0]
  assert "| 1 | 1 | 1 | 1 | 67.7 |" in proc.stdout
  # Quantized at start-up: the bfloat16 weights are on the device first, and they do not fit.
  proc = _run("plan", f"--model={bf16}", "--device=H200-141GB", "--quantization=fp8")
  _assert_one_line_error(proc, "plan", "loaded as 131.4 GiB in 16-bit before they are quantized")
  assert "it would fit on 2 x H200-141GB" in proc.stderr


def test_plan_says_what_would_fit_when_nothing_does():
  proc = _run("plan", "--model=llama-3.1-70b", "--num_devices=1", "--device=H100-80GB")
  _assert_one_line_error(proc, "plan", "llama-3.1-70b does not fit on 1 x H100-80GB")
  assert "it would fit on" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--model=no-such-model"], "--model='no-such-model' is neither a checkpoint directory nor a preset"),
    (["--model=llama-3.1-8b", "--device=A100"], "unknown device preset 'A100'"),
])
def test_plan_bad_flags(args, message):
  _assert_one_line_error(_run("plan", *args), "plan", message)


def test_convert_writes_orbax_weights_that_the_engine_serves_unchanged(tiny_model_dir, tmp_path):
  out = tmp_path / "orbax_model"
  proc = _run("convert", f"--model={tiny_model_dir}", f"--convert_output={out}", "--dtype=float32")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"wrote {out} (float32 weights in orbax/)")
  assert sorted(os.listdir(out)) == sorted(
      ["orbax"] + [f for f in os.listdir(tiny_model_dir) if not f.endswith(".safetensors")])

  from jserve import LLM, SamplingParams
  kwargs = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16, num_pages=24,
                compilation_cache_dir=None)
  params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  prompts = ["def main(argv):", "import os\n"]
  want = [o.outputs[0].token_ids for o in LLM(tiny_model_dir, **kwargs).generate(prompts, params, use_tqdm=False)]
  got = [o.outputs[0].token_ids for o in LLM(str(out), **kwargs).generate(prompts, params, use_tqdm=False)]
  assert got == want


def test_convert_refuses_a_non_empty_output(tiny_model_dir):
  proc = _run("convert", f"--model={tiny_model_dir}", f"--convert_output={tiny_model_dir}")
  _assert_one_line_error(proc, "convert", "is the input; choose a new directory")


def test_convert_needs_its_output_flag(tiny_model_dir):
  _assert_one_line_error(_run("convert", f"--model={tiny_model_dir}"), "convert", "--convert_output")

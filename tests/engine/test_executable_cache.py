"""Serialized step programs: a second start loads them and neither traces, lowers nor compiles a step."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import json, sys
from jserve import LLM, SamplingParams
args = json.loads(sys.argv[3])
llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
          kv_cache_gib=0.01, compilation_cache_dir=sys.argv[2], **args)
engine = llm.engine
started = dict(engine.startup_programs)
outs = llm.generate([[5, 6, 7], list(range(3, 40))], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                    use_tqdm=False)
ex = engine.runner.executables
print("RESULT " + json.dumps({"programs": started["programs"], "trace_lower_s": started["trace_lower_s"],
                              "loaded": ex.loaded if ex else None, "compiled": ex.compiled if ex else None,
                              "held": engine.runner.num_compiled(),
                              "tokens": [o.outputs[0].token_ids for o in outs]}))
"""


def _start(model_dir, cache_dir, devices=1, **engine_args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, model_dir, cache_dir, json.dumps(engine_args)],
                        capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  cold = _start(tiny_model_dir, cache, executable_cache=True, num_decode_steps=4)
  warm = _start(tiny_model_dir, cache, executable_cache=True, num_decode_steps=4)
  plain = _start(tiny_model_dir, str(tmp_path_factory.mktemp("plain")), num_decode_steps=4)
  other = _start(tiny_model_dir, cache, executable_cache=True, num_decode_steps=2)
  return cold, warm, plain, other, cache


def test_second_start_loads_every_step_program_and_builds_none(runs):
  cold, warm, _, _, cache = runs
  assert cold["loaded"] == 0 and cold["compiled"] > 0
  assert any(name.endswith(".jexe") for name in os.listdir(os.path.join(cache, "executables")))
  assert warm["compiled"] == 0 and warm["loaded"] == cold["compiled"]
  # JAX built none of the step programs: only the start's small ones (zeroed pools, placements).
  assert warm["programs"] == cold["programs"] - cold["compiled"]
  assert warm["trace_lower_s"] < cold["trace_lower_s"]
  assert warm["held"] == cold["held"]


def test_loaded_programs_generate_what_compiled_ones_do(runs):
  cold, warm, plain, _, _ = runs
  assert cold["tokens"] == warm["tokens"] == plain["tokens"]
  assert plain["loaded"] is None  # off by default


def test_another_configuration_does_not_take_these_programs(runs):
  cold, _, plain, other, _ = runs
  assert other["loaded"] == 0 and other["compiled"] > 0  # num_decode_steps differs: every key differs
  assert other["tokens"] == plain["tokens"]


def test_a_tensor_parallel_engine_loads_its_sharded_programs(tiny_model_dir, tmp_path, runs):
  _, _, plain, _, _ = runs
  cache = str(tmp_path / "jax_cache")
  args = dict(executable_cache=True, num_decode_steps=4, tensor_parallel_size=2)
  cold = _start(tiny_model_dir, cache, devices=8, **args)
  warm = _start(tiny_model_dir, cache, devices=8, **args)
  assert cold["loaded"] == 0 and warm["compiled"] == 0 and warm["loaded"] == cold["compiled"] > 0
  assert warm["tokens"] == cold["tokens"] == plain["tokens"]

"""A second engine start loads every program, step buckets and the small ones, from JAX's persistent cache."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import sys
from jax import monitoring
from jserve import LLM
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
          kv_cache_gib=0.01, compilation_cache_dir=sys.argv[2], compile_threads=4)
runner = llm.engine.runner
out = llm.generate(["def add(a, b):"], __import__("jserve").SamplingParams(max_tokens=6, temperature=0))
print("BUCKETS", len(runner.buckets), "HITS", len(hits), "COMPILED", llm.engine.startup_programs["compiled"],
      "LOADED", getattr(runner._step, "loaded", -1),
      "PREPARED", getattr(runner._step, "prepared", -1), "TOKENS", "-".join(map(str, out[0].outputs[0].token_ids)))
"""


def _start(model_dir, cache_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, model_dir, cache_dir], capture_output=True, text=True,
                        env=env, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  words = proc.stdout.split()
  return {w: words[words.index(w) + 1] if w == "TOKENS" else int(words[words.index(w) + 1])
          for w in ("BUCKETS", "HITS", "COMPILED", "LOADED", "PREPARED", "TOKENS")}


def test_second_start_takes_every_step_bucket_from_the_cache(tiny_model_dir, tmp_path):
  cache = str(tmp_path / "jax_cache")
  first = _start(tiny_model_dir, cache)
  assert first["HITS"] == 0 and first["COMPILED"] > first["BUCKETS"] and os.listdir(cache)
  # The step programs were exported beside the compilation cache (jserve/engine/programs.py) ...
  assert first["LOADED"] == 0
  assert first["PREPARED"] == 0, "programs not yet stored must compile one at a time"
  assert len([f for f in os.listdir(os.path.join(cache, "programs")) if f.startswith("step-")]) == first["BUCKETS"]
  second = _start(tiny_model_dir, cache)
  assert second["HITS"] >= first["BUCKETS"]
  assert second["COMPILED"] == 0, "a warm start compiled programs the cache should hold"
  # ... and the second start read them back instead of tracing and lowering, with the same greedy tokens.
  assert second["LOADED"] == first["BUCKETS"]
  # (read and compiled on the start-up's threads before their first call: compile_threads=4)
  assert second["PREPARED"] == first["BUCKETS"]
  assert second["TOKENS"] == first["TOKENS"]

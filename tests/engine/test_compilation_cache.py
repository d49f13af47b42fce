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
          kv_cache_gib=0.01, compilation_cache_dir=sys.argv[2])
print("BUCKETS", len(llm.engine.runner.buckets), "HITS", len(hits), "COMPILED",
      llm.engine.startup_programs["compiled"])
"""


def _start(model_dir, cache_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, model_dir, cache_dir], capture_output=True, text=True,
                        env=env, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  words = proc.stdout.split()
  return [int(words[words.index(w) + 1]) for w in ("BUCKETS", "HITS", "COMPILED")]


def test_second_start_takes_every_step_bucket_from_the_cache(tiny_model_dir, tmp_path):
  cache = str(tmp_path / "jax_cache")
  buckets, first_hits, first_compiled = _start(tiny_model_dir, cache)
  assert first_hits == 0 and first_compiled > buckets and os.listdir(cache)
  _, second_hits, second_compiled = _start(tiny_model_dir, cache)
  assert second_hits >= buckets
  assert second_compiled == 0, "a warm start compiled programs the cache should hold"

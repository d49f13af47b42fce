"""The engine records how long each start-up phase took and how many XLA programs it built.

tools/bench_cold_start.py reads these (`LLMEngine.startup_s`, `startup_programs`) to break the
time to the first token down by phase; the phases must be there, in order, and account for no
more time than building the engine took.
"""

import time

from jserve import LLM


def test_startup_phases_are_timed_and_fit_in_the_construction(tiny_model_dir):
  start = time.monotonic()
  llm = LLM(tiny_model_dir, dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16,
            kv_cache_gib=0.01, compilation_cache_dir=None)
  construct_s = time.monotonic() - start
  engine = llm.engine
  assert list(engine.startup_s) == ["config", "weights", "kv_pool", "compile"]
  assert all(s >= 0 for s in engine.startup_s.values())
  assert sum(engine.startup_s.values()) <= construct_s
  programs = engine.startup_programs
  # Every step bucket was built (compiled, or read from the session's persistent cache).
  assert programs["programs"] >= len(engine.runner.buckets)
  assert 0 <= programs["from_cache"] <= programs["programs"]
  assert programs["compiled"] == programs["programs"] - programs["from_cache"]
  assert programs["xla_s"] >= 0 and programs["trace_lower_s"] >= 0

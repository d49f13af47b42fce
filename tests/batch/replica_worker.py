"""Runs a batch job on two replicas, one per simulated CPU device; prints a JSON report.

Run by test_replicas.py in a fresh Python with XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import json
import sys


def main(model_dir: str, cache_dir: str, input_path: str, output_path: str):
  import jax

  from jserve.batch import BatchConfig, build_replicas, run_batch
  from jserve.engine.engine import EngineConfig
  from tests.batch.util import ENGINE_KWARGS

  def devices_of(tree):
    return sorted({str(d) for leaf in jax.tree_util.tree_leaves(tree) for d in leaf.devices()})

  replicas = build_replicas(EngineConfig(model=model_dir, compilation_cache_dir=cache_dir, **ENGINE_KWARGS), 2)
  summary = run_batch(BatchConfig(input_path=input_path, output_path=output_path, defaults={"temperature": 0.0},
                                  progress="none"), lambda: replicas)
  print(json.dumps({
      "num_devices": jax.device_count(),
      "replica_devices": [str(r.device) for r in replicas],
      # The KV pool is the jit step's output (donated and replaced each step): where it lives is where the step ran.
      "param_devices": [devices_of(r.engine.params) for r in replicas],
      "kv_devices": [devices_of(r.engine.runner.kv_caches) for r in replicas],
      "steps": [r.engine.num_steps for r in replicas],
      "finished": summary.finished, "num_replicas": summary.num_replicas}))


if __name__ == "__main__":
  main(*sys.argv[1:])

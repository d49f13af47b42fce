"""Worker for test_parallel_engine.py: `LLM(tensor_parallel_size=..., pipeline_parallel_size=...)` on 8 CPU devices.

    python -m tests.engine.parallel_engine_worker MODEL_DIR TP[,TP...] [MODEL_DIR TP[,TP...] ...]

A degree `TP@FIRST` builds the engine as `jserve batch` builds a replica, on
the devices FIRST to FIRST + TP - 1 given explicitly; a plain `TP` uses
`LLM(tensor_parallel_size=TP)` (this host's first TP devices), and `PPxTP`
`LLM(pipeline_parallel_size=PP, tensor_parallel_size=TP)`.

Prints one JSON line: per model directory and degree, the tokens of a batch of
greedy prompts, of one seeded sampled request with a repetition penalty (the
sampler's per-slot state) and of one under a regex (the grammar mask), the
XLA compiles while serving, and where the weights and the KV pool went.
"""

import contextlib
import json
import sys

import jax
import jax.monitoring

from jserve import LLM, SamplingParams
from jserve.batch import build_replicas
from jserve.engine.engine import EngineConfig

# XLA compiles in this process (JAX reports each one under this event name).
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: _COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)

PROMPTS = [
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "def main(argv):",
    "for i in range(10):\n    print(i)\n",
    "x",
    "    return self._cache.get(key, default)\n\n\n",
]
# Token budget 16 (one bucket, one compile per engine): the first prompt is prefilled in chunks.
ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=16, num_pages=48,
              compilation_cache_dir=None)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, repetition_penalty=1.3, seed=5, ignore_eos=True)
# A grammar's bitmask, uploaded to the mesh before each step.
CONSTRAINED = SamplingParams(max_tokens=12, temperature=1.0, seed=3, regex=r"[a-z]{3,8}\([0-9]\)")


def spec_of(a) -> list:
  spec = [None if s is None else str(s) for s in getattr(a.sharding, "spec", ())]  # none on one device
  return spec + [None] * (a.ndim - len(spec))


def _generate(engine, prompts, params) -> list:
  ids = [engine.add_request(None, prompt, p) for prompt, p in zip(prompts, params)]
  done = {}
  while engine.has_unfinished():
    done.update((out.request_id, out) for out in engine.step() if out.finished)
  return [done[i] for i in ids]


def run(model_dir: str, degree: str) -> dict:
  pp, _, tp = degree.rpartition("x")
  tp, _, first = tp.partition("@")
  pp, tp = int(pp or 1), int(tp)
  scope = contextlib.nullcontext()
  if first:
    devices = jax.devices()[int(first):int(first) + tp]
    (replica,) = build_replicas(EngineConfig(model=model_dir, tensor_parallel_size=tp, **ENGINE), 1, devices)
    engine = replica.engine
    # As the batch feeder does: the default device is part of jit's cache key.
    scope = jax.default_device(replica.device)
  else:
    engine = LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE).engine
  compiled_at_start = len(_COMPILES)
  with scope:
    outs = _generate(engine, PROMPTS + PROMPTS[:2], [GREEDY] * len(PROMPTS) + [SAMPLED, CONSTRAINED])
  pool = engine.runner.kv_caches[0]
  layer = engine.params["layers"][0]
  return {
      "greedy": [o.outputs[0].token_ids for o in outs[:-2]],
      "sampled": outs[-2].outputs[0].token_ids,
      "constrained": outs[-1].outputs[0].text,
      "compiles_while_serving": len(_COMPILES) - compiled_at_start,
      "kv_pool_shape": list(pool.shape),
      "kv_shard_shape": list(pool.addressable_shards[0].data.shape),
      "kv_devices": sorted(d.id for d in pool.devices()),
      "kv_layer_devices": [sorted(d.id for d in a.devices()) for a in engine.runner.kv_caches],
      "slot_devices": sorted(d.id for d in engine.runner.slots.counts_RV.devices()),
      "wq_spec": spec_of(layer["wq"]),
      "wq_shard_shape": list(layer["wq"].addressable_shards[0].data.shape),
      "w_down_spec": spec_of(layer["w_down"]),
      "slots_replicated": all(s.data.shape == engine.runner.slots.counts_RV.shape
                              for s in engine.runner.slots.counts_RV.addressable_shards),
  }


def main(argv):
  report = {"num_devices": jax.device_count()}
  for model_dir, degrees in zip(argv[::2], argv[1::2]):
    report[model_dir] = {degree: run(model_dir, degree) for degree in degrees.split(",")}
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1:])

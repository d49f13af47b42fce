"""Worker for test_dummy_weights.py: engines with `load_format="dummy"` on 4 simulated CPU devices.

    python -m tests.engine.dummy_weights_worker MODEL_DIR

MODEL_DIR holds config.json and a tokenizer, no weights. For one device,
tensor 4 (2 KV heads widened to 4) and pipeline 2 x tensor 2 it prints one JSON
line: greedy tokens, whether every weight equals one device's (widened where
the layout widens it), and where the weights went.
"""

import json
import sys

import jax
import numpy as np

from jserve import LLM, SamplingParams

LAYOUTS = {"1": (1, 1), "tensor 4": (4, 1), "pipeline 2 x tensor 2": (2, 2)}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [40, 41], [300]]


def _widened(a: np.ndarray, like: np.ndarray) -> np.ndarray:
  for dim, (n, m) in enumerate(zip(a.shape, like.shape)):
    if n != m:
      return np.repeat(a, m // n, axis=dim)
  return a


def _flat(params) -> list:
  """Per-layout params as one list: a pipeline's per-stage trees joined back in layer order."""
  if isinstance(params, list):
    layers = [layer for stage in params for layer in stage["layers"]]
    params = {"embed": params[0]["embed"], "layers": layers, "final_norm": params[-1]["final_norm"],
              **({"lm_head": params[-1]["lm_head"]} if "lm_head" in params[-1] else {})}
  return jax.tree_util.tree_leaves(params)


def main(model_dir: str):
  report, reference = {}, None
  for name, (tp, pp) in LAYOUTS.items():
    llm = LLM(model_dir, load_format="dummy", tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32",
              max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, num_pages=32, compilation_cache_dir=None)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    leaves = [np.asarray(x) for x in _flat(llm.engine.runner.params)]
    reference = reference or leaves
    wq = llm.engine.params["layers"][0]["wq"]
    report[name] = {
        "greedy": [o.outputs[0].token_ids for o in outs],
        "weights_equal_one_device": all(np.array_equal(a, _widened(r, a)) for a, r in zip(leaves, reference)),
        "wq_shard_shape": list(wq.addressable_shards[0].data.shape),
        "wq_devices": sorted(d.id for d in wq.devices()),
        "wk_shape": list(llm.engine.params["layers"][0]["wk"].shape),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1])

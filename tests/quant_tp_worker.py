"""Worker for test_quant.py: fp8 quantization of weights placed on meshes of 8 simulated CPU devices.

    python -m tests.quant_tp_worker [FP8_CHECKPOINT_DIR]

Builds `LLM(None, quantization="fp8", dtype="float32")` at tensor 2 and at pipeline 2 x tensor 2,
and prints one JSON line: per layout the greedy tokens of `PROMPTS`, the partition specs of the
quantized weights and their scales, whether layer 0's fp8 values and scales equal those of the
same weights quantized on one device (wo and w_down are split along the axes their amax reduces),
and the weight bytes on each device with its pipeline stage (for the planner's count).

It also runs fp8 activations (w8a8) at pipeline 2 x tensor 2 and on one device, and reports the
tokens of each and where the [N, K] weights lie.

Given a pre-quantized fp8 checkpoint, it also serves that at tensor 4 (the default model's 2 KV heads
widened to 4, and their scales with them) and on one device, with `quantization=None`, and reports
the same, layer 0's weights compared with the checkpoint read onto one device.
"""

import json
import sys

import jax
import numpy as np

from jserve import LLM, SamplingParams
from jserve.config import load_model_config
from jserve.engine.engine import DEFAULT_MODEL_DIR
from jserve.models.quant import CONTRACTED_AXES, quantize_fp8
from jserve.weights import load_params

PROMPTS = ["import os\n\n\ndef read_lines(path):", "class Stack:\n", "for i in range(10):"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE = dict(quantization="fp8", dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
              num_pages=40, compilation_cache_dir=None)
LAYOUTS = {"tensor 2": (1, 2), "pipeline 2 x tensor 2": (2, 2)}


def spec_of(a) -> list:
  spec = [None if s is None else str(s) for s in a.sharding.spec]
  return spec + [None] * (a.ndim - len(spec))


def main():
  cfg = load_model_config(DEFAULT_MODEL_DIR)
  one = load_params(DEFAULT_MODEL_DIR, cfg, "float32")["layers"][0]
  report = {}
  for name, (pp, tp) in LAYOUTS.items():
    llm = LLM(None, pipeline_parallel_size=pp, tensor_parallel_size=tp, **ENGINE)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    layer = llm.engine.params["layers"][0]
    same = {}
    for param, n in CONTRACTED_AXES.items():
      if param in ("wk", "wv") and tp > cfg.num_kv_heads:
        continue  # widened KV heads: not the single-device shape
      ref = quantize_fp8(one[param], n)
      q = layer[param]
      same[param] = bool(np.array_equal(np.asarray(q.w, np.float32), np.asarray(ref.w, np.float32))
                         and np.array_equal(np.asarray(q.scale), np.asarray(ref.scale)))
    report[name] = _describe(llm, outs, same)
  report["w8a8"] = _w8a8()
  if len(sys.argv) > 1:
    report["fp8 checkpoint"] = _checkpoint(sys.argv[1])
  print(json.dumps({"num_devices": jax.device_count(), **report}))


def _device_bytes(llm) -> dict:
  """{device id: bytes of the weights the step reads there}: the runner's params, which with stages
  hold the last stage's copy of a tied LM head."""
  out = {}
  for a in jax.tree_util.tree_leaves(llm.engine.runner.params):
    for shard in a.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def _describe(llm, outs, same) -> dict:
  layer = llm.engine.params["layers"][0]
  return {
      "tokens": [o.outputs[0].token_ids for o in outs],
      "specs": {param: [spec_of(layer[param].w), spec_of(layer[param].scale)] for param in CONTRACTED_AXES},
      "dtypes": sorted({str(layer[param].w.dtype) for param in CONTRACTED_AXES}),
      "equal_to_one_device": same,
      "scale_devices": sorted(d.id for d in layer["wo"].scale.devices()),
      "last_layer_devices": sorted(d.id for d in llm.engine.params["layers"][-1]["wo"].w.devices()),
      "device_weight_bytes": _device_bytes(llm),
      "first_stage_devices": sorted(d.id for d in layer["wo"].w.devices()),
  }


def _w8a8() -> dict:
  """fp8 activations (w8a8) at pipeline 2 x tensor 2 against one device: tokens, and where each [N, K]
  weight and its scale lie."""
  one, llm = (LLM(None, activation_quantization="fp8", pipeline_parallel_size=n, tensor_parallel_size=n, **ENGINE)
              for n in (1, 2))
  layer = llm.engine.params["layers"][0]
  names = sorted(layer)  # the projections, gate and up, k and v stacked (quant.stack_pairs)
  return {
      "tokens": [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)],
      "one_device_tokens": [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)],
      "names": names,
      "types": sorted({type(layer[param]).__name__ for param in names if param.startswith("w")}),
      "specs": {param: [spec_of(layer[param].w_NK), spec_of(layer[param].scale)] for param in names
                if param.startswith("w")},
      "shard_shapes": {param: list(layer[param].w_NK.addressable_shards[0].data.shape) for param in names
                       if param.startswith("w")},
      "first_stage_devices": sorted(d.id for d in layer["wo"].w_NK.devices()),
      "last_layer_devices": sorted(d.id for d in llm.engine.params["layers"][-1]["wo"].w_NK.devices()),
      # matmul_impl="auto": decode-sized products weight-only from the same sharded store (quant.a8_weight_only)
      "auto_tokens": {n: [o.outputs[0].token_ids for o in LLM(
          None, activation_quantization="fp8", tensor_parallel_size=n, **dict(ENGINE, matmul_impl="auto")).generate(
              PROMPTS, GREEDY, use_tqdm=False)] for n in (1, 2)},
  }


def _checkpoint(model_dir: str) -> dict:
  """The fp8 checkpoint at tensor 4 against one device: tokens, placements and layer 0's values."""
  kw = dict(ENGINE, quantization=None)  # the checkpoint's own quantization
  one = LLM(model_dir, **kw)
  llm = LLM(model_dir, tensor_parallel_size=4, **kw)
  outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
  want, got = one.engine.params["layers"][0], llm.engine.params["layers"][0]
  same = {}
  for param in CONTRACTED_AXES:
    w, scale = np.asarray(want[param].w, np.float32), np.asarray(want[param].scale)
    if param in ("wk", "wv"):  # widened: head j copies head j // 2, its scale with it
      w, scale = np.repeat(w, 2, axis=1), np.repeat(scale, 2, axis=0)
    same[param] = bool(np.array_equal(np.asarray(got[param].w, np.float32), w)
                       and np.array_equal(np.asarray(got[param].scale), scale))
  return dict(_describe(llm, outs, same), one_device_tokens=[
      o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)],
      wk_shapes=[list(got["wk"].w.shape), list(got["wk"].scale.shape)],
      wk_scale_shard=list(got["wk"].scale.addressable_shards[0].data.shape))


if __name__ == "__main__":
  main()

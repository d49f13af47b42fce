"""Pre-quantized fp8 checkpoints written the way llm-compressor (compressed-tensors) and AutoFP8 write them.

Made from a full-precision Hugging Face checkpoint with numpy and ml_dtypes only (not with jserve's
quantizer, so that the loader is checked against an independent writer): every layer projection's
`weight` becomes float8 e4m3 in torch's [out, in] layout with a `weight_scale` beside it, and
config.json gets the `quantization_config` those tools write. Beside it, optionally, the float32
checkpoint of the dequantized weights (weight * scale), the model the fp8 checkpoint stands for.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (quantization_config, strategy, dtype of weight_scale, shape of a per-tensor scale, input_scale
# tensors written). The first two as RedHatAI's Llama-3.1-8B-Instruct "-FP8-dynamic" and "-FP8".
FORMATS = {
    "compressed-tensors channel": ({
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                        "group_size": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True, "group_size": None, "block_structure": None, "observer": None},
        }},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
    }, "channel", ml_dtypes.bfloat16, None, False),
    "compressed-tensors tensor": ({
        "quant_method": "compressed-tensors", "format": "naive-quantized", "quantization_status": "frozen",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False,
                        "group_size": None, "block_structure": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                  "dynamic": False, "group_size": None, "block_structure": None},
        }},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    }, "tensor", np.float32, (1,), True),
    # AutoFP8 (and vLLM's own fp8 serialization): a 0-d float32 scale per tensor, static input scales.
    "fp8 tensor": ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]},
                   "tensor", np.float32, (), True),
}


def quantize(w: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
  """(float8 e4m3 weight, float32 scale [out, 1] or [1, 1]) of a torch-layout [out, in] weight."""
  w32 = w.astype(np.float32)
  amax = np.abs(w32).max(axis=1 if strategy == "channel" else None, keepdims=True)
  scale = np.maximum(amax / np.float32(448), np.finfo(np.float32).tiny).astype(np.float32)
  return np.clip(w32 / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn), scale


def write_fp8_checkpoint(src: str, out: str, fmt: str, *, dequantized: str | None = None, extra=(), keep=(),
                         drop=(), config_edit=None) -> str:
  """Writes `src` (a one-file checkpoint) quantized as `FORMATS[fmt]` to `out`; returns `out`.

  extra: more weights to quantize (an LM head, say); keep: projections left unquantized (the config's
  ignore list names them); drop: tensors to leave out; config_edit: changes to quantization_config;
  dequantized: a directory for the float32 checkpoint of the dequantized weights.
  """
  qc, strategy, scale_dtype, tensor_shape, input_scales = FORMATS[fmt]
  qc = json.loads(json.dumps(qc))
  tensors = load_file(os.path.join(src, "model.safetensors"))
  plain = dict(tensors)
  for name in sorted(tensors):
    module = name.removesuffix(".weight")
    quantized = name.endswith(".weight") and module.split(".")[-1] in PROJECTIONS or name in extra
    if not quantized or module in keep:
      continue
    w8, scale = quantize(tensors[name], strategy)
    scale = scale.astype(scale_dtype)
    tensors[name] = w8
    tensors[module + ".weight_scale"] = scale if strategy == "channel" else scale.reshape(tensor_shape)
    if input_scales:
      tensors[module + ".input_scale"] = np.array(0.02, np.float32).reshape(tensor_shape)
    plain[name] = w8.astype(np.float32) * scale.astype(np.float32)
  if keep:
    qc.setdefault("ignore" if "ignore" in qc else "ignored_layers", []).extend(keep)
  qc.update(config_edit or {})
  _write(src, out, {k: v for k, v in tensors.items() if k not in drop}, qc)
  if dequantized:
    _write(src, dequantized, plain, None)
  return out


def _write(src: str, out: str, tensors: dict, quantization_config: dict | None):
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(src):
    if not name.endswith(".safetensors") and os.path.isfile(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), out)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if quantization_config is not None:
    config["quantization_config"] = quantization_config
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)

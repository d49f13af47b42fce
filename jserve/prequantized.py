"""Pre-quantized FP8 checkpoints: a `quantization_config` in config.json, read into `quant.Fp8Weight`s.

Serving an fp8 checkpoint as it was published (RedHatAI's and neuralmagic's "-FP8" models, say) means
reading what its quantizer wrote: a projection's `weight` as float8 e4m3 in torch's [out, in] layout
and a `weight_scale` beside it, weight * scale being the original. Two formats are read:

- `quant_method: "compressed-tensors"` (llm-compressor), `format` "float-quantized" or
  "naive-quantized", every config group's `weights` {num_bits: 8, type: "float", symmetric,
  strategy: "channel" or "tensor"}: a scale of shape [out, 1] per channel, [1] or [] per tensor.
  Modules named in `ignore` (usually `lm_head`) stay in their checkpoint dtype.
- `quant_method: "fp8"` without `weight_block_size` (AutoFP8, and what vLLM writes): one scale per tensor.

A scale per tensor is broadcast to one per output channel, so `Fp8Weight` has one form whatever the
checkpoint held, and the same one as online quantization (jserve/models/quant.py).

Activation settings (`input_activations`, `activation_scheme`, `input_scale` and k/v scale tensors)
are ignored: by default jserve multiplies the activations in the model's dtype (weight-only, w8a16),
which is the checkpoint's fp8 weights with no activation rounding added, so at least as accurate as
fp8 x fp8. `EngineConfig.activation_quantization="fp8"` rounds them to fp8 with jserve's own dynamic
scale per token (the scheme of a "dynamic", per-token checkpoint such as llm-compressor's FP8-Dynamic);
a static checkpoint's `input_scale`s are not used either way.

Everything else is refused with a `CheckpointError` before any tensor is read: block-wise fp8
(`weight_block_size`, as in Qwen3-FP8 and DeepSeek-V3), integer formats (awq, gptq, bitsandbytes,
int8 or int4 compressed-tensors) and modules quantized that jserve keeps unquantized (an fp8 LM head
or embedding). A checkpoint that cannot be read right must not load as something else.
"""

import dataclasses
import json
import os

import numpy as np

from jserve.errors import CheckpointError

# Element types of a tensor that loads unquantized (cast to the model's dtype, as always).
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
_FORMATS = ("float-quantized", "naive-quantized")
_STRATEGIES = ("channel", "tensor")
_SUPPORTED = ("fp8 checkpoints with a scale per output channel or per tensor: compressed-tensors "
              "(float-quantized) or quant_method 'fp8' without weight_block_size")


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
  """What a checkpoint's `quantization_config` says, reduced to what jserve does with it."""

  method: str  # quant_method
  strategies: tuple[str, ...]  # how its weights are scaled: "channel", "tensor" (the config's word)
  ignored: tuple[str, ...]  # activation and KV-cache settings that weight-only serving leaves out

  def describe(self) -> str:
    return f"{self.method}: fp8 e4m3 weights with a scale per {' or per '.join(self.strategies)}"


def checkpoint_quantization(model_dir: str) -> CheckpointQuantization | None:
  """The quantization of the checkpoint in `model_dir`: None when its config.json has no
  `quantization_config`; a `CheckpointError` naming what is unsupported when jserve cannot read it."""
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  qc = hf.get("quantization_config") if isinstance(hf, dict) else None
  return None if qc is None else parse_quantization_config(qc)


def parse_quantization_config(qc) -> CheckpointQuantization:
  """Checks a `quantization_config` dict against the formats jserve reads (see the module docstring)."""
  if not isinstance(qc, dict):
    raise CheckpointError(f"quantization_config={qc!r}: expected a dict")
  method = qc.get("quant_method")
  if method == "compressed-tensors":
    return _compressed_tensors(qc)
  if method == "fp8":
    return _fp8(qc)
  raise CheckpointError(f"quantization_config.quant_method={method!r} is not supported; jserve reads {_SUPPORTED}. "
                        "Serve the unquantized checkpoint instead (quantization='fp8' quantizes it at start-up)")


def _fp8(qc: dict) -> CheckpointQuantization:
  block = qc.get("weight_block_size")
  if block is not None:
    raise CheckpointError(f"quant_method 'fp8' with weight_block_size={block} (a scale per weight block, as in "
                          f"Qwen3-FP8 and DeepSeek-V3) is not supported; jserve reads {_SUPPORTED}")
  fmt = qc.get("fmt", "e4m3")
  if fmt != "e4m3":
    raise CheckpointError(f"quant_method 'fp8' with fmt={fmt!r} is not supported: only e4m3 weights are read")
  scheme = qc.get("activation_scheme", "dynamic")
  if scheme not in ("static", "dynamic"):
    raise CheckpointError(f"quant_method 'fp8' with activation_scheme={scheme!r}: expected static or dynamic")
  return CheckpointQuantization(method="fp8", strategies=("tensor",), ignored=(f"activation_scheme={scheme!r}",))


def _compressed_tensors(qc: dict) -> CheckpointQuantization:
  fmt = qc.get("format")
  if fmt not in _FORMATS:
    raise CheckpointError(f"compressed-tensors format={fmt!r} is not supported; jserve reads {_SUPPORTED}")
  sparsity = qc.get("sparsity_config") or {}
  if sparsity.get("format", "dense") != "dense":
    raise CheckpointError(f"compressed-tensors sparsity_config format={sparsity.get('format')!r} is not supported "
                          "(sparse weights are stored compressed); jserve reads dense fp8 weights")
  if qc.get("transform_config"):
    # Rotations (QuIP, SpinQuant) change what the weights multiply; reading them plainly would be wrong.
    raise CheckpointError("compressed-tensors transform_config is not supported: the weights are rotated")
  groups = qc.get("config_groups")
  if not isinstance(groups, dict) or not groups:
    raise CheckpointError(f"compressed-tensors quantization_config has no config_groups ({groups!r})")
  strategies, ignored = [], []
  for name, group in groups.items():
    where = f"compressed-tensors config_groups.{name}"
    if group.get("format") not in (None, *_FORMATS):
      raise CheckpointError(f"{where}.format={group['format']!r} is not supported; jserve reads {_SUPPORTED}")
    weights = group.get("weights")
    if not weights:
      raise CheckpointError(f"{where} quantizes no weights (activations only), which jserve does not support")
    problems = _weight_scheme_problems(weights)
    if problems:
      raise CheckpointError(f"{where}.weights: {', '.join(problems)}; jserve reads {_SUPPORTED}")
    if group.get("output_activations"):
      raise CheckpointError(f"{where}.output_activations is set; quantized outputs are not supported")
    strategies.append(weights["strategy"])
    acts = group.get("input_activations")
    if acts:
      kind = "dynamic" if acts.get("dynamic") else "static"
      ignored.append(f"{name}'s input activations in {acts.get('type')}{acts.get('num_bits')} "
                     f"({kind}, per {acts.get('strategy')})")
  if qc.get("kv_cache_scheme"):
    ignored.append("kv_cache_scheme (the KV cache follows kv_cache_dtype)")
  return CheckpointQuantization(method="compressed-tensors", strategies=tuple(dict.fromkeys(strategies)),
                                ignored=tuple(ignored))


def _weight_scheme_problems(w: dict) -> list[str]:
  """What in a compressed-tensors weight scheme differs from fp8 with a scale per channel or tensor."""
  want = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
          "dynamic": False, "actorder": None}
  problems = [f"{k}={w.get(k, v)!r}" for k, v in want.items() if w.get(k, v) != v]
  if w.get("strategy") not in _STRATEGIES:
    problems.append(f"strategy={w.get('strategy')!r}")
  return problems


def scale_name(weight_name: str) -> str:
  return weight_name.removesuffix("weight") + "weight_scale"


def fp8_tensors(leaves, dtypes: dict[str, str], contracted: dict[str, int], quant: CheckpointQuantization | None,
                model_dir: str) -> set[str]:
  """The checkpoint names of the parameters to read as fp8; raises on anything else that is not plain float.

  leaves: the model's `ParamSpec`s; dtypes: the safetensors dtype of every tensor in the checkpoint
  (from the headers, so nothing is read yet); contracted: the projections' names -> contracted axes.
  """
  out = set()
  for spec in leaves:
    name = spec.hf_name
    if name not in dtypes:
      raise CheckpointError(f"checkpoint {model_dir!r} lacks tensor {name!r}")
    dtype, scale = dtypes[name], scale_name(name)
    if quant is None:
      if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name!r} is stored as {dtype} but config.json has no quantization_config "
                              f"to say how to read it")
      continue
    if name not in contracted:
      if dtype not in FLOAT_DTYPES or scale in dtypes:
        raise CheckpointError(
            f"tensor {name!r} is quantized ({dtype}{', with ' + scale if scale in dtypes else ''}): jserve keeps "
            "the embedding, LM head and norms unquantized and reads fp8 layer projections only (a checkpoint "
            "quantized with these modules in its ignore list loads)")
      continue
    if dtype == FP8_DTYPE:
      if scale not in dtypes:
        raise CheckpointError(f"checkpoint {model_dir!r} lacks tensor {scale!r}, the scale of the fp8 {name!r}")
      if dtypes[scale] not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {scale!r} is stored as {dtypes[scale]}; expected a float scale")
      out.add(name)
    elif scale in dtypes or dtype not in FLOAT_DTYPES:
      raise CheckpointError(f"tensor {name!r} is stored as {dtype}{' with ' + scale if scale in dtypes else ''}; "
                            f"jserve reads quantized projections as {FP8_DTYPE} (float8_e4m3fn) only")
    # else: left unquantized by the checkpoint (its ignore list): loads as a plain array
  return out


def scale_from_hf(spec, scale: np.ndarray, num_contracted: int) -> np.ndarray:
  """A checkpoint's `weight_scale` as `Fp8Weight.scale`: float32 of `spec`'s output axes.

  torch's [out, in] layout flattens the output axes, in jserve's order, into `out` (wq's [N * H],
  wo's [D]), so a scale per channel ([out, 1] or [out]) reshapes to them; one per tensor broadcasts.
  """
  out_shape = tuple(spec.shape[num_contracted:])
  name = scale_name(spec.hf_name)
  scale = np.asarray(scale, np.float32)
  if scale.size == 1:
    scale = np.full(out_shape, scale.reshape(()), np.float32)
  elif scale.size == int(np.prod(out_shape)) and scale.ndim <= 2 and scale.shape[1:] in ((), (1,)):
    scale = scale.reshape(out_shape)
  else:
    raise CheckpointError(f"tensor {name!r} has shape {list(scale.shape)}; expected a scale per output channel "
                          f"[{int(np.prod(out_shape))}, 1] or per tensor [1] (blocks or groups are not supported)")
  if not np.isfinite(scale).all():
    raise CheckpointError(f"tensor {name!r} holds non-finite scales")
  return scale

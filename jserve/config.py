"""Model architecture config, read from a Hugging Face `config.json`.

Two layouts are found in the wild and both are accepted: transformers 4 writes
`rope_theta` beside an optional `rope_scaling` dict; transformers 5 writes one
`rope_parameters` dict that holds `rope_theta` and the scaling fields.
"""

import dataclasses
import json
import math
import os

import numpy as np

from jserve.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
  """Rotary embedding parameters; `rope_type` is Hugging Face's name."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(
          f"rope_type={self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """Per-pair rotation frequencies, [head_dim // 2] float32, as transformers computes them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (np.float32(self.theta) ** exponent)).astype(np.float32)
    if self.rope_type == "linear":
      return (inv_freq / np.float32(self.factor)).astype(np.float32)
    if self.rope_type == "llama3":
      old_len = self.original_max_position_embeddings
      low_wavelen = old_len / self.low_freq_factor
      high_wavelen = old_len / self.high_freq_factor
      wavelen = 2 * math.pi / inv_freq
      scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
      smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyper-parameters of a Llama-family decoder. Hashable: it is a static jit argument."""

  architecture: str = "LlamaForCausalLM"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(f"architecture {self.architecture!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"{name}={getattr(self, name)}: need a positive value")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def param_count(self) -> int:
    """Number of parameters, counting a tied LM head once."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.num_layers * layer + self.vocab_size * d + head + d

  def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

  @classmethod
  def from_hf_dict(cls, hf: dict) -> "ModelConfig":
    """Builds a config from the contents of a Hugging Face `config.json`."""
    archs = hf.get("architectures") or []
    if not archs:
      raise ConfigError("config.json has no 'architectures' entry; cannot tell which model it is")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
      num_heads = int(hf["num_attention_heads"])
      hidden = int(hf["hidden_size"])
      eos = hf.get("eos_token_id")
      eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
      sliding = hf.get("sliding_window")
      if arch == "Qwen2ForCausalLM" or arch == "Qwen3ForCausalLM":
        if not hf.get("use_sliding_window", False):
          sliding = None
      return cls(
          architecture=arch,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=num_heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
          head_dim=int(hf.get("head_dim") or hidden // num_heads),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          rope=_rope_from_hf(hf),
          max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
          attention_bias=(arch == "Qwen2ForCausalLM") or bool(hf.get("attention_bias", False)),
          qk_norm=arch == "Qwen3ForCausalLM",
          sliding_window=int(sliding) if sliding else None,
          bos_token_id=hf.get("bos_token_id"),
          eos_token_ids=eos_ids,
      )
    except KeyError as e:
      raise ConfigError(f"config.json lacks the required field {e.args[0]!r}") from None

  def to_hf_dict(self) -> dict:
    """The `config.json` contents that transformers reads back into this config."""
    rope = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
    if self.rope.rope_type == "linear":
      rope["factor"] = self.rope.factor
    if self.rope.rope_type == "llama3":
      rope.update(factor=self.rope.factor, low_freq_factor=self.rope.low_freq_factor,
                  high_freq_factor=self.rope.high_freq_factor,
                  original_max_position_embeddings=self.rope.original_max_position_embeddings)
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[self.architecture]
    out = {
        "architectures": [self.architecture], "model_type": model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope.theta, "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": self.attention_bias, "torch_dtype": "bfloat16",
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
    }
    if self.architecture == "MistralForCausalLM":
      out["sliding_window"] = self.sliding_window
    return out


def _rope_from_hf(hf: dict) -> RopeConfig:
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  params = {**scaling, **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(
        f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
  kwargs = {"theta": float(theta), "rope_type": rope_type}
  if rope_type in ("linear", "llama3"):
    kwargs["factor"] = float(params["factor"])
  if rope_type == "llama3":
    kwargs.update(low_freq_factor=float(params["low_freq_factor"]),
                  high_freq_factor=float(params["high_freq_factor"]),
                  original_max_position_embeddings=int(params["original_max_position_embeddings"]))
  return RopeConfig(**kwargs)


def load_model_config(model_dir: str) -> ModelConfig:
  """Reads `config.json` from a checkpoint directory."""
  if not os.path.isdir(model_dir):
    raise CheckpointError(f"model directory {model_dir!r} does not exist")
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{model_dir!r} has no config.json; expected a Hugging Face checkpoint directory")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  return ModelConfig.from_hf_dict(hf)

"""The engine's settings: `EngineConfig` (vLLM's engine argument names) and the defaults it falls back on.

Apart from `LLMEngine` (jserve/engine/engine.py, which re-exports these names) so that what a user can
set, and how each setting is checked, reads in one place; `jserve plan` also resolves the KV cache's
element type here, as the engine does.
"""

import dataclasses
import os

import jax.numpy as jnp

from jserve.engine.placement import LOAD_FORMATS
from jserve.errors import ConfigError
from jserve.models.quant import ACTIVATION_QUANTIZATIONS, QUANTIZATIONS
from jserve.weights import resolve_dtype
from pallas_kernels.decode_matmul import IMPLS as MATMUL_IMPLS

# kv_cache_dtype's names (vLLM's, and the 16-bit ones by name) -> the pool's dtype; None: the model's.
KV_CACHE_DTYPES = {"auto": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "fp8": jnp.float8_e4m3fn,
                   "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def resolve_kv_cache_dtype(name: str, dtype: str) -> jnp.dtype:
  """The KV pool's dtype for kv_cache_dtype=`name` and the model's `dtype`: one place for the engine and
  for `jserve plan`, so the plan counts the pool's bytes as the engine allocates them."""
  return jnp.dtype(KV_CACHE_DTYPES[name] or resolve_dtype(dtype))


DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_model")
CPU_DEFAULT_BATCHED_TOKENS = 512
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jserve", "jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  """Everything the engine needs to start. Field names follow vLLM's engine arguments."""

  model: str | None = None
  dtype: str = "bfloat16"
  # The KV pool's element type: "auto" (the model's dtype) or "fp8" (e4m3, as vLLM's fp8 and fp8_e4m3;
  # "fp8_e5m2" also): half the bytes of bfloat16, so twice the tokens in the pool and half the KV read
  # per decode step. Keys and values are stored unscaled, clipped to the format's range.
  kv_cache_dtype: str = "auto"
  # Weight quantization at load time (vLLM's `quantization`): None, or "fp8": every layer's projections
  # in float8 (e4m3) with a float32 scale per output channel, activations in `dtype`: half the weight
  # bytes a decode step reads, and the memory freed goes to the KV pool (jserve/models/quant.py).
  # A pre-quantized fp8 checkpoint is read as stored with None or "fp8" (jserve/prequantized.py).
  quantization: str | None = None
  # fp8 activations too (w8a8; needs fp8 weights, from `quantization="fp8"` or an fp8 checkpoint): None,
  # or "fp8": every projection quantizes its input per token to e4m3 with a dynamic scale
  # and multiplies fp8 by fp8 on the tensor cores, twice bfloat16's FLOP rate on Ada and Hopper, for
  # compute-bound steps (prefill chunks, large decode batches). See jserve/models/quant.py.
  activation_quantization: str | None = None
  max_model_len: int | None = None
  max_num_seqs: int = 256
  max_num_batched_tokens: int | None = None  # 8192 on accelerators, 512 on CPU
  page_size: int = 16
  enable_prefix_caching: bool = True
  gpu_memory_utilization: float = 0.9
  kv_cache_gib: float | None = None  # per device
  num_pages: int | None = None
  scheduling_policy: str = "fcfs"
  # How much of the KV pool a waiting request must find free to start: "auto" (its whole length when
  # that is known, ignore_eos without stops; else its first chunk), "full" (always its whole length:
  # nothing admitted is preempted) or "prompt" (its first chunk, as vLLM). See engine/scheduler.py.
  kv_admission: str = "auto"
  seed: int = 0
  compilation_cache_dir: str | None = DEFAULT_COMPILATION_CACHE
  # Keep the step programs as exported modules in compilation_cache_dir/programs, so a warm start reads
  # them instead of tracing and lowering (jserve/engine/programs.py). One device, one process only.
  program_cache: bool = True
  # Threads that read and compile the stored programs at a warm start (jserve/engine/runner.py's
  # compile_all); programs not yet stored compile one at a time whatever this says.
  compile_threads: int = 1
  attn_impl: str = "auto"
  # How decode steps' projections multiply (pallas_kernels/decode_matmul): "xla" (einsum; the
  # default until a kernel measures faster on the GPU), "auto" or "gpu" (the Triton kernel), "hopper"
  # (the Mosaic GPU kernel). Prefill-sized steps and sharded weights use XLA whatever this says. With fp8
  # activations, "auto" also multiplies decode-sized products of small weights weight-only (quant.a8_weight_only),
  # and "gpu" multiplies decode-sized w8a8 products in the Triton kernel's w8a8 entries.
  matmul_impl: str = "xla"
  tensor_parallel_size: int = 1
  pipeline_parallel_size: int = 1
  overlap_steps: bool = True  # queue step N+1 on the device before reading step N's tokens
  num_decode_steps: int = 1  # decode steps per device call when a batch only decodes (vLLM: num_scheduler_steps)
  load_format: str = "auto"  # "dummy": random weights made on the devices (benchmarks; no checkpoint read)
  # Who picks the sampler's path for a batch: "host" (a program per path: no conditional in the step
  # of a batch of greedy and temperature rows), "device" (one program, a `lax.switch`), or "auto":
  # "host" on GPUs, where a conditional makes the host wait for the device, else "device".
  sampler_paths: str = "auto"
  # With host paths: compile the staged sampler's programs (top-k/top-p/min-p, penalties, bias,
  # logprobs, grammar) at start-up; False halves start-up compiling, and the first batch that needs
  # one waits for its compile (a deployment that only serves greedy and temperature never does).
  precompile_staged_sampler: bool = True

  def __post_init__(self):
    if self.page_size % 8:
      raise ConfigError(f"page_size={self.page_size}: need a multiple of 8")
    if not 0 < self.gpu_memory_utilization <= 1:
      raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization}: need a value in (0, 1]")
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "num_decode_steps"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name}={getattr(self, name)}: need at least 1")
    if self.matmul_impl not in MATMUL_IMPLS:
      raise ConfigError(f"matmul_impl={self.matmul_impl!r}: use one of {', '.join(MATMUL_IMPLS)}")
    if self.sampler_paths not in ("auto", "host", "device"):
      raise ConfigError(f"sampler_paths={self.sampler_paths!r}: use auto, host or device")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
    if self.quantization is not None and self.quantization not in QUANTIZATIONS:
      raise ConfigError(f"quantization={self.quantization!r}: use None (no quantization) or one of "
                        f"{', '.join(QUANTIZATIONS)}")
    if self.activation_quantization is not None:
      if self.activation_quantization not in ACTIVATION_QUANTIZATIONS:
        raise ConfigError(f"activation_quantization={self.activation_quantization!r}: use None (activations in "
                          f"dtype) or one of {', '.join(ACTIVATION_QUANTIZATIONS)}")
    if self.load_format not in LOAD_FORMATS:
      raise ConfigError(f"load_format={self.load_format!r}: use one of {', '.join(LOAD_FORMATS)}")

  @property
  def model_dir(self) -> str:
    return self.model or DEFAULT_MODEL_DIR

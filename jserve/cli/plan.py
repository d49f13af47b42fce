"""`jserve plan`: ranked (data, pipeline, tensor) layouts for a model on a cluster, with the numbers behind them.

    jserve plan --model=llama-3.1-70b --num_devices=8 --device=H100-80GB
    jserve plan --model=/path/to/hf_dir --num_devices=16 --num_hosts=2 --device=H200-141GB --max_model_len=8192

--model is a checkpoint directory (its config.json is read; no weights) or a
preset name from configs/models.py. The workload comes from the engine flags
--dtype, --max_model_len (default here 4096, not the model's limit),
--max_num_seqs, --max_num_batched_tokens and --gpu_memory_utilization, plus
--concurrency. The weights are counted as the engine would hold them: a
pre-quantized fp8 checkpoint's as stored, or with --quantization=fp8 the
projections in fp8 (for a checkpoint directory, quantized at start-up, so its
full-precision weights must fit first). The KV cache is counted at
--kv_cache_dtype's element size (fp8: one byte), as the engine allocates it.
The planner itself is sharding.planner (docs/planner.md).
"""

import os
import sys

from absl import flags

from jserve.cli import flags as _engine_flags  # noqa: F401  (--model, --dtype, --max_model_len, ...)
from jserve.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_devices", 1, "accelerators in the cluster, all hosts together")
flags.DEFINE_integer("num_hosts", None, "hosts they sit in (default: as few as the device preset's devices/host allow)")
flags.DEFINE_string("device", "H100-80GB", "device preset: H100-80GB, H200-141GB, TPU-v5e, TPU-v5p, TPU-v6e")
flags.DEFINE_float("device_memory_gib", None, "memory of one device in GiB (default: the preset's)")
flags.DEFINE_integer("concurrency", 256, "sequences decoding at once over the whole cluster")
flags.DEFINE_integer("num_plans", 10, "how many of the ranked plans to print")

PLAN_MAX_MODEL_LEN = 4096  # a model's own limit (128k for Llama-3.1) would size the KV pool for nobody's workload


def model_config(model: str | None):
  """(config, name, checkpoint directory) of a checkpoint directory, a preset name (directory None), or
  the shipped default model (--model unset)."""
  from configs import MODEL_PRESETS
  from jserve.config import load_model_config
  from jserve.engine.engine_config import DEFAULT_MODEL_DIR
  if model is None:
    return load_model_config(DEFAULT_MODEL_DIR), "the default model", DEFAULT_MODEL_DIR
  if os.path.isdir(model):
    return load_model_config(model), os.path.basename(os.path.normpath(model)), model
  if model in MODEL_PRESETS:
    return MODEL_PRESETS[model], model, None
  raise ConfigError(f"--model={model!r} is neither a checkpoint directory nor a preset; presets: "
                    f"{', '.join(sorted(MODEL_PRESETS))}")


def weight_quantization(model_dir: str | None) -> tuple[str | None, bool]:
  """(quantization, whether it happens at start-up) of the weights the engine would serve.

  As the engine decides: a pre-quantized checkpoint's config.json wins (read by the engine's own
  `checkpoint_quantization`, so an unsupported one is the same error here), else --quantization of
  the full-precision weights. A preset has no checkpoint: it is planned as fp8 weights served as
  stored (a pre-quantized checkpoint of that shape); plan a directory to see the start-up peak.
  """
  from jserve.prequantized import checkpoint_quantization
  if model_dir is not None and checkpoint_quantization(model_dir) is not None:
    return "fp8", False
  requested = None if FLAGS.quantization == "none" else FLAGS.quantization
  return requested, requested is not None and model_dir is not None


def workload(model_dir: str | None):
  import jax.numpy as jnp

  from jserve.engine.engine_config import resolve_kv_cache_dtype
  from jserve.weights import resolve_dtype
  from sharding.costs import Workload
  itemsize = jnp.dtype(resolve_dtype(FLAGS.dtype)).itemsize
  # The engine's own resolution of --kv_cache_dtype ("auto": the model's dtype), so the pool is counted
  # at the element size the engine would allocate.
  kv_itemsize = resolve_kv_cache_dtype(FLAGS.kv_cache_dtype, FLAGS.dtype).itemsize
  quantization, at_load = weight_quantization(model_dir)
  return Workload(max_model_len=FLAGS.max_model_len or PLAN_MAX_MODEL_LEN, concurrency=FLAGS.concurrency,
                  max_num_batched_tokens=FLAGS.max_num_batched_tokens or 8192, max_num_seqs=FLAGS.max_num_seqs,
                  weight_bytes=itemsize, kv_bytes=kv_itemsize, memory_utilization=FLAGS.gpu_memory_utilization,
                  quantization=quantization, quantize_at_load=at_load,
                  kv_cache_dtype=None if FLAGS.kv_cache_dtype == "auto" else FLAGS.kv_cache_dtype)


def main():
  from sharding.errors import ShardingError
  from sharding.planner import plan_report
  cfg, name, model_dir = model_config(FLAGS.model)
  try:
    report = plan_report(cfg, model_name=name, num_devices=FLAGS.num_devices, device=FLAGS.device,
                         num_hosts=FLAGS.num_hosts, device_memory_gib=FLAGS.device_memory_gib,
                         workload=workload(model_dir), limit=FLAGS.num_plans)
  except ShardingError as e:
    # The planner says what would fit; that is the user's answer, not a crash.
    raise ConfigError(str(e)) from None
  sys.stdout.write(report + "\n")

"""Flags shared by the commands. Configs are built here, never read from flags below cli/."""

from absl import flags

from jserve.engine.engine_config import KV_CACHE_DTYPES, EngineConfig
from jserve.models.quant import ACTIVATION_QUANTIZATIONS, QUANTIZATIONS

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "Hugging Face checkpoint directory (default: the model shipped with jserve)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "weight (and by default KV cache) dtype")
flags.DEFINE_enum("kv_cache_dtype", "auto", list(KV_CACHE_DTYPES),
                  "KV pool element type: auto (--dtype) or fp8 (e4m3; fp8_e5m2 also): half the bytes per token")
flags.DEFINE_enum("quantization", "none", ["none", *QUANTIZATIONS],
                  "fp8: projection weights in float8 (e4m3) with a scale per output channel; half the weight bytes. "
                  "A pre-quantized fp8 checkpoint is read as stored either way")
flags.DEFINE_enum("activation_quantization", "none", ["none", *ACTIVATION_QUANTIZATIONS],
                  "fp8: with fp8 weights, each projection also quantizes its input per token (w8a8) and "
                  "multiplies on fp8 tensor cores")
flags.DEFINE_integer("max_model_len", None, "longest prompt + output in tokens (default: the model's limit)")
flags.DEFINE_integer("max_num_seqs", 256, "most sequences in one step")
flags.DEFINE_integer("max_num_batched_tokens", None,
                     "most tokens in one step, the prefill chunk budget (default 8192; 512 on CPU)")
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_bool("enable_prefix_caching", True, "reuse KV pages of shared prompt prefixes")
flags.DEFINE_float("gpu_memory_utilization", 0.9, "fraction of device memory jserve may use")
flags.DEFINE_float("kv_cache_gib", None, "KV pool size in GiB (default: from device memory; 0.5 on CPU)")
flags.DEFINE_enum("scheduling_policy", "fcfs", ["fcfs", "priority"], "order of the waiting queue")
flags.DEFINE_enum("kv_admission", "auto", ["auto", "full", "prompt"],
                  "KV pages a waiting request must find free: its whole length (full; auto where the length is "
                  "known) or its first chunk (prompt)")
flags.DEFINE_integer("seed", 0, "engine seed (per-request seeds are drawn from it when not given)")
flags.DEFINE_string("compilation_cache_dir", EngineConfig.compilation_cache_dir,
                    "JAX persistent compilation cache ('' disables)")
flags.DEFINE_bool("program_cache", True, "keep the step programs as exported modules beside the compilation cache, "
                  "so a warm start skips tracing and lowering (one device)")
flags.DEFINE_integer("compile_threads", 1, "threads that read and compile the stored step programs at a "
                     "warm start")
flags.DEFINE_integer("tensor_parallel_size", 1, "devices per tensor-parallel group")
flags.DEFINE_integer("pipeline_parallel_size", 1, "pipeline stages, each of --tensor_parallel_size devices")
flags.DEFINE_integer("num_decode_steps", 1, "decode steps per device call when a batch only decodes")
flags.DEFINE_bool("overlap_steps", True, "queue the next step on the device before reading this step's tokens")
flags.DEFINE_enum("sampler_paths", "auto", ["auto", "host", "device"],
                  "who picks the sampler's path per batch: host (a program per path, no conditional in plain "
                  "batches; auto on GPUs) or device (one program with a lax.switch)")
flags.DEFINE_bool("precompile_staged_sampler", True,
                  "with host sampler paths, compile the staged sampler's programs at start-up (false: on first use)")
flags.DEFINE_enum("load_format", "auto", ["auto", "dummy"],
                  "auto: read the checkpoint's weights; dummy: random weights made on the devices (benchmarks)")
flags.DEFINE_enum("matmul_impl", "xla", ["xla", "auto", "gpu", "hopper"],
                  "decode steps' projections: xla, auto or gpu (the Triton kernel), hopper (the Mosaic GPU kernel)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, to serve one model from several processes")
flags.DEFINE_integer("num_processes", 1, "processes serving one model (one per host); process 0 serves requests")
flags.DEFINE_integer("process_id", 0, "this process's index among --num_processes")


def join_processes() -> bool:
  """Joins the other processes (with --num_processes > 1) before JAX starts; True on a follower, which
  must then run `LLMEngine.follow()` instead of serving."""
  from sharding import distributed
  from sharding.errors import ShardingError
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ShardingError as e:
    from jserve.errors import ConfigError
    raise ConfigError(str(e)) from None
  return FLAGS.num_processes > 1 and FLAGS.process_id != 0


def engine_config() -> EngineConfig:
  return EngineConfig(
      model=FLAGS.model, dtype=FLAGS.dtype, kv_cache_dtype=FLAGS.kv_cache_dtype,
      quantization=None if FLAGS.quantization == "none" else FLAGS.quantization, max_model_len=FLAGS.max_model_len,
      activation_quantization=None if FLAGS.activation_quantization == "none" else FLAGS.activation_quantization,
      max_num_seqs=FLAGS.max_num_seqs,
      max_num_batched_tokens=FLAGS.max_num_batched_tokens, page_size=FLAGS.page_size,
      enable_prefix_caching=FLAGS.enable_prefix_caching, gpu_memory_utilization=FLAGS.gpu_memory_utilization,
      kv_cache_gib=FLAGS.kv_cache_gib, scheduling_policy=FLAGS.scheduling_policy,
      kv_admission=FLAGS.kv_admission, seed=FLAGS.seed,
      compilation_cache_dir=FLAGS.compilation_cache_dir or None, program_cache=FLAGS.program_cache,
      compile_threads=FLAGS.compile_threads, tensor_parallel_size=FLAGS.tensor_parallel_size,
      pipeline_parallel_size=FLAGS.pipeline_parallel_size,
      num_decode_steps=FLAGS.num_decode_steps, overlap_steps=FLAGS.overlap_steps,
      sampler_paths=FLAGS.sampler_paths, precompile_staged_sampler=FLAGS.precompile_staged_sampler,
      load_format=FLAGS.load_format, matmul_impl=FLAGS.matmul_impl)

"""`jserve batch`: offline JSONL inference (docs/batch.md).

    jserve batch --model=DIR --input=in.jsonl --output=out.jsonl [--num_replicas=2] [--sort_by_prefix]
    jserve batch ... --num_shards=4 --shard_index=$HOST_INDEX --output=out.$HOST_INDEX.jsonl
    jserve batch --merge='out.*.jsonl' --input=in.jsonl --output=out.jsonl
"""

import json

from absl import flags

# --max_tokens, --temperature, --top_p, --top_k and --sample_seed are defined by `generate`
# (absl flags are global); here they are the defaults of every line.
from jserve.cli import generate  # noqa: F401
from jserve.cli.flags import engine_config
from jserve.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "batch input JSONL (jserve lines or OpenAI batch lines)")
flags.DEFINE_string("output", None, "output JSONL; an existing file is resumed (ids already in it are skipped)")
flags.DEFINE_enum("input_format", "auto", ["auto", "jserve", "openai"],
                  "format of the input lines (auto: OpenAI if the first line has custom_id or body)")
flags.DEFINE_string("sampling_params", None,
                    "JSON object of SamplingParams fields used as every line's defaults, after the "
                    "--max_tokens/--temperature/--top_p/--top_k/--sample_seed flags, e.g. '{\"min_p\": 0.05}'")
flags.DEFINE_bool("sort_by_prefix", False, "start prompts in sorted order so that shared prefixes hit the cache")
flags.DEFINE_integer("num_replicas", 1, "independent engines on this host, each on its own "
                     "--pipeline_parallel_size x --tensor_parallel_size devices")
flags.DEFINE_integer("num_shards", 1, "hosts sharing the input: this one takes lines i with i % num_shards == "
                     "shard_index")
flags.DEFINE_integer("shard_index", 0, "this host's shard, in [0, num_shards)")
flags.DEFINE_string("merge", None, "merge shard outputs instead of running: comma-separated files or globs, "
                    "written to --output (in input order and verified if --input is given)")
flags.DEFINE_enum("progress", "auto", ["auto", "bar", "log", "none"],
                  "a progress bar (auto: on a terminal) or log lines")
flags.DEFINE_float("log_every_s", 10.0, "seconds between progress log lines")
flags.DEFINE_integer("max_pending", None, "unfinished requests kept in each engine (default: 2 x max_num_seqs)")


def _defaults() -> dict:
  defaults = {"max_tokens": FLAGS.max_tokens, "temperature": FLAGS.temperature, "top_p": FLAGS.top_p,
              "top_k": FLAGS.top_k}
  if FLAGS.sample_seed is not None:
    defaults["seed"] = FLAGS.sample_seed
  if FLAGS.sampling_params:
    try:
      extra = json.loads(FLAGS.sampling_params)
    except json.JSONDecodeError as e:
      raise ConfigError(f"--sampling_params is not JSON: {e}") from None
    if not isinstance(extra, dict):
      raise ConfigError(f"--sampling_params={FLAGS.sampling_params!r}: expected a JSON object")
    defaults.update(extra)
  return defaults


def main():
  from jserve.batch import BatchConfig, build_replicas, merge_outputs, run_batch
  if not FLAGS.output:
    raise ConfigError("--output is required")
  if FLAGS.merge:
    merge_outputs(FLAGS.merge, FLAGS.output, FLAGS.input, FLAGS.input_format)
    return
  if not FLAGS.input:
    raise ConfigError("--input is required (or --merge to merge shard outputs)")
  config = BatchConfig(input_path=FLAGS.input, output_path=FLAGS.output, input_format=FLAGS.input_format,
                       defaults=_defaults(), sort_by_prefix=FLAGS.sort_by_prefix, num_shards=FLAGS.num_shards,
                       shard_index=FLAGS.shard_index, progress=FLAGS.progress, log_every_s=FLAGS.log_every_s,
                       max_pending=FLAGS.max_pending)
  engine = engine_config()
  run_batch(config, lambda: build_replicas(engine, FLAGS.num_replicas))

"""`jserve convert`: write a Hugging Face checkpoint as a model directory with orbax weights.

    jserve convert --model=/path/to/hf_dir --convert_output=/path/to/out [--dtype=bfloat16]

The output is served like any model directory (`jserve serve --model=/path/to/out`);
the engine restores its orbax weights straight into each device's shards.
"""

import sys

from absl import flags

from jserve.cli import flags as _engine_flags  # noqa: F401  (--model, --dtype)
from jserve.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("convert_output", None, "directory jserve convert writes (new or empty)")


def main():
  from jserve.convert import convert_to_orbax
  if not FLAGS.model:
    raise ConfigError("--model (the Hugging Face checkpoint directory to convert) is required")
  if not FLAGS.convert_output:
    raise ConfigError("--convert_output (the directory to write) is required")
  seconds = convert_to_orbax(FLAGS.model, FLAGS.convert_output, FLAGS.dtype)
  sys.stdout.write(f"wrote {FLAGS.convert_output} ({FLAGS.dtype} weights in orbax/) in {seconds:.1f} s\n")

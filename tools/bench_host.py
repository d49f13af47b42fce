"""Host time per engine step with the device taken out: what the engine's Python costs per step.

    JAX_PLATFORMS=cpu python -m tools.bench_host --batch=256

Starts an engine on a tiny random model, replaces the runner's device step by
one that returns random tokens at once (the batch is still built and packed),
fills it with `--batch` decoding sequences and times `--steps` calls of
`LLMEngine.step()`: scheduling, batch building, reading tokens, stop checks
and page bookkeeping, everything but the device. With overlapped steps this
is the floor of the wall time per step whenever it exceeds the device's time.
With `--num_decode_steps=K` each call covers K decode steps (the stub returns
K tokens per sequence) and the time is per decode step.
"""

import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 256, "sequences decoding together")
flags.DEFINE_integer("steps", 200, "steps timed")
flags.DEFINE_integer("repeats", 3, "timed rounds; the best is reported")
flags.DEFINE_integer("num_decode_steps", 1, "decode steps per device call (the stub returns K tokens per row)")


class _Tokens:
  def __init__(self, rng, num_seqs):
    self.tokens_B = rng.integers(5, 500, num_seqs).astype("int32")


def main(argv):
  del argv
  import numpy as np

  from jserve.engine.engine import EngineConfig, LLMEngine
  from jserve.engine.request import SamplingParams
  from jserve.engine.runner import pack_host_inputs
  from tools.make_random_checkpoint import make_checkpoint
  model = os.path.join(tempfile.mkdtemp(), "tiny")
  make_checkpoint("tiny-llama", model)
  total = 30 + FLAGS.steps * FLAGS.repeats + 8
  engine = LLMEngine(EngineConfig(model=model, max_model_len=16 + total + 16, max_num_seqs=FLAGS.batch,
                                  max_num_batched_tokens=FLAGS.batch, num_pages=FLAGS.batch * (total // 16 + 4),
                                  compilation_cache_dir=None, num_decode_steps=FLAGS.num_decode_steps))
  runner, rng = engine.runner, np.random.default_rng(0)

  def stub_execute(inputs, sampling, tokens):
    runner._flush_slot_writes()
    runner._put(pack_host_inputs((inputs, sampling, tokens))[0])
    return _Tokens(rng, len(sampling.temperature_B)), None

  def stub_burst(inputs, sampling, tokens):
    runner._flush_slot_writes()
    runner._put(pack_host_inputs((inputs, sampling, tokens))[0])
    return rng.integers(5, 500, (FLAGS.num_decode_steps, len(sampling.temperature_B))).astype("int32")

  runner.execute = stub_execute
  runner.execute_burst = stub_burst
  params = SamplingParams(max_tokens=total, temperature=0, ignore_eos=True)
  for _ in range(FLAGS.batch):
    engine.add_request(None, rng.integers(10, 200, size=16).tolist(), params)
  for _ in range(30):
    engine.step()
  best = float("inf")
  for _ in range(FLAGS.repeats):
    t, steps = time.perf_counter(), engine.num_steps
    for _ in range(FLAGS.steps // FLAGS.num_decode_steps):
      engine.step()
    best = min(best, (time.perf_counter() - t) / (engine.num_steps - steps))
  print(f"host time per decode step at {len(engine.scheduler.running)} decoding sequences, "
        f"{FLAGS.num_decode_steps} step(s) per call: {best * 1e3:.3f} ms "
        f"(best of {FLAGS.repeats} rounds of {FLAGS.steps} steps)")


if __name__ == "__main__":
  app.run(main)

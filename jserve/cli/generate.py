"""`jserve generate`: complete one or more prompts and print the text."""

import sys

from absl import flags

from jserve.cli.flags import engine_config, join_processes
from jserve.engine.llm import LLM
from jserve.engine.request import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("prompt", None, "prompt text (repeat the flag for several prompts)")
flags.DEFINE_integer("max_tokens", 32, "most tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0 is greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("top_k", -1, "sample among the k most likely tokens (-1: all)")
flags.DEFINE_integer("sample_seed", None, "per-request sampling seed")
flags.DEFINE_bool("chat", False, "wrap the prompt as a user message in the model's chat template")


def main():
  if not FLAGS.prompt:
    raise SystemExit("jserve generate: --prompt is required")
  params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                          top_k=FLAGS.top_k, seed=FLAGS.sample_seed)
  follower = join_processes()
  llm = LLM(**_engine_kwargs())
  if follower:
    llm.engine.follow()
    return
  if FLAGS.chat:
    outs = llm.chat([[{"role": "user", "content": p}] for p in FLAGS.prompt], params)
  else:
    outs = llm.generate(FLAGS.prompt, params)
  for prompt, out in zip(FLAGS.prompt, outs):
    if len(FLAGS.prompt) > 1:
      print(f"--- prompt: {prompt!r}")
    sys.stdout.write(prompt + out.outputs[0].text + "\n" if not FLAGS.chat else out.outputs[0].text + "\n")
  llm.engine.stop_followers()


def _engine_kwargs():
  import dataclasses
  cfg = engine_config()
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}

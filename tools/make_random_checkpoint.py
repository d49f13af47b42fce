"""Writes a Hugging Face checkpoint directory with random weights for any preset.

    python -m tools.make_random_checkpoint --preset=llama-3.2-1b --out=/tmp/llama1b [--num_layers=2]

The directory holds config.json, model.safetensors (bfloat16 by default) and a
byte-level BPE tokenizer trained in seconds on Python standard-library source,
so benchmarks and tests run real shapes without downloading anything.
"""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import sysconfig

from absl import app, flags

import jax

from configs import get_model_preset
from jserve.models.llama import init_params
from jserve.weights import resolve_dtype, save_hf_checkpoint

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def stdlib_files(limit: int | None = None) -> list[str]:
  """Python files of the interpreter's standard library, sorted, tests and site-packages excluded."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
  files = [f for f in files if "site-packages" not in f and "/test" not in f and "idlelib" not in f]
  return files[:limit] if limit else files


def train_tokenizer(vocab_size: int, files: list[str]):
  """A byte-level BPE tokenizer (the Llama 3 / GPT-2 scheme) that prepends BOS, trained on `files`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train(files, trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
  return tok


def write_tokenizer(tok, out_dir: str):
  """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja as transformers 5 does."""
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
               "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}, f, indent=2)
  with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
    f.write(CHAT_TEMPLATE)


def write_generation_config(cfg, out_dir: str, **extra):
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), **extra}, f, indent=2)


def make_checkpoint(preset: str, out_dir: str, *, num_layers: int | None = None, dtype: str = "bfloat16",
                    seed: int = 0, tokenizer_vocab: int = 4096, tokenizer_files: int = 200, weights: bool = True):
  """Writes the checkpoint; returns its ModelConfig. weights=False: config.json, tokenizer and generation
  config only, for an engine that makes its weights on the devices (`load_format="dummy"`)."""
  cfg = get_model_preset(preset)
  tok = train_tokenizer(min(tokenizer_vocab, cfg.vocab_size), stdlib_files(tokenizer_files))
  cfg = dataclasses.replace(cfg, bos_token_id=tok.token_to_id(BOS), eos_token_ids=(tok.token_to_id(EOS),),
                            num_layers=num_layers or cfg.num_layers)
  if weights:
    params = init_params(cfg, jax.random.key(seed), dtype=resolve_dtype(dtype))
    save_hf_checkpoint(params, cfg, out_dir)
  else:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(cfg.to_hf_dict(), f, indent=2)
  write_tokenizer(tok, out_dir)
  write_generation_config(cfg, out_dir)
  return cfg


def make_checkpoint_in_subprocess(preset: str, out_dir: str, *, weights: bool = True, timeout_s: float = 1800):
  """`make_checkpoint` in a child process, for a benchmark whose own process must not start a JAX
  backend: on a GPU the first process to start one takes most of the device's memory, which the
  engine started after it (a server, a measured child) then lacks."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys; from tools.make_random_checkpoint import make_checkpoint; "
          "make_checkpoint(sys.argv[1], sys.argv[2], weights=sys.argv[3] == '1')")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
  subprocess.run([sys.executable, "-c", code, preset, out_dir, "1" if weights else "0"], check=True, env=env,
                 cwd=repo, timeout=timeout_s)


FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a script: benchmarks import this module and define flags of their own.
  flags.DEFINE_string("preset", "tiny-llama", "model preset from configs/models.py")
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_integer("num_layers", None, "override the preset's layer count (smaller files)")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weight dtype")
  flags.DEFINE_integer("seed", 0, "random seed of the weights")


def main(argv):
  del argv
  cfg = make_checkpoint(FLAGS.preset, FLAGS.out, num_layers=FLAGS.num_layers, dtype=FLAGS.dtype, seed=FLAGS.seed)
  print(f"wrote {FLAGS.out}: {cfg.architecture}, {cfg.param_count() / 1e6:.1f}M parameters", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

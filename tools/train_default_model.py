"""Trains jserve's default model: a small Llama on the Python standard library's source.

    python -m tools.train_default_model --out=/tmp/default_model [--seed=0 --steps=2000]

The corpus is every `*.py` file under the interpreter's standard library
(`--stdlib_root` points elsewhere), site-packages and files that are not UTF-8
left out. Files whose relative path hashes into one bucket of `HELDOUT_MODULUS`
are held out: the rule depends on the name alone, so any Python's standard
library splits the same way and a held-out name is never trained on. The
tokenizer (byte-level BPE) and the model are trained on the other files; the
model is jserve's own (`jserve.models.llama.forward_dense`), trained with optax.

Deterministic for a seed on one platform: the tokenizer, the initial weights
and every batch derive from the flags, and XLA's GPU backend is told to use
deterministic reductions. The output directory is a Hugging Face checkpoint
plus `training_record.json`: corpus statistics, held-out files, the training
curve, the held-out loss per file, the unigram baseline and sample completions.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

from tools.make_random_checkpoint import BOS, EOS, train_tokenizer, write_generation_config, write_tokenizer

HELDOUT_MODULUS = 32  # about 3% of the files
SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef read_lines(path):", "class Stack:\n",
                  "    def __repr__(self):")
LICENCE = "PSF License Version 2 (the standard library's LICENSE.txt)"


def is_heldout(relpath: str) -> bool:
  """Whether the stdlib file at `relpath` (posix, relative to the stdlib root) is a validation file."""
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "big") % HELDOUT_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The standard library's source split by `is_heldout`; paths relative to `root`."""

  root: str
  train: tuple[str, ...]
  heldout: tuple[str, ...]
  not_utf8: tuple[str, ...]
  digest: str  # sha256 over every used file's name and bytes, to tell corpora apart

  def read(self, relpath: str) -> str:
    with open(os.path.join(self.root, relpath), encoding="utf-8") as f:
      return f.read()

  def num_bytes(self, relpaths) -> int:
    return sum(os.path.getsize(os.path.join(self.root, p)) for p in relpaths)


def read_corpus(root: str, max_files: int | None = None) -> Corpus:
  """Lists the `*.py` files under `root` (sorted; the first `max_files` only, for quick runs) and splits them."""
  paths = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
  relpaths = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
  relpaths = [p for p in relpaths if "site-packages" not in p.split("/")][:max_files]
  used, not_utf8 = [], []
  sha = hashlib.sha256()
  for rel in relpaths:
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:  # a few tests are deliberately in latin-1 or koi8-r
      not_utf8.append(rel)
      continue
    used.append(rel)
    sha.update(rel.encode("utf-8") + b"\0" + data + b"\0")
  return Corpus(root=root, train=tuple(p for p in used if not is_heldout(p)),
                heldout=tuple(p for p in used if is_heldout(p)), not_utf8=tuple(not_utf8), digest=sha.hexdigest())


def encode_files(tok, corpus: Corpus, relpaths) -> list[np.ndarray]:
  """Each file as BOS, its tokens, EOS: the model learns where a file starts and ends."""
  eos = tok.token_to_id(EOS)
  encodings = tok.encode_batch([corpus.read(p) for p in relpaths])
  return [np.asarray(e.ids + [eos], dtype=np.int32) for e in encodings]


def unigram_logprobs(train_docs: list[np.ndarray], vocab_size: int) -> np.ndarray:
  """Add-one-smoothed log unigram probabilities of the training tokens: the baseline to beat."""
  counts = np.bincount(np.concatenate(train_docs), minlength=vocab_size).astype(np.float64)
  return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def eval_windows(docs: list[np.ndarray], seq_len: int):
  """Cuts each document into windows of `seq_len` predictions: inputs, targets, mask and owning document."""
  rows = []
  for d, doc in enumerate(docs):
    for s in range(0, len(doc) - 1, seq_len):
      inp, tgt = doc[s:s + seq_len], doc[s + 1:s + seq_len + 1]
      rows.append((d, inp[:len(tgt)], tgt))
  inputs_BT = np.zeros((len(rows), seq_len), dtype=np.int32)
  targets_BT = np.zeros((len(rows), seq_len), dtype=np.int32)
  mask_BT = np.zeros((len(rows), seq_len), dtype=np.float32)
  for i, (_, inp, tgt) in enumerate(rows):
    inputs_BT[i, :len(inp)], targets_BT[i, :len(tgt)], mask_BT[i, :len(tgt)] = inp, tgt, 1.0
  return inputs_BT, targets_BT, mask_BT, np.asarray([r[0] for r in rows], dtype=np.int32)


def make_model_config(vocab_size: int, bos_id: int, eos_id: int):
  from jserve.config import ModelConfig, RopeConfig
  return ModelConfig(
      architecture="LlamaForCausalLM", vocab_size=vocab_size, hidden_size=FLAGS.width,
      intermediate_size=FLAGS.ffn, num_layers=FLAGS.layers, num_heads=FLAGS.heads, num_kv_heads=FLAGS.kv_heads,
      head_dim=FLAGS.head_dim, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
      max_position_embeddings=FLAGS.seq_len, tie_word_embeddings=True, bos_token_id=bos_id,
      eos_token_ids=(eos_id,))


def token_losses(params, tokens_BT, targets_BT, cfg):
  """Next-token cross-entropy of every position, [B, T] float32, computed by jserve's own forward."""
  import jax
  import jax.numpy as jnp
  from jserve.models.llama import forward_dense
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  logits_BTV = forward_dense(params, tokens_BT, cfg)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def make_optimizer(steps: int):
  import jax
  import optax
  schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, FLAGS.warmup_steps, steps, FLAGS.lr * 0.1)
  # Decay matrices only: shrinking RMSNorm scales toward zero fights the normalisation.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask)), schedule


def make_steps(cfg, optimizer, batch_size: int, seq_len: int):
  """The jitted train step (samples its own batch from the token stream on device) and eval step."""
  import jax
  import jax.numpy as jnp
  import optax

  def mean_loss(params, windows_BT):
    return token_losses(params, windows_BT[:, :-1], windows_BT[:, 1:], cfg).mean()

  @jax.jit
  def train_step(params, opt_state, stream_T, key):
    starts_B = jax.random.randint(key, (batch_size,), 0, stream_T.shape[0] - seq_len - 1, dtype=jnp.int32)
    windows_BT = stream_T[starts_B[:, None] + jnp.arange(seq_len + 1, dtype=jnp.int32)]
    loss, grads = jax.value_and_grad(mean_loss)(params, windows_BT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_step(params, tokens_BT, targets_BT, mask_BT):
    return (token_losses(params, tokens_BT, targets_BT, cfg) * mask_BT).sum(axis=-1)

  return train_step, eval_step


def evaluate(eval_step, params, windows, num_docs: int, batch_size: int) -> np.ndarray:
  """Summed held-out loss of each document, [num_docs] float64."""
  padded = [np.pad(a, ((0, -len(a) % batch_size), (0, 0))) for a in windows[:3]]
  owner = windows[3]
  sums = np.concatenate([np.asarray(eval_step(params, *(a[i:i + batch_size] for a in padded)), dtype=np.float64)
                         for i in range(0, len(padded[0]), batch_size)])[:len(owner)]
  return np.bincount(owner, weights=sums, minlength=num_docs)


def greedy_complete(params, cfg, prompt_ids: list[int], max_new_tokens: int, pad_len: int = 256) -> list[int]:
  """Greedy continuation through `forward_dense`, padded to one length so it compiles once; stops at EOS."""
  import jax
  import jax.numpy as jnp
  from jserve.models.llama import forward_dense
  if len(prompt_ids) + max_new_tokens > pad_len:
    raise ValueError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new > pad_len={pad_len}")
  step = jax.jit(forward_dense, static_argnums=2)  # one compile per (cfg, pad_len), whatever the prompt
  ids = list(prompt_ids)
  out = []
  for _ in range(max_new_tokens):
    ids_BT = np.zeros((1, pad_len), dtype=np.int32)
    ids_BT[0, :len(ids)] = ids
    next_id = int(jnp.argmax(step(params, ids_BT, cfg)[0, len(ids) - 1]))
    out.append(next_id)
    ids.append(next_id)
    if next_id in cfg.eos_token_ids:
      break
  return out


def train(cfg, train_docs, windows, num_heldout: int, log):
  """Runs FLAGS.steps optimizer steps; returns float32 params, the curve (train and held-out loss), eval_step."""
  import jax
  import jax.numpy as jnp
  from jserve.models.llama import init_params
  init_key, data_key = jax.random.split(jax.random.key(FLAGS.seed))
  params = init_params(cfg, init_key, dtype=jnp.float32)
  optimizer, schedule = make_optimizer(FLAGS.steps)
  opt_state = optimizer.init(params)
  train_step, eval_step = make_steps(cfg, optimizer, FLAGS.batch_size, FLAGS.seq_len)
  stream_T = jnp.asarray(np.concatenate(train_docs))
  heldout_tokens = float(windows[2].sum())
  curve, pending, start = [], [], time.monotonic()
  for step in range(1, FLAGS.steps + 1):
    params, opt_state, loss = train_step(params, opt_state, stream_T, jax.random.fold_in(data_key, step))
    pending.append(loss)
    if step == 1:  # time from here on: step 1 includes compilation
      loss.block_until_ready()
      start = time.monotonic()
    if step % FLAGS.log_every == 0 or step == FLAGS.steps:
      point = {"step": step, "train_loss": float(np.mean(jax.device_get(pending))), "lr": float(schedule(step))}
      pending = []
      if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
        sums = evaluate(eval_step, params, windows, num_heldout, FLAGS.eval_batch_size)
        point["heldout_loss"] = float(sums.sum() / heldout_tokens)
      curve.append(point)
      per_step = (time.monotonic() - start) / max(step - 1, 1)
      log(f"step {step}/{FLAGS.steps}  loss {point['train_loss']:.4f}"
          + (f"  held-out {point['heldout_loss']:.4f}" if "heldout_loss" in point else "")
          + f"  lr {point['lr']:.2e}  {FLAGS.batch_size * FLAGS.seq_len / per_step:,.0f} tok/s"
          + f"  eta {per_step * (FLAGS.steps - step):.0f}s")
  return params, curve, eval_step


def run(out_dir: str, log) -> dict:
  """Builds the corpus, tokenizer and model, trains, evaluates and writes the checkpoint; returns the record."""
  import jax
  import jax.numpy as jnp
  from jserve.weights import save_hf_checkpoint
  t0 = time.monotonic()
  corpus = read_corpus(FLAGS.stdlib_root, FLAGS.max_files)
  log(f"corpus {corpus.root}: {len(corpus.train)} training files ({corpus.num_bytes(corpus.train) / 1e6:.1f} MB), "
      f"{len(corpus.heldout)} held out, {len(corpus.not_utf8)} not UTF-8 (skipped); digest {corpus.digest[:16]}")
  log(_compare_with_shipped(corpus.digest))
  tok = train_tokenizer(FLAGS.vocab_size, [os.path.join(corpus.root, p) for p in corpus.train])
  train_docs, heldout_docs = encode_files(tok, corpus, corpus.train), encode_files(tok, corpus, corpus.heldout)
  cfg = make_model_config(tok.get_vocab_size(), tok.token_to_id(BOS), tok.token_to_id(EOS))
  num_train_tokens = int(sum(len(d) for d in train_docs))
  log(f"tokenizer: {cfg.vocab_size} tokens, {num_train_tokens / 1e6:.2f}M training tokens "
      f"({time.monotonic() - t0:.0f}s); model: {cfg.param_count() / 1e6:.2f}M parameters on {jax.devices()[0]}")
  windows = eval_windows(heldout_docs, FLAGS.seq_len)
  params, curve, eval_step = train(cfg, train_docs, windows, len(heldout_docs), log)
  params_bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  per_file = evaluate(eval_step, params_bf16, windows, len(heldout_docs), FLAGS.eval_batch_size)
  save_hf_checkpoint(params_bf16, cfg, out_dir)
  write_tokenizer(tok, out_dir)
  write_generation_config(cfg, out_dir)
  record = make_record(corpus, tok, cfg, params_bf16, train_docs, heldout_docs, curve, per_file)
  record["seconds"] = round(time.monotonic() - t0, 1)
  with open(os.path.join(out_dir, "training_record.json"), "w") as f:
    json.dump(record, f, indent=1)
  log(f"held-out loss {record['heldout_loss']:.4f} nats/token (unigram baseline {record['unigram_loss']:.4f}), "
      f"{record['heldout_bits_per_byte']:.3f} bits/byte; wrote {out_dir} in {record['seconds']:.0f}s")
  return record


def _compare_with_shipped(digest: str) -> str:
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jserve", "default_model",
                      "training_record.json")
  if not os.path.exists(path):
    return "no shipped model to compare the corpus with"
  with open(path) as f:
    shipped = json.load(f)["corpus"]
  if shipped["digest"] == digest:
    return f"corpus is the shipped model's (Python {shipped['python']} standard library)"
  return (f"corpus differs from the shipped model's (Python {shipped['python']}, digest {shipped['digest'][:16]}): "
          "expect a different held-out loss")


def make_record(corpus, tok, cfg, params, train_docs, heldout_docs, curve, per_file) -> dict:
  """What `training_record.json` holds: flags, corpus, software, curve, held-out figures, samples."""
  import jax
  import optax
  import tokenizers
  unigram_V = unigram_logprobs(train_docs, cfg.vocab_size)
  targets = [d[1:] for d in heldout_docs]
  unigram_per_file = np.asarray([-unigram_V[t].sum() for t in targets])
  num_targets = np.asarray([len(t) for t in targets])
  heldout_bytes = corpus.num_bytes(corpus.heldout)
  samples = [{"prompt": p, "completion": tok.decode(greedy_complete(params, cfg, tok.encode(p).ids, 48))}
             for p in SAMPLE_PROMPTS]
  return {
      "flags": {name: FLAGS[name].value for name in FLAG_NAMES},
      "corpus": {"root": corpus.root, "python": FLAGS.stdlib_python or platform.python_version(),
                 "licence": LICENCE, "digest": corpus.digest, "train_files": len(corpus.train),
                 "train_bytes": corpus.num_bytes(corpus.train), "train_tokens": int(sum(map(len, train_docs))),
                 "heldout_files": len(corpus.heldout), "heldout_bytes": heldout_bytes,
                 "heldout_tokens": int(num_targets.sum()), "not_utf8": list(corpus.not_utf8),
                 "heldout_rule": f"sha256(relative path)[:4] as big-endian int % {HELDOUT_MODULUS} == 0"},
      "model": {"parameters": cfg.param_count(), **cfg.to_hf_dict()},
      "software": {"jax": jax.__version__, "optax": optax.__version__, "tokenizers": tokenizers.__version__,
                   "python": platform.python_version(), "device": str(jax.devices()[0].device_kind)},
      "curve": curve,
      "heldout_loss": float(per_file.sum() / num_targets.sum()),
      "unigram_loss": float(unigram_per_file.sum() / num_targets.sum()),
      "heldout_bits_per_byte": float(per_file.sum() / math.log(2) / heldout_bytes),
      "heldout_files": [{"path": p, "tokens": int(n), "loss": float(s / n), "unigram_loss": float(u / n)}
                        for p, n, s, u in zip(corpus.heldout, num_targets, per_file, unigram_per_file)],
      "unigram_logprobs": [round(float(x), 5) for x in unigram_V],
      "samples": samples,
  }


def plot_curve(record: dict, path: str):
  """Writes the training curve (train and held-out loss per step, unigram baseline) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curve = record["curve"]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  ax.plot([c["step"] for c in curve], [c["train_loss"] for c in curve], label="training batches")
  held = [c for c in curve if "heldout_loss" in c]
  ax.plot([c["step"] for c in held], [c["heldout_loss"] for c in held], "o-", label="held-out stdlib files")
  ax.axhline(record["unigram_loss"], color="gray", linestyle="--", label="unigram baseline (held-out)")
  ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", ylim=(0, 8),
         title=f"jserve default model: {record['model']['parameters'] / 1e6:.1f}M parameters, "
               f"{record['corpus']['train_tokens'] / 1e6:.1f}M training tokens")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


FLAGS = flags.FLAGS
# --out (required) and --seed are defined by tools.make_random_checkpoint, imported above for its
# tokenizer helpers; its --preset, --num_layers and --dtype flags are unused here.
flags.DEFINE_string("stdlib_root", None, "standard library to train on (default: this interpreter's)")
flags.DEFINE_string("stdlib_python", None, "Python version of --stdlib_root, for the record (default: this one's)")
flags.DEFINE_string("log_file", None, "also write the progress lines to this file")
flags.DEFINE_integer("max_files", None, "use only the first N files (sorted by path), for quick checks")
flags.DEFINE_integer("steps", 2000, "optimizer steps")
flags.DEFINE_integer("batch_size", 32, "sequences per step")
flags.DEFINE_integer("seq_len", 1024, "tokens per sequence (also the checkpoint's max_position_embeddings)")
flags.DEFINE_float("lr", 3e-3, "peak learning rate (AdamW, cosine decay to a tenth)")
flags.DEFINE_integer("warmup_steps", 200, "linear warm-up steps")
flags.DEFINE_integer("vocab_size", 8192, "BPE vocabulary size, special tokens included")
flags.DEFINE_integer("layers", 8, "decoder layers")
flags.DEFINE_integer("width", 256, "model width (hidden_size)")
flags.DEFINE_integer("ffn", 640, "SwiGLU hidden size (intermediate_size)")
flags.DEFINE_integer("heads", 4, "query heads")
flags.DEFINE_integer("kv_heads", 2, "key/value heads (grouped-query attention)")
flags.DEFINE_integer("head_dim", 64, "head dimension")
flags.DEFINE_bool("deterministic_ops", True, "ask XLA for deterministic GPU reductions (slower scatter)")
flags.DEFINE_string("plot_only", None, "train nothing: plot --out's training_record.json to this PNG path")
flags.DEFINE_integer("log_every", 50, "steps between progress lines")
flags.DEFINE_integer("eval_every", 250, "steps between held-out evaluations")
flags.DEFINE_integer("eval_batch_size", 16, "windows per held-out evaluation batch")
FLAG_NAMES = ("seed", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "vocab_size", "layers", "width", "ffn",
              "heads", "kv_heads", "head_dim", "max_files", "eval_every", "deterministic_ops")


def main(argv):
  del argv
  if FLAGS.plot_only:
    with open(os.path.join(FLAGS.out, "training_record.json")) as f:
      plot_curve(json.load(f), FLAGS.plot_only)
    return
  if not 0 <= FLAGS.warmup_steps < FLAGS.steps:
    raise app.UsageError(f"--warmup_steps={FLAGS.warmup_steps} must be below --steps={FLAGS.steps}")
  # Set before the first JAX computation starts a backend: scatter-add (the embedding gradient) and
  # some reductions are otherwise non-deterministic on GPU, and the same seed must give the same model.
  if FLAGS.deterministic_ops:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
  if FLAGS.stdlib_root is None:
    import sysconfig
    FLAGS.stdlib_root = sysconfig.get_paths()["stdlib"]
  log_file = open(FLAGS.log_file, "w") if FLAGS.log_file else None

  def log(line):
    line = f"[{time.strftime('%H:%M:%S')}] {line}"
    print(line, file=sys.stderr, flush=True)
    if log_file:
      log_file.write(line + "\n")
      log_file.flush()

  try:
    run(FLAGS.out, log)
  finally:
    if log_file:
      log_file.close()


if __name__ == "__main__":
  app.run(main)

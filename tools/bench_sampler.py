"""Measures the sampler's share of a decode step: batch 256, a 128k vocabulary (Llama-3.2-1B's shape).

Run on the GPU machine from the source tree:

    PYTHONPATH=. python tools/bench_sampler.py --out_dir=/tmp/bench_sampler

It times, each in its own jit program and in this order (results are written
after every line, so a run cut short still leaves what it measured):
  1. `sampler.sample` alone on [256, 128256] float32 logits, for each parameter
     mix below (one compile serves them all: parameters are arrays);
  2. the building blocks: the shortlist top-k, a full sort of the logits;
  3. the model's decode forward pass (random Llama-3.2-1B weights, bf16, every
     sequence at `--context` tokens) up to the logits, with a plain argmax.
The share of a mix is sampler / (forward + sampler). Because the forward pass
runs with whatever attention backend the tree dispatches to, the table also
gives the share against the memory roofline of the step (weights plus KV bytes
at the measured copy bandwidth): no decode step can be faster than that.
Writes OUT_DIR/sampler.md and OUT_DIR/sampler.json.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.models import get_model_preset  # noqa: E402
from jserve.engine import sampler  # noqa: E402
from jserve.engine.request import BIAS_TABLE_SIZE  # noqa: E402
from jserve.models.llama import StepInputs, compute_logits, forward, init_params  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_sampler", "where sampler.md and sampler.json go")
_BATCH = flags.DEFINE_integer("batch", 256, "sequences in the decode step")
_CONTEXT = flags.DEFINE_integer("context", 1024, "tokens of context per sequence in the forward pass")
_QUICK = flags.DEFINE_bool("quick", False, "tiny shapes: a smoke run of this script on a CPU")

_ROWS = []


def log(msg):
  print(msg, flush=True)


def save(meta):
  out = _OUT_DIR.value
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sampler.json"), "w") as f:
    json.dump({"meta": meta, "rows": _ROWS}, f, indent=1)
  lines = [f"device: {meta['device']}; JAX {meta['jax']}; {meta['date']}; batch {meta['batch']}, "
           f"vocab {meta['vocab']}, context {meta['context']}", "",
           "| what | ms | share of step | share of roofline step |", "| --- | --- | --- | --- |"]
  for r in _ROWS:
    lines.append(f"| {r['name']} | {r['ms']:.3f} | {r.get('share', '')} | {r.get('share_roofline', '')} |")
  with open(os.path.join(out, "sampler.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def time_fn(fn, *args, reps=10, rounds=3):
  """Median over rounds of the mean of `reps` back-to-back calls, in ms."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / reps)
  return 1e3 * float(np.median(times))


def inputs_for(batch, mix, rng):
  """SamplingInputs for one named mix of parameters."""
  f = lambda v: np.full(batch, v, np.float32)  # noqa: E731
  s = dict(temperature_B=f(0.8), top_k_B=np.zeros(batch, np.int32), top_p_B=f(1), min_p_B=f(0),
           repetition_penalty_B=f(1), presence_penalty_B=f(0), frequency_penalty_B=f(0),
           slot_B=np.arange(batch, dtype=np.int32), use_bias_B=np.zeros(batch, bool),
           ban_stop_B=np.zeros(batch, bool), use_mask_B=np.zeros(batch, bool), logprobs_B=np.zeros(batch, bool),
           seed_B=rng.integers(0, 2**31, batch).astype(np.uint32), position_B=np.full(batch, 100, np.int32))
  for key, value in mix.items():
    s[key] = np.asarray(value, s[key].dtype) if np.ndim(value) else np.full(batch, value, s[key].dtype)
  return sampler.SamplingInputs(**{k: jnp.asarray(v) for k, v in s.items()})


MIXES = {
    "greedy": dict(temperature_B=0.0),
    "temperature 0.8": {},
    "top_k 50": dict(top_k_B=50),
    "top_p 0.9": dict(top_p_B=0.9),
    "min_p 0.05": dict(min_p_B=0.05),
    "top_k 50 + top_p 0.95 + min_p 0.05": dict(top_k_B=50, top_p_B=0.95, min_p_B=0.05),
    "penalties (rep 1.1, freq 0.5, pres 0.5)": dict(repetition_penalty_B=1.1, frequency_penalty_B=0.5,
                                                    presence_penalty_B=0.5),
    "logit_bias (300 entries)": dict(use_bias_B=True),
    "grammar bitmask": dict(use_mask_B=True),
    "logprobs (top 20)": dict(logprobs_B=True),
    "everything": dict(top_k_B=50, top_p_B=0.95, min_p_B=0.05, repetition_penalty_B=1.1, frequency_penalty_B=0.5,
                       presence_penalty_B=0.5, use_bias_B=True, use_mask_B=True, logprobs_B=True),
}


def bench_sampler(batch, vocab, meta):
  rng = np.random.default_rng(0)
  # Peaked logits, like a trained model's: the nucleus of top_p 0.9 is a few dozen tokens.
  peaked_BV = jnp.asarray(rng.standard_normal((batch, vocab), np.float32) * 5.0)
  # Flat logits (a random model): top_p 0.9 keeps most of the vocabulary, so the full sort runs.
  flat_BV = jnp.asarray(rng.standard_normal((batch, vocab), np.float32) * 0.5)
  state = sampler.SlotState.zeros(batch, vocab, BIAS_TABLE_SIZE)
  counts = rng.integers(0, 3, (batch + 1, vocab)).astype(np.int32) * (rng.random((batch + 1, vocab)) < 0.002)
  state = sampler.SlotState(
      prompt_RV=jnp.asarray((rng.random((batch + 1, vocab)) < 0.004).astype(np.uint8)),
      counts_RV=jnp.asarray(counts),
      bias_ids_RJ=jnp.asarray(rng.integers(0, vocab, (batch + 1, BIAS_TABLE_SIZE)).astype(np.int32)),
      bias_vals_RJ=jnp.asarray(rng.uniform(-5, 5, (batch + 1, BIAS_TABLE_SIZE)).astype(np.float32)),
      bias_stop_RJ=state.bias_stop_RJ)
  mask_BW = jnp.asarray(rng.integers(-2**31, 2**31, (batch, (vocab + 31) // 32)).astype(np.int32))
  fn = sampler.sample_jit
  results = {}
  for name, mix in MIXES.items():
    s = inputs_for(batch, mix, rng)
    results[name] = time_fn(fn, peaked_BV, s, state, mask_BW)
    _ROWS.append(dict(name=f"sampler: {name}", ms=results[name]))
    log(f"sampler {name}: {results[name]:.3f} ms")
    save(meta)
  s = inputs_for(batch, dict(top_p_B=0.9), rng)
  results["top_p 0.9, flat logits (full-sort fallback)"] = t = time_fn(fn, flat_BV, s, state, mask_BW)
  _ROWS.append(dict(name="sampler: top_p 0.9, flat logits (full-sort fallback)", ms=t))
  log(f"sampler top_p 0.9 flat: {t:.3f} ms")
  save(meta)

  blocks = {
      "block: shortlist (256 best 16-token chunks, sorted)": jax.jit(lambda x: sampler.shortlist(x)[0]),
      "block: full sort of the logits": jax.jit(lambda x: jnp.sort(x, axis=-1)),
      "block: jax.lax.top_k(logits, 20)": jax.jit(lambda x: jax.lax.top_k(x, 20)[0]),
      "block: one read of the logits (row max)": jax.jit(lambda x: jnp.max(x, axis=-1)),
  }
  for name, block in blocks.items():
    t = time_fn(block, peaked_BV)
    _ROWS.append(dict(name=name, ms=t))
    log(f"{name}: {t:.3f} ms")
    save(meta)
  return results


def copy_bandwidth():
  x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
  t = time_fn(jax.jit(lambda x: x + 1), x) / 1e3
  return 2 * x.nbytes / t


def bench_forward(cfg, batch, context, page_size=16):
  params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
  pages_per_seq = -(-(context + 1) // page_size)
  num_pages = batch * pages_per_seq + 1
  shape = (num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
  kv = [jnp.zeros(shape, jnp.bfloat16) for _ in range(cfg.num_layers)]
  table_BP = 1 + np.arange(batch * pages_per_seq, dtype=np.int32).reshape(batch, pages_per_seq)
  pos_B = np.full(batch, context, np.int32)
  inputs = StepInputs(
      token_ids_T=jnp.asarray(np.arange(batch, dtype=np.int32) % cfg.vocab_size),
      positions_T=jnp.asarray(pos_B), slots_T=jnp.asarray(table_BP[:, context // page_size] * page_size +
                                                          context % page_size),
      cu_q_lens_E=jnp.arange(batch + 1, dtype=jnp.int32), kv_lens_B=jnp.asarray(pos_B + 1),
      page_indices_BP=jnp.asarray(table_BP), num_seqs=jnp.asarray([batch], jnp.int32),
      logits_indices_B=jnp.arange(batch, dtype=jnp.int32))

  def step(params, kv, inputs):
    x_BD, kv = forward(params, kv, inputs, cfg)
    return jnp.argmax(compute_logits(params, x_BD, cfg), axis=-1), kv

  step = jax.jit(step, donate_argnums=(1,))
  state = {"kv": kv}

  def run(params, inputs):
    tokens, state["kv"] = step(params, state["kv"], inputs)
    return tokens

  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kv_bytes = batch * (context + 1) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
  return time_fn(run, params, inputs, reps=5), param_bytes, kv_bytes


def main(_):
  cfg = get_model_preset("llama-3.2-1b")
  batch, context = _BATCH.value, _CONTEXT.value
  if _QUICK.value:
    import dataclasses
    cfg = dataclasses.replace(cfg, vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16)
    batch, context = 8, 64
  meta = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(), jax=jax.__version__,
              date=datetime.date.today().isoformat(), batch=batch, vocab=cfg.vocab_size, context=context)
  log(str(meta))
  results = bench_sampler(batch, cfg.vocab_size, meta)
  bandwidth = copy_bandwidth()
  meta["copy_bandwidth_TBps"] = round(bandwidth / 1e12, 3)
  fwd_ms, param_bytes, kv_bytes = bench_forward(cfg, batch, context)
  roofline_ms = 1e3 * (param_bytes + kv_bytes) / bandwidth
  meta.update(forward_ms=fwd_ms, roofline_ms=roofline_ms, param_bytes=param_bytes, kv_bytes=kv_bytes)
  _ROWS.append(dict(name="decode forward + logits + argmax (no sampler)", ms=fwd_ms))
  _ROWS.append(dict(name="roofline of the decode step (weights + KV at copy bandwidth)", ms=roofline_ms))
  log(f"forward {fwd_ms:.3f} ms; roofline {roofline_ms:.3f} ms; bandwidth {bandwidth / 1e12:.2f} TB/s")
  for r in _ROWS:
    if r["name"].startswith("sampler: "):
      r["share"] = f"{100 * r['ms'] / (fwd_ms + r['ms']):.1f}%"
      r["share_roofline"] = f"{100 * r['ms'] / (roofline_ms + r['ms']):.1f}%"
  save(meta)
  del results


if __name__ == "__main__":
  app.run(main)

"""Measures the sampler's share of a decode step: batch 256, a 128k vocabulary (the Llama 3 vocabulary).

Run on the GPU machine from the source tree (meant to take under 4 minutes on an H200; each line is
written to OUT_DIR as soon as it is measured, so a run cut short still leaves what it measured, and
past --budget_s the remaining in-step timings are skipped):

    PYTHONPATH=. python tools/bench_sampler.py --out_dir=$OUT

and on a CPU, to check that the script runs (tiny shapes, numbers meaningless):

    PYTHONPATH=. python tools/bench_sampler.py --smoke --out_dir=/tmp/bench_sampler

Sections, in order:
  1. `sampler.sample` alone on [256, 128256] float32 logits, for each parameter mix (one compile serves
     them all: parameters are arrays). "Peaked" logits are normal with sigma 5 (a top_p 0.9 nucleus of a
     few dozen tokens, like a trained model's); "flat" ones sigma 0.5 (a random model's), where top-p
     keeps most of the vocabulary and the thresholds come from the exact search.
  2. Building blocks, each its own program: one read of the logits, the plain path's fused pass, the
     shortlist's pieces (its two passes, its two top_k rounds, its sort), one pass of the search and a
     whole search, and what the sampler no longer does ("not used": the former one-pass variadic
     reduce and one-round top_k of the shortlist, a full sort, `lax.top_k(logits, 20)`).
  3. For Llama-3.2-1B and Llama-3.1-8B shapes (random bf16 weights made on the device, every sequence at
     `--context` tokens): the decode step up to the logits with a plain argmax, and the same step with
     `sampler.sample` in it for a few mixes. The share of a mix is sampler / (step + sampler), with the
     sampler timed alone; "in step" is the step with the sampler minus the step with the argmax (what
     the sampler adds where it really runs, after the forward pass, minus one argmax read).
Also the step's memory roofline (weights plus KV at the measured copy bandwidth): no decode step at
that shape can be faster. Writes OUT_DIR/sampler.md and OUT_DIR/sampler.json; prints a table last.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.models import get_model_preset  # noqa: E402
from jserve.engine import sampler, thresholds  # noqa: E402
from jserve.engine.request import BIAS_TABLE_SIZE  # noqa: E402
from jserve.models.llama import StepInputs, compute_logits, forward, init_params  # noqa: E402
from tools.ceilings import copy_ceilings  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_sampler", "where sampler.md and sampler.json go")
_BATCH = flags.DEFINE_integer("batch", 256, "sequences in the decode step")
_CONTEXT = flags.DEFINE_integer("context", 1024, "tokens of context per sequence in the decode step")
_MODELS = flags.DEFINE_list("models", ["llama-3.2-1b", "llama-3.1-8b"], "model presets whose decode step is timed")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes: checks on a CPU that the script runs")
_BUDGET_S = flags.DEFINE_float("budget_s", 210.0, "skip the in-step timings of a model once this much time has gone")

_ROWS = []
_START = time.perf_counter()


def log(msg):
  print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", flush=True)


def add_row(meta, section, name, ms, **extra):
  _ROWS.append(dict(section=section, name=name, ms=ms, **extra))
  log(f"{section}: {name}: {ms:.3f} ms")
  save(meta)


def save(meta):
  out = _OUT_DIR.value
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sampler.json"), "w") as f:
    json.dump({"meta": meta, "rows": _ROWS}, f, indent=1)
  with open(os.path.join(out, "sampler.md"), "w") as f:
    f.write(report(meta))


def report(meta):
  lines = [f"device: {meta['device']}; JAX {meta['jax']}; {meta['date']}; batch {meta['batch']}, "
           f"vocab {meta['vocab']}, context {meta['context']}", ""]
  steps = meta.get("steps", {})
  models = list(steps)
  head = "| what | ms |" + "".join(f" share of {m} step |" for m in models)
  lines += [head, "|" + " --- |" * (2 + len(models))]
  for r in _ROWS:
    shares = "".join(f" {r.get('share', {}).get(m, '')} |" for m in models)
    lines.append(f"| {r['section']}: {r['name']} | {r['ms']:.3f} |{shares}")
  return "\n".join(lines) + "\n"


def time_fn(fn, *args, reps=10, rounds=3):
  """Median over rounds of the mean of `reps` back-to-back calls, in ms (after one warm-up call)."""
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


EVERYTHING = dict(top_k_B=50, top_p_B=0.95, min_p_B=0.05, repetition_penalty_B=1.1, frequency_penalty_B=0.5,
                  presence_penalty_B=0.5, use_bias_B=True, use_mask_B=True, logprobs_B=True)
# (name, logits, mix): "flat" rows resolve by the exact search, the others from the shortlist.
MIXES = [
    ("greedy", "peaked", dict(temperature_B=0.0)),
    ("temperature 0.8", "peaked", {}),
    ("top_k 50", "peaked", dict(top_k_B=50)),
    ("top_p 0.9", "peaked", dict(top_p_B=0.9)),
    ("min_p 0.05", "peaked", dict(min_p_B=0.05)),
    ("top_k 50 + top_p 0.95 + min_p 0.05", "peaked", dict(top_k_B=50, top_p_B=0.95, min_p_B=0.05)),
    ("penalties (rep 1.1, freq 0.5, pres 0.5)", "peaked",
     dict(repetition_penalty_B=1.1, frequency_penalty_B=0.5, presence_penalty_B=0.5)),
    ("logit_bias (300 entries)", "peaked", dict(use_bias_B=True)),
    ("grammar bitmask", "peaked", dict(use_mask_B=True)),
    ("logprobs (top 20)", "peaked", dict(logprobs_B=True)),
    ("everything", "peaked", EVERYTHING),
    ("top_p 0.9, flat logits (top-p search)", "flat", dict(top_p_B=0.9)),
    ("top_k 1000, flat logits (top-k search)", "flat", dict(top_k_B=1000)),
    ("top_k 1000 + top_p 0.9, flat logits (both searches)", "flat", dict(top_k_B=1000, top_p_B=0.9)),
]
STEP_MIXES = ["greedy", "temperature 0.8", "top_k 50 + top_p 0.95 + min_p 0.05", "everything"]


def sampler_data(batch, vocab):
  rng = np.random.default_rng(0)
  logits = {"peaked": jnp.asarray(rng.standard_normal((batch, vocab), np.float32) * 5.0),
            "flat": jnp.asarray(rng.standard_normal((batch, vocab), np.float32) * 0.5)}
  counts = rng.integers(0, 3, (batch + 1, vocab)).astype(np.int32) * (rng.random((batch + 1, vocab)) < 0.002)
  counts[-1] = 0  # the null slot
  prompt = (rng.random((batch + 1, vocab)) < 0.004).astype(np.uint8)
  prompt[-1] = 0
  state = sampler.SlotState(
      prompt_RV=jnp.asarray(prompt), counts_RV=jnp.asarray(counts),
      bias_ids_RJ=jnp.asarray(rng.integers(0, vocab, (batch + 1, BIAS_TABLE_SIZE)).astype(np.int32)),
      bias_vals_RJ=jnp.asarray(rng.uniform(-5, 5, (batch + 1, BIAS_TABLE_SIZE)).astype(np.float32)),
      bias_stop_RJ=jnp.zeros((batch + 1, BIAS_TABLE_SIZE), bool))
  mask_BW = jnp.asarray(rng.integers(-2**31, 2**31, (batch, (vocab + 31) // 32)).astype(np.int32))
  inputs = {name: inputs_for(batch, mix, rng) for name, _, mix in MIXES}
  return logits, state, mask_BW, inputs


def bench_sampler(meta, data):
  logits, state, mask_BW, inputs = data
  results = {}
  for name, kind, _ in MIXES:
    # The program the engine runs on a GPU: the path the host picks for these parameters.
    path = sampler.host_path(jax.tree.map(np.asarray, inputs[name]))
    results[name] = time_fn(functools.partial(sampler.sample_jit, path=path), logits[kind], inputs[name], state,
                            mask_BW)
    add_row(meta, "sampler", f"{name} [{path}]", results[name])
  return results


def _online_softmax_pass(x_BUY):
  """The shortlist's former first pass, timed for comparison: max and sum of exp per chunk in one
  variadic reduce whose combiner rescales the smaller running sum (0.40 ms on an H200 at 256 x 128k)."""
  def combine(a, b):
    (max_a, sum_a), (max_b, sum_b) = a, b
    scale = jnp.where(max_a == max_b, 1.0, jnp.exp(-jnp.abs(max_a - max_b)))
    return jnp.maximum(max_a, max_b), jnp.where(max_a >= max_b, sum_a + sum_b * scale, sum_a * scale + sum_b)

  return jax.lax.reduce((x_BUY, jnp.ones_like(x_BUY)), (jnp.float32(-jnp.inf), jnp.float32(0)), combine, (2,))


def bench_blocks(meta, data):
  logits, _, _, inputs = data
  x_BV = logits["peaked"]
  s = inputs["temperature 0.8"]
  batch, vocab = x_BV.shape
  chunk, num_chunks, group = thresholds.SHORTLIST_CHUNK, thresholds.SHORTLIST_CHUNKS, thresholds.SHORTLIST_GROUP
  # (Arrays go in as arguments: a captured one is a constant that XLA would fold, sorts and all.)
  chunked = functools.partial(thresholds._chunked, chunk=chunk)
  maxima_BU = jax.jit(lambda x: jnp.max(chunked(x), axis=2))(x_BV)
  num_maxima = maxima_BU.shape[1]
  num_groups = -(-num_maxima // group)
  group_max_BO = jax.jit(lambda m: jnp.max(jnp.pad(m, ((0, 0), (0, num_groups * group - num_maxima)),
                                                   constant_values=-jnp.inf).reshape(batch, num_groups, group),
                                           axis=2))(maxima_BU)
  # The second round's row: the maxima of the chunks of the best groups (here just the first groups').
  in_best_BU = maxima_BU[:, :min(num_chunks * group, num_maxima)]
  cand_BM = jax.jit(lambda x, m: thresholds._best_chunks(chunked(x), m, num_chunks)[0])(x_BV, maxima_BU)
  cands_BZ = jnp.linspace(-3.0, 12.0, thresholds.SEARCH_CANDIDATES + 1, dtype=jnp.float32)[None].repeat(batch, 0)
  no_k_B, top_p_B, no_min_p_B = jnp.zeros(batch, jnp.int32), jnp.full(batch, 0.9), jnp.zeros(batch)

  def plain_pass(x_BV):
    noise_BV = sampler.gumbel_noise(s.seed_B, s.position_B, vocab)
    return jnp.argmax(x_BV * (1 / s.temperature_B)[:, None] + noise_BV, axis=-1)

  top_k = lambda n: jax.jit(lambda m: jax.lax.top_k(m, n))  # noqa: E731
  blocks = [
      ("one read of the logits (row max)", lambda: jax.jit(lambda x: jnp.max(x, axis=-1)), (x_BV,)),
      ("plain path's pass (argmax of logits / T + noise)", lambda: jax.jit(plain_pass), (x_BV,)),
      (f"shortlist: chunk max pass ({chunk}-token chunks)", lambda: jax.jit(lambda x: jnp.max(chunked(x), axis=2)),
       (x_BV,)),
      ("shortlist: chunk sum-exp pass (given the maxima)", lambda: jax.jit(
          lambda x, m: thresholds._sumexp(chunked(x), m, axis=2)), (x_BV, maxima_BU)),
      ("shortlist: chunk max and sum-exp (both passes)", lambda: jax.jit(
          lambda x: thresholds.max_and_sumexp(chunked(x), axis=2)), (x_BV,)),
      ("not used: chunk max and sum-exp in one variadic reduce (online softmax)", lambda: jax.jit(
          lambda x: _online_softmax_pass(chunked(x))), (x_BV,)),
      ("shortlist: best chunk ids and bound (top_k rounds and their gathers)", lambda: jax.jit(
          lambda m: thresholds._top_chunks(m, num_chunks, group)), (maxima_BU,)),
      (f"shortlist: sort of the {cand_BM.shape[1]} gathered values", lambda: jax.jit(
          lambda c: jnp.sort(c, axis=1)), (cand_BM,)),
      ("shortlist: all of it (passes, top_k rounds, gather, sort, total mass)", lambda: jax.jit(
          lambda x: thresholds._head(x, chunk, num_chunks)), (x_BV,)),
      (f"search: one pass ({thresholds.SEARCH_CANDIDATES + 1} masses)", lambda: jax.jit(
          lambda x: thresholds.masses_at(x, jnp.exp(x - 12.0), cands_BZ)), (x_BV,)),
      ("search: top-p thresholds of flat logits (8 passes)", lambda: jax.jit(
          lambda x: thresholds.search_thresholds(x, no_k_B, top_p_B, no_min_p_B)), (logits["flat"],)),
      (f"logprobs: max, sum-exp and top 20 ({thresholds.TOP_LOGPROBS_CHUNKS}-chunk shortlist)",
       lambda: jax.jit(thresholds.log_softmax_terms), (x_BV,)),
      ("not used: full sort of the logits", lambda: jax.jit(lambda x: jnp.sort(x, axis=-1)), (x_BV,)),
      ("not used: jax.lax.top_k(logits, 20)", lambda: jax.jit(lambda x: jax.lax.top_k(x, 20)[0]), (x_BV,)),
  ]
  if num_groups > num_chunks:  # two rounds (not at the --smoke vocabulary: one round there)
    blocks[6:6] = [
        (f"shortlist: top_k({num_chunks + 1}) of the {num_groups} group maxima (round 1)",
         lambda: top_k(num_chunks + 1), (group_max_BO,)),
        (f"shortlist: top_k({num_chunks + 1}) of the {in_best_BU.shape[1]} chunk maxima of the best groups "
         "(round 2)", lambda: top_k(num_chunks + 1), (in_best_BU,)),
        (f"not used: top_k({num_chunks + 1}) of all {num_maxima} chunk maxima (one round)",
         lambda: top_k(num_chunks + 1), (maxima_BU,))]
  for name, make, args in blocks:
    add_row(meta, "block", name, time_fn(make(), *args))


def step_setup(cfg, batch, context, page_size=16):
  params = jax.jit(lambda key: init_params(cfg, key, jnp.bfloat16))(jax.random.key(0))
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
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kv_bytes = batch * (context + 1) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
  return params, kv, inputs, param_bytes, kv_bytes


def bench_step(meta, cfg, name, batch, context, data, sampler_ms):
  """Times the decode step with an argmax and, time allowing, with the sampler; sets the shares."""
  params, kv, inputs, param_bytes, kv_bytes = step_setup(cfg, batch, context)
  state = {"kv": kv}
  _, slots, mask_BW, sampling = data

  def argmax_step(params, kv, inputs):
    x_BD, kv = forward(params, kv, inputs, cfg)
    return jnp.argmax(compute_logits(params, x_BD, cfg), axis=-1), kv

  def sample_step(params, kv, inputs, s, slots, mask_BW, path):
    x_BD, kv = forward(params, kv, inputs, cfg)
    return sampler.sample(compute_logits(params, x_BD, cfg), s, slots, mask_BW, path=path).tokens_B, kv

  def runner(step, **static):
    step = jax.jit(functools.partial(step, **static), donate_argnums=(1,))

    def run(*args):
      tokens, state["kv"] = step(args[0], state["kv"], *args[1:])
      return tokens
    return run

  step_ms = time_fn(runner(argmax_step), params, inputs, reps=5)
  roofline_ms = 1e3 * (param_bytes + kv_bytes) / (meta["copy_bandwidth_TBps"] * 1e12)
  meta["steps"][name] = dict(step_ms=step_ms, roofline_ms=roofline_ms, param_bytes=param_bytes, kv_bytes=kv_bytes)
  add_row(meta, f"{name} step", "decode forward + logits + argmax (no sampler)", step_ms)
  add_row(meta, f"{name} step", "roofline (weights + KV at copy bandwidth)", roofline_ms)
  for r in _ROWS:
    if r["section"] == "sampler":
      r.setdefault("share", {})[name] = f"{100 * r['ms'] / (step_ms + r['ms']):.1f}%"
  save(meta)
  if time.perf_counter() - _START > _BUDGET_S.value:
    log(f"{name}: past --budget_s, in-step timings skipped")
    return
  for mix in STEP_MIXES:
    run = runner(sample_step, path=sampler.host_path(jax.tree.map(np.asarray, sampling[mix])))
    with_sampler_ms = time_fn(run, params, inputs, sampling[mix], slots, mask_BW, reps=5)
    extra_ms = with_sampler_ms - step_ms
    add_row(meta, f"{name} step", f"in step: {mix} (step with sampler {with_sampler_ms:.3f} ms, minus argmax step)",
            extra_ms, share={name: f"{100 * extra_ms / with_sampler_ms:.1f}%"})
    meta["steps"][name][f"in_step_{mix}"] = extra_ms
  save(meta)
  del params, kv, state
  gc.collect()


def summary(meta, results):
  """The short table printed last: each mix's time alone and its share of each model's step."""
  steps = meta["steps"]
  lines = ["", "sampler (ms, alone)" + "".join(f" | % of {m} step ({s['step_ms']:.2f} ms)" for m, s in steps.items())]
  for name, ms in results.items():
    lines.append(f"{name[:52]:52s} {ms:7.3f}" + "".join(
        f" | {100 * ms / (s['step_ms'] + ms):5.1f}%" for s in steps.values()))
  for m, s in steps.items():
    for key, v in s.items():
      if key.startswith("in_step_"):
        lines.append(f"{m} in step: {key[len('in_step_'):][:38]:38s} {v:7.3f} ms ({100 * v / (s['step_ms'] + v):.1f}%)")
  return "\n".join(lines)


def main(_):
  batch, context = _BATCH.value, _CONTEXT.value
  cfgs = {name: get_model_preset(name) for name in _MODELS.value}
  if _SMOKE.value:
    batch, context = 8, 64
    cfgs = {name: dataclasses.replace(cfg, vocab_size=8192, hidden_size=64, intermediate_size=128, num_layers=2,
                                      num_heads=4, num_kv_heads=2, head_dim=16) for name, cfg in cfgs.items()}
  vocab = next(iter(cfgs.values())).vocab_size
  meta = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(), jax=jax.__version__,
              date=datetime.date.today().isoformat(), batch=batch, vocab=vocab, context=context, steps={})
  log(str(meta))
  data = sampler_data(batch, vocab)
  results = bench_sampler(meta, data)
  bench_blocks(meta, data)
  meta["copy_bandwidth_TBps"] = round(copy_ceilings(1 << (22 if _SMOKE.value else 30))["ceiling_TBps"], 3)
  for name, cfg in cfgs.items():
    if cfg.vocab_size != vocab:
      raise ValueError(f"{name} has vocab {cfg.vocab_size}, the sampler was timed at {vocab}")
    bench_step(meta, cfg, name, batch, context, data, results)
  save(meta)
  log(f"wrote {_OUT_DIR.value}/sampler.md and sampler.json")
  print(summary(meta, results), flush=True)


if __name__ == "__main__":
  app.run(main)

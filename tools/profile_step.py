"""Profiles engine steps: where the device time of a step goes, and how busy the device is.

    PYTHONPATH=. python -m tools.profile_step --preset=llama-3.2-1b --batch=256 --out_dir=$OUT

Starts an `LLMEngine` on random weights of a preset and records `--steps`
engine steps under `jax.profiler.trace`, of one `--phase`:
- decode: `--batch` requests, stepped until every sequence decodes (steady-state decoding);
- prefill: prompts only (requests of `--input_len` tokens that stop after their first token), every
  step a full chunk of `--max_num_batched_tokens` prompt tokens;
- mixed: `--batch` sequences decoding and prompts queued behind them, so that every step carries the
  decode rows and fills the rest of its token budget with a prompt chunk (what continuous batching
  runs while requests arrive). From the trace (read back with
`jax.profiler.ProfileData`) it sums the device kernels by name and by kind
(matmul, attention, KV write, sampler, other), and compares the union of
kernel time with the wall time of those steps: the device's busy fraction. It also counts the kernels
per step, the idle time between them and the share of kernels under 5 us, which is where a step of
many small kernels (batch 1) loses time that its bytes do not explain.
Writes profile.json and profile.md under --out_dir; prints a short table last.
"""

import collections
import datetime
import glob
import json
import os
import tempfile
import time

from absl import app, flags, logging

from tools.trace_stats import SMALL_KERNEL_NS, busy_ns, kernel_stats, kind_of

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-3.2-1b", "model preset (random weights)")
flags.DEFINE_enum("phase", "decode", ["decode", "prefill", "mixed"], "which steps to record (see above)")
flags.DEFINE_integer("batch", 256, "sequences decoding together (decode and mixed phases)")
flags.DEFINE_integer("input_len", 128, "prompt tokens")
flags.DEFINE_integer("steps", 12, "engine steps recorded")
flags.DEFINE_integer("max_num_batched_tokens", 512, "engine token budget (fewer buckets compile sooner)")
flags.DEFINE_string("out_dir", "/tmp/profile_step", "results directory")
flags.DEFINE_string("engine_args", "{}", "extra EngineConfig fields, as a JSON object")
flags.DEFINE_integer("host_tracer_level", None,
                     "jax.profiler host tracer level (default: 0 on accelerators, where the device tracer records "
                     "the kernels and host tracing only slows the steps; 2 on CPU, whose ops are host events)")
flags.DEFINE_bool("py_profile", True, "also run the untraced steps under cProfile: where the host's time goes")
flags.DEFINE_string("xla_variants", None,
                    "compare XLA flag sets: 'name=flags;name=flags' (e.g. 'default=;no_cmdbuf="
                    "--xla_gpu_enable_command_buffer='), each profiled in its own process into out_dir/name")

def device_events(trace_dir: str):
  """(name, start_ns, duration_ns) of every kernel on the first accelerator plane, or of every XLA op
  on the host plane when there is no accelerator (CPU smoke runs)."""
  from jax.profiler import ProfileData
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  data = ProfileData.from_file(sorted(paths)[-1])
  planes = list(data.planes)
  gpu = [p for p in planes if p.name.startswith("/device:GPU") or p.name.startswith("/device:TPU")]
  events = []
  if gpu:
    plane = sorted(gpu, key=lambda p: p.name)[0]
    for line in plane.lines:
      if "stream" not in line.name.lower():  # kernels sit on stream lines; XLA op and module lines repeat them
        continue
      for ev in line.events:
        events.append((ev.name, ev.start_ns, ev.duration_ns))
    return plane.name, events
  for plane in planes:
    if plane.name.startswith("/host:CPU"):
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          for ev in line.events:
            events.append((ev.name, ev.start_ns, ev.duration_ns))
  return "/host:CPU", events


def compare_variants(spec: str):
  """Profiles each XLA flag set in its own process; prints and writes a table side by side."""
  import subprocess
  import sys
  rows = []
  for item in spec.split(";"):
    name, _, xla_flags = item.partition("=")
    out = os.path.join(FLAGS.out_dir, name)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
    args = [a for a in sys.argv[1:] if not a.startswith(("--xla_variants", "--out_dir"))]
    done = subprocess.run([sys.executable, "-m", "tools.profile_step", *args, f"--out_dir={out}"], env=env)
    try:
      with open(os.path.join(out, "profile.json")) as f:
        r = json.load(f)
    except OSError:
      rows.append(f"| {name} | `{xla_flags}` | failed (exit {done.returncode}) | | |")
      continue
    dispatch = [h for h in r["host_top_cumulative"]
                if "_call_step" in h["function"] or "execute_burst" in h["function"]]
    dispatch_ms = sum(h["self_ms_per_step"] for h in dispatch)
    rows.append(f"| {name} | `{xla_flags}` | {r['untraced_wall_ms_per_step']:.2f} | "
                f"{r['device_busy_ms_per_step']:.2f} | {dispatch_ms:.2f} |")
  lines = ["| variant | XLA_FLAGS added | wall ms / step (untraced) | device busy ms / step (traced) | "
           "host ms / step inside the jit call (cProfile self time) |", "| --- | --- | --- | --- | --- |"] + rows
  with open(os.path.join(FLAGS.out_dir, "variants.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv):
  del argv
  if FLAGS.xla_variants:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    return compare_variants(FLAGS.xla_variants)
  import jax
  import numpy as np

  from jserve.engine.engine import EngineConfig, LLMEngine
  from jserve.engine.request import SamplingParams
  from tools.make_random_checkpoint import make_checkpoint
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  model = os.path.join(tempfile.mkdtemp(), FLAGS.preset)
  extra = json.loads(FLAGS.engine_args)
  # With load_format="dummy" the engine makes its weights on the device: write no weights to disk
  # (an 8B checkpoint takes about a minute to write and read back).
  cfg = make_checkpoint(FLAGS.preset, model, weights=extra.get("load_format") != "dummy")
  # Long enough that no sequence finishes while the last prompts are still prefilled (decode goes first).
  # (Each call may run num_decode_steps steps; three rounds of --steps calls, plus warm-up.)
  out_len = ((3 * FLAGS.steps + 8) * extra.get("num_decode_steps", 1) + 64
             + -(-FLAGS.batch * FLAGS.input_len // FLAGS.max_num_batched_tokens))
  rounds = 3 * FLAGS.steps + 4  # untraced, cProfile and traced rounds, and warm-up
  # Prompt requests that keep every recorded step full of prompt tokens (prefill and mixed phases).
  budget = FLAGS.max_num_batched_tokens - (FLAGS.batch if FLAGS.phase == "mixed" else 0)
  if budget <= 0:
    raise app.UsageError(f"--phase=mixed needs --max_num_batched_tokens above --batch={FLAGS.batch}")
  num_prompts = 0 if FLAGS.phase == "decode" else -(-rounds * budget // FLAGS.input_len) + 1
  num_decoding = 0 if FLAGS.phase == "prefill" else FLAGS.batch
  engine = LLMEngine(EngineConfig(model=model, max_model_len=FLAGS.input_len + out_len + 16,
                                  max_num_seqs=num_decoding + num_prompts,
                                  max_num_batched_tokens=FLAGS.max_num_batched_tokens, **extra))
  rng = np.random.default_rng(0)

  def add(n, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for _ in range(n):
      engine.add_request(None, rng.integers(10, min(cfg.vocab_size, 4000), size=FLAGS.input_len).tolist(), params)

  def prompt_tokens_left():
    return sum(max(r.num_prompt_tokens - r.num_computed_tokens, 0) for r in engine.requests.values())

  add(num_decoding, out_len)
  while engine.scheduler.waiting or prompt_tokens_left():
    engine.step()
  add(num_prompts, 1)  # each stops after its first token: only prompt tokens join the decode rows
  for _ in range(3):
    engine.step()
  # With num_decode_steps=K one call runs up to K decode steps: times are per decode step.
  n0 = engine.num_steps
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    engine.step()
  steps = engine.num_steps - n0
  untraced_ms = (time.perf_counter() - t) / steps * 1e3
  host_top = []
  if FLAGS.py_profile:
    import cProfile
    import pstats
    prof = cProfile.Profile()
    n0 = engine.num_steps
    prof.enable()
    for _ in range(FLAGS.steps):
      engine.step()
    prof.disable()
    py_steps = engine.num_steps - n0
    stats = pstats.Stats(prof)
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in sorted(stats.stats.items(),
                                                                       key=lambda kv: -kv[1][3])[:30]:
      host_top.append({"function": f"{os.path.basename(file)}:{line}({func})", "calls_per_step": ncalls / py_steps,
                       "self_ms_per_step": tottime / py_steps * 1e3, "cum_ms_per_step": cumtime / py_steps * 1e3})
  running = [r for r in engine.scheduler.running if r.params.max_tokens > 1]  # the decoding sequences
  traced_batch, traced_context = len(running), float(np.mean([r.num_computed_tokens for r in running] or [0]))
  trace_dir = tempfile.mkdtemp()
  n0, prompt0 = engine.num_steps, prompt_tokens_left()
  level = FLAGS.host_tracer_level
  if level is None:
    level = 2 if jax.default_backend() == "cpu" else 0
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level, options.python_tracer_level = level, 0
  with jax.profiler.trace(trace_dir, profiler_options=options):
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
      engine.step()
    jax.effects_barrier()
    wall_ns = (time.perf_counter() - t) * 1e9
  steps = engine.num_steps - n0
  prompt1 = prompt_tokens_left()
  if FLAGS.phase != "decode" and prompt1 < budget:
    logging.warning("the prompts ran out during the traced steps: the last steps were not full")
  plane, events = device_events(trace_dir)
  by_name = collections.defaultdict(lambda: [0, 0.0])
  by_kind = collections.defaultdict(float)
  for name, _, dur in events:
    by_name[name][0] += 1
    by_name[name][1] += dur
    by_kind[kind_of(name)] += dur
  busy = busy_ns(events)
  result = {
      "date": datetime.date.today().isoformat(), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
      "preset": FLAGS.preset, "phase": FLAGS.phase, "batch": traced_batch,
      "prompt_tokens_per_step": (prompt0 - prompt1) / steps, "context": traced_context, "plane": plane,
      "wall_ms_per_step": wall_ns / steps / 1e6, "untraced_wall_ms_per_step": untraced_ms,
      "device_busy_ms_per_step": busy / steps / 1e6, "busy_fraction": busy / wall_ns,
      # The device's traced work over the untraced wall time: tracing slows the host, not the kernels.
      "busy_fraction_of_untraced": min(busy / steps / 1e6 / untraced_ms, 1.0), "host_tracer_level": level,
      "kinds_ms_per_step": {k: v / steps / 1e6 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      **kernel_stats(events, steps),
      "top_kernels": [{"name": n[:160], "calls_per_step": c / steps, "ms_per_step": d / steps / 1e6}
                      for n, (c, d) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]],
      "engine_args": extra, "decode_steps_per_call": steps / FLAGS.steps, "host_top_cumulative": host_top,
  }
  with open(os.path.join(FLAGS.out_dir, "profile.json"), "w") as f:
    json.dump(result, f, indent=1)
  lines = [f"{result['device']}, JAX {result['jax']}, {result['date']}; {FLAGS.preset}, {FLAGS.phase} steps: "
           f"{result['prompt_tokens_per_step']:.0f} prompt tokens and {traced_batch} decode rows per step, "
           f"mean context {traced_context:.0f}; plane {plane}; engine args {extra}; "
           f"{steps / FLAGS.steps:.1f} decode steps per call",
           f"wall {result['wall_ms_per_step']:.2f} ms/step (untraced {untraced_ms:.2f}); device busy "
           f"{result['device_busy_ms_per_step']:.2f} ms/step = {100 * result['busy_fraction']:.0f}% of wall, "
           f"{100 * result['busy_fraction_of_untraced']:.0f}% of the untraced wall",
           f"{result['kernels_per_step']:.0f} kernels per step (median {result['median_kernel_us']:.1f} us), "
           f"{result['idle_between_kernels_ms_per_step']:.3f} ms/step idle between them; "
           f"{result['small_kernels_per_step']:.0f} kernels under {SMALL_KERNEL_NS // 1000} us take "
           f"{result['small_kernels_ms_per_step']:.3f} ms/step", "",
           "| kind | ms / step |", "| --- | --- |"]
  lines += [f"| {k} | {v:.3f} |" for k, v in result["kinds_ms_per_step"].items()]
  lines += ["", "| kernel | calls / step | ms / step |", "| --- | --- | --- |"]
  lines += [f"| `{k['name'][:90]}` | {k['calls_per_step']:.0f} | {k['ms_per_step']:.3f} |"
            for k in result["top_kernels"][:25]]
  if host_top:
    lines += ["", "Host (cProfile of the untraced steps, by cumulative time):", "",
              "| function | calls / step | self ms / step | cumulative ms / step |", "| --- | --- | --- | --- |"]
    lines += [f"| `{h['function'][:80]}` | {h['calls_per_step']:.1f} | {h['self_ms_per_step']:.3f} | "
              f"{h['cum_ms_per_step']:.3f} |" for h in host_top]
  with open(os.path.join(FLAGS.out_dir, "profile.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)

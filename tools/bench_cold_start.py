"""Cold start: process start to first token, with an empty and then a warm persistent compilation cache.

    PYTHONPATH=. python -m tools.bench_cold_start --preset=llama-3.1-8b --dummy --out_dir=$OUT

Writes the preset's checkpoint once (config and tokenizer only with `--dummy`: the engine then
makes random weights on the device), or takes `--model`, then starts two fresh Python processes
one after the other, both with the same new, empty compilation-cache directory: the first fills
it, the second reads it. Each child serves one short request (`LLM.generate`, max_tokens=1) and
reports, from the moment the parent spawned it: the interpreter's start, imports (jax and
jserve), backend start-up (`jax.devices()`), the engine's own phases (`LLMEngine.startup_s`:
config, weights, kv_pool, compile) and the first token. The parent prints a phase x cache table
and writes cold_start.json and cold_start.md to --out_dir (each child's log beside them).

Both children read a checkpoint the parent has just written, so from the OS page cache: the
weights phase is that of a warm disk.
"""

import time

_CHILD_T0 = time.time()  # a child's first line: everything before it is the interpreter starting

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_T0_ENV = "JSERVE_COLD_START_SPAWN_T0"  # the parent's time.time() just before it spawned the child
_RESULT = "COLD_START_RESULT "  # prefix of the child's JSON line on stdout
ENGINE_PHASES = ("config", "weights", "kv_pool", "compile")


def child(spec: dict) -> dict:
  """One cold start in this process: imports, backend, engine, one token. Times are seconds since the
  parent spawned the process (`since_spawn`) and since this file's first line (`since_child_start`)."""
  spawn_t0 = float(os.environ.get(_T0_ENV, _CHILD_T0))
  marks = {}

  def mark(name):
    marks[name] = time.time()

  import jax
  from jserve import LLM, SamplingParams
  from jserve.engine.startup import StartupClock
  mark("imports")
  devices = jax.devices()
  mark("backend")
  t = time.monotonic()
  llm = LLM(spec["model"], **spec["engine_args"])
  construct_s = time.monotonic() - t
  mark("engine")
  prompt = list(range(10, 10 + spec["prompt_len"]))
  clock = StartupClock()  # programs the first request builds: ones compile_all left out
  out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
  mark("first_token")
  assert len(out[0].outputs[0].token_ids) == 1
  engine = llm.engine
  return {"jax": jax.__version__, "device": devices[0].device_kind, "num_devices": len(devices),
          "python_start_s": _CHILD_T0 - spawn_t0,
          "since_spawn": {k: v - spawn_t0 for k, v in marks.items()},
          "since_child_start": {k: v - _CHILD_T0 for k, v in marks.items()},
          "engine_construct_s": construct_s, "startup_s": engine.startup_s,
          "startup_programs": engine.startup_programs, "first_token_programs": clock.programs(),
          "buckets": list(engine.runner.buckets)}


def phases(r: dict) -> dict:
  """Seconds per phase, in order, adding up to the time from spawn to the first token."""
  s = r["since_spawn"]
  out = {"python start": r["python_start_s"], "imports (jax, jserve)": s["imports"] - r["python_start_s"],
         "backend (jax.devices)": s["backend"] - s["imports"]}
  for k in ENGINE_PHASES:
    out[f"engine: {k}"] = r["startup_s"].get(k, 0.0)
  out["engine: other"] = (s["engine"] - s["backend"]) - sum(r["startup_s"].values())
  out["first token (warm-up)"] = s["first_token"] - s["engine"]
  out["total to first token"] = s["first_token"]
  return out


def _run_child(label: str, spec: dict, out_dir: str, timeout_s: float) -> dict:
  env = dict(os.environ)
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
  env[_T0_ENV] = repr(time.time())
  proc = subprocess.run([sys.executable, "-m", "tools.bench_cold_start", "--child", json.dumps(spec)],
                        capture_output=True, text=True, env=env, cwd=_REPO, timeout=timeout_s)
  with open(os.path.join(out_dir, f"child_{label}.log"), "w") as f:
    f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
  lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f"{label} child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len(_RESULT):])


def table(results: dict) -> str:
  """Markdown: one row per phase, one column per run."""
  labels = list(results)
  rows = {label: phases(r) for label, r in results.items()}
  lines = ["| phase (s) | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
  for name in rows[labels[0]]:
    cells = [f"{rows[label][name]:.2f}" for label in labels]
    bold = "**" if name.startswith("total") else ""
    lines.append(f"| {bold}{name}{bold} | " + " | ".join(f"{bold}{c}{bold}" for c in cells) + " |")
  for part, where in (("startup_programs", "engine"), ("first_token_programs", "first token")):
    for key, name in (("programs", f"XLA programs built ({where})"), ("from_cache", "... from the persistent cache"),
                      ("compiled", "... compiled"), ("xla_s", "... seconds building them"),
                      ("trace_lower_s", "... seconds tracing and lowering")):
      fmt = "{:.2f}" if key.endswith("_s") else "{}"
      lines.append(f"| {name} | " + " | ".join(fmt.format(results[label][part][key]) for label in labels) + " |")
  return "\n".join(lines)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("preset", "llama-3.1-8b", "model preset (random weights) from configs/models.py")
  flags.DEFINE_string("model", None, "an existing checkpoint directory instead of the preset's random one")
  flags.DEFINE_bool("dummy", False, "random weights made on the device (load_format=dummy): the checkpoint "
                    "written has no weights")
  flags.DEFINE_integer("max_num_batched_tokens", None, "engine token budget (None: the engine's default)")
  flags.DEFINE_integer("max_num_seqs", 256, "engine max_num_seqs")
  flags.DEFINE_integer("max_model_len", None, "engine max_model_len (None: the model's)")
  flags.DEFINE_integer("prompt_len", 16, "tokens in the one request")
  flags.DEFINE_string("engine_args", "{}", "extra EngineConfig fields, as a JSON object")
  flags.DEFINE_string("out_dir", "/tmp/bench_cold_start", "results directory")
  flags.DEFINE_list("runs", ["empty", "warm"], "which starts, in order: empty (a new cache directory), warm "
                    "(the cache the runs before left, or --cache_dir as it is)")
  flags.DEFINE_string("cache_dir", None, "compilation cache directory to use (default: a new, empty one; with an "
                      "empty run, one that does not exist yet or is empty); with --runs=warm alone, one that an "
                      "earlier process filled, e.g. a bench_e2e run with the same engine args")
  flags.DEFINE_float("timeout_s", 1800, "wall-clock limit per child process (and for writing the checkpoint)")


def main(argv):
  del argv
  from absl import app, flags
  FLAGS = flags.FLAGS
  if set(FLAGS.runs) - {"empty", "warm"} or not FLAGS.runs:
    raise app.UsageError(f"--runs={','.join(FLAGS.runs)}: expected a list of empty and warm")
  given = os.path.expanduser(FLAGS.cache_dir) if FLAGS.cache_dir else None
  if "empty" in FLAGS.runs and given and os.path.isdir(given) and os.listdir(given):
    raise app.UsageError(f"--cache_dir={FLAGS.cache_dir} with an 'empty' run: the directory is not empty")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  work = tempfile.mkdtemp(prefix="cold_start_")
  model = FLAGS.model
  checkpoint_s = 0.0
  if model is None:
    model = os.path.join(work, FLAGS.preset)
    t = time.perf_counter()
    from tools.make_random_checkpoint import make_checkpoint_in_subprocess  # (the child never imports it)
    make_checkpoint_in_subprocess(FLAGS.preset, model, weights=not FLAGS.dummy, timeout_s=FLAGS.timeout_s)
    checkpoint_s = time.perf_counter() - t
  engine_args = {"max_num_seqs": FLAGS.max_num_seqs, **json.loads(FLAGS.engine_args)}
  if FLAGS.max_num_batched_tokens is not None:
    engine_args["max_num_batched_tokens"] = FLAGS.max_num_batched_tokens
  if FLAGS.max_model_len is not None:
    engine_args["max_model_len"] = FLAGS.max_model_len
  if FLAGS.dummy:
    engine_args["load_format"] = "dummy"
  engine_args["compilation_cache_dir"] = os.path.expanduser(FLAGS.cache_dir or os.path.join(work, "jax_cache"))
  spec = {"model": model, "engine_args": engine_args, "prompt_len": FLAGS.prompt_len}
  results = {}
  for run in FLAGS.runs:
    label = f"{run} cache"
    print(f"cold start, {label} ...", file=sys.stderr, flush=True)
    results[label] = _run_child(run, spec, FLAGS.out_dir, FLAGS.timeout_s)
  first = next(iter(results.values()))
  report = {"date": time.strftime("%Y-%m-%d"), "preset": FLAGS.preset if FLAGS.model is None else None,
            "model": FLAGS.model, "dummy": FLAGS.dummy, "jax": first["jax"], "device": first["device"],
            "num_devices": first["num_devices"], "checkpoint_write_s": checkpoint_s, "spec": spec,
            "runs": results, "phases": {label: phases(r) for label, r in results.items()}}
  md = (f"# Cold start: {report['preset'] or FLAGS.model} on {first['device']}\n\n"
        f"jax {first['jax']}; engine args `{json.dumps(engine_args)}`; step buckets {first['buckets']}.\n"
        f"Seconds from spawning the process; the engine's phases are `LLMEngine.startup_s`.\n\n"
        + table(results) + "\n")
  with open(os.path.join(FLAGS.out_dir, "cold_start.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(FLAGS.out_dir, "cold_start.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(_RESULT + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
  else:
    from absl import app
    _define_flags()
    app.run(main)

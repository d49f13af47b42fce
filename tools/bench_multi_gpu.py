"""What several GPUs of one host show, in one run: equality, step times beside the cost model, a 70B shape.

    PYTHONPATH=. python -m tools.bench_multi_gpu --out_dir=$OUT          # on nvidia-h200-x2 or nvidia-h200-x4
    PYTHONPATH=. python -m tools.bench_multi_gpu --smoke --out_dir=/tmp/mg   # the same flow on 4 simulated CPUs

Each part runs in its own process (tools/multi_gpu_*.py), so a crash, a
hang or an out-of-memory in one is recorded with its traceback and the others
still run; each gets a time limit cut from --budget_s, and writes what it has
finished as it goes. Parts, in order:

1. ceilings: copy bandwidth of every GPU (JAX and PyTorch, bytes read plus
   written) and psum time and bus bandwidth over 2 and all GPUs.
2. equality: greedy tokens (4 prompts, 16 new tokens) of the Llama-3.1-8B
   shape cut to --equality_layers layers, float32 with true float32 matmuls,
   under tensor 2 and pipeline 2 (tensor 4 and pipeline 2 x tensor 2 on 4
   GPUs), each against one device.
3. distributed: two processes with one GPU each (CUDA_VISIBLE_DEVICES),
   joined by jax.distributed on localhost (NCCL), tensor 2 across them; the
   leader's tokens against its own GPU alone and against part 2's tensor 1.
4. timing: the full 8B shape in bf16 under tensor 1, 2 (4) and pipeline 2:
   the engine's jit step at decode batch 64 and 256 (context 1024) and a
   4096-token prefill, beside the cost model (`sharding/costs.py`) with
   nominal H200 numbers and with part 1's ceilings; TP2 vs TP1 decode speedup.
5. big: the Llama-3.1-70B shape (141 GB of bf16 weights: more than one
   H200 holds with room for a KV cache) at tensor 2 on two GPUs, 4 on four;
   engine start, decode steps at 64 and 256 against roofline and cost model,
   64 requests of 128/64 end to end, and 1000/1000 x 64 offline if time is left.

Weights are random and made on the GPUs in their shards (the engine's
`load_format="dummy"`); model directories hold only config.json and a
tokenizer. Multicast NVLink stays off (NCCL_NVLS_ENABLE=0 and friends, set
here for every process). Writes multi_gpu.json, multi_gpu.md and
multi_gpu.log (every part's output) to --out_dir; prints a short table last.
"""

import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app, flags

from tools import multi_gpu_distributed, multi_gpu_parts as parts, multi_gpu_timing
from tools.multi_gpu_report import cross_checks, markdown, summary

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "/tmp/bench_multi_gpu", "results directory")
flags.DEFINE_bool("smoke", False, "tiny shapes on 4 simulated CPU devices: checks the flow, measures nothing")
flags.DEFINE_list("parts", ["ceilings", "equality", "distributed", "timing", "big"], "parts to run, in order")
flags.DEFINE_float("budget_s", 480, "wall-clock budget of the whole run; each part gets a share")
flags.DEFINE_integer("equality_layers", 4, "layers of the 8B shape in the float32 equality checks")
flags.DEFINE_string("timing_preset", None, "preset of the equality and timing parts (default llama-3.1-8b)")
flags.DEFINE_string("big_preset", None, "preset of the big part (default llama-3.1-70b)")
flags.DEFINE_integer("big_tp", 0, "tensor degree of the big part; 0: 2 on two GPUs, 4 on four or more")
flags.DEFINE_string("offline", None, "in/out/requests of the big part's offline run; 'none' skips it")
# Set by the orchestrator for the processes it starts.
flags.DEFINE_string("part", None, "internal: run this one part in this process")
flags.DEFINE_string("part_out", None, "internal: where the part writes its JSON")
flags.DEFINE_string("work_dir", None, "internal: model directories")
flags.DEFINE_float("deadline", 0, "internal: time.time() by which the part must return")
flags.DEFINE_string("ceilings_json", None, "internal: the ceilings part's report")
flags.DEFINE_integer("process_id", 0, "internal: distributed worker index")
flags.DEFINE_integer("port", 0, "internal: distributed coordinator port")
flags.DEFINE_string("dist_mode", "one_device_visible", "internal: how a distributed worker finds its GPU")

# Multicast NVLink (NVLS) can put a shared host's GPUs out of service; the device notes require it off.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

# part -> (most seconds it may take, seconds kept back for it while earlier parts run)
LIMITS = {"ceilings": (60, 20), "equality": (120, 45), "distributed": (120, 45), "timing": (260, 120),
          "big": (330, 170)}
SMOKE_LIMITS = {name: (600, 30) for name in LIMITS}
PARTS = {"ceilings": parts.ceilings, "equality": parts.equality, "timing": multi_gpu_timing.timing,
         "big": multi_gpu_timing.big}


def settings(work_dir: str) -> parts.Settings:
  dirs = {k: os.path.join(work_dir, k) for k in ("equality", "timing", "big")}
  names = preset_names()
  common = dict(timing_name=names["timing"], big_name=names["big"], equality_dir=dirs["equality"],
                timing_dir=dirs["timing"], big_dir=dirs["big"], equality_layers=FLAGS.equality_layers,
                big_tp=FLAGS.big_tp)
  offline = None if (FLAGS.offline or "").lower() == "none" else FLAGS.offline
  if FLAGS.smoke:
    offline = offline or "32/16/8"
    s = parts.Settings(smoke=True, decode_batches=(16, 32), context=48, prefill_tokens=64, timing_iters=2,
                       prefill_iters=2, e2e=(16, 8, 8), copy_bytes=16 << 20, allreduce_bytes=(16 << 10, 1 << 20),
                       offline=None, **common)
  else:
    offline = offline or "1000/1000/64"
    s = parts.Settings(smoke=False, offline=None, **common)
  return dataclasses.replace(s, offline=tuple(int(x) for x in offline.split("/")) if offline else None)


def preset_names() -> dict:
  return {"timing": FLAGS.timing_preset or ("tiny-llama" if FLAGS.smoke else "llama-3.1-8b"),
          "big": FLAGS.big_preset or ("tiny-qwen3" if FLAGS.smoke else "llama-3.1-70b")}


def presets() -> dict:
  """Model directory name -> ModelConfig of the preset it serves."""
  from configs import get_model_preset
  names = preset_names()
  timing, big = get_model_preset(names["timing"]), get_model_preset(names["big"])
  if FLAGS.smoke:  # enough layers for two stages of two
    timing = dataclasses.replace(timing, num_layers=4)
  return {"equality": dataclasses.replace(timing, num_layers=FLAGS.equality_layers), "timing": timing, "big": big}


def write_model_dirs(work_dir: str) -> dict:
  """config.json, a tokenizer and generation_config.json per model: no weights (they are made on the devices)."""
  from tools.make_random_checkpoint import (BOS, EOS, stdlib_files, train_tokenizer, write_generation_config,
                                            write_tokenizer)
  cfgs = presets()
  tok = train_tokenizer(min(4096, *(c.vocab_size for c in cfgs.values())), stdlib_files(40 if FLAGS.smoke else 200))
  out = {}
  for name, cfg in cfgs.items():
    cfg = dataclasses.replace(cfg, bos_token_id=tok.token_to_id(BOS), eos_token_ids=(tok.token_to_id(EOS),))
    path = os.path.join(work_dir, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg.to_hf_dict(), f, indent=2)
    write_tokenizer(tok, path)
    write_generation_config(cfg, path)
    out[name] = {"preset_layers": cfg.num_layers, "params_B": cfg.param_count() / 1e9}
  return out


def part_env(name: str) -> dict:
  env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
  env["PYTHONPATH"] = parts.ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  # JAX takes 75% of each GPU by default; the 70B shape at tensor 2 needs about 110 of 140 GiB.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  if name == "ceilings":
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # PyTorch copies on the same GPUs first
  if FLAGS.smoke:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  return env


def run_part(name: str, timeout: float, work_dir: str, log, ceilings_json: str | None) -> dict:
  """Runs one part in a child process group; returns its report (or what it saved before it died)."""
  out_path = os.path.join(work_dir, f"part_{name}.json")
  # --alsologtostderr: the engine's INFO lines (weights, KV pool, compiles) go to multi_gpu.log too.
  cmd = [sys.executable, "-m", "tools.bench_multi_gpu", *sys.argv[1:], "--alsologtostderr", f"--part={name}",
         f"--part_out={out_path}", f"--work_dir={work_dir}", f"--deadline={time.time() + timeout - 10}"]
  if ceilings_json and os.path.exists(ceilings_json):
    cmd.append(f"--ceilings_json={ceilings_json}")
  log.write(f"\n===== part {name} (limit {timeout:.0f} s) =====\n")
  log.flush()
  start = time.time()
  proc = subprocess.Popen(cmd, env=part_env(name), cwd=parts.ROOT, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  status = None
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group: it and its workers
    proc.wait()
    status = f"killed after {timeout:.0f} s"
  report = {}
  if os.path.exists(out_path):
    with open(out_path) as f:
      report = json.load(f)
  if status:
    report["error"] = report.get("error", "") + status
  elif proc.returncode and "error" not in report:
    report["error"] = f"exit code {proc.returncode}"
  report["wall_s"] = time.time() - start
  return report


def run_one_part():
  """In a child process: one part, its report saved as it goes and once more at the end."""
  s = settings(FLAGS.work_dir)
  if FLAGS.part == "dist_worker":
    multi_gpu_distributed.dist_worker(s, FLAGS.process_id, FLAGS.port, FLAGS.dist_mode)
    return
  state = {}

  def save(report: dict):
    state.clear()
    state.update(report)
    tmp = FLAGS.part_out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1, default=str)
    os.replace(tmp, FLAGS.part_out)

  ceilings = None
  if FLAGS.ceilings_json:
    with open(FLAGS.ceilings_json) as f:
      ceilings = json.load(f)
  ctx = parts.Context(settings=s, deadline=FLAGS.deadline, ceilings=ceilings, save=save)
  try:
    if FLAGS.part == "distributed":
      result = multi_gpu_distributed.distributed(ctx, [a for a in sys.argv[1:] if not a.startswith("--part=")])
    else:
      result = PARTS[FLAGS.part](ctx)
  except Exception:
    tb = traceback.format_exc()
    print(tb, flush=True)
    result = dict(state, error=tb)
  save(result)


def main(argv):
  del argv
  if FLAGS.part:
    run_one_part()
    return
  start = time.time()
  deadline = start + FLAGS.budget_s
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  work_dir = tempfile.mkdtemp(prefix="bench_multi_gpu_")
  results = {"date": datetime.date.today().isoformat(), "smoke": FLAGS.smoke, "argv": sys.argv[1:],
             "env": {k: os.environ.get(k) for k in [*NO_MULTICAST, "XLA_PYTHON_CLIENT_MEM_FRACTION"]}, "parts": {}}
  try:
    results["models"] = write_model_dirs(work_dir)
  except Exception:  # every part will fail without them, and say so; the report is still written
    results["models"] = {"error": traceback.format_exc()}
    print(results["models"]["error"], flush=True)
  limits = SMOKE_LIMITS if FLAGS.smoke else LIMITS
  names = [n for n in FLAGS.parts if n in limits]
  json_path, md_path = (os.path.join(FLAGS.out_dir, f) for f in ("multi_gpu.json", "multi_gpu.md"))
  with open(os.path.join(FLAGS.out_dir, "multi_gpu.log"), "w") as log:
    for i, name in enumerate(names):
      reserve = sum(limits[n][1] for n in names[i + 1:])
      timeout = min(limits[name][0], deadline - time.time() - reserve)
      if timeout < limits[name][1] / 2:
        results["parts"][name] = {"skipped": f"{timeout + reserve:.0f} s left of the budget"}
        print(f"[{name}] skipped: out of budget", flush=True)
        continue
      print(f"[{name}] running (limit {timeout:.0f} s)", flush=True)
      report = run_part(name, timeout, work_dir, log, os.path.join(work_dir, "part_ceilings.json"))
      results["parts"][name] = report
      if "error" in report:
        print(f"[{name}] FAILED after {report['wall_s']:.0f} s:\n{report['error'][-3000:]}", flush=True)
      else:
        print(f"[{name}] done in {report['wall_s']:.0f} s", flush=True)
      results["cross_checks"] = cross_checks(results["parts"])
      results["wall_s"] = time.time() - start
      with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
  with open(md_path, "w") as f:
    f.write(markdown(results))
  shutil.rmtree(work_dir, ignore_errors=True)
  print(summary(results))


if __name__ == "__main__":
  app.run(main)

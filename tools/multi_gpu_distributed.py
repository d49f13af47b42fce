"""The distributed part of tools/bench_multi_gpu.py: two processes, one device each, tensor 2 across them.

The part's process starts two workers (this module's `dist_worker`, through
the bench's `--part=dist_worker`) joined by `jax.distributed` on localhost,
as tests/sharding/multihost_worker.py does on CPUs: both run the same jitted
step on a global mesh, the leader schedules and broadcasts each step's
inputs, and it also decodes on its own device alone to compare.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

from tools.multi_gpu_parts import PAGE_SIZE, ROOT, Context, Settings, make_prompts


def distributed(ctx: Context, argv: list[str]) -> dict:
  """Starts two worker processes of one device each, tensor 2 across them; the leader reports."""
  s = ctx.settings
  out = {"attempts": []}
  # First as asked: each process sees only its GPU. Should NCCL fail that way, all GPUs visible and
  # each process told its local device (JAX's own way for one process per GPU) is tried next.
  modes = ["one_device_visible"] if s.smoke else ["one_device_visible", "local_device_ids"]
  for n, mode in enumerate(modes):
    if ctx.left() < 30:
      out["attempts"].append({"mode": mode, "skipped": "out of time"})
      break
    # The first try leaves time for the second; a healthy pair takes well under a minute.
    limit = ctx.left() - 5 if n == len(modes) - 1 else min(ctx.left() / 2, 100)
    attempt = dict(_run_workers(argv, mode, limit, s.smoke), mode=mode)
    out["attempts"].append(attempt)
    ctx.save(out)
    if "equal" in attempt:
      out.update({k: attempt[k] for k in ("mode", "equal", "tokens", "reference_tokens", "global_devices",
                                          "local_devices", "platform", "decode_step_ms")})
      return out
  out["error"] = "no attempt ran to the end: " + "; ".join(
      f"{a['mode']}: {a.get('error', a.get('skipped', '?'))[-1500:]}" for a in out["attempts"])
  return out


def _run_workers(argv: list[str], mode: str, limit: float, smoke: bool) -> dict:
  """Both workers, their output in files (a full pipe would stall them); if one fails, the other is
  stopped rather than left waiting for its peer in a collective."""
  import socket
  import tempfile
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
  procs = []
  for i in (0, 1):
    env = dict(os.environ)
    if smoke:
      env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    elif mode == "one_device_visible":
      env["CUDA_VISIBLE_DEVICES"] = str(i)
    cmd = [sys.executable, "-m", "tools.bench_multi_gpu", *argv, "--part=dist_worker", f"--process_id={i}",
           f"--port={port}", f"--dist_mode={mode}"]
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT, text=True))
  end = time.time() + limit
  while time.time() < end and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.5)
  stopped = [p.poll() is None for p in procs]
  for p, stop in zip(procs, stopped):
    if stop:
      p.kill()
    p.wait()
  text = []
  for i, f in enumerate(logs):
    f.seek(0)
    text.append(f.read())
    f.close()
    print(f"--- distributed worker {i} ({mode}), exit {procs[i].returncode}"
          f"{' (stopped)' if stopped[i] else ''} ---\n{text[i]}", flush=True)
  reports = [json.loads(line) for line in text[0].splitlines() if line.startswith('{"dist_report"')]
  if reports and all(p.returncode == 0 for p in procs):
    report = reports[-1]["dist_report"]
    return dict(report, equal=report["tokens"] == report["reference_tokens"])
  why = "timed out" if all(stopped) else f"exit codes {[p.returncode for p in procs]}"
  failed = next((t for p, t, stop in zip(procs, text, stopped) if p.returncode and not stop), text[0])
  return {"error": f"{why}; output ends:\n{failed[-3000:]}"}


def dist_worker(settings: Settings, process_id: int, port: int, mode: str):
  """One of two processes: tensor 2 over both processes' devices, greedy; the leader also decodes on
  its own device alone and prints a JSON line."""
  import jax
  from sharding import distributed as dist
  if mode == "local_device_ids":
    jax.distributed.initialize(f"localhost:{port}", 2, process_id, local_device_ids=[process_id])
  else:
    dist.initialize(f"localhost:{port}", 2, process_id)
  import jax.numpy as jnp

  from jserve.config import load_model_config
  from jserve.engine.placement import random_engine_params
  from jserve.models import llama
  from sharding import rules
  from sharding.mesh import MeshShape, make_mesh

  cfg = load_model_config(settings.equality_dir)
  prompts = make_prompts(cfg.vocab_size)
  shape = dict(num_tokens=128, max_seqs=len(prompts), pages_per_seq=8)
  num_pages = shape["max_seqs"] * shape["pages_per_seq"]

  def step_fn(params, caches, inputs, mesh=None):
    x_BD, caches = llama.forward(params, caches, inputs, cfg, mesh=mesh)
    return llama.compute_logits(params, x_BD, cfg), caches

  jax.config.update("jax_default_matmul_precision", "highest")  # as the equality part: float32, not TF32
  mesh = make_mesh(MeshShape(tensor=2), allow_cross_host_tensor=True)
  params = random_engine_params(cfg, "float32", mesh)
  caches = rules.make_kv_caches(cfg, mesh, num_pages, PAGE_SIZE, jnp.float32)
  step = jax.jit(lambda p, c, i: step_fn(p, c, i, mesh), donate_argnums=1)
  on = rules.replicated(mesh)

  def run(inputs):
    nonlocal caches
    inputs = dist.broadcast_from_leader(inputs)  # followers run what the leader scheduled
    logits, caches = step(params, caches, dist.put_global(inputs, jax.tree.map(lambda _: on, inputs)))
    return dist.broadcast_from_leader(dist.fetch(logits)[:len(prompts)].argmax(-1))

  tokens, step_s = _greedy(run, prompts, settings.new_tokens, **shape)
  if not dist.is_leader():
    return
  local = random_engine_params(cfg, "float32", None)  # on this process's device alone
  device = jax.local_devices()[0]
  local_caches = [jnp.zeros(rules.kv_pool_shape(cfg, 1, num_pages, PAGE_SIZE), jnp.float32, device=device)
                  for _ in range(cfg.num_layers)]
  single = jax.jit(step_fn, donate_argnums=1)

  def run_local(inputs):
    nonlocal local_caches
    logits, local_caches = single(local, local_caches, inputs)
    return np.asarray(logits)[:len(prompts)].argmax(-1)

  ref, _ = _greedy(run_local, prompts, settings.new_tokens, **shape)
  print(json.dumps({"dist_report": {"tokens": tokens, "reference_tokens": ref, "global_devices": jax.device_count(),
                                    "local_devices": jax.local_device_count(), "platform": jax.default_backend(),
                                    "decode_step_ms": step_s * 1e3}}), flush=True)


def _greedy(run, prompts, num_new, *, num_tokens, max_seqs, pages_per_seq):
  """Greedy decoding over `run(StepInputs) -> next token per prompt`: one prefill step, then decodes.
  Returns the tokens and the median wall time of a decode step (host round trip included)."""
  out = [[] for _ in prompts]
  chunks, starts = [list(p) for p in prompts], [0] * len(prompts)
  times = []
  for _ in range(num_new):
    t = time.perf_counter()
    next_tokens = run(_step_inputs(chunks, starts, num_tokens, max_seqs, pages_per_seq))
    times.append(time.perf_counter() - t)
    starts = [s + len(c) for s, c in zip(starts, chunks)]
    chunks = [[int(t)] for t in next_tokens]
    for o, t in zip(out, next_tokens):
      o.append(int(t))
  return out, float(np.median(times[2:] or times))


def _step_inputs(chunks, starts, num_tokens, max_seqs, pages_per_seq):
  """One padded ragged step in which sequence i (pages [i * pages_per_seq, ...)) appends chunks[i]."""
  from jserve.models.llama import StepInputs
  num_pages = max_seqs * pages_per_seq
  tok, pos = np.zeros(num_tokens, np.int32), np.zeros(num_tokens, np.int32)
  slots = np.full(num_tokens, num_pages * PAGE_SIZE, np.int32)  # padding rows write nowhere
  cu, kv, last = np.zeros(max_seqs + 1, np.int32), np.zeros(max_seqs, np.int32), np.zeros(max_seqs, np.int32)
  pages = np.arange(num_pages, dtype=np.int32).reshape(max_seqs, pages_per_seq)
  row = 0
  for i, (chunk, start) in enumerate(zip(chunks, starts)):
    for j, token in enumerate(chunk):
      p = start + j
      tok[row], pos[row] = token, p
      slots[row] = pages[i, p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
      row += 1
    cu[i + 1], kv[i], last[i] = row, start + len(chunk), row - 1
  cu[len(chunks) + 1:] = row
  return StepInputs(token_ids_T=tok, positions_T=pos, slots_T=slots, cu_q_lens_E=cu, kv_lens_B=kv,
                    page_indices_BP=pages, num_seqs=np.array([len(chunks)], np.int32), logits_indices_B=last)

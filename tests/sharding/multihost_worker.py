"""Worker for test_multihost.py: one of two processes (4 CPU devices each) joined by jax.distributed.

Usage: python -m tests.sharding.multihost_worker PROCESS_ID PORT CHECKPOINT_DIR

Both processes run a tensor-parallel step over all 8 devices (the tensor
group spans the two processes, so every layer's all-reduces cross them).
The leader picks the greedy tokens and broadcasts them; it also decodes on
its own first device alone, and prints both results as one JSON line.
"""

import json
import sys

from sharding import distributed


def main(process_id: int, port: int, ckpt: str):
  distributed.initialize(f"localhost:{port}", 2, process_id)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jserve.config import load_model_config
  from jserve.models import llama
  from jserve.weights import load_params
  from sharding import mesh as mesh_lib
  from sharding import rules
  from tests.sharding.greedy import Layout, step_inputs

  layout = Layout()
  prompts = [[3, 17, 42, 5, 9], [100, 7, 7, 8, 1, 2, 3, 4, 5, 6, 11], [250, 1, 64]]
  cfg = load_model_config(ckpt)
  specs = llama.param_specs(cfg)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(tensor=8), allow_cross_host_tensor=True)
  params = load_params(ckpt, cfg, dtype="float32", place=rules.make_place(specs, mesh))
  caches = rules.make_kv_caches(cfg, mesh, layout.num_pages, layout.page_size, jnp.float32)

  def step_fn(params, caches, inputs):
    x_BD, caches = llama.forward(params, caches, inputs, cfg, mesh=mesh)
    return llama.compute_logits(params, x_BD, cfg), caches

  step = jax.jit(step_fn, donate_argnums=1)
  replicated = rules.replicated(mesh)
  tokens = [[] for _ in prompts]
  chunks, starts = [list(p) for p in prompts], [0] * len(prompts)
  for _ in range(4):
    host_inputs = step_inputs(chunks, starts, layout)
    host_inputs = distributed.broadcast_from_leader(host_inputs)  # followers run what the leader scheduled
    inputs = distributed.put_global(host_inputs, jax.tree.map(lambda _: replicated, host_inputs))
    logits, caches = step(params, caches, inputs)
    next_tokens = distributed.broadcast_from_leader(distributed.fetch(logits)[:len(prompts)].argmax(-1))
    starts = [s + len(c) for s, c in zip(starts, chunks)]
    chunks = [[int(t)] for t in next_tokens]
    for out, t in zip(tokens, next_tokens):
      out.append(int(t))
  if not distributed.is_leader():
    return
  # The same decode on this process's first device alone.
  local = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.local_devices()[0]),
                       load_params(ckpt, cfg, dtype="float32", place=lambda spec, a: a))
  pool = (layout.num_pages, layout.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
  local_caches = [jnp.zeros(pool, jnp.float32, device=jax.local_devices()[0]) for _ in range(cfg.num_layers)]
  ref = [[] for _ in prompts]
  chunks, starts = [list(p) for p in prompts], [0] * len(prompts)

  @jax.jit
  def single(params, caches, inputs):
    x_BD, caches = llama.forward(params, caches, inputs, cfg)
    return llama.compute_logits(params, x_BD, cfg), caches

  for _ in range(4):
    logits, local_caches = single(local, local_caches, step_inputs(chunks, starts, layout))
    next_tokens = np.asarray(logits)[:len(prompts)].argmax(-1)
    starts = [s + len(c) for s, c in zip(starts, chunks)]
    chunks = [[int(t)] for t in next_tokens]
    for out, t in zip(ref, next_tokens):
      out.append(int(t))
  print(json.dumps({"tokens": tokens, "reference_tokens": ref, "global_devices": jax.device_count(),
                    "local_devices": jax.local_device_count()}))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

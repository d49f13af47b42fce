"""Worker for test_tensor_parallel.py: runs tiny models under tensor 1/2/4/8 on 8 CPU devices.

Prints one JSON line: per variant and degree, the greedy tokens, the largest
logit difference from one device, every parameter's partition spec, the bytes
of weights on each device, and the KV pool's per-device shard shape.
"""

import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jserve.config import ModelConfig
from jserve.models import llama
from jserve.weights import load_params, save_hf_checkpoint
from sharding import checkpoint, rules
from sharding import mesh as mesh_lib
from tests.sharding.greedy import Layout, greedy, step_inputs

VARIANTS = {
    # GQA with 2 KV heads: split at tensor 2, replicated at 4 and 8.
    "llama_gqa": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                             num_kv_heads=2, head_dim=8),
    # One KV head, q/k norms, biases, tied embedding, and a vocabulary that 8 does not divide.
    "qwen3_bias_tied": ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=260, hidden_size=64,
                                   intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=1, head_dim=16,
                                   qk_norm=True, attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6),
}
DEGREES = (1, 2, 4, 8)
LAYOUT = Layout()
PROMPTS = [[3, 17, 42, 5, 9], [100, 7, 7, 8, 1, 2, 3, 4, 5, 6, 11], [250, 1, 64]]
NUM_NEW = 4


def make_step(params, caches, cfg, mesh):
  def step_fn(params, caches, inputs):
    x_BD, caches = llama.forward(params, caches, inputs, cfg, mesh=mesh)
    return llama.compute_logits(params, x_BD, cfg), caches

  jitted = jax.jit(step_fn, donate_argnums=1)
  state = {"caches": caches, "jitted": jitted}

  def step(batches):
    (inputs,) = batches
    logits, state["caches"] = jitted(params, state["caches"], inputs)
    return [logits]

  return step, state


def spec_of(a) -> list:
  spec = tuple(a.sharding.spec)
  return list(spec) + [None] * (a.ndim - len(spec))


def device_bytes(tree) -> dict:
  out = {}
  for a in jax.tree.leaves(tree):
    for shard in a.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def named_leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def collectives(state, params) -> dict:
  """How many of each collective the compiled step runs (on CPU they are synchronous ops)."""
  inputs = step_inputs([p for p in PROMPTS], [0] * len(PROMPTS), LAYOUT)
  hlo = state["jitted"].lower(params, state["caches"], inputs).compile().as_text()
  ops = re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", hlo)
  return {op: ops.count(op) for op in set(ops)}


def run_variant(cfg):
  params = llama.init_params(cfg, jax.random.key(0), dtype=jnp.float32)
  specs = llama.param_specs(cfg)
  pool = (LAYOUT.num_pages, LAYOUT.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
  caches = [jnp.zeros(pool, jnp.float32) for _ in range(cfg.num_layers)]
  ref_tokens, ref_logits = greedy(make_step(params, caches, cfg, None)[0], PROMPTS, NUM_NEW, LAYOUT)
  out = {"reference_tokens": ref_tokens, "degrees": {}}
  with tempfile.TemporaryDirectory() as ckpt, tempfile.TemporaryDirectory() as tmp:
    save_hf_checkpoint(params, cfg, ckpt)
    # An orbax copy written from the widest placement (KV heads widened there), restored at every degree.
    orbax_dir = os.path.join(tmp, "orbax")
    mesh8 = mesh_lib.make_mesh(mesh_lib.MeshShape(tensor=8))
    checkpoint.save(rules.shard_params(params, specs, mesh8), specs, orbax_dir, tp=8)
    for tp in DEGREES:
      mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(tensor=tp))
      sharded = rules.shard_params(params, specs, mesh)
      loaded = load_params(ckpt, cfg, dtype="float32", place=rules.make_place(specs, mesh))
      same_as_loaded = all(
          a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(loaded)))
      restored = checkpoint.restore(orbax_dir, specs, mesh, jnp.float32)
      same_as_restored = all(
          a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(restored)))
      caches = rules.make_kv_caches(cfg, mesh, LAYOUT.num_pages, LAYOUT.page_size, jnp.float32)
      step, state = make_step(sharded, caches, cfg, mesh)
      tokens, logits = greedy(step, PROMPTS, NUM_NEW, LAYOUT)
      out["degrees"][tp] = {
          "tokens": tokens,
          "max_logit_diff": float(np.abs(logits - ref_logits).max()),
          "specs": {name: spec_of(a) for name, a in named_leaves(sharded).items()},
          "loaded_equals_sharded": same_as_loaded,
          "orbax_restored_equals_sharded": same_as_restored,
          "loaded_shard_shapes": {name: [list(s.data.shape) for s in a.addressable_shards]
                                  for name, a in named_leaves(loaded).items()},
          "device_weight_bytes": device_bytes(sharded),
          "kv_shard_shapes": [list(s.data.shape) for s in state["caches"][0].addressable_shards],
          "kv_spec": spec_of(state["caches"][0]),
          "collectives": collectives(state, sharded) if tp == 8 else None,
      }
  return out


def main():
  assert len(jax.devices()) == 8, jax.devices()
  report = {name: run_variant(cfg) for name, cfg in VARIANTS.items()}
  print(json.dumps(report))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()

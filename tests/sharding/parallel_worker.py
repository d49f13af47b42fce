"""Worker for test_pipeline_and_data.py: pipeline, data and mixed layouts on 8 CPU devices.

Prints one JSON line: per variant and layout, the greedy tokens, the largest
logit difference from one device, and the bytes of weights on each device.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from jserve.config import ModelConfig
from jserve.models import llama
from sharding import mesh as mesh_lib
from sharding import pipeline, rules
from tests.sharding.greedy import Layout, greedy
from tests.sharding.tp_worker import device_bytes, make_step

VARIANTS = {
    # Five layers, so no stage count here divides them evenly.
    "llama_gqa_5": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=5, num_heads=8,
                               num_kv_heads=2, head_dim=8),
    "qwen3_tied_5": ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=256, hidden_size=64,
                                intermediate_size=96, num_layers=5, num_heads=4, num_kv_heads=1, head_dim=16,
                                qk_norm=True, attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6),
}
# (data, stage, tensor, micro-batches per replica step). Each stage of each layout compiles once, which
# is most of this worker's time, so the list is the cases plus one layout using all three axes.
LAYOUTS = [(1, 2, 1, 2), (1, 4, 1, 2), (1, 2, 2, 2), (2, 1, 1, 1), (2, 1, 4, 1), (2, 2, 2, 2)]
# The tied variant only where its embedding must be copied to the last stage.
LAYOUTS_OF = {"llama_gqa_5": LAYOUTS, "qwen3_tied_5": [(1, 2, 2, 2)]}
LAYOUT = Layout()
PROMPTS = [[3, 17, 42, 5, 9], [100, 7, 7, 8, 1, 2, 3, 4, 5, 6, 11], [250, 1, 64], [9, 8, 7, 6]]
NUM_NEW = 4


def llama_stage(params, caches, carry, inputs, *, first, last, mesh, cfg):
  x_TD = params["embed"][inputs.token_ids_T] if first else carry
  x_TD, caches = llama.forward_layers(params["layers"], caches, x_TD, inputs, cfg, mesh=mesh)
  if last:
    x_BD = llama.rms_norm(x_TD[inputs.logits_indices_B], params["final_norm"], cfg.rms_norm_eps)
    return llama.compute_logits(params, x_BD, cfg), caches
  return x_TD, caches


def replica_runner(params, specs, cfg, mesh):
  """A `run(list of StepInputs)` for one replica: its micro-batches through its pipeline stages."""
  sharded = rules.shard_params(params, specs, mesh)
  caches = rules.make_kv_caches(cfg, mesh, LAYOUT.num_pages, LAYOUT.page_size, jnp.float32)
  num_stages = mesh.shape[mesh_lib.STAGE]
  stage_params = pipeline.split_params(sharded, specs, mesh)
  state = {"caches": pipeline.split_caches(caches, num_stages)}
  steps = pipeline.make_stage_steps(lambda *a, **k: llama_stage(*a, **k, cfg=cfg), mesh)

  def run(batches):
    outs, state["caches"] = pipeline.run_micro_batches(steps, mesh, stage_params, state["caches"], batches)
    return outs

  return run, stage_params


def run_layout(params, specs, cfg, data, stage, tensor, micro):
  mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(data=data, stage=stage, tensor=tensor))
  replicas = [replica_runner(params, specs, cfg, m) for m in mesh_lib.replica_meshes(mesh)]
  # Sequences go to replicas round-robin; each replica splits its own into `micro` micro-batches.
  per_replica = [list(range(r, len(PROMPTS), data)) for r in range(data)]
  per_micro = [[seqs[m::micro] for m in range(micro)] for seqs in per_replica]

  def run(batches):
    outs, k = [], 0
    for (replica, _), groups in zip(replicas, per_micro):
      outs += replica(batches[k:k + len(groups)])
      k += len(groups)
    return outs

  tokens, logits = greedy(run, PROMPTS, NUM_NEW, LAYOUT, groups=[g for gs in per_micro for g in gs])
  weights = {}
  for _, stage_params in replicas:
    for d, b in device_bytes(stage_params).items():
      weights[d] = weights.get(d, 0) + b
  stage_of_device = {d.id: s for s in range(stage) for d in mesh.devices[:, s, :].flat}
  return tokens, logits, weights, stage_of_device


def main():
  assert len(jax.devices()) == 8, jax.devices()
  report = {}
  for name, cfg in VARIANTS.items():
    params = llama.init_params(cfg, jax.random.key(1), dtype=jnp.float32)
    specs = llama.param_specs(cfg)
    pool = (LAYOUT.num_pages, LAYOUT.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    step, _ = make_step(params, [jnp.zeros(pool, jnp.float32) for _ in range(cfg.num_layers)], cfg, None)
    ref_tokens, ref_logits = greedy(step, PROMPTS, NUM_NEW, LAYOUT)
    report[name] = {"reference_tokens": ref_tokens, "layouts": {}}
    for data, stage, tensor, micro in LAYOUTS_OF[name]:
      tokens, logits, weights, stage_of = run_layout(params, specs, cfg, data, stage, tensor, micro)
      report[name]["layouts"][f"{data},{stage},{tensor}"] = {
          "tokens": tokens, "max_logit_diff": float(np.abs(logits - ref_logits).max()),
          "device_weight_bytes": weights, "stage_of_device": stage_of}
  print(json.dumps(report))


if __name__ == "__main__":
  main()

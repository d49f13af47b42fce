"""Pipeline parallelism: the layers split into stages, each stage on its own sub-mesh.

A replica's mesh has `stage` x `tensor` devices; stage s runs the layers of
`rules.layer_stages(...)[s]` with tensor parallelism over its own `tensor`
devices, the first stage also the embedding, the last also the final norm
and LM head. Between stages only the hidden state of the step's tokens moves.

A step is split into micro-batches (disjoint sets of sequences sharing the
KV pool). `run_micro_batches` dispatches every micro-batch through every
stage without waiting: JAX dispatch is asynchronous, so the call returns at
once and, on the devices, stage s works on micro-batch i + 1 while stage s + 1
works on micro-batch i. Each stage's calls are ordered by the KV pool they
thread through (donated, updated in place), which is all the ordering needed.

Knows nothing of the model beyond the params layout of `jserve.models`
(`embed`, `layers` list, `final_norm`, optional `lm_head`); the model's
computation comes in as `stage_fn`.
"""

import functools
from typing import Callable

import jax
from jax.sharding import Mesh

from sharding.mesh import TENSOR, stage_meshes
from sharding.rules import layer_stages, partition_spec, replicated


def split_params(params: dict, specs: dict, mesh: Mesh) -> list[dict]:
  """Per-stage params from a tree placed by `rules.shard_params`/`make_place` on a mesh with stages.

  A tied embedding, which the first stage embeds with and the last uses as LM
  head, is copied to the last stage's devices (the planner counts that copy).
  """
  stages = stage_meshes(mesh)
  ranges = layer_stages(len(params["layers"]), len(stages))
  out = [{"layers": [params["layers"][i] for i in r]} for r in ranges]
  out[0]["embed"] = params["embed"]
  out[-1]["final_norm"] = params["final_norm"]
  if "lm_head" in params:
    out[-1]["lm_head"] = params["lm_head"]
  elif len(stages) > 1:
    tp = mesh.shape[TENSOR]
    spec = specs["embed"]
    sharding = jax.sharding.NamedSharding(stages[-1], partition_spec(spec.axes, spec.shape, tp))
    out[-1]["embed"] = jax.device_put(params["embed"], sharding)
  return out


def split_caches(kv_caches: list, num_stages: int) -> list[list]:
  """The per-layer KV pools grouped by stage (they are already on their stage's devices)."""
  return [[kv_caches[i] for i in r] for r in layer_stages(len(kv_caches), num_stages)]


def make_stage_steps(stage_fn: Callable, mesh: Mesh) -> list[Callable]:
  """One jitted step per stage: `step(stage_params, stage_caches, carry, inputs) -> (carry, stage_caches)`.

  `stage_fn(params, caches, carry, inputs, *, first, last, mesh)` is the
  model's stage: on the first stage `carry` is None and it embeds the tokens;
  on the last it returns what the caller wants out (logits, say) as `carry`.
  """
  meshes = stage_meshes(mesh)
  return [jax.jit(functools.partial(stage_fn, first=s == 0, last=s == len(meshes) - 1, mesh=m), donate_argnums=1)
          for s, m in enumerate(meshes)]


def run_micro_batches(steps: list[Callable], mesh: Mesh, stage_params: list[dict], stage_caches: list[list],
                      micro_inputs: list) -> tuple[list, list[list]]:
  """Runs each micro-batch's inputs through all stages; returns the last stage's outputs and the new caches."""
  meshes = stage_meshes(mesh)
  stage_caches = list(stage_caches)
  outputs = []
  for inputs in micro_inputs:
    carry = None
    for s, step in enumerate(steps):
      on_stage = replicated(meshes[s])
      if carry is not None:
        carry = jax.device_put(carry, on_stage)  # the hidden state crosses to the next stage's devices
      carry, stage_caches[s] = step(stage_params[s], stage_caches[s], carry, jax.device_put(inputs, on_stage))
    outputs.append(carry)
  return outputs, stage_caches

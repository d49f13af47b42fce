"""The engine's step split into pipeline stages: one jit per stage, each on its own sub-mesh.

With `pipeline_parallel_size=P` a replica's mesh has P stages of
`tensor_parallel_size` devices (`sharding.mesh.stage_meshes`). Stage s holds
the layers `sharding.rules.layer_stages(L, P)[s]` and their KV pools; the first
also embeds, the last also holds the final norm, the LM head (a copy of a tied
embedding, see `sharding.pipeline.split_params`), the sampler's slot state and
the grammar mask, and runs the sampler. A step runs the stages in order and
moves only the hidden state [T, D] from one stage's devices to the next.

What this gives is capacity: a model P times larger than one stage's devices
fits. It does not overlap stages: the engine waits for each step's tokens
before it schedules the next, so stage s idles while the others run. Several
micro-batches in flight (`sharding.pipeline.run_micro_batches`) would need the
scheduler to keep P batches going at once; that is not done.
"""

import functools
from typing import Callable

import jax
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.models.llama import forward_layers
from sharding.mesh import stage_meshes
from sharding.rules import kv_cache_sharding, layer_stages, replicated


def _lead_stage(params, kv_caches, x_TD, inputs, *, first: bool, cfg: ModelConfig, attn_impl: str, mesh: Mesh):
  """A stage before the last: the embedding on the first, then the stage's layers."""
  if first:
    x_TD = params["embed"][inputs.token_ids_T]
  return forward_layers(params["layers"], kv_caches, x_TD, inputs, cfg, attn_impl, mesh)


class PipelineStep:
  """Called like the runner's single jit step, with `params` the per-stage list of `split_params`.

  `last_stage(params, kv_caches, x_TD, slots, mask_SW, inputs, sampling, tokens, *, mesh)` is the
  runner's: the last stage's layers, logits and sampling. `slots` and `mask_SW` live on the last
  stage (replicated); step inputs come as host arrays and are put on each stage's devices.
  `compiler_options`: XLA's, for every stage's jit (`programs.compiler_options`).
  """

  def __init__(self, cfg: ModelConfig, mesh: Mesh, last_stage: Callable, attn_impl: str,
               compiler_options: dict | None = None):
    self.meshes = stage_meshes(mesh)
    self.layers = layer_stages(cfg.num_layers, len(self.meshes))
    self._lead = []
    for s, (m, r) in enumerate(zip(self.meshes[:-1], self.layers[:-1])):
      # Output shardings pinned (the hidden state replicated, each pool by KV heads) so that a step
      # never sees inputs placed differently from the compiled ones.
      fn = functools.partial(_lead_stage, first=s == 0, cfg=cfg, attn_impl=attn_impl, mesh=m)
      self._lead.append(jax.jit(fn, donate_argnums=(1,), compiler_options=compiler_options,
                                out_shardings=(replicated(m), [kv_cache_sharding(m)] * len(r))))
    m = self.meshes[-1]
    self._last = jax.jit(functools.partial(last_stage, mesh=m), donate_argnums=(1, 3),
                         compiler_options=compiler_options,
                         out_shardings=(replicated(m), replicated(m), [kv_cache_sharding(m)] * len(self.layers[-1]),
                                        replicated(m)))

  @property
  def home(self):
    """Where the sampler's state lives: replicated over the last stage."""
    return replicated(self.meshes[-1])

  def __call__(self, params: list[dict], kv_caches: list, slots, mask_SW, inputs, sampling, tokens):
    kv_caches = list(kv_caches)
    x_TD = None
    for s, step in enumerate(self._lead):
      on, r = replicated(self.meshes[s]), self.layers[s]
      if x_TD is not None:
        x_TD = jax.device_put(x_TD, on)  # the hidden state crosses to this stage's devices
      x_TD, kv_caches[r.start:r.stop] = step(params[s], kv_caches[r.start:r.stop], x_TD, jax.device_put(inputs, on))
    on, r = self.home, self.layers[-1]
    inputs, sampling, tokens = jax.device_put((inputs, sampling, tokens), on)
    out, prompt, kv_caches[r.start:r.stop], slots = self._last(
        params[-1], kv_caches[r.start:r.stop], jax.device_put(x_TD, on), slots, mask_SW, inputs, sampling, tokens)
    return out, prompt, kv_caches, slots

  def _cache_size(self) -> int:
    """Programs compiled over all stages (the runner's `num_compiled`)."""
    return sum(step._cache_size() for step in self._lead + [self._last])

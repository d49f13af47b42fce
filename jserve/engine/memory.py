"""Sizing the KV pool from the memory of one device (with tensor parallelism, each device of the mesh)."""

import jax
import jax.numpy as jnp
from absl import logging

from jserve.config import ModelConfig
from jserve.errors import CapacityError
from sharding.rules import sharded_kv_heads

# Without a measured peak, budget this many bytes of activations per batched token per model-dim
# element: the residual stream, q/k/v, the MLP's gate and up (F wide), and the logits of a bucket.
_CPU_DEFAULT_KV_GIB = 0.5


def _activation_bytes(cfg: ModelConfig, max_num_batched_tokens: int, tp: int = 1) -> int:
  """A bound on one device's step temporaries: a few [T, D] and [T, F / tp] float32 buffers and [B, V]
  logits (kept whole: the sampler may gather them)."""
  t = max_num_batched_tokens
  per_token = 4 * (6 * cfg.hidden_size + (3 * cfg.intermediate_size + 2 * cfg.num_heads * cfg.head_dim) // tp)
  logits = 4 * min(t, 1024) * cfg.vocab_size * 3
  return t * per_token + logits


def page_bytes_per_device(cfg: ModelConfig, page_size: int, kv_dtype, tp: int = 1, pp: int = 1) -> int:
  """Bytes one KV page takes on each device: its share of the pool's KV heads, which has `tp` heads
  (one per device) when the model has fewer KV heads than `tp`, for the layers of the largest stage."""
  heads = sharded_kv_heads(cfg.num_kv_heads, tp) // tp
  layers = -(-cfg.num_layers // pp)  # uneven stages: the first ones get one more layer
  return page_size * 2 * layers * heads * cfg.head_dim * jnp.dtype(kv_dtype).itemsize


def _weight_bytes_on(params, device) -> int:
  return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards
             if s.device == device)


def size_kv_pool(cfg: ModelConfig, params, *, page_size: int, kv_dtype, gpu_memory_utilization: float,
                 kv_cache_gib: float | None, max_num_batched_tokens: int, tp: int = 1, pp: int = 1) -> int:
  """Number of KV pages (including the reserved page 0) that fit the budget of each device.

  `kv_cache_gib` is per device, like the memory limit it replaces (vLLM's convention).
  """
  page_bytes = page_bytes_per_device(cfg, page_size, kv_dtype, tp, pp)
  if kv_cache_gib is not None:
    budget = int(kv_cache_gib * (1 << 30))
  else:
    # The device the weights were put on (a data-parallel replica's, not always device 0); with
    # tensor parallelism every device of the mesh holds the same share, up to a replicated vocabulary,
    # and with stages the first device is on the first stage, which holds the most layers.
    device = min(jax.tree_util.tree_leaves(params)[0].devices(), key=lambda d: d.id)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      budget = int(_CPU_DEFAULT_KV_GIB * (1 << 30))
      logging.info("device %s reports no memory limit; KV pool gets %.1f GiB per device (set kv_cache_gib to "
                   "change)", device.platform, _CPU_DEFAULT_KV_GIB)
    else:
      total = stats["bytes_limit"]
      weights = _weight_bytes_on(params, device)
      activations = _activation_bytes(cfg, max_num_batched_tokens, tp)
      budget = int(total * gpu_memory_utilization) - stats.get("bytes_in_use", weights) - activations
      logging.info("device memory %.1f GiB x %.2f: weights %.1f GiB, activations %.1f GiB, KV pool %.1f GiB"
                   "%s", total / 2**30, gpu_memory_utilization, weights / 2**30, activations / 2**30,
                   budget / 2**30, f" (per device of {tp * pp})" if tp * pp > 1 else "")
      if budget <= 0:
        raise CapacityError(f"no memory left for the KV cache: device has {total / 2**30:.1f} GiB, weights "
                            f"take {weights / 2**30:.1f} GiB; raise gpu_memory_utilization or use more devices")
  return max(budget // page_bytes, 0)


def check_kv_pool(num_pages: int, page_size: int, max_model_len: int) -> None:
  """Refuses a pool (of `num_pages` including the reserved page 0) that cannot hold one sequence of
  `max_model_len`, and logs how many it holds."""
  pages_per_max_seq = -(-max_model_len // page_size)
  if num_pages - 1 < pages_per_max_seq:
    raise CapacityError(
        f"the KV pool holds {(num_pages - 1) * page_size} tokens, less than one sequence of "
        f"max_model_len={max_model_len}; lower max_model_len or give the KV cache more memory")
  logging.info("KV pool: %d pages of %d tokens = %d tokens; %.1f sequences of max_model_len=%d fit",
               num_pages - 1, page_size, (num_pages - 1) * page_size, (num_pages - 1) / pages_per_max_seq,
               max_model_len)

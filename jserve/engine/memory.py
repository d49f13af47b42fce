"""Sizing the KV pool from the device's memory."""

import jax
import jax.numpy as jnp
from absl import logging

from jserve.config import ModelConfig
from jserve.errors import CapacityError

# Without a measured peak, budget this many bytes of activations per batched token per model-dim
# element: the residual stream, q/k/v, the MLP's gate and up (F wide), and the logits of a bucket.
_CPU_DEFAULT_KV_GIB = 0.5


def _activation_bytes(cfg: ModelConfig, max_num_batched_tokens: int) -> int:
  """A bound on the step's temporaries: a few [T, D] and [T, F] float32 buffers and [B, V] logits."""
  t = max_num_batched_tokens
  per_token = 4 * (6 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * cfg.num_heads * cfg.head_dim)
  logits = 4 * min(t, 1024) * cfg.vocab_size * 3
  return t * per_token + logits


def size_kv_pool(cfg: ModelConfig, params, *, page_size: int, kv_dtype, gpu_memory_utilization: float,
                 kv_cache_gib: float | None, max_num_batched_tokens: int) -> int:
  """Number of KV pages (including the reserved page 0) that fit the memory budget."""
  page_bytes = page_size * cfg.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize)
  if kv_cache_gib is not None:
    budget = int(kv_cache_gib * (1 << 30))
  else:
    # The device the weights were put on (a data-parallel replica's, not always device 0).
    device = min(jax.tree_util.tree_leaves(params)[0].devices(), key=lambda d: d.id)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      budget = int(_CPU_DEFAULT_KV_GIB * (1 << 30))
      logging.info("device %s reports no memory limit; KV pool gets %.1f GiB (set kv_cache_gib to change)",
                   device.platform, _CPU_DEFAULT_KV_GIB)
    else:
      total = stats["bytes_limit"]
      weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
      activations = _activation_bytes(cfg, max_num_batched_tokens)
      budget = int(total * gpu_memory_utilization) - stats.get("bytes_in_use", weights) - activations
      logging.info("device memory %.1f GiB x %.2f: weights %.1f GiB, activations %.1f GiB, KV pool %.1f GiB",
                   total / 2**30, gpu_memory_utilization, weights / 2**30, activations / 2**30, budget / 2**30)
      if budget <= 0:
        raise CapacityError(f"no memory left for the KV cache: device has {total / 2**30:.1f} GiB, weights "
                            f"take {weights / 2**30:.1f} GiB; raise gpu_memory_utilization or use more devices")
  return max(budget // page_bytes, 0)

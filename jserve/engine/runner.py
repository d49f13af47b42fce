"""Builds each step's ragged batch on the host and runs it as one jit call on the device.

The batch is padded to a bucket: the token count to the next power of two (from
`MIN_TOKEN_BUCKET` up to `max_num_batched_tokens`), the sequence count to
`min(max_num_seqs, token bucket)`, so there is exactly one compiled program per
token bucket and all of them are compiled at start-up. The KV pool (one array
per layer) is donated into the step and replaced by its output, so it is
updated in place.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jserve.config import ModelConfig
from jserve.engine.request import Request
from jserve.engine.sampler import SamplingInputs, sample
from jserve.models.llama import StepInputs, compute_logits, forward

MIN_TOKEN_BUCKET = 16


def token_buckets(max_num_batched_tokens: int) -> list[int]:
  buckets, b = [], MIN_TOKEN_BUCKET
  while b < max_num_batched_tokens:
    buckets.append(b)
    b *= 2
  buckets.append(max_num_batched_tokens)
  return buckets


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerConfig:
  num_pages: int
  page_size: int
  max_num_seqs: int
  max_num_batched_tokens: int
  max_model_len: int
  kv_dtype: str = "bfloat16"
  attn_impl: str = "auto"

  @property
  def pages_per_seq(self) -> int:
    return -(-self.max_model_len // self.page_size)


def _step(params, kv_caches, inputs: StepInputs, sampling: SamplingInputs, *, cfg: ModelConfig, attn_impl: str):
  x_BD, kv_caches = forward(params, kv_caches, inputs, cfg, attn_impl=attn_impl)
  logits_BV = compute_logits(params, x_BD, cfg)
  tokens_B, logprobs_B = sample(logits_BV, sampling)
  return tokens_B, logprobs_B, kv_caches


class ModelRunner:
  """Owns the params and the KV pool on the device; runs one step per call."""

  def __init__(self, cfg: ModelConfig, params: dict, rc: RunnerConfig):
    self.cfg = cfg
    self.params = params
    self.rc = rc
    self.buckets = token_buckets(rc.max_num_batched_tokens)
    shape = (rc.num_pages, rc.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    self.kv_caches = [jnp.zeros(shape, dtype=rc.kv_dtype) for _ in range(cfg.num_layers)]
    self._step = jax.jit(functools.partial(_step, cfg=cfg, attn_impl=rc.attn_impl), donate_argnums=(1,))

  def bucket_for(self, num_tokens: int) -> int:
    for b in self.buckets:
      if num_tokens <= b:
        return b
    raise AssertionError(f"{num_tokens} tokens exceed max_num_batched_tokens={self.rc.max_num_batched_tokens}")

  def num_compiled(self) -> int:
    """Programs compiled so far (a request must never add one after start-up)."""
    return self._step._cache_size()

  def _empty_inputs(self, num_tokens: int):
    rc = self.rc
    num_seqs = min(rc.max_num_seqs, num_tokens)
    inputs = StepInputs(
        token_ids_T=np.zeros(num_tokens, np.int32),
        positions_T=np.zeros(num_tokens, np.int32),
        slots_T=np.full(num_tokens, rc.num_pages * rc.page_size, np.int32),
        cu_q_lens_E=np.zeros(num_seqs + 1, np.int32),
        kv_lens_B=np.zeros(num_seqs, np.int32),
        page_indices_BP=np.zeros((num_seqs, rc.pages_per_seq), np.int32),
        num_seqs=np.zeros(1, np.int32),
        logits_indices_B=np.zeros(num_seqs, np.int32))
    sampling = SamplingInputs(
        temperature_B=np.zeros(num_seqs, np.float32), top_k_B=np.zeros(num_seqs, np.int32),
        top_p_B=np.ones(num_seqs, np.float32), min_p_B=np.zeros(num_seqs, np.float32),
        seed_B=np.zeros(num_seqs, np.int32), position_B=np.zeros(num_seqs, np.int32))
    return inputs, sampling

  def compile_all(self, progress=None):
    """Compiles (or loads from the persistent cache) the step of every bucket."""
    start = time.monotonic()
    for i, b in enumerate(self.buckets):
      inputs, sampling = self._empty_inputs(b)
      tokens, _, self.kv_caches = self._step(self.params, self.kv_caches, inputs, sampling)
      tokens.block_until_ready()
      if progress:
        progress(i + 1, len(self.buckets), b)
    logging.info("compiled %d step buckets (%s tokens) in %.1f s", len(self.buckets),
                 ",".join(map(str, self.buckets)), time.monotonic() - start)

  def build(self, requests: list[Request], num_new_tokens: list[int], page_tables: dict[str, list[int]]):
    """The padded ragged batch of one step, in numpy."""
    rc = self.rc
    total = sum(num_new_tokens)
    inputs, sampling = self._empty_inputs(self.bucket_for(total))
    inputs.cu_q_lens_E[:] = total
    inputs.cu_q_lens_E[0] = 0
    inputs.num_seqs[0] = len(requests)
    offset = 0
    for i, (req, n) in enumerate(zip(requests, num_new_tokens)):
      start = req.num_computed_tokens
      end = start + n
      table = page_tables[req.request_id]
      pos = np.arange(start, end, dtype=np.int32)
      inputs.token_ids_T[offset:offset + n] = req.all_token_ids[start:end]
      inputs.positions_T[offset:offset + n] = pos
      inputs.slots_T[offset:offset + n] = np.asarray(table, np.int32)[pos // rc.page_size] * rc.page_size + (
          pos % rc.page_size)
      offset += n
      inputs.cu_q_lens_E[i + 1] = offset
      inputs.kv_lens_B[i] = end
      inputs.page_indices_BP[i, :len(table)] = table
      inputs.logits_indices_B[i] = offset - 1
      p = req.params
      sampling.temperature_B[i] = p.temperature
      sampling.top_k_B[i] = max(p.top_k, 0)
      sampling.top_p_B[i] = p.top_p
      sampling.min_p_B[i] = p.min_p
      sampling.seed_B[i] = req.seed
      sampling.position_B[i] = end
    return inputs, sampling

  def execute(self, inputs: StepInputs, sampling: SamplingInputs):
    """Runs one step; returns device arrays (tokens [B], logprobs [B]) without waiting for them."""
    tokens_B, logprobs_B, self.kv_caches = self._step(self.params, self.kv_caches, inputs, sampling)
    return tokens_B, logprobs_B

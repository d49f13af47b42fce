"""LLMEngine: requests in, one scheduled ragged step at a time, outputs out.

Single-threaded by design: the servers run it in its own thread and talk to it
through queues (see jserve/server). `step()` schedules, builds the batch, runs
the jit step, then appends sampled tokens, detokenizes and checks stop
conditions; finished and aborted requests free their pages at once.
"""

import dataclasses
import itertools
import os
import time

import jax
import numpy as np
from absl import logging

from jserve.config import ModelConfig, load_model_config
from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.memory import size_kv_pool
from jserve.engine.outputs import OutputProcessor
from jserve.engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams
from jserve.engine.runner import ModelRunner, RunnerConfig
from jserve.engine.scheduler import Scheduler, SchedulerConfig
from jserve.errors import CapacityError, ConfigError, InvalidRequestError
from jserve.tokenizer import Tokenizer
from jserve.weights import load_params, resolve_dtype

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_model")
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jserve", "jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  """Everything the engine needs to start. Field names follow vLLM's engine arguments."""

  model: str | None = None
  dtype: str = "bfloat16"
  max_model_len: int | None = None
  max_num_seqs: int = 256
  max_num_batched_tokens: int = 8192
  page_size: int = 16
  enable_prefix_caching: bool = True
  gpu_memory_utilization: float = 0.9
  kv_cache_gib: float | None = None
  num_pages: int | None = None
  scheduling_policy: str = "fcfs"
  seed: int = 0
  compilation_cache_dir: str | None = DEFAULT_COMPILATION_CACHE
  attn_impl: str = "auto"
  tensor_parallel_size: int = 1
  pipeline_parallel_size: int = 1

  def __post_init__(self):
    if self.page_size % 8:
      raise ConfigError(f"page_size={self.page_size}: need a multiple of 8")
    if not 0 < self.gpu_memory_utilization <= 1:
      raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization}: need a value in (0, 1]")
    if self.tensor_parallel_size != 1 or self.pipeline_parallel_size != 1:
      raise ConfigError(f"tensor_parallel_size={self.tensor_parallel_size}, pipeline_parallel_size="
                        f"{self.pipeline_parallel_size}: the engine runs on one device for now")

  @property
  def model_dir(self) -> str:
    return self.model or DEFAULT_MODEL_DIR


def _enable_compilation_cache(path: str | None):
  if not path:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class LLMEngine:
  """The engine of one model replica."""

  def __init__(self, config: EngineConfig, progress=None):
    self.config = config
    _enable_compilation_cache(config.compilation_cache_dir)
    model_dir = config.model_dir
    self.model_config: ModelConfig = load_model_config(model_dir)
    self.tokenizer = Tokenizer(model_dir)
    cfg = self.model_config
    self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
      raise ConfigError(f"max_model_len={config.max_model_len} exceeds the model's "
                        f"max_position_embeddings={cfg.max_position_embeddings}")
    self.max_num_batched_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
    self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids | set(cfg.eos_token_ids))
    logging.info("loading %s from %s", cfg.architecture, model_dir)
    self.params = load_params(model_dir, cfg, config.dtype)
    kv_dtype = resolve_dtype(config.dtype)
    num_pages = config.num_pages or size_kv_pool(
        cfg, self.params, page_size=config.page_size, kv_dtype=kv_dtype,
        gpu_memory_utilization=config.gpu_memory_utilization, kv_cache_gib=config.kv_cache_gib,
        max_num_batched_tokens=self.max_num_batched_tokens)
    pages_per_max_seq = -(-self.max_model_len // config.page_size)
    if num_pages - 1 < pages_per_max_seq:
      raise CapacityError(
          f"the KV pool holds {(num_pages - 1) * config.page_size} tokens, less than one sequence of "
          f"max_model_len={self.max_model_len}; lower max_model_len or give the KV cache more memory")
    logging.info("KV pool: %d pages of %d tokens = %d tokens; %.1f sequences of max_model_len=%d fit",
                 num_pages - 1, config.page_size, (num_pages - 1) * config.page_size,
                 (num_pages - 1) / pages_per_max_seq, self.max_model_len)
    self.kv = KVCacheManager(num_pages, config.page_size, config.enable_prefix_caching)
    self.scheduler = Scheduler(SchedulerConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
        max_model_len=self.max_model_len, policy=config.scheduling_policy), self.kv)
    self.runner = ModelRunner(cfg, self.params, RunnerConfig(
        num_pages=num_pages, page_size=config.page_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
        kv_dtype=kv_dtype, attn_impl=config.attn_impl))
    self.runner.compile_all(progress)
    self.outputs = OutputProcessor(self.tokenizer)
    self.requests: dict[str, Request] = {}
    self._seed_rng = np.random.default_rng(config.seed)
    self._ids = itertools.count()
    self.num_steps = 0

  # --- requests -------------------------------------------------------------------------------
  def add_request(self, request_id: str | None, prompt: str | list[int] | None,
                  params: SamplingParams | None = None, *, priority: int = 0,
                  arrival_time: float | None = None, stream: bool = False) -> str:
    """Validates and queues a request; raises InvalidRequestError / CapacityError if it can never run."""
    params = params or SamplingParams()
    request_id = str(next(self._ids)) if request_id is None else str(request_id)
    if request_id in self.requests:
      raise InvalidRequestError(f"request_id {request_id!r} is already in use")
    if isinstance(prompt, str):
      if not prompt:
        raise InvalidRequestError("prompt is empty")
      text, token_ids = prompt, self.tokenizer.encode(prompt)
    elif prompt is not None:
      text, token_ids = None, [int(t) for t in prompt]
    else:
      raise InvalidRequestError("prompt is missing")
    if not token_ids:
      raise InvalidRequestError("prompt is empty")
    vocab = self.model_config.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
      raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if params.logit_bias:
      bad = [t for t in params.logit_bias if not 0 <= int(t) < vocab]
      if bad:
        raise InvalidRequestError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(token_ids) >= self.max_model_len:
      raise InvalidRequestError(f"prompt has {len(token_ids)} tokens; max_model_len={self.max_model_len} "
                                f"leaves no room for output")
    if params.max_tokens is None:
      params = dataclasses.replace(params, max_tokens=self.max_model_len - len(token_ids))
    if len(token_ids) + params.max_tokens > self.max_model_len:
      raise InvalidRequestError(
          f"prompt ({len(token_ids)} tokens) plus max_tokens={params.max_tokens} exceeds "
          f"max_model_len={self.max_model_len}")
    need = self.kv.pages_for(len(token_ids) + params.max_tokens)
    if need > self.kv.num_usable_pages:
      raise CapacityError(f"request {request_id} needs {need} KV pages, the whole pool has "
                          f"{self.kv.num_usable_pages}")
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**31 - 1))
    req = Request(request_id, token_ids, params, prompt=text, priority=priority, arrival_time=arrival_time,
                  eos_token_ids=self.eos_token_ids, seed=seed & 0x7FFFFFFF)
    self.requests[request_id] = req
    self.outputs.add(req, stream=stream)
    self.scheduler.add(req)
    return request_id

  def abort(self, request_id: str) -> RequestOutput | None:
    """Stops a request and frees its pages at once. Unknown or finished ids are ignored."""
    req = self.requests.pop(str(request_id), None)
    if req is None:
      return None
    self.scheduler.remove(req)
    req.status = RequestStatus.FINISHED
    req.finish_reason = FinishReason.ABORT
    return self.outputs.finish(req)

  def has_unfinished(self) -> bool:
    return self.scheduler.num_unfinished > 0

  # --- the step -------------------------------------------------------------------------------
  def step(self) -> list[RequestOutput]:
    """Runs one engine step; returns outputs of requests that streamed new tokens or finished."""
    batch = self.scheduler.schedule()
    if not batch:
      return []
    inputs, sampling = self.runner.build(batch.requests, batch.num_new_tokens, self.kv.page_tables)
    tokens_B, logprobs_B = self.runner.execute(inputs, sampling)
    tokens_B, logprobs_B = np.asarray(tokens_B), np.asarray(logprobs_B)
    self.num_steps += 1
    now = time.monotonic()
    results = []
    for i, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
      req.num_computed_tokens += n
      self.kv.cache_full_pages(req)
      if req.num_computed_tokens < req.num_tokens:
        continue  # a prompt chunk: nothing sampled yet
      token = int(tokens_B[i])
      req.all_token_ids.append(token)
      if req.first_token_time is None:
        req.first_token_time = now
      out = self.outputs.append(req, token, float(logprobs_B[i]), self.max_model_len)
      if req.is_finished:
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
      if out is not None:
        results.append(out)
    return results

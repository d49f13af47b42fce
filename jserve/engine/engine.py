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
from jserve.engine import multihost
from jserve.engine.engine_config import (CPU_DEFAULT_BATCHED_TOKENS, DEFAULT_COMPILATION_CACHE, DEFAULT_MODEL_DIR,
                                        KV_CACHE_DTYPES, EngineConfig, resolve_kv_cache_dtype)
from jserve.engine.groups import CompletionGroup
from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.memory import check_kv_pool, size_kv_pool
from jserve.engine.placement import (engine_mesh, load_engine_params, quantize_engine_params, replica_devices,
                                     stage_count, tensor_size)
from jserve.engine.outputs import OutputProcessor
from jserve.engine.request import (MAX_EOS_TOKEN_IDS, PLACEHOLDER, FinishReason, Request, RequestOutput,
                                   RequestStatus, SamplingParams)
from jserve.engine.runner import ModelRunner, RunnerConfig
from jserve.engine.sampler import PLAIN, request_path
from jserve.engine.scheduler import Scheduler, SchedulerConfig
from jserve.engine.startup import StartupClock
from jserve.errors import CapacityError, ConfigError, InvalidRequestError
from jserve.prequantized import checkpoint_quantization
from jserve.tokenizer import Tokenizer

# EngineConfig and its defaults live in engine_config.py; they are imported from here too (the public name).
__all__ = ["CPU_DEFAULT_BATCHED_TOKENS", "DEFAULT_COMPILATION_CACHE", "DEFAULT_MODEL_DIR", "KV_CACHE_DTYPES",
           "EngineConfig", "LLMEngine", "resolve_kv_cache_dtype"]


class _KVCacheManager(KVCacheManager):
  """The page pool, except that a request asking for prompt logprobs computes its whole prompt:
  positions served from the prefix cache would have no logits."""

  def find_cached_prefix(self, req: Request) -> list[int]:
    if req.params.prompt_logprobs is not None:
      return []
    return super().find_cached_prefix(req)


def _sampler_paths(setting: str) -> str:
  if setting == "auto":
    return "host" if jax.default_backend() == "gpu" else "device"
  return setting


def _enable_compilation_cache(path: str | None):
  if not path:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program, however quick to compile: a warm start should compile nothing (on an H200, 18 of the
  # 8B engine's 33 programs fell under the default 0.5 s and were compiled again at every start, 10 s).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


class LLMEngine:
  """The engine of one model replica."""

  def __init__(self, config: EngineConfig, progress=None, devices=None):
    """`devices`: where this replica runs (it takes the first `pipeline_parallel_size` x
    `tensor_parallel_size` of them); default: JAX's default device, or this host's first devices.

    `startup_s`: seconds per start-up phase (config and tokenizer, weights on the devices, KV pool
    and runner, compiling or loading every step program); `startup_programs`: XLA programs built
    meanwhile, and how many came from the persistent cache (see jserve/engine/startup.py)."""
    clock = StartupClock()
    self.config = config
    backend = (devices[0].platform if devices else jax.default_backend())
    if config.matmul_impl in ("gpu", "hopper") and backend != "gpu":
      raise ConfigError(f"matmul_impl={config.matmul_impl!r} is a GPU kernel and this engine runs on {backend}: "
                        "use 'auto' (the kernel where it runs, XLA elsewhere) or 'xla'")
    _enable_compilation_cache(config.compilation_cache_dir)
    model_dir = config.model_dir
    self.model_config: ModelConfig = load_model_config(model_dir)
    cfg = self.model_config
    # A pre-quantized checkpoint says how its weights are stored (an unsupported one is refused here):
    # quantization=None reads it so, as vLLM reads the config's; "fp8" agrees. Dummy weights are
    # random full-precision ones whatever the checkpoint holds, quantized only if asked.
    stored = None if config.load_format == "dummy" else checkpoint_quantization(model_dir)
    self.quantization = "fp8" if stored is not None else config.quantization
    if config.activation_quantization and not self.quantization:
      raise ConfigError(f"activation_quantization={config.activation_quantization!r} needs fp8 weights: set "
                        "quantization='fp8' or serve an fp8 checkpoint")
    self.tokenizer = Tokenizer(model_dir)
    self._set_limits(config, cfg)
    logging.info("loading %s from %s", cfg.architecture, model_dir)
    self.num_processes = jax.process_count()
    devices = replica_devices(config, devices, self.num_processes)
    self.mesh = engine_mesh(cfg, config.tensor_parallel_size, devices, config.pipeline_parallel_size)
    clock.lap("config")
    self.params = load_engine_params(model_dir, cfg, config.dtype, self.mesh, config.load_format)
    jax.block_until_ready(self.params)  # else the weights' last transfers are timed as compiling
    if self.quantization:
      # Before the KV pool is sized: the memory the original weights free goes to the pool.
      self.params = quantize_engine_params(self.params, config, stored, self.mesh)
    clock.lap("weights")
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, config.dtype)
    # What the model-info answers say beside the weights' quantization: the pool's element type as numpy
    # names it ("bfloat16", "float8_e4m3fn"), and "fp8" when the projections' inputs are rounded too.
    self.kv_cache_dtype = kv_dtype.name
    self.activation_quantization = config.activation_quantization
    num_pages = config.num_pages or size_kv_pool(
        cfg, self.params, page_size=config.page_size, kv_dtype=kv_dtype,
        gpu_memory_utilization=config.gpu_memory_utilization, kv_cache_gib=config.kv_cache_gib,
        max_num_batched_tokens=self.max_num_batched_tokens, tp=tensor_size(self.mesh), pp=stage_count(self.mesh))
    check_kv_pool(num_pages, config.page_size, self.max_model_len)
    self.kv = _KVCacheManager(num_pages, config.page_size, config.enable_prefix_caching)
    self.scheduler = Scheduler(SchedulerConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
        max_model_len=self.max_model_len, policy=config.scheduling_policy,
        kv_admission=config.kv_admission), self.kv)
    self.runner = ModelRunner(cfg, self.params, RunnerConfig(
        num_pages=num_pages, page_size=config.page_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
        kv_dtype=kv_dtype, attn_impl=config.attn_impl, matmul_impl=config.matmul_impl,
        quantization=self.quantization, num_decode_steps=config.num_decode_steps,
        sampler_paths=_sampler_paths(config.sampler_paths), precompile_staged=config.precompile_staged_sampler,
        program_cache_dir=(os.path.join(config.compilation_cache_dir, "programs")
                           if config.program_cache and config.compilation_cache_dir else None)),
        mesh=self.mesh)
    clock.lap("kv_pool")
    self.runner.compile_all(progress, threads=config.compile_threads)
    clock.lap("compile")
    self.startup_s, self.startup_programs = clock.phases, clock.programs()
    logging.info("start-up: %s", clock.summary())
    self.is_leader = jax.process_index() == 0
    if self.num_processes > 1 and self.is_leader:
      self.runner._channel = multihost.LeaderChannel()
    self.outputs = OutputProcessor(self.tokenizer)
    self.requests: dict[str, Request] = {}
    self._groups: dict[str, CompletionGroup] = {}  # user request id -> its children, when n > 1
    self._grammar = None  # a GrammarBackend, made when the first structured request arrives
    self._num_constrained = 0  # live requests with a grammar: while any, steps do not overlap
    self._in_flight = None  # the dispatched step whose results the host has not read
    self._seed_rng = np.random.default_rng(config.seed)
    self._ids = itertools.count()
    self.num_steps = 0

  def _set_limits(self, config: EngineConfig, cfg: ModelConfig):
    """max_model_len, the step's token budget and the EOS ids, each checked against the model."""
    self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
      raise ConfigError(f"max_model_len={config.max_model_len} exceeds the model's "
                        f"max_position_embeddings={cfg.max_position_embeddings}")
    budget = config.max_num_batched_tokens
    if budget is None:
      # A CPU step of thousands of tokens takes seconds; small buckets also compile quicker.
      budget = CPU_DEFAULT_BATCHED_TOKENS if jax.default_backend() == "cpu" else 8192
    self.max_num_batched_tokens = max(budget, config.max_num_seqs)
    self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids | set(cfg.eos_token_ids))
    if len(self.eos_token_ids) > MAX_EOS_TOKEN_IDS:
      raise ConfigError(f"the model has {len(self.eos_token_ids)} EOS token ids; at most {MAX_EOS_TOKEN_IDS}")

  # --- requests -------------------------------------------------------------------------------
  def add_request(self, request_id: str | None, prompt: str | list[int] | None,
                  params: SamplingParams | None = None, *, priority: int = 0,
                  arrival_time: float | None = None, stream: bool = False) -> str:
    """Validates and queues a request; raises InvalidRequestError / CapacityError if it can never run."""
    params = params or SamplingParams()
    request_id = str(next(self._ids)) if request_id is None else str(request_id)
    if request_id in self.requests or request_id in self._groups:
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
    if params.stop_token_ids:
      bad = [t for t in params.stop_token_ids if t >= vocab]
      if bad:
        raise InvalidRequestError(f"stop_token_ids token id {bad[0]} is outside the vocabulary [0, {vocab})")
    children = self._make_children(request_id, token_ids, text, params, priority, arrival_time)
    deferred = []
    if len(children) > 1:
      # With prefix caching the others wait for the first child's prompt pages, then share them.
      deferred = children[1:] if self.config.enable_prefix_caching else []
      self._groups[request_id] = CompletionGroup(n=len(children), stream=stream, deferred=deferred)
    for req in children:
      self.requests[req.request_id] = req
      self.outputs.add(req, stream=stream)
      if req not in deferred:
        self.scheduler.add(req)
    return request_id

  def _make_children(self, request_id, token_ids, text, params, priority, arrival_time) -> list[Request]:
    """One Request per completion; children of n > 1 get ids "<id>-<index>" and seeds seed + index."""
    n = params.n
    base_seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**31 - 1))
    children = []
    for index in range(n):
      child_params = params
      if index > 0 and params.prompt_logprobs is not None:
        # One child reports the prompt's logprobs; the others may then share its prefix pages.
        child_params = dataclasses.replace(params, prompt_logprobs=None)
      rid = request_id if n == 1 else f"{request_id}-{index}"
      req = Request(rid, token_ids, child_params, prompt=text, priority=priority, arrival_time=arrival_time,
                    eos_token_ids=self.eos_token_ids, seed=(base_seed + index) & 0x7FFFFFFF, index=index,
                    parent_id=request_id if n > 1 else None)
      if params.structured:
        req.grammar = self._grammar_backend().matcher(params)
        self._num_constrained += 1
      children.append(req)
    return children

  def _grammar_backend(self):
    if self._grammar is None:
      from jserve.engine.structured_output import GrammarBackend
      self._grammar = GrammarBackend(self.config.model_dir, self.model_config.vocab_size, self.eos_token_ids)
    return self._grammar

  def abort(self, request_id: str) -> RequestOutput | None:
    """Stops a request (all its completions) and frees its pages at once. Unknown or finished ids are ignored."""
    request_id = str(request_id)
    group = self._groups.pop(request_id, None)
    if group is None:
      return self._abort_one(request_id)
    outputs, last = list(group.finals.values()), None
    for index in range(group.n):
      out = self._abort_one(f"{request_id}-{index}")
      if out is not None:
        outputs += out.outputs
        last = out
    if last is None:
      return None
    return dataclasses.replace(last, request_id=request_id, finished=True, prompt_logprobs=group.prompt_logprobs,
                               outputs=sorted(outputs, key=lambda c: c.index))

  def _abort_one(self, request_id: str) -> RequestOutput | None:
    req = self.requests.get(request_id)
    if req is None:
      return None
    self._drop(req)
    while req.all_token_ids and req.all_token_ids[-1] == PLACEHOLDER:
      req.all_token_ids.pop()
    req.status = RequestStatus.FINISHED
    req.finish_reason = FinishReason.ABORT
    return self.outputs.finish(req)

  # --- several processes ---------------------------------------------------------------------
  def follow(self):
    """A follower process's whole life: repeats the leader's device commands until it sends STOP."""
    if self.is_leader:
      raise ConfigError("follow() is for processes other than process 0")
    while True:
      command, buf_N, arg = multihost.receive()
      if command == multihost.STOP:
        return
      self.runner.follow(command, buf_N, arg)

  def stop_followers(self):
    """The leader tells the followers to return from `follow()` (call it once, when serving ends)."""
    if self.num_processes > 1 and self.is_leader and self.runner._channel is not None:
      while self._in_flight is not None or self.has_unfinished():
        self.step()
      self.runner._channel.send(multihost.STOP, np.zeros(0, np.int32))
      self.runner._channel = None

  def has_unfinished(self) -> bool:
    return self.scheduler.num_unfinished > 0 or self._in_flight is not None

  # --- the step -------------------------------------------------------------------------------
  def step(self) -> list[RequestOutput]:
    """Runs one engine step; returns outputs of requests that streamed new tokens or finished.

    Overlapped (`overlap_steps`, the default): the step is scheduled, built and queued on the
    device before the host reads the tokens of the step before it, so the device never waits for
    the host between steps. Its sampled tokens stay on the device: a sequence's next token is a
    PLACEHOLDER on the host, and the next step reads it from the previous step's output. Outputs
    therefore come one call later. A request that finishes at step N (a stop token or string) has
    had one more token computed by step N+1; that token is dropped and its pages are freed after
    step N+1 in device order. Steps with a grammar-constrained request run one at a time: the
    grammar's mask for step N+1 needs the token of step N.
    """
    if self._overlap_now():
      previous, self._in_flight = self._in_flight, self._dispatch()
      return self._resolve(previous)
    results = self._resolve(self._in_flight)
    self._in_flight = None
    return results + self._resolve(self._dispatch())

  def _overlap_now(self) -> bool:
    return self.config.overlap_steps and self.runner.can_overlap and not self._num_constrained

  def _dispatch(self):
    """Schedules the next step and queues it on the device; returns what `_resolve` needs, or None."""
    batch = self.scheduler.schedule()
    if not batch:
      return None
    if self._can_burst(batch):
      return self._dispatch_burst(batch)
    sampling_rows = [i for i, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens))
                     if req.num_computed_tokens + n >= req.num_tokens]
    constrained = {batch.requests[i].request_id for i in sampling_rows if batch.requests[i].grammar is not None}
    inputs, sampling, tokens, plan = self.runner.build(batch.requests, batch.num_new_tokens, self.kv.page_tables,
                                                       constrained)
    if constrained:
      rows = [(i, batch.requests[i].grammar) for i in sampling_rows if batch.requests[i].request_id in constrained]
      self.runner.set_mask(self._grammar.fill_async(rows, len(sampling.temperature_B)))
    out, prompt = self.runner.execute(inputs, sampling, tokens)
    positions = {}  # row -> where its sampled token goes in all_token_ids
    for req, n in zip(batch.requests, batch.num_new_tokens):
      req.num_computed_tokens += n
    for i in sampling_rows:
      req = batch.requests[i]
      positions[i] = req.num_tokens
      # The token that ends the request by length is never fed to another step: no placeholder, so
      # the scheduler leaves the request alone until the host has read it.
      if req.num_output_tokens + 1 < req.params.max_tokens and req.num_tokens + 1 < self.max_model_len:
        req.all_token_ids.append(PLACEHOLDER)
        req.pending_row = i
    self.num_steps += 1
    return batch, positions, out, prompt, plan

  def _can_burst(self, batch) -> bool:
    """Whether the batch may run `num_decode_steps` steps in one call: it only decodes, asks for nothing
    computed per step on the host (grammar, logprobs), no request can end by length within the steps,
    every request gets the pages of all of them, and, where the host picks the sampler's path, every
    row is plain (bursts are compiled for that path only)."""
    steps = self.config.num_decode_steps
    if self.runner._burst is None:
      return False
    for req, n in zip(batch.requests, batch.num_new_tokens):
      p = req.params
      if (n != 1 or req.num_computed_tokens + 1 < req.num_tokens or req.grammar is not None
          or p.logprobs is not None or p.prompt_logprobs is not None
          or req.num_output_tokens + steps >= p.max_tokens or req.num_tokens + steps >= self.max_model_len
          or (self.runner.host_paths and request_path(p) != PLAIN)):
        return False
    return all(self.kv.allocate(req, steps) for req in batch.requests)

  def _dispatch_burst(self, batch):
    steps = self.config.num_decode_steps
    inputs, sampling, tokens, plan = self.runner.build(batch.requests, batch.num_new_tokens, self.kv.page_tables)
    out_KB = self.runner.execute_burst(inputs, sampling, tokens)
    positions = {}
    for i, req in enumerate(batch.requests):
      req.num_computed_tokens += steps  # the input token and the first steps - 1 sampled ones
      self.runner.slot_table.advance(req.request_id, steps - 1)
      positions[i] = req.num_tokens
      req.all_token_ids += [PLACEHOLDER] * steps
      req.pending_row = i  # the last step's token, which the next call reads on the device
    self.num_steps += steps
    return batch, positions, out_KB, None, None

  def _resolve(self, dispatched) -> list[RequestOutput]:
    """Reads a dispatched step's results (waiting for it) and records them on its requests."""
    if dispatched is None:
      return []
    batch, positions, out, prompt, plan = dispatched
    if plan is None:  # a burst of decode steps: tokens [K, B]
      result = None
      tokens = self.runner._to_host(out).T.tolist()
    else:
      result = self.runner.fetch(out, prompt, plan)
      tokens = [[t] for t in result.tokens.tolist()]
    now = time.monotonic()
    results = []
    for i, req in enumerate(batch.requests):
      if req.is_finished:
        continue  # aborted, or finished at the previous step: this step's token for it is dropped
      if plan is not None and req.request_id in plan.prompt_rows:
        offset, count, first = plan.prompt_rows[req.request_id]
        rows = slice(offset, offset + count)
        self.outputs.add_prompt_logprobs(req, first, result.prompt_logprobs[rows], result.prompt_top_ids[rows],
                                         result.prompt_top_logprobs[rows])
      position = positions.get(i)
      if position is None:  # a prompt chunk: nothing sampled yet
        self.kv.cache_full_pages(req)  # (does nothing if preempted since)
        self._release_deferred(req)
        continue
      new = tokens[i]
      # all_token_ids ends at `position` or in placeholders from there: this call's, then the next one's.
      ids = req.all_token_ids
      later = len(ids) - position - len(new)
      del ids[position:]
      if req.first_token_time is None:
        req.first_token_time = now
      outs = []
      for token in new:
        ids.append(token)
        if result is not None and result.logprobs is not None:
          out = self.outputs.append(req, token, self.max_model_len, float(result.logprobs[i]), result.top_ids[i],
                                    result.top_logprobs[i])
        else:
          out = self.outputs.append(req, token, self.max_model_len)
        if out is not None:
          outs.append(out)
        if req.is_finished:
          break  # the tokens after the one that finished it are dropped
      self.kv.cache_full_pages(req)
      if req.parent_id is not None:
        self._release_deferred(req)
      if req.is_finished:
        self._drop(req)
      elif later > 0:
        ids += [PLACEHOLDER] * later
      for out in outs:
        out = self._to_parent(req, out)
        if out is not None:
          results.append(out)
    return results

  def _drop(self, req: Request):
    self.scheduler.remove(req)
    self.runner.release(req.request_id)
    self.requests.pop(req.request_id, None)
    if req.grammar is not None:
      self._num_constrained -= 1

  def _release_deferred(self, req: Request):
    """Queues the other children of an n > 1 request once the first has its prompt in cached pages."""
    group = self._groups.get(req.parent_id) if req.parent_id else None
    if group and group.deferred and req.index == 0 and req.num_computed_tokens >= req.num_prompt_tokens:
      for child in group.deferred:
        self.scheduler.add(child)
      group.deferred = []

  def _to_parent(self, req: Request, out: RequestOutput) -> RequestOutput | None:
    """A child's output as its parent's: streamed deltas pass through; a non-streamed request reports
    once, when all its completions are done."""
    if req.parent_id is None:
      return out
    parent_out, done = self._groups[req.parent_id].collect(req, out)
    if done:
      del self._groups[req.parent_id]
    return parent_out

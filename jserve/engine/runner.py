"""Runs each step's ragged batch as one jit call on the device.

The batch is built on the host by step_batch.py; the device programs are in step.py. The batch is
padded to a bucket:
the token count to the next power of two (from `MIN_TOKEN_BUCKET` up to
`max_num_batched_tokens`), the sequence count to
`min(max_num_seqs, token bucket)`, so there is one compiled program per token
bucket (two where the host picks the sampler's path, `RunnerConfig.sampler_paths`)
and all of them are compiled at start-up. The KV pool (one array
per layer) is donated into the step and replaced by its output, so it is
updated in place.
"""

import concurrent.futures
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jserve.config import ModelConfig
from jserve.engine.request import BIAS_TABLE_SIZE, Request
from jserve.engine.slot_table import SlotTable
from jserve.engine.step_batch import BatchBuilder, StepPlan
from jserve.engine.sampler import SamplingInputs, SlotState, host_path, write_slots
from jserve.engine import multihost
from jserve.engine.placement import default_device
from jserve.engine.programs import ProgramCache, compiler_options
from jserve.engine.stages import PipelineStep
from jserve.engine.step import (TokenInputs, _decode_burst, _last_stage, _prompt_logprobs, _step, pack_host_inputs,
                                unpack_host)
from jserve.models.llama import StepInputs, param_specs
from jserve.models.quant import quantizes_activations
from sharding import distributed
from sharding.mesh import STAGE
from sharding.pipeline import split_params
from sharding.rules import kv_cache_shardings, make_kv_caches, replicated

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
  matmul_impl: str = "xla"  # see EngineConfig.matmul_impl
  # EngineConfig.quantization. The runner reads it nowhere (quantized weights come in `params`), but
  # it keys the program cache: a stored program is found by this config's repr.
  quantization: str | None = None
  num_decode_steps: int = 1  # decode steps per device call for decode-only batches (see `_decode_burst`)
  # "host": the host picks the sampler's path and each bucket has a program per path (no conditional
  # in a plain batch's step: on a GPU a conditional waits for the device); "device": one program per
  # bucket, the path picked on the device (`sampler.sample`).
  sampler_paths: str = "device"
  precompile_staged: bool = True  # with host paths: compile the staged programs at start-up (else on first use)
  # Where the step and burst programs are kept as exported modules (jserve/engine/programs.py), so a
  # warm start skips tracing and lowering; None: traced and lowered at every start. One device only.
  program_cache_dir: str | None = None

  @property
  def pages_per_seq(self) -> int:
    return -(-self.max_model_len // self.page_size)


@dataclasses.dataclass
class StepResult:
  """A step's results, fetched to the host. Arrays are None where the step did not compute them."""

  tokens: np.ndarray
  logprobs: np.ndarray | None = None
  top_ids: np.ndarray | None = None
  top_logprobs: np.ndarray | None = None
  prompt_logprobs: np.ndarray | None = None
  prompt_top_ids: np.ndarray | None = None
  prompt_top_logprobs: np.ndarray | None = None


class ModelRunner:
  """Owns the params, the KV pool and the sampler's slot state on the device; runs one step per call."""

  def __init__(self, cfg: ModelConfig, params: dict, rc: RunnerConfig, mesh: jax.sharding.Mesh | None = None):
    """`mesh`: the replica's mesh (stage x tensor), with `params` placed on it by `sharding.rules`;
    None runs on JAX's default device. With pipeline stages `self.params` is the per-stage list."""
    self.cfg = cfg
    self.params = params
    self.rc = rc
    self.mesh = mesh
    self.num_stages = 1 if mesh is None else mesh.shape[STAGE]
    self.buckets = token_buckets(rc.max_num_batched_tokens)
    options = compiler_options(quantizes_activations(params))
    self.num_slots = rc.max_num_seqs
    slots = SlotState.zeros(self.num_slots, cfg.vocab_size, BIAS_TABLE_SIZE)
    if mesh is None:
      # Committed to the default device (a data-parallel replica's): the step's outputs are committed,
      # and a jit called with committed and then uncommitted state compiles twice.
      self._home = default_device()
      shape = (rc.num_pages, rc.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
      self.kv_caches = [jnp.zeros(shape, dtype=rc.kv_dtype, device=self._home) for _ in range(cfg.num_layers)]
      self.slots = jax.device_put(slots, self._home)
      step_shardings = {}
      self.multiprocess = False
    else:
      self._home = replicated(mesh)
      # The pool is split by KV heads (it may hold more heads than the model when K < tp). Step inputs
      # and the sampler's slot state are small and read whole by every device: replicated. The outputs'
      # shardings are pinned so that the pool and slots come back exactly as they went in: an inferred
      # sharding that drifted would make the next step compile again.
      self.kv_caches = make_kv_caches(cfg, mesh, rc.num_pages, rc.page_size, rc.kv_dtype)
      step_shardings = {"out_shardings": (replicated(mesh), replicated(mesh), kv_cache_shardings(cfg, mesh),
                                          replicated(mesh), replicated(mesh))}
      if self.num_stages > 1:
        self.params = split_params(params, param_specs(cfg), mesh)
        self._pipeline = PipelineStep(cfg, mesh, functools.partial(_last_stage, cfg=cfg, attn_impl=rc.attn_impl),
                                      rc.attn_impl, compiler_options=options)
        self._home = self._pipeline.home
      # A mesh over the devices of several processes (see jserve/engine/multihost.py): host arrays
      # become global arrays through `distributed.put_global`, each process filling its own devices.
      self.multiprocess = not self._home.is_fully_addressable
      self.slots = self._device_put(slots, self._home)
    self._channel = None  # the leader's LeaderChannel when the mesh spans processes (set by the engine)
    self._last_x_TD = None  # a follower's last step's hidden states, for a prompt-logprob command
    self.slot_table = SlotTable(self.num_slots, cfg.vocab_size)
    self.batches = BatchBuilder(rc, self.buckets, self.slot_table)
    self._mask_future = None
    mask_SW = np.zeros((rc.max_num_seqs, (cfg.vocab_size + 31) // 32), np.int32)
    self._mask_SW = self._device_put(mask_SW, self._home)
    self._last_S = self._device_put(np.zeros(rc.max_num_seqs, np.int32), self._home)
    # Whether a step may take tokens that the previous step sampled and the host has not seen. The
    # pipeline's stages take host inputs at the first stage and sample at the last: not yet.
    self.can_overlap = self.num_stages == 1
    if self.num_stages > 1:
      self._step = self._pipeline
    else:
      self._step = jax.jit(functools.partial(_step, cfg=cfg, attn_impl=rc.attn_impl, mesh=mesh,
                                             matmul_impl=rc.matmul_impl),
                           donate_argnums=(1, 2), static_argnames=("layout", "path"),
                           compiler_options=options, **step_shardings)
    self._burst = None
    if rc.num_decode_steps > 1 and self.can_overlap and not self.multiprocess:
      self._burst = jax.jit(functools.partial(_decode_burst, num_steps=rc.num_decode_steps, cfg=cfg,
                                              attn_impl=rc.attn_impl, page_size=rc.page_size, mesh=mesh,
                                              matmul_impl=rc.matmul_impl),
                            donate_argnums=(1, 2), static_argnames=("layout", "path"),
                            compiler_options=options,
                            **({} if mesh is None else {"out_shardings": (
                                replicated(mesh), kv_cache_shardings(cfg, mesh), replicated(mesh), replicated(mesh))}))
    if rc.program_cache_dir and mesh is None:
      key = repr((cfg, dataclasses.replace(rc, program_cache_dir=None), jax.config.jax_enable_x64,
                  jax.config.jax_default_matmul_precision))
      self._step = ProgramCache(self._step, name="step", key=key, directory=rc.program_cache_dir,
                                donate_argnums=(1, 2), compiler_options=options)
      if self._burst is not None:
        self._burst = ProgramCache(self._burst, name="burst", key=key, directory=rc.program_cache_dir,
                                   donate_argnums=(1, 2), compiler_options=options)
    # Prompt logprobs, compiled per token bucket on first use (most deployments never ask for them).
    self._prompt_logprobs = jax.jit(functools.partial(_prompt_logprobs, cfg=cfg))
    self._write_slots = jax.jit(write_slots, donate_argnums=(0,),
                                **({} if mesh is None else {"out_shardings": self._home}))

  def bucket_for(self, num_tokens: int) -> int:
    return self.batches.bucket_for(num_tokens)

  def build(self, requests: list[Request], num_new_tokens: list[int], page_tables: dict[str, list[int]],
            constrained: set | None = None):
    """The padded ragged batch of one step, in numpy (`BatchBuilder.build`): (inputs, sampling, tokens, plan)."""
    return self.batches.build(requests, num_new_tokens, page_tables, constrained)

  def _empty_inputs(self, num_tokens: int, staged: bool = False):
    return self.batches.empty_inputs(num_tokens, staged)

  def num_compiled(self) -> int:
    """Programs compiled so far (a request must never add one after start-up)."""
    return self._step._cache_size() + (self._burst._cache_size() if self._burst is not None else 0)

  @property
  def burst_buckets(self) -> list[int]:
    """Token buckets of the decode-only batches that run `num_decode_steps` steps per call."""
    if self._burst is None:
      return []
    out = []
    for b in self.buckets:  # up to the bucket of max_num_seqs single-token rows
      out.append(b)
      if b >= self.rc.max_num_seqs:
        break
    return out

  def program_memory(self) -> dict:
    """XLA's memory analysis of the compiled program of the largest bucket, the burst's if the engine has
    bursts, else the step's: {"program", "tokens", "temp_bytes", "argument_bytes", "output_bytes"}. A benchmark
    reads it: temporary bytes near the weights' size mean XLA holds a copy of them (for instance weights its dot
    merger concatenated, hoisted out of the burst's loop). Lowers and compiles again: the compilation cache
    answers a warm start."""
    bucket = (self.burst_buckets or self.buckets)[-1]
    fn, name = (self._burst, "burst") if self._burst is not None else (self._step, "step")
    out = {"program": name, "tokens": bucket}
    try:
      inputs, sampling, tokens = self._empty_inputs(bucket)
      args, static = self._step_args(*pack_host_inputs((inputs, sampling, tokens)), sampling)
      if isinstance(fn, ProgramCache):
        fn, static = fn.program(args, static), {}
      if isinstance(fn, functools.partial):  # the cache's fallback: the jitted function, static arguments bound
        fn, static = fn.func, dict(fn.keywords)
      mem = fn.lower(*args, **static).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - a pipeline's stages, say, are several programs: report, do not fail
      return dict(out, error=f"{type(e).__name__}: {str(e)[:200]}")
    return dict(out, temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                output_bytes=int(mem.output_size_in_bytes))

  def _put(self, host_arrays):
    """Copies a step's host arrays to the devices in one call: replicated over the mesh, if any (with
    pipeline stages, the stages put them on their own devices)."""
    if self.mesh is None or self.num_stages > 1:
      return host_arrays
    return self._device_put(host_arrays, replicated(self.mesh))

  def _device_put(self, host, sharding):
    if self.multiprocess:
      return distributed.put_global(host, jax.tree.map(lambda _: sharding, host))
    return jax.device_put(host, sharding)

  @staticmethod
  def _to_host(x) -> np.ndarray:
    """A replicated result on the host (with processes, from this process's own copy)."""
    return np.asarray(x if getattr(x, "is_fully_addressable", True) else x.addressable_shards[0].data)

  def compile_all(self, progress=None, threads: int = 1):
    """Compiles (or loads from the persistent cache) the step of every bucket and the slot writer.

    With a program cache and `threads` > 1, the programs stored in it are first read and compiled on
    that many threads at once (the persistent cache answers those on a warm start), then every
    program runs once on empty inputs, as without. Programs not stored compile one at a time: XLA's
    GPU autotuner times its candidates on the device, and parallel compiles would disturb it.
    """
    start = time.monotonic()
    # With host-chosen paths each bucket has a plain and a staged program: empty inputs take the
    # plain path; a logprobs row sends them down the staged one.
    # Bursts run plain batches only (the engine's `_can_burst`).
    variants = [False, True] if self.host_paths and self.rc.precompile_staged else [False]
    if threads > 1 and isinstance(self._step, ProgramCache):
      def args(num_tokens, staged=False):
        inputs, sampling, tokens = self._empty_inputs(num_tokens, staged=staged)
        return self._step_args(*pack_host_inputs((inputs, sampling, tokens)), sampling)
      jobs = [(self._step, args(b, s)) for b in self.buckets for s in variants]
      jobs += [(self._burst, args(b)) for b in self.burst_buckets]
      jobs = [(cache, a) for cache, a in jobs if cache.stored(*a[0], **a[1])]
      with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jserve-compile") as pool:
        list(pool.map(lambda job: job[0].prepare(*job[1][0], **job[1][1]), jobs))
      logging.info("prepared %d programs on %d threads in %.1f s", len(jobs), threads, time.monotonic() - start)
    for i, b in enumerate(self.buckets):
      for staged in variants:
        out = self._call_step(*self._empty_inputs(b, staged=staged))[0]
        out.tokens_B.block_until_ready()
      if progress:
        progress(i + 1, len(self.buckets), b)
    for b in self.burst_buckets:
      self.execute_burst(*self._empty_inputs(b)).block_until_ready()
    self._flush_slot_writes(force=True)
    logging.info("compiled %d step buckets (%s tokens)%s in %.1f s", len(self.buckets),
                 ",".join(map(str, self.buckets)), ", a plain and a staged sampler each" if len(variants) > 1 else "",
                 time.monotonic() - start)

  # --- slots ----------------------------------------------------------------------------------
  def release(self, request_id: str):
    """Forgets a finished or aborted request's slot."""
    self.slot_table.release(request_id)

  def _flush_slot_writes(self, force: bool = False):
    """Writes the slot rows of the requests that started or restarted (`SlotTable.take_writes`)."""
    for args in self.slot_table.take_writes(force):
      self._run_slot_write(args)

  def _run_slot_write(self, args):
    if self._channel is not None:
      self._channel.send(multihost.SLOTS, pack_host_inputs(args)[0])
    if self.multiprocess:
      args = self._device_put(args, self._home)
    self.slots = self._write_slots(self.slots, *args)

  # --- grammar bitmask --------------------------------------------------------------------------
  def set_mask(self, future):
    """The next step's grammar bitmask: a future of a [num_seqs bucket, words] int32 array."""
    self._mask_future = future

  def _upload_mask(self):
    """Waits for the host's bitmask of this step and puts it on the device (steps with grammars only)."""
    future, self._mask_future = self._mask_future, None
    mask_BW = np.asarray(future.result(), np.int32)
    mask_SW = np.zeros(self._mask_SW.shape, np.int32)
    mask_SW[:mask_BW.shape[0]] = mask_BW
    self._set_mask(mask_SW)

  def _set_mask(self, mask_SW):
    if self._channel is not None:
      self._channel.send(multihost.MASK, mask_SW)
    self._mask_SW = self._device_put(mask_SW, self._mask_SW.sharding)

  # --- the step -------------------------------------------------------------------------------
  def execute(self, inputs: StepInputs, sampling: SamplingInputs, tokens: TokenInputs):
    """Runs one step; returns the sampler's and the prompt-logprob device arrays without waiting for them."""
    self._flush_slot_writes()
    if self._mask_future is not None:
      self._upload_mask()
    out, x_TD = self._call_step(inputs, sampling, tokens)
    prompt = None
    if (tokens.prompt_target_T >= 0).any():
      prompt = self._run_prompt_logprobs(x_TD, tokens.prompt_target_T)
    return out, prompt

  def execute_burst(self, inputs: StepInputs, sampling: SamplingInputs, tokens: TokenInputs):
    """Runs `num_decode_steps` steps of a decode-only batch (one token per sequence, pages reserved
    for all of them) in one call; returns the tokens [K, B] on the device without waiting."""
    self._flush_slot_writes()
    args, static = self._step_args(*pack_host_inputs((inputs, sampling, tokens)), sampling)
    out_KB, self.kv_caches, self.slots, self._last_S = self._burst(*args, **static)
    return out_KB

  def _step_args(self, buf_N, layout, sampling):
    """The positional and static arguments of a step or burst call on packed host inputs."""
    args = (self.params, self.kv_caches, self.slots, self._mask_SW, self._last_S, self._put(buf_N))
    return args, {"layout": layout, "path": self._path(sampling)}

  @property
  def host_paths(self) -> bool:
    """Whether the host picks the sampler's path (then a decode burst takes plain batches only)."""
    return self.rc.sampler_paths == "host" and self.can_overlap

  def _path(self, sampling: SamplingInputs) -> str | None:
    """The sampler's path for a batch when the host picks it (see RunnerConfig.sampler_paths)."""
    return host_path(sampling) if self.host_paths else None

  def _call_step(self, inputs, sampling, tokens):
    """Queues the step; returns the sampler's outputs and the last hidden states [T, D]."""
    if not self.can_overlap:  # pipeline stages: each puts the host arrays on its own devices
      out, x_TD, self.kv_caches, self.slots = self._step(self.params, self.kv_caches, self.slots, self._mask_SW,
                                                         inputs, sampling, tokens)
    else:
      buf_N, layout = pack_host_inputs((inputs, sampling, tokens))
      if self._channel is not None:
        self._channel.send(multihost.STEP, buf_N, arg=inputs.token_ids_T.shape[0])
      args, static = self._step_args(buf_N, layout, sampling)
      out, x_TD, self.kv_caches, self.slots, self._last_S = self._step(*args, **static)
    return out, x_TD

  def _run_prompt_logprobs(self, x_TD, target_T):
    if self._channel is not None:
      self._channel.send(multihost.PROMPT, target_T)
    params = self.params[-1] if self.num_stages > 1 else self.params
    return self._prompt_logprobs(params, x_TD, self._device_put(target_T, x_TD.sharding))

  # --- a follower process -----------------------------------------------------------------------
  def follow(self, command: int, buf_N: np.ndarray, arg: int):
    """Repeats on this process's devices one device command of the leader (jserve/engine/multihost.py)."""
    if command == multihost.STEP:
      layout = pack_host_inputs(self._empty_inputs(arg))[1]
      path = self._path(unpack_host(buf_N, layout)[1])  # the leader's choice
      _, self._last_x_TD, self.kv_caches, self.slots, self._last_S = self._step(
          self.params, self.kv_caches, self.slots, self._mask_SW, self._last_S, self._put(buf_N), layout=layout,
          path=path)
    elif command == multihost.SLOTS:
      self._run_slot_write(unpack_host(buf_N, pack_host_inputs(self.slot_table.write_template())[1]))
    elif command == multihost.MASK:
      self._set_mask(buf_N.reshape(self._mask_SW.shape))
    elif command == multihost.PROMPT:
      self._run_prompt_logprobs(self._last_x_TD, buf_N)
    else:
      raise ValueError(f"unknown command {command} from the leader")

  @staticmethod
  def fetch(out, prompt, plan: StepPlan) -> StepResult:
    """Copies to the host what the step's plan asked for (waiting for the step)."""
    host = ModelRunner._to_host
    result = StepResult(tokens=host(out.tokens_B))
    if plan.want_logprobs:
      result.logprobs = host(out.logprob_B)
      result.top_ids, result.top_logprobs = host(out.top_ids_BA), host(out.top_logprobs_BA)
    if plan.prompt_rows:
      result.prompt_logprobs, result.prompt_top_ids, result.prompt_top_logprobs = (host(a) for a in prompt)
    return result

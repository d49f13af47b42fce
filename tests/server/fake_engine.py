"""A stand-in for LLMEngine with the same surface the AsyncEngine uses, and no JAX: tests of the
asyncio plumbing and the front ends run in milliseconds. Each step gives every request one token,
whose id is its output position and whose text is "t<position> "."""

import dataclasses
import time
import types

from jserve.engine.request import CompletionOutput, RequestOutput
from jserve.errors import InvalidRequestError


@dataclasses.dataclass
class _Req:
  request_id: str
  prompt_token_ids: list
  params: object
  num_output_tokens: int = 0
  schedule_time: float | None = None
  num_cached_tokens: int = 0

  @property
  def num_prompt_tokens(self):
    return len(self.prompt_token_ids)


class _Tokenizer:
  eos_token_ids = frozenset()

  def encode(self, text, add_special_tokens=True):
    return [ord(c) % 100 for c in text]

  def decode(self, ids, skip_special_tokens=True):
    return "".join(f"t{i} " for i in ids)

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return "".join(m["content"] for m in messages)


class FakeEngine:
  def __init__(self, max_num_seqs: int = 4, step_s: float = 0.001, fail_at_step: int | None = None,
               quantization: str | None = None, activation_quantization: str | None = None,
               kv_cache_dtype: str = "float32"):
    self.max_num_seqs = max_num_seqs
    self.step_s = step_s
    self.fail_at_step = fail_at_step
    self.requests: dict[str, _Req] = {}
    self.scheduler = types.SimpleNamespace(waiting=[], running=[], num_preemptions=0)
    self.kv = types.SimpleNamespace(num_used_pages=0, num_cached_pages=0, num_usable_pages=100, hit_rate=0.0)
    self.tokenizer = _Tokenizer()
    self.max_model_len = 64
    # What the model-info answers (gRPC GetModelInfo, HTTP /v1/models) read.
    self.model_config = types.SimpleNamespace(architecture="FakeForCausalLM", vocab_size=100)
    self.config = types.SimpleNamespace(dtype="float32", page_size=16, max_num_seqs=max_num_seqs,
                                        tensor_parallel_size=1, pipeline_parallel_size=1)
    self.max_num_batched_tokens = 64
    self.eos_token_ids = frozenset()
    self.quantization = quantization
    self.activation_quantization = activation_quantization
    self.kv_cache_dtype = kv_cache_dtype
    self.num_steps = 0
    self.aborted: list[str] = []

  def add_request(self, request_id, prompt, params, *, priority=0, arrival_time=None, stream=False):
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
      raise InvalidRequestError("prompt is empty")
    req = _Req(request_id, ids, params)
    self.requests[request_id] = req
    self.scheduler.waiting.append(req)
    self._update_pages()
    return request_id

  def _update_pages(self):
    self.kv.num_used_pages = len(self.scheduler.running) + len(self.scheduler.waiting)

  def has_unfinished(self):
    return bool(self.scheduler.waiting or self.scheduler.running)

  def abort(self, request_id):
    req = self.requests.pop(request_id, None)
    if req is None:
      return None
    for q in (self.scheduler.waiting, self.scheduler.running):
      if req in q:
        q.remove(req)
    self.aborted.append(request_id)
    self._update_pages()
    return self._output(req, [], "abort")

  def _output(self, req, tokens, finish_reason):
    c = CompletionOutput(index=0, text=self.tokenizer.decode(tokens), token_ids=tokens,
                         finish_reason=finish_reason)
    return RequestOutput(request_id=req.request_id, prompt=None, prompt_token_ids=req.prompt_token_ids,
                         outputs=[c], finished=finish_reason is not None)

  def step(self):
    self.num_steps += 1
    if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
      raise RuntimeError("device lost")
    time.sleep(self.step_s)
    sched = self.scheduler
    while sched.waiting and len(sched.running) < self.max_num_seqs:
      req = sched.waiting.pop(0)
      req.schedule_time = time.monotonic()
      sched.running.append(req)
    outs = []
    for req in list(sched.running):
      token = req.num_output_tokens
      req.num_output_tokens += 1
      done = req.num_output_tokens >= req.params.max_tokens
      if done:
        sched.running.remove(req)
        del self.requests[req.request_id]
      outs.append(self._output(req, [token], "length" if done else None))
    self._update_pages()
    return outs

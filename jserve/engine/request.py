"""Per-request state and the user-facing request/result types (vLLM's names)."""

import dataclasses
import enum
import time
from typing import Any

from jserve.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
  """How to sample one request. Field names and defaults follow vLLM's `SamplingParams`."""

  n: int = 1
  max_tokens: int | None = 16
  min_tokens: int = 0
  temperature: float = 1.0
  top_k: int = -1
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[int, float] | None = None
  seed: int | None = None
  stop: str | list[str] | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  include_stop_str_in_output: bool = False
  skip_special_tokens: bool = True
  logprobs: int | None = None
  prompt_logprobs: int | None = None
  json_schema: Any = None
  regex: str | None = None
  grammar: str | None = None

  def __post_init__(self):
    def bad(field, rule):
      raise InvalidRequestError(f"{field}={getattr(self, field)!r}: {rule}")

    if self.n < 1:
      bad("n", "must be at least 1")
    if self.max_tokens is not None and self.max_tokens < 1:
      bad("max_tokens", "must be at least 1")
    if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
      bad("min_tokens", "must be in [0, max_tokens]")
    if not self.temperature >= 0:  # also refuses NaN
      bad("temperature", "must be >= 0 (0 means greedy)")
    if self.top_k < -1:
      bad("top_k", "must be -1 (disabled), 0 (disabled) or positive")
    if not 0 < self.top_p <= 1:
      bad("top_p", "must be in (0, 1]")
    if not 0 <= self.min_p <= 1:
      bad("min_p", "must be in [0, 1]")
    if not self.repetition_penalty > 0:
      bad("repetition_penalty", "must be > 0")
    if not -2 <= self.presence_penalty <= 2:
      bad("presence_penalty", "must be in [-2, 2]")
    if not -2 <= self.frequency_penalty <= 2:
      bad("frequency_penalty", "must be in [-2, 2]")
    for field in ("logprobs", "prompt_logprobs"):
      value = getattr(self, field)
      if value is not None and not 0 <= value <= MAX_LOGPROBS:
        bad(field, f"must be in [0, {MAX_LOGPROBS}]")
    if isinstance(self.stop, str):
      self.stop = [self.stop]
    if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
      bad("stop", "must be a non-empty string or a list of them")
    if sum(x is not None for x in (self.json_schema, self.regex, self.grammar)) > 1:
      raise InvalidRequestError("json_schema, regex and grammar are exclusive: give at most one")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


class RequestStatus(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


class FinishReason(str, enum.Enum):
  STOP = "stop"
  LENGTH = "length"
  ABORT = "abort"


@dataclasses.dataclass
class CompletionOutput:
  """One completion of a request (vLLM's `CompletionOutput`)."""

  index: int
  text: str
  token_ids: list[int]
  cumulative_logprob: float | None = None
  logprobs: list[dict[int, float]] | None = None
  finish_reason: str | None = None
  stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
  """What the engine reports for a request after a step (vLLM's `RequestOutput`)."""

  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  prompt_logprobs: list[dict[int, float] | None] | None = None
  num_cached_tokens: int = 0


class Request:
  """Engine-side state of one sequence: tokens so far, progress, pages (held by the KV manager)."""

  def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
               prompt: str | None = None, priority: int = 0, arrival_time: float | None = None,
               eos_token_ids: frozenset = frozenset(), seed: int = 0):
    self.request_id = request_id
    self.prompt = prompt
    self.prompt_token_ids = list(prompt_token_ids)
    self.all_token_ids = list(prompt_token_ids)
    self.params = params
    self.priority = priority
    self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
    self.eos_token_ids = eos_token_ids
    self.seed = seed
    self.status = RequestStatus.WAITING
    self.num_computed_tokens = 0
    self.num_cached_tokens = 0
    self.num_preemptions = 0
    self.finish_reason: FinishReason | None = None
    self.stop_reason: int | str | None = None
    self.first_token_time: float | None = None
    self.schedule_time: float | None = None

  @property
  def num_prompt_tokens(self) -> int:
    return len(self.prompt_token_ids)

  @property
  def num_tokens(self) -> int:
    return len(self.all_token_ids)

  @property
  def output_token_ids(self) -> list[int]:
    return self.all_token_ids[self.num_prompt_tokens:]

  @property
  def num_output_tokens(self) -> int:
    return len(self.all_token_ids) - self.num_prompt_tokens

  @property
  def is_finished(self) -> bool:
    return self.status == RequestStatus.FINISHED

  def sort_key(self):
    """Larger is scheduled later and preempted first: lower priority (higher number), later arrival."""
    return (self.priority, self.arrival_time)

"""Per-request state and the user-facing request/result types (vLLM's names)."""

import dataclasses
import enum
import math
import numbers
import time
from typing import Any

from jserve.errors import InvalidRequestError

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's API and vLLM allow
# Sizes of the per-request tables the sampler keeps on the device (see sampler.SlotState).
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64
MAX_EOS_TOKEN_IDS = 8
BIAS_TABLE_SIZE = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + MAX_EOS_TOKEN_IDS


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

    def number(field, integer=False):
      value = getattr(self, field)
      kind = numbers.Integral if integer else numbers.Real
      if isinstance(value, bool) or not isinstance(value, kind):
        bad(field, "must be an integer" if integer else "must be a number")

    for field in ("n", "min_tokens", "top_k"):
      number(field, integer=True)
    for field in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
      number(field)
    if self.n < 1:
      bad("n", "must be at least 1")
    if self.max_tokens is not None:
      number("max_tokens", integer=True)
      if self.max_tokens < 1:
        bad("max_tokens", "must be at least 1")
    if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
      bad("min_tokens", "must be in [0, max_tokens]")
    if not 0 <= self.temperature < math.inf:  # also refuses NaN
      bad("temperature", "must be >= 0 (0 means greedy)")
    if self.top_k < -1:
      bad("top_k", "must be -1 (disabled), 0 (disabled) or positive")
    if not 0 < self.top_p <= 1:
      bad("top_p", "must be in (0, 1]")
    if not 0 <= self.min_p <= 1:
      bad("min_p", "must be in [0, 1]")
    if not 0 < self.repetition_penalty < math.inf:
      bad("repetition_penalty", "must be > 0 (1 disables)")
    if not -2 <= self.presence_penalty <= 2:
      bad("presence_penalty", "must be in [-2, 2]")
    if not -2 <= self.frequency_penalty <= 2:
      bad("frequency_penalty", "must be in [-2, 2]")
    if self.seed is not None:
      number("seed", integer=True)
    for field in ("logprobs", "prompt_logprobs"):
      value = getattr(self, field)
      if value is not None:
        number(field, integer=True)
        if not 0 <= value <= MAX_LOGPROBS:
          bad(field, f"must be in [0, {MAX_LOGPROBS}]")
    self._check_logit_bias()
    self._check_stops()
    if sum(x is not None for x in (self.json_schema, self.regex, self.grammar)) > 1:
      raise InvalidRequestError("json_schema, regex and grammar are exclusive: give at most one")
    if self.structured:
      from jserve.engine.structured_output import validate  # llguidance loads only when used
      validate(self)

  def _check_logit_bias(self):
    if self.logit_bias is None:
      return
    if not isinstance(self.logit_bias, dict):
      raise InvalidRequestError(f"logit_bias={self.logit_bias!r}: must map token ids to biases")
    if len(self.logit_bias) > MAX_LOGIT_BIAS:
      raise InvalidRequestError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
    bias = {}
    for token, value in self.logit_bias.items():
      try:
        token_id = int(token)  # JSON object keys arrive as strings
      except (TypeError, ValueError):
        raise InvalidRequestError(f"logit_bias key {token!r}: must be a token id") from None
      if token_id < 0:
        raise InvalidRequestError(f"logit_bias token id {token_id} is negative")
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -100 <= value <= 100:
        raise InvalidRequestError(f"logit_bias[{token_id}]={value!r}: must be a number in [-100, 100]")
      bias[token_id] = float(value)
    self.logit_bias = bias

  def _check_stops(self):
    if isinstance(self.stop, str):
      self.stop = [self.stop]
    if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
      raise InvalidRequestError(f"stop={self.stop!r}: must be a non-empty string or a list of them")
    if self.stop_token_ids is not None:
      if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"stop_token_ids has {len(self.stop_token_ids)} entries; at most "
                                  f"{MAX_STOP_TOKEN_IDS}")
      if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
                 for t in self.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids={self.stop_token_ids!r}: must be non-negative token ids")
      self.stop_token_ids = [int(t) for t in self.stop_token_ids]

  @property
  def structured(self) -> bool:
    return self.json_schema is not None or self.regex is not None or self.grammar is not None

  @property
  def penalized(self) -> bool:
    return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

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


PLACEHOLDER = -1  # a sampled token the host has not read yet: the step that samples it is still running


class Request:
  """Engine-side state of one sequence: tokens so far, progress, pages (held by the KV manager).

  With overlapped steps (see `LLMEngine.step`) `all_token_ids` may end in up to two PLACEHOLDERs:
  tokens sampled by steps the host has not read yet. `pending_row` is the row of the last of them
  in the step that samples it, from which the next step takes it on the device.
  """

  def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
               prompt: str | None = None, priority: int = 0, arrival_time: float | None = None,
               eos_token_ids: frozenset = frozenset(), seed: int = 0, index: int = 0,
               parent_id: str | None = None):
    self.request_id = request_id
    self.index = index  # which of the parent's n completions this is
    self.parent_id = parent_id  # the id the user gave, when n > 1 split the request into children
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
    self.grammar = None  # an llguidance matcher when the params ask for structured output
    self.pending_row: int | None = None

  @property
  def num_prompt_tokens(self) -> int:
    return len(self.prompt_token_ids)

  @property
  def num_tokens(self) -> int:
    return len(self.all_token_ids)

  @property
  def num_known_tokens(self) -> int:
    """Tokens before the trailing placeholders."""
    n = len(self.all_token_ids)
    while n and self.all_token_ids[n - 1] == PLACEHOLDER:
      n -= 1
    return n

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

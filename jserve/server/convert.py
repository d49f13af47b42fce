"""Proto <-> engine: requests into (prompt, SamplingParams), engine outputs into stream messages."""

import dataclasses
import json

from jserve.engine.request import CompletionOutput, RequestOutput, SamplingParams
from jserve.errors import InvalidRequestError
from jserve.server.proto import jserve_pb2 as pb

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _value(msg, field) -> object:
  """The value of one proto field, or None when unset (so SamplingParams keeps its default)."""
  if field.is_repeated:
    value = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
      return dict(value) if value else None
    return list(value) if value else None
  return getattr(msg, field.name) if msg.HasField(field.name) else None


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
  """Every field set in `msg` is passed to SamplingParams under the same name; it validates them."""
  kwargs = {}
  for field in msg.DESCRIPTOR.fields:
    if field.name not in SAMPLING_FIELDS:
      continue
    value = _value(msg, field)
    if value is None:
      continue
    if field.name == "json_schema":
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from None
    kwargs[field.name] = value
  return SamplingParams(**kwargs)


def prompt_from_proto(request: pb.GenerateRequest, tokenizer) -> str | list[int]:
  kind = request.WhichOneof("prompt")
  if kind == "text":
    return request.text
  if kind == "token_ids":
    return list(request.token_ids.ids)
  if kind == "chat":
    messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    if not messages:
      raise InvalidRequestError("chat.messages is empty")
    add = request.chat.add_generation_prompt if request.chat.HasField("add_generation_prompt") else True
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add)
    return tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
  raise InvalidRequestError("the request has no prompt: set text, chat or token_ids")


def logprob_value(v) -> float:
  """A logprob entry as a float: the engine gives floats or objects with `.logprob` (vLLM's Logprob)."""
  return float(getattr(v, "logprob", v))


def token_logprobs(completion: CompletionOutput) -> list[tuple[int, float, list[tuple[int, float]]]]:
  """(token id, its logprob, [(top id, top logprob) best first]) for each new token of a delta."""
  if completion.logprobs is None:
    return []
  entries = list(completion.logprobs)[-len(completion.token_ids):] if completion.token_ids else []
  result = []
  for token, entry in zip(completion.token_ids, entries):
    entry = entry or {}
    top = sorted(((int(t), logprob_value(v)) for t, v in entry.items()), key=lambda x: -x[1])
    result.append((int(token), logprob_value(entry[token]) if token in entry else float("nan"), top))
  return result


class TokenText:
  """Token id -> its text (for logprobs), decoded once per id."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._cache: dict[int, str] = {}

  def __call__(self, token_id: int) -> str:
    text = self._cache.get(token_id)
    if text is None:
      text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
    return text


def _logprob_protos(entries, token_text: TokenText, num_top: int) -> list[pb.TokenLogprob]:
  return [pb.TokenLogprob(token_id=t, logprob=lp, token=token_text(t), top_logprobs=[
      pb.TopLogprob(token_id=i, logprob=v, token=token_text(i)) for i, v in top[:num_top]])
          for t, lp, top in entries]


def response_from_output(out: RequestOutput, request_id: str, *, first: bool, params: SamplingParams,
                         token_text: TokenText, completion_tokens: int) -> pb.GenerateResponse:
  """One stream message from one engine delta."""
  msg = pb.GenerateResponse(request_id=request_id)
  for c in out.outputs:
    choice = msg.choices.add(index=c.index, token_ids=c.token_ids, text=c.text)
    if params.logprobs is not None:
      choice.logprobs.extend(_logprob_protos(token_logprobs(c), token_text, params.logprobs))
    if c.finish_reason:
      choice.finish_reason = _FINISH.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
      if isinstance(c.stop_reason, str):
        choice.stop_string = c.stop_reason
      elif c.stop_reason is not None:
        choice.stop_token_id = int(c.stop_reason)
      if c.cumulative_logprob is not None:
        choice.cumulative_logprob = c.cumulative_logprob
  if first:
    msg.prompt_token_ids.extend(out.prompt_token_ids)
    if params.prompt_logprobs is not None and out.prompt_logprobs:
      for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        entry = entry or {}
        top = sorted(((int(t), logprob_value(v)) for t, v in entry.items()), key=lambda x: -x[1])
        lp = logprob_value(entry[token]) if token in entry else float("nan")
        msg.prompt_logprobs.extend(_logprob_protos([(token, lp, top)], token_text, params.prompt_logprobs))
  if out.finished:
    msg.usage.prompt_tokens = len(out.prompt_token_ids)
    msg.usage.completion_tokens = completion_tokens
    msg.usage.cached_prompt_tokens = out.num_cached_tokens
  return msg

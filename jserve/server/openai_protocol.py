"""OpenAI's request and response JSON <-> engine types, for /v1/completions and /v1/chat/completions.

Request bodies are read field by field so that every error names the field and
what it should be. Beside OpenAI's fields, the engine's other sampling
parameters are accepted under their own names, as vLLM's server does (top_k,
min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos, ...).
"""

import dataclasses
import json
import time
import uuid

from absl import logging

from jserve.engine.request import CompletionOutput, SamplingParams
from jserve.errors import InvalidRequestError
from jserve.server.convert import TokenText, token_logprobs

_NUMBER = (int, float)

# SamplingParams fields accepted under their own name in both endpoints: name -> JSON type(s).
_ENGINE_FIELDS = {
    "n": int, "max_tokens": int, "min_tokens": int, "temperature": _NUMBER, "top_k": int, "top_p": _NUMBER,
    "min_p": _NUMBER, "repetition_penalty": _NUMBER, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "seed": int, "stop_token_ids": list, "ignore_eos": bool, "include_stop_str_in_output": bool,
    "skip_special_tokens": bool, "prompt_logprobs": int,
}
# Fields read elsewhere (or harmlessly meaningless here); any other unknown field is ignored, as by
# OpenAI's and vLLM's servers, so that newer clients keep working.
_KNOWN = {"model", "stream", "stream_options", "user", "messages", "prompt", "echo", "logprobs", "top_logprobs",
            "response_format", "logit_bias", "stop", "priority", "max_completion_tokens", "best_of", "suffix",
            "guided_json", "guided_regex", "guided_grammar", "structured_outputs", "tools", "tool_choice",
            "parallel_tool_calls", "add_generation_prompt", "service_tier", "store", "metadata", "return_token_ids"}


def _typename(kind) -> str:
  if kind is _NUMBER:
    return "a number"
  return {int: "an integer", bool: "a boolean", str: "a string", list: "a list", dict: "an object"}[kind]


def get(body: dict, name: str, kind, default=None):
  """body[name] checked against `kind` (a JSON type); `default` when absent or null."""
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
  if not ok:
    raise InvalidRequestError(f"{name}={value!r}: expected {_typename(kind)}")
  return value


def _structured(body: dict) -> dict:
  """Structured-output fields: OpenAI's response_format, vLLM's guided_* and structured_outputs."""
  out = {}
  fmt = get(body, "response_format", dict)
  if fmt is not None:
    kind = fmt.get("type")
    if kind == "json_schema":
      schema = (fmt.get("json_schema") or {}).get("schema")
      if not isinstance(schema, dict):
        raise InvalidRequestError("response_format.json_schema.schema: expected a JSON Schema object")
      out["json_schema"] = schema
    elif kind == "json_object":
      out["json_schema"] = {"type": "object"}
    elif kind != "text":
      raise InvalidRequestError(f"response_format.type={kind!r}: expected 'text', 'json_object' or 'json_schema'")
  so = get(body, "structured_outputs", dict) or {}
  for key, field in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_grammar", "grammar")):
    value = body.get(key, so.get(key.removeprefix("guided_")))
    if value is None:
      continue
    if field == "json_schema" and isinstance(value, str):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{key} is not valid JSON: {e}") from None
    elif field != "json_schema" and not isinstance(value, str):
      raise InvalidRequestError(f"{key}={value!r}: expected a string")
    out[field] = value
  return out


def sampling_params(body: dict, *, chat: bool, default_max_tokens: int | None) -> SamplingParams:
  """SamplingParams from a completions or chat body; SamplingParams itself checks the ranges."""
  unknown = sorted(set(body) - set(_ENGINE_FIELDS) - _KNOWN)
  if unknown:
    logging.vlog(1, "ignoring unknown request field(s) %s", ", ".join(unknown))
  if body.get("tools"):
    raise InvalidRequestError("tools: tool calling is not supported")
  if body.get("suffix"):
    raise InvalidRequestError("suffix: not supported")
  kwargs = {name: get(body, name, kind) for name, kind in _ENGINE_FIELDS.items()}
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  if chat and body.get("max_completion_tokens") is not None:
    kwargs["max_tokens"] = get(body, "max_completion_tokens", int)
  kwargs.setdefault("max_tokens", default_max_tokens)
  best_of = get(body, "best_of", int)
  if best_of is not None and best_of != kwargs.get("n", 1):
    raise InvalidRequestError(f"best_of={best_of}: only best_of equal to n is supported")
  if chat:
    if get(body, "logprobs", bool):
      kwargs["logprobs"] = get(body, "top_logprobs", int, 0)
    elif body.get("top_logprobs") is not None:
      raise InvalidRequestError("top_logprobs needs logprobs=true")
  elif get(body, "logprobs", int) is not None:
    kwargs["logprobs"] = body["logprobs"]
  stop = body.get("stop")
  if stop is not None:
    if not isinstance(stop, (str, list)):
      raise InvalidRequestError(f"stop={stop!r}: expected a string or a list of strings")
    kwargs["stop"] = stop
  bias = get(body, "logit_bias", dict)
  if bias:
    try:
      kwargs["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
      raise InvalidRequestError("logit_bias: expected an object of token id -> bias") from None
  if kwargs.get("stop_token_ids") is not None and not all(
      isinstance(t, int) and not isinstance(t, bool) for t in kwargs["stop_token_ids"]):
    raise InvalidRequestError("stop_token_ids: expected a list of integers")
  kwargs.update(_structured(body))
  return SamplingParams(**kwargs)


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  stream: bool
  include_usage: bool


def stream_options(body: dict) -> StreamOptions:
  stream = get(body, "stream", bool, False)
  opts = get(body, "stream_options", dict) or {}
  if opts and not stream:
    raise InvalidRequestError("stream_options needs stream=true")
  return StreamOptions(stream, bool(opts.get("include_usage", False)))


def completion_prompts(body: dict) -> list[str | list[int]]:
  """The prompt field: a string, a list of token ids, or a list of either."""
  prompt = body.get("prompt")
  if prompt is None:
    raise InvalidRequestError("prompt is missing")
  if isinstance(prompt, str):
    return [prompt]
  if isinstance(prompt, list) and prompt:
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      return [prompt]
    if all(isinstance(p, str) for p in prompt):
      return list(prompt)
    if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
      return list(prompt)
  if isinstance(prompt, list) and not prompt:
    raise InvalidRequestError("prompt is empty")
  raise InvalidRequestError("prompt: expected a string, a list of token ids, or a list of either")


def chat_messages(body: dict) -> list[dict]:
  """Messages with their content as one string (text parts of a content list are joined)."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages: expected a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise InvalidRequestError(f"messages[{i}]: expected an object with a 'role' string")
    content = m.get("content")
    if isinstance(content, list):
      parts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
          raise InvalidRequestError(f"messages[{i}].content: only text parts are supported")
        parts.append(str(part.get("text", "")))
      content = "".join(parts)
    elif content is None:
      content = ""
    elif not isinstance(content, str):
      raise InvalidRequestError(f"messages[{i}].content: expected a string or a list of text parts")
    out.append({**m, "content": content})
  return out


# --- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
  u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
       "total_tokens": prompt_tokens + completion_tokens}
  if cached_tokens:
    u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
  return u


def completion_logprobs(c: CompletionOutput, token_text: TokenText, num_top: int, offset: int) -> dict:
  """Legacy completions' logprobs object for the new tokens of one delta; offsets start at `offset`."""
  tokens, lps, tops, offsets = [], [], [], []
  for token, lp, top in token_logprobs(c):
    text = token_text(token)
    tokens.append(text)
    lps.append(lp)
    tops.append({token_text(t): v for t, v in top[:num_top]})
    offsets.append(offset)
    offset += len(text)
  return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, token_text: TokenText, num_top: int) -> dict:
  """Chat's logprobs object ({"content": [...]}) for the new tokens of one delta."""
  def entry(token, lp):
    text = token_text(token)
    return {"token": text, "logprob": lp, "bytes": list(text.encode())}
  return {"content": [{**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top[:num_top]]}
                      for token, lp, top in token_logprobs(c)]}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
  """OpenAI's error JSON."""
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}

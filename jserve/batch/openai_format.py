"""OpenAI's batch file format: request lines in, batch output lines out.

In:  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "m", "messages": [...], "max_tokens": 64, ...}}
Out: {"id": "batch_req_...", "custom_id": "r1", "error": null,
      "response": {"status_code": 200, "request_id": "...", "body": <chat.completion object>}}

A request that is invalid gets `status_code` 400 and an OpenAI error object as its body; a
line that is not a JSON object at all (so it has no custom_id) gets a top-level `error`.
"""

import dataclasses
import hashlib
import time

from jserve.batch.items import (
  BatchItem,
  check_prompt,
  id_key,
  line_key,
  make_params,
  normalize_messages,
  sampling_fields,
)
from jserve.errors import InvalidRequestError

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
# OpenAI body fields with no effect on offline generation.
_IGNORED = frozenset({"model", "user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls"})
# OpenAI's name -> SamplingParams' name, where they differ.
_RENAMED = {"max_completion_tokens": "max_tokens"}


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
  """What the output line needs from the request line."""

  chat: bool
  model: str | None


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def _sampling_fields(body: dict, chat: bool) -> dict:
  fields = {}
  for name, value in body.items():
    if name in _IGNORED or name in ("messages", "prompt", "logprobs", "top_logprobs", "response_format"):
      continue
    if name == "stream":
      if value:
        raise InvalidRequestError("stream=true: a batch request cannot stream")
      continue
    if name == "echo" and not value:
      continue
    name = _RENAMED.get(name, name)
    if name not in sampling_fields():
      raise InvalidRequestError(f"body field {name!r} is not supported")
    fields[name] = value
  if chat and body.get("logprobs"):
    fields["logprobs"] = body.get("top_logprobs") or 0
  elif chat and body.get("top_logprobs") is not None:
    raise InvalidRequestError("top_logprobs needs logprobs=true")
  elif not chat and body.get("logprobs") is not None:
    fields["logprobs"] = body["logprobs"]
  fmt = body.get("response_format")
  if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
    schema = (fmt.get("json_schema") or {}).get("schema")
    if schema is None:
      raise InvalidRequestError("response_format.json_schema.schema is missing")
    fields["json_schema"] = schema
  elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
    fields["json_schema"] = {"type": "object"}
  elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
    raise InvalidRequestError(f"response_format={fmt!r}: expected type text, json_object or json_schema")
  return fields


def parse_line(obj: dict, line_no: int, defaults: dict) -> BatchItem:
  """A BatchItem from one OpenAI batch request line (errors kept on the item)."""
  custom_id = obj.get("custom_id")
  key = id_key(custom_id)
  if key is None:
    item = BatchItem(key=line_key(line_no), line_no=line_no, id_value=line_key(line_no))
    item.error = f"line {line_no}: custom_id must be a string, got {custom_id!r}"
    return item
  item = BatchItem(key=key, line_no=line_no, id_value=custom_id)
  url = obj.get("url")
  body = obj.get("body")
  item.openai = OpenAIRequest(chat=url != COMPLETIONS_URL,
                              model=body.get("model") if isinstance(body, dict) else None)
  try:
    if obj.get("method", "POST") != "POST":
      raise InvalidRequestError(f"method={obj.get('method')!r}: only POST is supported")
    if url not in (CHAT_URL, COMPLETIONS_URL):
      raise InvalidRequestError(f"url={url!r}: expected {CHAT_URL!r} or {COMPLETIONS_URL!r}")
    if not isinstance(body, dict):
      raise InvalidRequestError("body must be a JSON object")
    if item.openai.chat:
      if body.get("messages") is None:
        raise InvalidRequestError("body.messages is missing")
      item.messages = normalize_messages(body["messages"])
    else:
      prompt = body.get("prompt")
      if prompt is None:
        raise InvalidRequestError("body.prompt is missing")
      if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
      item.prompt = check_prompt(prompt)
    item.params = make_params(defaults, _sampling_fields(body, item.openai.chat))
  except InvalidRequestError as e:
    item.error = f"line {line_no}: {e}"
  return item


def _token_text(tokenizer, token_id: int) -> str:
  return tokenizer.decode([token_id], skip_special_tokens=False)


def _logprob_content(completion, tokenizer, logprob_of):
  """OpenAI chat `logprobs.content`: one entry per generated token with its top alternatives."""
  content = []
  for token_id, top in zip(completion.token_ids, completion.logprobs):
    text = _token_text(tokenizer, token_id)
    alternatives = [{"token": _token_text(tokenizer, int(t)), "logprob": logprob_of(v),
                     "bytes": list(_token_text(tokenizer, int(t)).encode())} for t, v in top.items()]
    content.append({"token": text, "logprob": logprob_of(top.get(token_id)), "bytes": list(text.encode()),
                    "top_logprobs": sorted(alternatives, key=lambda a: -(a["logprob"] or -1e30))})
  return {"content": content}


def _logprob_completion(completion, tokenizer, logprob_of):
  """OpenAI completions `logprobs`: parallel lists of tokens, their logprobs and top alternatives."""
  tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
  for token_id, top in zip(completion.token_ids, completion.logprobs):
    text = _token_text(tokenizer, token_id)
    tokens.append(text)
    token_logprobs.append(logprob_of(top.get(token_id)))
    top_logprobs.append({_token_text(tokenizer, int(t)): logprob_of(v) for t, v in top.items()})
    offsets.append(offset)
    offset += len(text)
  return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
          "text_offset": offsets}


def result_record(item: BatchItem, out, tokenizer, model_name: str, logprob_of) -> dict:
  """The batch output line of a finished request (`out` is the engine's RequestOutput)."""
  req = item.openai
  choices = []
  for c in out.outputs:
    logprobs = None
    if c.logprobs is not None:
      fn = _logprob_content if req.chat else _logprob_completion
      logprobs = fn(c, tokenizer, logprob_of)
    if req.chat:
      choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": logprobs, "finish_reason": c.finish_reason})
    else:
      choices.append({"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
  prompt_tokens = len(out.prompt_token_ids)
  completion_tokens = sum(len(c.token_ids) for c in out.outputs)
  digest = _digest(item.key)
  body = {"id": ("chatcmpl-" if req.chat else "cmpl-") + digest,
          "object": "chat.completion" if req.chat else "text_completion",
          "created": int(time.time()), "model": req.model or model_name, "choices": choices,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}}
  return {"id": "batch_req_" + digest, "custom_id": item.id_value,
          "response": {"status_code": 200, "request_id": "req_" + digest, "body": body}, "error": None}


def error_record(item: BatchItem, message: str) -> dict:
  """The batch output line of a line that could not run."""
  digest = _digest(item.key)
  if item.openai is None:  # not even a request object: nothing to answer with an HTTP status
    return {"id": "batch_req_" + digest, "custom_id": item.id_value, "response": None,
            "error": {"code": "invalid_line", "message": message}}
  body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
  return {"id": "batch_req_" + digest, "custom_id": item.id_value,
          "response": {"status_code": 400, "request_id": "req_" + digest, "body": body}, "error": None}

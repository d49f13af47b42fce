"""Output lines: a finished request or an error, in the format of the line it answers.

jserve format:
    {"id": ..., "text": ..., "finish_reason": "stop" | "length", "usage": {"prompt_tokens": ..,
     "completion_tokens": .., "total_tokens": ..}}      (+ "logprobs" and "token_ids" when asked,
                                                          + "choices" when n > 1)
    {"id": ..., "error": "line 7: prompt is missing"}
OpenAI batch format: see openai_format.py.
"""

from jserve.batch import openai_format
from jserve.batch.items import BatchItem


def logprob_of(value) -> float | None:
  """A logprob as a float, whether the engine gives floats or objects with `.logprob` (vLLM's `Logprob`)."""
  if value is None:
    return None
  return float(getattr(value, "logprob", value))


def _logprobs(completion) -> list[dict]:
  return [{"token_id": int(t), "logprob": logprob_of(top.get(t)),
           "top_logprobs": {str(int(k)): logprob_of(v) for k, v in top.items()}}
          for t, top in zip(completion.token_ids, completion.logprobs)]


def _completion(c) -> dict:
  rec = {"text": c.text, "finish_reason": c.finish_reason}
  if isinstance(c.stop_reason, (str, int)) and not isinstance(c.stop_reason, bool):
    rec["stop_reason"] = c.stop_reason
  if c.logprobs is not None:
    rec["token_ids"] = list(c.token_ids)
    rec["logprobs"] = _logprobs(c)
    rec["cumulative_logprob"] = c.cumulative_logprob
  return rec


def result_record(item: BatchItem, out, tokenizer, model_name: str) -> dict:
  """The output line of a finished request (`out` is the engine's RequestOutput)."""
  if item.openai is not None:
    return openai_format.result_record(item, out, tokenizer, model_name, logprob_of)
  rec = {"id": item.id_value, **_completion(out.outputs[0])}
  if len(out.outputs) > 1:
    rec["choices"] = [{"index": c.index, **_completion(c)} for c in out.outputs]
  prompt_tokens = len(out.prompt_token_ids)
  completion_tokens = sum(len(c.token_ids) for c in out.outputs)
  rec["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}
  return rec


def error_record(item: BatchItem, message: str, fmt: str) -> dict:
  """The output line of a line that could not run (`fmt` is the input file's format)."""
  if fmt == "openai":
    return openai_format.error_record(item, message)
  return {"id": item.id_value, "error": message}


def record_key(record) -> str | None:
  """The input key an output line answers: `custom_id` for OpenAI lines, `id` for jserve's."""
  if not isinstance(record, dict):
    return None
  value = record["custom_id"] if "custom_id" in record else record.get("id")
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    return None
  return str(value)

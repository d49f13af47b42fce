"""Reading a batch input file into `BatchItem`s: one per non-blank line, bad lines kept as errors.

Two line formats: jserve's own (`{"id", "prompt" | "messages" | "prompt_token_ids", <sampling
fields>}`) and OpenAI's batch format (`{"custom_id", "method", "url", "body"}`, parsed in
openai_format.py). A file is one format or the other, chosen by its first JSON object
unless given. Every line gets a key (its id, or `line-N` from its 1-based line number when
it has none or is not JSON at all), and resume, sharding and verification all go by that key.
"""

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from jserve.batch.errors import BatchInputError
from jserve.engine.request import SamplingParams
from jserve.errors import InvalidRequestError

JSERVE, OPENAI = "jserve", "openai"
FORMATS = ("auto", JSERVE, OPENAI)
_PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")


def sampling_fields() -> frozenset[str]:
  """SamplingParams' field names, read at call time so that fields added to it work at once."""
  return frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclasses.dataclass
class BatchItem:
  """One input line: what to run, or why it cannot run (`error`)."""

  key: str  # the id as a string: what resume, shards and verification compare
  line_no: int  # 1-based
  id_value: Any  # the id as written back into the output line
  prompt: str | list[int] | None = None
  messages: list[dict] | None = None
  params: SamplingParams | None = None
  error: str | None = None
  openai: Any = None  # openai_format.OpenAIRequest for lines of the OpenAI batch format

  def prefix_key(self):
    """Sorting by this puts prompts that share a prefix next to each other."""
    if self.messages is not None:
      # Before the chat template is applied (the tokenizer lives with the engine): conversations
      # with the same system prompt and first turns still sort together.
      return (0, json.dumps(self.messages, ensure_ascii=False))
    if isinstance(self.prompt, str):
      return (0, self.prompt)
    return (1, tuple(self.prompt or ()))


def make_params(defaults: dict, fields: dict) -> SamplingParams:
  """`SamplingParams(**defaults, **fields)`; raises InvalidRequestError naming the bad field."""
  merged = {**defaults, **fields}
  bias = merged.get("logit_bias")
  if isinstance(bias, dict):  # JSON object keys are strings; the engine wants token ids
    try:
      merged["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
      raise InvalidRequestError(f"logit_bias={bias!r}: need an object of token id -> bias") from None
  try:
    return SamplingParams(**merged)
  except InvalidRequestError:
    raise
  except (TypeError, ValueError) as e:
    # A wrong type (temperature="hot") fails inside __post_init__ with a comparison error.
    raise InvalidRequestError(f"invalid sampling parameters {fields}: {e}") from None


def normalize_messages(messages) -> list[dict]:
  """Checks chat messages; joins OpenAI content parts (`[{"type": "text", "text": ...}]`) into one string."""
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'")
    content = m.get("content")
    if isinstance(content, list):
      texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
      if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
        raise InvalidRequestError(f"messages[{i}].content: only text parts are supported")
      content = "".join(texts)
    if not isinstance(content, str):
      raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text parts")
    out.append({**m, "content": content})
  return out


def check_prompt(prompt):
  """A prompt is a string or a list of token ids (the engine checks emptiness and length)."""
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    return prompt
  raise InvalidRequestError(f"prompt must be a string or a list of token ids, got {_short(prompt)}")


def _short(value, limit: int = 80) -> str:
  text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def line_key(line_no: int) -> str:
  return f"line-{line_no}"


def id_key(value) -> str | None:
  """The key of an id value, or None if it is not a usable id (a string or an integer)."""
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    return None
  return str(value)


def parse_jserve_line(obj: dict, line_no: int, defaults: dict) -> BatchItem:
  raw_id = obj.get("id")
  if raw_id is None:
    item = BatchItem(key=line_key(line_no), line_no=line_no, id_value=line_key(line_no))
  elif id_key(raw_id) is None:
    item = BatchItem(key=line_key(line_no), line_no=line_no, id_value=line_key(line_no))
    item.error = f"line {line_no}: id must be a string or an integer, got {_short(raw_id)}"
    return item
  else:
    item = BatchItem(key=id_key(raw_id), line_no=line_no, id_value=raw_id)
  try:
    given = [f for f in _PROMPT_FIELDS if obj.get(f) is not None]
    if len(given) != 1:
      raise InvalidRequestError("needs exactly one of 'prompt', 'messages' or 'prompt_token_ids'"
                                + (f", got {', '.join(given)}" if given else ""))
    if given[0] == "messages":
      item.messages = normalize_messages(obj["messages"])
    else:
      item.prompt = check_prompt(obj[given[0]])
    fields = {k: v for k, v in obj.items() if k not in ("id", *_PROMPT_FIELDS)}
    unknown = sorted(set(fields) - sampling_fields())
    if unknown:
      raise InvalidRequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; a line has 'id', "
                                f"'prompt' or 'messages', and SamplingParams fields")
    item.params = make_params(defaults, fields)
  except InvalidRequestError as e:
    item.error = f"line {line_no}: {e}"
  return item


def _iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
  try:
    f = open(path, "rb")  # noqa: SIM115 (closed by the `with` below; open() alone is in the try)
  except OSError as e:
    raise BatchInputError(f"cannot read input {path!r}: {e.strerror}") from None
  with f:
    for line_no, raw in enumerate(f, start=1):
      if raw.strip():
        yield line_no, raw


def _decode(raw: bytes, line_no: int) -> tuple[Any, str | None]:
  try:
    return json.loads(raw), None
  except UnicodeDecodeError as e:
    return None, f"line {line_no}: not UTF-8 text ({e.reason} at byte {e.start})"
  except json.JSONDecodeError as e:
    return None, f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})"


def detect_format(path: str) -> str:
  """OPENAI if the first line holding a JSON object has `custom_id` or `body`, else JSERVE."""
  for line_no, raw in _iter_lines(path):
    obj, _ = _decode(raw, line_no)
    if isinstance(obj, dict):
      return OPENAI if ("custom_id" in obj or "body" in obj) else JSERVE
  return JSERVE


def read_input(path: str, fmt: str = "auto", defaults: dict | None = None, num_shards: int = 1,
               shard_index: int = 0) -> tuple[str, list[BatchItem], list[str]]:
  """Parses `path`; returns (format, this shard's items, every key of the file in line order).

  Lines go to shard `(line_no - 1) % num_shards`: a deterministic split that every host
  computes alike. Raises BatchInputError if the file is unreadable or two lines share a key.
  """
  from jserve.batch import openai_format
  if fmt not in FORMATS:
    raise BatchInputError(f"input_format={fmt!r}: expected one of {', '.join(FORMATS)}")
  fmt = detect_format(path) if fmt == "auto" else fmt
  defaults = dict(defaults or {})
  items, all_keys, first_line = [], [], {}
  duplicates = []
  for line_no, raw in _iter_lines(path):
    obj, error = _decode(raw, line_no)
    if error is None and not isinstance(obj, dict):
      error = f"line {line_no}: expected a JSON object, got {_short(obj)}"
    if error is not None:
      item = BatchItem(key=line_key(line_no), line_no=line_no, id_value=line_key(line_no), error=error)
    elif fmt == OPENAI:
      item = openai_format.parse_line(obj, line_no, defaults)
    else:
      item = parse_jserve_line(obj, line_no, defaults)
    if item.key in first_line:
      duplicates.append(f"{item.key!r} (lines {first_line[item.key]} and {line_no})")
      continue
    first_line[item.key] = line_no
    all_keys.append(item.key)
    if (line_no - 1) % num_shards == shard_index:
      items.append(item)
  if duplicates:
    more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
    raise BatchInputError(f"{path}: ids must be unique, but these repeat: {', '.join(duplicates[:3])}{more}")
  return fmt, items, all_keys

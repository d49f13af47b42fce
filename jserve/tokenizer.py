"""Tokenizer from a checkpoint directory: Hugging Face `tokenizers`, special tokens, chat template.

The chat template comes from `chat_template.jinja` (transformers 5) or the
`chat_template` field of `tokenizer_config.json` (transformers 4), and is
rendered in Jinja2's immutable sandbox: a template is code from a download.
"""

import datetime
import json
import os

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from jserve.errors import CheckpointError, InvalidRequestError


def _token_str(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class Tokenizer:
  """Text <-> token ids for one checkpoint, with its EOS ids and chat template."""

  def __init__(self, model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
      raise CheckpointError(f"{model_dir!r} has no tokenizer.json")
    try:
      self._tok = HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
      raise CheckpointError(f"cannot read {path!r}: {e}") from None
    config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    gen_config = _read_json(os.path.join(model_dir, "generation_config.json"))
    model_config = _read_json(os.path.join(model_dir, "config.json"))
    self.bos_token = _token_str(config.get("bos_token"))
    self.eos_token = _token_str(config.get("eos_token"))
    self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
    eos_ids = set()
    for source in (gen_config.get("eos_token_id"), model_config.get("eos_token_id")):
      if isinstance(source, list):
        eos_ids.update(int(i) for i in source)
      elif source is not None:
        eos_ids.add(int(source))
    if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
      eos_ids.add(self._tok.token_to_id(self.eos_token))
    self.eos_token_ids = frozenset(eos_ids)
    template_path = os.path.join(model_dir, "chat_template.jinja")
    template = None
    if os.path.exists(template_path):
      with open(template_path) as f:
        template = f.read()
    elif isinstance(config.get("chat_template"), str):
      template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named templates; take "default"
      named = {t["name"]: t["template"] for t in config["chat_template"]}
      template = named.get("default")
    self.chat_template = template
    self._compiled_template = None

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(token_id)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders chat messages to the prompt text the model was trained on."""
    if self.chat_template is None:
      raise InvalidRequestError("this model has no chat template; send a plain prompt instead of messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
      raise InvalidRequestError("messages must be a list of objects with a 'role' and 'content'")
    if self._compiled_template is None:
      env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

      def raise_exception(message):
        raise InvalidRequestError(f"chat template refused the messages: {message}")

      env.globals["raise_exception"] = raise_exception
      env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
      env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
      self._compiled_template = env.from_string(self.chat_template)
    try:
      return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                            **kwargs)
    except jinja2.TemplateError as e:
      raise InvalidRequestError(f"chat template failed: {e}") from None


class IncrementalDetokenizer:
  """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

  Text is emitted once the decoded window no longer ends in U+FFFD (an
  incomplete UTF-8 sequence); a few prompt tokens give the first output token
  its left context, so leading spaces decode as they will in the full text.
  """

  _CONTEXT = 5

  def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._ids = list(prompt_ids[-self._CONTEXT:])
    self._prefix_offset = 0
    self._read_offset = len(self._ids)

  def _decode(self, start, end=None):
    return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

  def add(self, new_ids) -> str:
    """Appends token ids; returns the text that became final."""
    self._ids.extend(new_ids)
    prefix = self._decode(self._prefix_offset, self._read_offset)
    full = self._decode(self._prefix_offset)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
      self._prefix_offset = self._read_offset
      self._read_offset = len(self._ids)
      return full[len(prefix):]
    return ""

  def flush(self) -> str:
    """Text still held back at the end of the sequence (an incomplete character, as U+FFFD)."""
    prefix = self._decode(self._prefix_offset, self._read_offset)
    full = self._decode(self._prefix_offset)
    self._prefix_offset = self._read_offset = len(self._ids)
    return full[len(prefix):]

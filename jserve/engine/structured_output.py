"""Structured output: JSON schema, regex and Lark grammars, enforced by a token bitmask per sequence.

The library is llguidance, for three reasons. It is one abi3 wheel with no
dependencies, so the same file installs here and runs on the GPU image, which
has no package registry and neither library (it can be carried there as a
wheel); xgrammar needs torch, transformers, triton and apache-tvm-ffi and ships
a wheel per CPython version. It fills the masks of a whole batch in parallel in
Rust with the GIL released, so the host computes them beside the device's
forward pass. And it validates a grammar without a tokenizer, so a bad schema
or regex is refused at submission with the library's own message.

Each step the engine hands the runner the matchers of the batch's constrained
sequences; a worker thread fills their rows of a [B, ceil(V / 32)] int32
bitmask (bit i of word i // 32 allows token i) while the device runs the
forward pass, and the step reads it through a host callback just before
sampling. After a token is sampled the matcher consumes it; once the grammar is
complete the mask allows only EOS.
"""

import concurrent.futures
import json
import os

import llguidance
import llguidance.numpy
import numpy as np

from jserve.errors import InvalidRequestError

# Compact JSON: flexible whitespace lets a weak model pad with spaces until max_tokens runs out.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(params) -> str:
  """The llguidance grammar of a request's json_schema, regex or (Lark) grammar."""
  if params.json_schema is not None:
    schema = params.json_schema
    if isinstance(schema, str):
      try:
        schema = json.loads(schema)
      except json.JSONDecodeError as e:
        raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
      raise InvalidRequestError(f"json_schema={schema!r}: must be a JSON object")
    try:
      return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as e:
      raise InvalidRequestError(f"json_schema: {e}") from None
  if params.regex is not None:
    if not isinstance(params.regex, str):
      raise InvalidRequestError(f"regex={params.regex!r}: must be a string")
    return llguidance.LLMatcher.grammar_from_regex(params.regex)
  if not isinstance(params.grammar, str):
    raise InvalidRequestError(f"grammar={params.grammar!r}: must be a Lark grammar string")
  return llguidance.LLMatcher.grammar_from_lark(params.grammar)


def _field(params) -> str:
  return "json_schema" if params.json_schema is not None else "regex" if params.regex is not None else "grammar"


def validate(params):
  """Raises InvalidRequestError carrying llguidance's message if the schema, regex or grammar is invalid."""
  message = llguidance.LLMatcher.validate_grammar(grammar_text(params))
  if message and not message.startswith("WARNING"):
    raise InvalidRequestError(f"invalid {_field(params)}: {message}")


class GrammarBackend:
  """Matchers for one model's tokenizer, and the batch bitmask computed beside the device."""

  def __init__(self, model_dir: str, vocab_size: int, eos_token_ids):
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
      tokenizer_json = f.read()
    self.vocab_size = vocab_size
    self.num_words = (vocab_size + 31) // 32
    self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                            eos_token=sorted(eos_token_ids) or None)
    self._executor = llguidance.LLExecutor()
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jserve-grammar")

  def matcher(self, params) -> llguidance.LLMatcher:
    m = llguidance.LLMatcher(self.tokenizer, grammar_text(params), log_level=0)
    if m.is_error():
      raise InvalidRequestError(f"invalid {_field(params)}: {m.get_error()}")
    return m

  def fill(self, rows: list, num_rows: int) -> np.ndarray:
    """[num_rows, words] bitmask: each (row, matcher) gets its allowed tokens, other rows all ones."""
    mask_BW = np.full((num_rows, self.num_words), -1, dtype=np.int32)
    if rows:
      llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in rows], mask_BW)
    return mask_BW

  def fill_async(self, rows: list, num_rows: int) -> concurrent.futures.Future:
    return self._worker.submit(self.fill, rows, num_rows)

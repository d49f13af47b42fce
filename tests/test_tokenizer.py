"""Tokenizer: special tokens, chat template, and the incremental detokenizer."""

import pytest
from hypothesis import given, settings, strategies as st

from jserve.errors import InvalidRequestError
from jserve.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
  return Tokenizer(tiny_model_dir)


def test_bos_is_prepended_and_eos_read_from_checkpoint(tok):
  ids = tok.encode("x = 1")
  assert ids[0] == tok.bos_token_id
  assert tok.token_to_id("<|end_of_text|>") in tok.eos_token_ids


def test_chat_template_renders_in_sandbox(tok):
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert text == "<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_cannot_reach_python_internals(tok):
  tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
  tok._compiled_template = None
  with pytest.raises(Exception, match="unsafe|not safely|access"):
    tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_messages_must_have_roles(tok):
  with pytest.raises(InvalidRequestError, match="'role'"):
    tok.apply_chat_template(["hello"])


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab é€😀\n中")), min_size=1, max_size=30))
def test_incremental_detokenizer_streams_exactly_the_full_text(tok, text):
  ids = tok.encode(text, add_special_tokens=False)
  detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("prefix"))
  pieces = [detok.add([t]) for t in ids]
  pieces.append(detok.flush())
  assert all("\ufffd" not in p for p in pieces[:-1])
  assert "".join(pieces) == tok.decode(ids)


def test_text_decoded_once_at_the_end_equals_streamed_text(tiny_model_dir):
  """Non-streamed requests without stop strings decode once at the finish; the text must not differ."""
  from jserve import LLM, SamplingParams
  llm = LLM(tiny_model_dir, dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
            kv_cache_gib=0.01)
  params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
  final = llm.generate(["é€ x = '😀'"], params, use_tqdm=False)[0].outputs[0]
  engine = llm.engine
  engine.add_request("s", "é€ x = '😀'", params, stream=True)
  pieces = []
  while engine.has_unfinished():
    pieces += [o.outputs[0].text for o in engine.step()]
  assert "".join(pieces) == final.text
  assert final.text == llm.tokenizer.decode(final.token_ids)

"""Bad sampling parameters are refused when the request is made, with a message naming the field."""

import pytest

from jserve import SamplingParams
from jserve.errors import InvalidRequestError


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), r"temperature=-0\.5: must be >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan"),
    (dict(top_p=0.0), r"top_p=0\.0: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1\.5: must be in \(0, 1\]"),
    (dict(top_k=-2), r"top_k=-2: must be -1"),
    (dict(n=0), r"n=0: must be at least 1"),
    (dict(logprobs=21), r"logprobs=21: must be in \[0, 20\]"),
    (dict(prompt_logprobs=25), r"prompt_logprobs=25: must be in \[0, 20\]"),
    (dict(min_p=1.5), r"min_p=1\.5"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0\.0: must be > 0"),
    (dict(presence_penalty=3.0), r"presence_penalty=3\.0"),
    (dict(frequency_penalty=-2.5), r"frequency_penalty=-2\.5"),
    (dict(max_tokens=4, min_tokens=5), r"min_tokens=5"),
    (dict(logit_bias={-1: 1.0}), r"logit_bias token id -1 is negative"),
    (dict(logit_bias={3: 200.0}), r"logit_bias\[3\]=200\.0: must be a number in \[-100, 100\]"),
    (dict(logit_bias={"x": 1.0}), r"logit_bias key 'x': must be a token id"),
    (dict(logit_bias={i: 1.0 for i in range(301)}), r"logit_bias has 301 entries; at most 300"),
    (dict(stop_token_ids=[-3]), r"stop_token_ids=\[-3\]"),
    (dict(stop=[""]), r"stop=\[''\]"),
    (dict(n=1.5), r"n=1\.5: must be an integer"),
    (dict(regex="a", grammar="start: \"a\""), r"json_schema, regex and grammar are exclusive"),
], ids=lambda x: str(x)[:40])
def test_bad_value_is_refused_naming_the_field(kwargs, message):
  with pytest.raises(InvalidRequestError, match=message):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "frobnicate"}}}),
     r"invalid json_schema: .*frobnicate"),
    (dict(json_schema="{not json"), r"json_schema is not valid JSON"),
    (dict(regex="ab(c"), r"(?s)invalid regex: .*unclosed group"),
    (dict(grammar="start: missing_rule"), r"invalid grammar: .*unknown name"),
])
def test_bad_structure_is_refused_with_the_grammar_librarys_message(kwargs, message):
  with pytest.raises(InvalidRequestError, match=message):
    SamplingParams(**kwargs)


def test_good_values_are_normalized():
  p = SamplingParams(stop="END", logit_bias={"17": 2}, stop_token_ids=[3], json_schema={"type": "integer"})
  assert p.stop == ["END"] and p.logit_bias == {17: 2.0} and p.structured
  assert SamplingParams(top_k=-1, top_p=1.0, temperature=0).greedy

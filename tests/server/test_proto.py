"""The checked-in gRPC code matches jserve.proto, and every SamplingParams field is reachable from both APIs."""

import ast
import dataclasses
import filecmp
import importlib.metadata
import os
import re

import pytest

from jserve.engine.request import SamplingParams
from jserve.server import openai_protocol
from jserve.server.convert import sampling_params_from_proto
from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import regenerate

SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
# A valid, non-default value for each field (json_schema, regex and grammar are exclusive: tested apart).
EXAMPLE = dict(n=2, max_tokens=7, min_tokens=1, temperature=0.5, top_k=5, top_p=0.9, min_p=0.1,
               repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={3: 1.5},
               seed=42, stop=["\n"], stop_token_ids=[7], ignore_eos=True, include_stop_str_in_output=True,
               skip_special_tokens=False, logprobs=3, prompt_logprobs=2)
STRUCTURED = dict(json_schema={"type": "object"}, regex="[a-z]+", grammar='start: "a"')


def _embedded_descriptor(path: str) -> bytes:
  """The serialized FileDescriptorProto that a generated jserve_pb2.py registers."""
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
      return ast.literal_eval(node.args[0])
  raise AssertionError(f"{path} registers no descriptor")


def test_generated_code_is_fresh(tmp_path):
  paths = regenerate.generate(str(tmp_path))
  stale = "is stale: run `python -m jserve.server.proto.regenerate`"
  # Whatever the grpcio-tools version, the schema in jserve_pb2 must be the .proto's.
  assert _embedded_descriptor(paths[0]) == pb.DESCRIPTOR.serialized_pb, f"jserve_pb2.py {stale}"
  # With the grpcio-tools that wrote them, every generated file must be byte for byte the same.
  with open(os.path.join(regenerate.PROTO_DIR, "jserve_pb2_grpc.py")) as f:
    written_by = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", f.read()).group(1)
  if written_by != importlib.metadata.version("grpcio-tools"):
    return  # another grpcio-tools formats differently; the schema check above still holds
  for path in paths:
    checked_in = os.path.join(regenerate.PROTO_DIR, os.path.basename(path))
    assert filecmp.cmp(path, checked_in, shallow=False), f"{checked_in} {stale}"


@pytest.mark.parametrize("field", SAMPLING_FIELDS)
def test_every_sampling_field_is_in_the_proto(field):
  assert field in pb.SamplingParams.DESCRIPTOR.fields_by_name, (
      f"SamplingParams.{field} has no field in jserve.proto's SamplingParams: add it and regenerate")


def test_proto_sampling_params_reach_the_engine():
  msg = pb.SamplingParams(**{k: v for k, v in EXAMPLE.items()})
  params = sampling_params_from_proto(msg)
  for k, v in EXAMPLE.items():
    assert getattr(params, k) == v, k
  for k, v in STRUCTURED.items():
    value = '{"type": "object"}' if k == "json_schema" else v
    assert getattr(sampling_params_from_proto(pb.SamplingParams(**{k: value})), k) == v


def test_unset_proto_fields_keep_engine_defaults():
  assert sampling_params_from_proto(pb.SamplingParams()) == SamplingParams()


def test_http_sampling_params_reach_the_engine():
  body = {k: v for k, v in EXAMPLE.items() if k not in ("logit_bias", "logprobs")}
  body["logit_bias"] = {"3": 1.5}
  body["logprobs"] = 3
  params = openai_protocol.sampling_params(body, chat=False, default_max_tokens=16)
  for k, v in EXAMPLE.items():
    assert getattr(params, k) == v, k
  chat = openai_protocol.sampling_params({"logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5},
                                         chat=True, default_max_tokens=None)
  assert (chat.logprobs, chat.max_tokens) == (3, 5)
  fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
  assert openai_protocol.sampling_params(fmt, chat=True, default_max_tokens=None).json_schema == {"type": "object"}
  assert openai_protocol.sampling_params({"guided_regex": "[a-z]+"}, chat=False, default_max_tokens=16).regex
  assert openai_protocol.sampling_params({"guided_grammar": 'start: "a"'}, chat=False,
                                         default_max_tokens=16).grammar


def test_every_sampling_field_is_accepted_over_http():
  handled = set(openai_protocol._ENGINE_FIELDS) | {"logprobs", "stop", "logit_bias", "json_schema", "regex",
                                                   "grammar"}
  missing = sorted(set(SAMPLING_FIELDS) - handled)
  assert not missing, f"SamplingParams fields {missing} cannot be set over HTTP: map them in openai_protocol.py"

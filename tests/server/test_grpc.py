"""The gRPC service of a real `jserve serve` process, through the generated stub, health and reflection."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from tests.server.conftest import API_KEY, scrape, wait_idle

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def channel(server):
  with grpc.insecure_channel(server.grpc_address) as ch:
    yield ch


@pytest.fixture(scope="module")
def stub(channel):
  return pb_grpc.GenerationStub(channel)


def _generate(stub, timeout=60, metadata=AUTH, **kwargs) -> list[pb.GenerateResponse]:
  return list(stub.Generate(pb.GenerateRequest(**kwargs), metadata=metadata, timeout=timeout))


def _greedy(max_tokens, **kwargs):
  return pb.SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def _still_serving(stub):
  responses = _generate(stub, text="still there?", sampling_params=_greedy(2))
  assert responses[-1].choices[0].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_generate_streams_tokens_then_finish_reason_and_usage(stub):
  # How the 8 tokens split into messages depends on timing (deltas that pile up while the handler is busy
  # merge into one, AsyncEngine's stream): everything below holds for any split.
  responses = _generate(stub, request_id="r1", text="def add(a, b):", sampling_params=_greedy(8, ignore_eos=True))
  assert responses and all(r.request_id == "r1" for r in responses)
  tokens = [t for r in responses for c in r.choices for t in c.token_ids]
  assert len(tokens) == 8
  assert responses[0].prompt_token_ids and not responses[-1].prompt_token_ids
  assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1] for c in r.choices)
  assert responses[-1].choices[0].finish_reason == pb.FINISH_REASON_LENGTH
  assert responses[-1].usage.completion_tokens == 8
  assert responses[-1].usage.prompt_tokens == len(responses[0].prompt_token_ids)
  # Greedy is deterministic, and token ids in give the same tokens out as the text they encode.
  again = _generate(stub, token_ids=pb.TokenIds(ids=responses[0].prompt_token_ids),
                    sampling_params=_greedy(8, ignore_eos=True))
  assert [t for r in again for c in r.choices for t in c.token_ids] == tokens


def test_generate_sends_tokens_before_the_request_finishes(stub):
  # 128 greedy tokens take 128 engine steps: the first message leaves long before the last token exists, unless
  # the handler were starved for the whole generation.
  responses = _generate(stub, text="def add(a, b):", sampling_params=_greedy(128, ignore_eos=True))
  assert len(responses) >= 2, [len(c.token_ids) for r in responses for c in r.choices]
  assert responses[0].choices[0].finish_reason == pb.FINISH_REASON_UNSPECIFIED
  assert sum(len(c.token_ids) for r in responses for c in r.choices) == 128


def test_chat_prompt_and_logprobs(stub):
  chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hello")])
  responses = _generate(stub, chat=chat, sampling_params=_greedy(4, ignore_eos=True, logprobs=2))
  entries = [lp for r in responses for c in r.choices for lp in c.logprobs]
  tokens = [t for r in responses for c in r.choices for t in c.token_ids]
  assert [e.token_id for e in entries] == tokens
  for e in entries:  # greedy: the chosen token is the most likely one
    assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token_id == e.token_id
    assert e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob


def test_n_completions_have_their_own_indexes(stub):
  responses = _generate(stub, text="x = ", sampling_params=pb.SamplingParams(n=2, max_tokens=3, seed=1,
                                                                             ignore_eos=True))
  by_index = {}
  for r in responses:
    for c in r.choices:
      by_index.setdefault(c.index, []).extend(c.token_ids)
  assert sorted(by_index) == [0, 1] and all(len(v) == 3 for v in by_index.values())


def test_model_info(stub):
  info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=10)
  assert info.model_name == "tiny" and info.max_model_len == 256 and info.vocab_size == 1024
  assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32"
  assert info.sharding.tensor_parallel_size == 1 and info.sharding.platform == "cpu"
  assert info.num_kv_pages == 64 and info.page_size == 16
  assert info.quantization == ""  # float32 weights (fp8: test_model_info.py)
  assert info.activation_quantization == "" and info.kv_cache_dtype == "float32"  # the model's dtype


def test_metrics_rpc_serves_what_http_serves(stub, server):
  m = stub.GetMetrics(pb.GetMetricsRequest(), metadata=AUTH, timeout=10)
  assert m.kv_total_pages == 64
  assert "jserve_time_to_first_token_seconds_bucket" in m.prometheus_text
  assert scrape(server)["jserve_kv_cache_total_pages"] == m.kv_total_pages


def test_health_is_serving(channel):
  health = health_pb2_grpc.HealthStub(channel)
  for service in ("", "jserve.v1.Generation"):
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)  # needs no API key
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel):
  reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
  replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 metadata=AUTH, timeout=10))
  names = {s.name for s in replies[0].list_services_response.service}
  assert {"jserve.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
  replies = list(reflection.ServerReflectionInfo(
      iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="jserve.v1.Generation")]),
      metadata=AUTH, timeout=10))
  assert replies[0].file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("metadata,message", [
    ((), "missing API key"),
    ((("authorization", "Bearer wrong"),), "invalid API key"),
    ((("authorization", f"Basic {API_KEY}"),), "expected 'Bearer <key>'"),
])
def test_wrong_api_key_is_unauthenticated(stub, metadata, message):
  with pytest.raises(grpc.RpcError) as e:
    _generate(stub, metadata=metadata, text="hi", sampling_params=_greedy(2))
  assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in e.value.details()
  with pytest.raises(grpc.RpcError) as e:
    stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
  assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
  _still_serving(stub)


@pytest.mark.parametrize("request_kwargs,code,message", [
    (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "set text, chat or token_ids"),
    (dict(text="x = 1\n" * 100), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len=256"),
    (dict(text="hi", sampling_params=pb.SamplingParams(max_tokens=300)), grpc.StatusCode.INVALID_ARGUMENT,
     "plus max_tokens=300 exceeds max_model_len=256"),
    (dict(token_ids=pb.TokenIds(ids=[5, 99999])), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (dict(text="hi", sampling_params=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature=-1.0"),
    (dict(text="hi", sampling_params=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(text="hi", sampling_params=pb.SamplingParams(n=0)), grpc.StatusCode.INVALID_ARGUMENT, "n=0"),
    (dict(text="hi", sampling_params=pb.SamplingParams(json_schema="{not json")), grpc.StatusCode.INVALID_ARGUMENT,
     "json_schema is not valid JSON"),
    (dict(text="hi", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "'gpt-4' does not exist"),
    (dict(text="x" * 70000), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(stub, request_kwargs, code, message):
  with pytest.raises(grpc.RpcError) as e:
    _generate(stub, **request_kwargs)
  assert e.value.code() == code, e.value.details()
  assert message in e.value.details()
  _still_serving(stub)


def test_cancel_mid_stream_frees_the_request(stub, server):
  before = scrape(server).get('jserve_requests_total{finish_reason="abort",model_name="tiny"}', 0)
  call = stub.Generate(pb.GenerateRequest(text="count:", sampling_params=_greedy(200, ignore_eos=True)),
                       metadata=AUTH, timeout=60)
  for i, _ in enumerate(call):
    if i == 3:
      call.cancel()
      break
  m = wait_idle(server)
  assert m["jserve_kv_cache_used_pages"] == 0 and m["jserve_num_requests_running"] == 0
  assert m['jserve_requests_total{finish_reason="abort",model_name="tiny"}'] == before + 1
  _still_serving(stub)


def test_deadline_exceeded_aborts_the_request(stub, server):
  # The deadline is a quarter of what the same request takes here, so that it expires mid-generation
  # on a fast machine as on a slow one (a fixed 0.3 s was longer than 240 tokens on a warm cache).
  start = time.monotonic()
  _generate(stub, text="count:", sampling_params=_greedy(240, ignore_eos=True))
  full_s = time.monotonic() - start
  with pytest.raises(grpc.RpcError) as e:
    _generate(stub, timeout=full_s / 4, text="count:", sampling_params=_greedy(240, ignore_eos=True))
  assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
  m = wait_idle(server)
  assert m["jserve_kv_cache_used_pages"] == 0 and m["jserve_num_requests_running"] == 0
  _still_serving(stub)

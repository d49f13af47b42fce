"""The OpenAI-compatible HTTP endpoint of a real `jserve serve` process, through the `openai` client."""

import json
import socket

import httpx2
import openai
import pytest

from tests.server.conftest import API_KEY, scrape, wait_idle


@pytest.fixture(scope="module")
def client(server):
  with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
    yield c


@pytest.fixture(scope="module")
def http(server):
  with httpx2.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
    yield c


def _still_serving(client):
  out = client.completions.create(model="tiny", prompt="still there?", max_tokens=2, temperature=0)
  assert out.choices[0].finish_reason in ("stop", "length")


def test_completion(client):
  out = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
  assert out.object == "text_completion" and out.model == "tiny" and len(out.choices) == 1
  assert out.choices[0].finish_reason == "length" and out.choices[0].text
  assert out.usage.completion_tokens == 8 and out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_streamed_completion_equals_the_whole_one(client):
  kwargs = dict(model="tiny", prompt="import os\n", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
  whole = client.completions.create(**kwargs)
  chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_completion_of_several_prompts_with_echo_and_logprobs(client):
  out = client.completions.create(model="tiny", prompt=["a = 1", "b = 2"], max_tokens=3, temperature=0,
                                  echo=True, logprobs=2, extra_body={"ignore_eos": True})
  assert [c.index for c in out.choices] == [0, 1]
  assert out.choices[0].text.startswith("a = 1") and out.choices[1].text.startswith("b = 2")
  lp = out.choices[0].logprobs
  assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_chat(client):
  out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=1,
                                       extra_body={"ignore_eos": True})
  msg = out.choices[0].message
  assert out.object == "chat.completion" and msg.role == "assistant" and msg.content
  assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
  assert len(out.choices[0].logprobs.content) == 6


def test_streamed_chat_equals_the_whole_one(client):
  kwargs = dict(model="tiny", messages=[{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "hi there"}],
                max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
  whole = client.chat.completions.create(**kwargs)
  chunks = list(client.chat.completions.create(stream=True, **kwargs))
  assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks)
  assert text == whole.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_metrics(client, server):
  assert [m.id for m in client.models.list().data] == ["tiny"]
  assert client.models.retrieve("tiny").id == "tiny"
  card = httpx2.get(f"{server.http_url}/v1/models/tiny", headers={"Authorization": f"Bearer {API_KEY}"}).json()
  assert card["max_model_len"] == 256 and card["quantization"] is None  # fp8: test_model_info.py
  assert card["activation_quantization"] is None and card["kv_cache_dtype"] == "float32"
  assert httpx2.get(f"{server.http_url}/health").json() == {"status": "ok"}
  m = scrape(server)
  assert m["jserve_kv_cache_total_pages"] == 64
  for name in ("jserve_time_to_first_token_seconds_count", "jserve_time_per_output_token_seconds_count",
               "jserve_e2e_request_latency_seconds_count", "jserve_request_queue_time_seconds_count"):
    assert m[name] > 0, name
  for name in ("jserve_num_requests_running", "jserve_num_requests_waiting", "jserve_kv_cache_used_pages",
               "jserve_prefix_cache_hit_rate", "jserve_num_preemptions_total"):
    assert name in m


def _error(response, status: int, fragment: str):
  assert response.status_code == status, response.text
  body = response.json()
  assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == status
  assert fragment in body["error"]["message"], body


@pytest.mark.parametrize("path,body,status,fragment", [
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, 400, "prompt is empty"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt is missing"),
    ("/v1/completions", {"prompt": "x = 1\n" * 100}, 400, "max_model_len=256"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 400, "exceeds max_model_len=256"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature=-0.5"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature='hot': expected a number"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p=1.5"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs=50"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, 400, "json_schema"),
    ("/v1/completions", ["not", "an", "object"], 400, "must be a JSON object"),
])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(http, client, path, body, status, fragment):
  _error(http.post(path, json=body), status, fragment)
  _still_serving(client)


def test_malformed_json(http, client):
  _error(http.post("/v1/completions", content=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"}),
         400, "not valid JSON")
  _still_serving(client)


def test_oversized_body(http, client):
  _error(http.post("/v1/completions", json={"prompt": "x" * 70000}), 413, "over the limit of 65536 bytes")
  _still_serving(client)


def test_unknown_route(http):
  _error(http.get("/v1/nothing"), 404, "/v1/nothing")


@pytest.mark.parametrize("headers,fragment", [({}, "missing API key"),
                                              ({"Authorization": "Bearer nope"}, "invalid API key")])
def test_wrong_api_key_is_401(server, client, headers, fragment):
  _error(httpx2.post(f"{server.http_url}/v1/completions", json={"prompt": "hi"}, headers=headers), 401, fragment)
  _error(httpx2.get(f"{server.http_url}/v1/models", headers=headers), 401, fragment)
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="nope", max_retries=0).models.list()
  _still_serving(client)


def _raw_request(server, body: dict) -> socket.socket:
  data = json.dumps(body).encode()
  sock = socket.create_connection(("127.0.0.1", server.http_port))
  sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
  return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_disconnects_is_aborted(server, client, stream):
  key = 'jserve_requests_total{finish_reason="abort",model_name="tiny"}'
  before = scrape(server).get(key, 0)
  sock = _raw_request(server, {"prompt": "count:", "max_tokens": 240, "ignore_eos": True, "stream": stream})
  if stream:
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has started
  else:
    import time
    time.sleep(0.2)
  sock.close()
  m = wait_idle(server)
  assert m["jserve_kv_cache_used_pages"] == 0 and m["jserve_num_requests_running"] == 0
  assert m[key] == before + 1
  _still_serving(client)

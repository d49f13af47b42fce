"""OpenAI batch files in, OpenAI batch output lines out, with the same text as jserve's own format."""

from jserve.batch import BatchConfig, run_batch
from jserve.batch.items import BatchItem
from jserve.batch.openai_format import OpenAIRequest
from jserve.batch.records import result_record
from jserve.engine.request import CompletionOutput, RequestOutput
from tests.batch.util import by_key, read_jsonl, write_jsonl

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _line(custom_id, url, **body):
  return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}}


def test_openai_batch_file_round_trip(tmp_path, replicas):
  messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a stack class"}]
  rows = [
      _line("chat-1", CHAT, messages=messages, max_tokens=7, temperature=0),
      _line("chat-parts", CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "a stack "},
                                                                       {"type": "text", "text": "class"}]}],
            max_completion_tokens=5, temperature=0),
      _line("cmpl-1", COMPLETIONS, prompt="def fib(n):", max_tokens=6, temperature=0, stop=["\n\n"]),
      _line("bad-url", "/v1/embeddings", input="x"),
      _line("bad-param", CHAT, messages=messages, top_p=7),
      _line("streaming", COMPLETIONS, prompt="x", stream=True),
      _line("tools", CHAT, messages=messages, tools=[{"type": "function"}]),
      "not json at all",
  ]
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  summary = run_batch(BatchConfig(input_path=inp, output_path=str(out)), replicas)
  assert (summary.finished, summary.failed) == (3, 5)

  records = by_key(read_jsonl(out), key="custom_id")
  assert set(records) == {"chat-1", "chat-parts", "cmpl-1", "bad-url", "bad-param", "streaming", "tools", "line-8"}
  for key in ("chat-1", "chat-parts", "cmpl-1"):
    rec = records[key]
    assert rec["error"] is None and rec["id"].startswith("batch_req_")
    assert rec["response"]["status_code"] == 200
    body = rec["response"]["body"]
    assert body["model"] == "tiny"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
  chat = records["chat-1"]["response"]["body"]
  assert chat["object"] == "chat.completion"
  assert chat["choices"][0]["message"]["role"] == "assistant"
  assert chat["usage"]["completion_tokens"] == 7 and chat["choices"][0]["finish_reason"] == "length"
  assert records["chat-parts"]["response"]["body"]["usage"]["completion_tokens"] == 5
  cmpl = records["cmpl-1"]["response"]["body"]
  assert cmpl["object"] == "text_completion" and isinstance(cmpl["choices"][0]["text"], str)

  def error_message(key):
    rec = records[key]
    assert rec["response"]["status_code"] == 400 and rec["error"] is None
    return rec["response"]["body"]["error"]["message"]

  assert "url='/v1/embeddings': expected '/v1/chat/completions' or '/v1/completions'" in error_message("bad-url")
  assert "top_p=7: must be in (0, 1]" in error_message("bad-param")
  assert "stream=true: a batch request cannot stream" in error_message("streaming")
  assert "body field 'tools' is not supported" in error_message("tools")
  assert records["line-8"]["response"] is None
  assert records["line-8"]["error"]["code"] == "invalid_line"

  # The same prompts in jserve's format give the same text (greedy): the format is only a wrapper.
  same = write_jsonl(tmp_path / "same.jsonl", [
      {"id": "chat-1", "messages": messages, "max_tokens": 7, "temperature": 0},
      {"id": "cmpl-1", "prompt": "def fib(n):", "max_tokens": 6, "temperature": 0, "stop": ["\n\n"]}])
  run_batch(BatchConfig(input_path=same, output_path=str(tmp_path / "same.out.jsonl")), replicas)
  plain = by_key(read_jsonl(tmp_path / "same.out.jsonl"))
  assert plain["chat-1"]["text"] == chat["choices"][0]["message"]["content"]
  assert plain["cmpl-1"]["text"] == cmpl["choices"][0]["text"]

  # Resuming reads custom_id back: nothing is left to run, the model is not even asked for.
  calls = len(replicas.calls)
  again = run_batch(BatchConfig(input_path=inp, output_path=str(out)), replicas)
  assert (again.skipped, again.finished, len(replicas.calls)) == (8, 0, calls)


class _Tokenizer:
  def decode(self, ids, skip_special_tokens=True):
    return "".join(f"<{i}>" for i in ids)


def test_logprobs_are_written_in_openai_shapes():
  completion = CompletionOutput(index=0, text="<5><9>", token_ids=[5, 9], cumulative_logprob=-0.75,
                                logprobs=[{5: -0.25, 6: -1.5}, {9: -0.5, 2: -2.0}], finish_reason="length")
  out = RequestOutput(request_id="r", prompt="p", prompt_token_ids=[1, 2, 3], outputs=[completion], finished=True)
  chat = BatchItem(key="c", line_no=1, id_value="c", openai=OpenAIRequest(chat=True, model=None))
  body = result_record(chat, out, _Tokenizer(), "m")["response"]["body"]
  first = body["choices"][0]["logprobs"]["content"][0]
  assert first["token"] == "<5>" and first["logprob"] == -0.25 and first["bytes"] == list(b"<5>")
  assert [t["token"] for t in first["top_logprobs"]] == ["<5>", "<6>"]
  assert body["model"] == "m"

  cmpl = BatchItem(key="k", line_no=1, id_value="k", openai=OpenAIRequest(chat=False, model="x"))
  logprobs = result_record(cmpl, out, _Tokenizer(), "m")["response"]["body"]["choices"][0]["logprobs"]
  assert logprobs == {"tokens": ["<5>", "<9>"], "token_logprobs": [-0.25, -0.5],
                      "top_logprobs": [{"<5>": -0.25, "<6>": -1.5}, {"<9>": -0.5, "<2>": -2.0}], "text_offset": [0, 3]}

  plain = BatchItem(key="p", line_no=1, id_value="p")
  rec = result_record(plain, out, _Tokenizer(), "m")
  assert rec["token_ids"] == [5, 9] and rec["cumulative_logprob"] == -0.75
  assert rec["logprobs"][1] == {"token_id": 9, "logprob": -0.5, "top_logprobs": {"9": -0.5, "2": -2.0}}

"""Engine output deltas of one HTTP request -> OpenAI JSON: one whole response, or SSE chunks."""

import asyncio
import json

from jserve.engine.async_engine import RequestStream
from jserve.errors import JserveError
from jserve.server import openai_protocol as oai
from jserve.server.convert import TokenText
from jserve.server.service import ServingContext, status_of


def sse(data) -> bytes:
  return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def merged(streams: list[RequestStream]):
  """(prompt index, output delta) from several streams, as they come."""
  if len(streams) == 1:
    async for out in streams[0]:
      yield 0, out
    return
  q: asyncio.Queue = asyncio.Queue()

  async def pump(i, s):
    try:
      async for out in s:
        q.put_nowait((i, out))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      q.put_nowait((i, e))
    q.put_nowait((i, None))

  tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
  try:
    remaining = len(streams)
    while remaining:
      i, item = await q.get()
      if item is None:
        remaining -= 1
      elif isinstance(item, BaseException):
        raise item
      else:
        yield i, item
  finally:
    for t in tasks:
      t.cancel()


class _Run:
  """Turns engine deltas of one HTTP request into OpenAI JSON (a whole response, or SSE chunks)."""

  object_name = ""
  chunk_object_name = ""
  id_prefix = ""

  def __init__(self, ctx: ServingContext, tokenizer, streams: list[RequestStream], params,
               return_token_ids: bool):
    self.ctx = ctx
    self.return_token_ids = return_token_ids  # vLLM's extension: token ids beside the text
    self.tokenizer = tokenizer
    self.streams = streams
    self.params = params
    self.n = params.n
    self.token_text = TokenText(tokenizer)
    self.id = oai.new_id(self.id_prefix)
    self.created = oai.now()
    self.prompt_tokens = [0] * len(streams)
    self.cached_tokens = [0] * len(streams)
    self.completion_tokens = 0

  def _count(self, i: int, out):
    self.prompt_tokens[i] = len(out.prompt_token_ids)
    self.cached_tokens[i] = out.num_cached_tokens
    self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

  def usage(self) -> dict:
    return oai.usage(sum(self.prompt_tokens), self.completion_tokens, sum(self.cached_tokens))

  def _envelope(self, choices, chunk: bool) -> dict:
    return {"id": self.id, "object": self.chunk_object_name if chunk else self.object_name,
            "created": self.created, "model": self.ctx.model_name, "choices": choices}

  async def collect(self) -> dict:
    acc: dict[int, dict] = {}
    try:
      async for i, out in merged(self.streams):
        self._count(i, out)
        for c in out.outputs:
          choice = acc.setdefault(i * self.n + c.index, self._new_choice(i * self.n + c.index, i))
          self._accumulate(choice, c)
          if self.return_token_ids:
            choice.setdefault("prompt_token_ids", out.prompt_token_ids)
            choice["token_ids"] = choice.get("token_ids", []) + list(c.token_ids)
    finally:
      for s in self.streams:
        s.abort()
    result = self._envelope([acc[k] for k in sorted(acc)], chunk=False)
    result["usage"] = self.usage()
    return result

  async def events(self, include_usage: bool):
    try:
      async for i, out in merged(self.streams):
        self._count(i, out)
        for c in out.outputs:
          for choice in self._chunk_choices(i, c):
            if self.return_token_ids:
              choice["token_ids"] = list(c.token_ids)
            yield sse(self._envelope([choice], chunk=True))
      if include_usage:
        chunk = self._envelope([], chunk=True)
        chunk["usage"] = self.usage()
        yield sse(chunk)
    except JserveError as e:
      # The status line is sent already; the error goes in the stream, as OpenAI's servers do.
      status = status_of(e)
      yield sse(oai.error_body(str(e), status.openai_type, status.http_status))
    finally:
      for s in self.streams:
        s.abort()
    yield sse("[DONE]")


class CompletionRun(_Run):
  object_name = "text_completion"
  chunk_object_name = "text_completion"
  id_prefix = "cmpl"

  def __init__(self, ctx, tokenizer, streams, prompts, params, echo: bool, return_token_ids: bool):
    super().__init__(ctx, tokenizer, streams, params, return_token_ids)
    self.prompts = prompts
    self.echo = echo
    self.started: set[int] = set()
    self.offsets: dict[int, int] = {}

  def _prompt_text(self, i: int) -> str:
    p = self.prompts[i]
    return p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False)

  def _new_choice(self, index: int, i: int) -> dict:
    return {"index": index, "text": self._prompt_text(i) if self.echo else "", "logprobs": None,
            "finish_reason": None, "stop_reason": None}

  def _logprobs(self, index: int, c, offset: int):
    if self.params.logprobs is None:
      return None
    return oai.completion_logprobs(c, self.token_text, self.params.logprobs, offset)

  def _accumulate(self, choice: dict, c):
    lp = self._logprobs(choice["index"], c, len(choice["text"]))
    if lp is not None:
      prev = choice["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
      choice["logprobs"] = {k: prev[k] + lp[k] for k in prev}
    choice["text"] += c.text
    if c.finish_reason:
      choice["finish_reason"], choice["stop_reason"] = c.finish_reason, c.stop_reason

  def _chunk_choices(self, i: int, c):
    index = i * self.n + c.index
    text = c.text
    if self.echo and index not in self.started:
      text = self._prompt_text(i) + text
    self.started.add(index)
    offset = self.offsets.get(index, 0)
    self.offsets[index] = offset + len(text)
    logprobs = self._logprobs(index, c, offset)
    if not text and not c.finish_reason and not (logprobs and logprobs["tokens"]) and not (
        self.return_token_ids and c.token_ids):
      return  # a token whose text is held back (part of a character or of a stop string)
    yield {"index": index, "text": text, "logprobs": logprobs,
           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


class ChatRun(_Run):
  object_name = "chat.completion"
  chunk_object_name = "chat.completion.chunk"
  id_prefix = "chatcmpl"

  def __init__(self, ctx, tokenizer, streams, params, return_token_ids: bool):
    super().__init__(ctx, tokenizer, streams, params, return_token_ids)
    self.started: set[int] = set()

  def _logprobs(self, c):
    if self.params.logprobs is None:
      return None
    return oai.chat_logprobs(c, self.token_text, self.params.logprobs)

  def _new_choice(self, index: int, i: int) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None, "stop_reason": None}

  def _accumulate(self, choice: dict, c):
    choice["message"]["content"] += c.text
    lp = self._logprobs(c)
    if lp is not None:
      choice["logprobs"] = {"content": (choice["logprobs"] or {"content": []})["content"] + lp["content"]}
    if c.finish_reason:
      choice["finish_reason"], choice["stop_reason"] = c.finish_reason, c.stop_reason

  def _chunk_choices(self, i: int, c):
    index = i * self.n + c.index
    delta = {}
    if index not in self.started:
      self.started.add(index)
      delta["role"] = "assistant"
    if c.text or "role" in delta:
      delta["content"] = c.text
    logprobs = self._logprobs(c)
    if not delta and not c.finish_reason and not (logprobs and logprobs["content"]) and not (
        self.return_token_ids and c.token_ids):
      return  # a token whose text is held back (part of a character or of a stop string)
    yield {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason,
           "stop_reason": c.stop_reason}

"""The OpenAI-compatible HTTP front end: Starlette on uvicorn, in the same event loop as gRPC.

Routes: POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /v1/models, GET /health,
GET /metrics. Errors use OpenAI's JSON shape. API keys guard /v1/* only, so
that probes and scrapers need none.

A request is aborted in the engine as soon as its client disconnects: both
the streaming and the plain responses watch the connection while they wait
for tokens, rather than finding out at the next write.
"""

import asyncio
import contextlib
import json
import socket

import uvicorn
from absl import logging
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jserve.engine.async_engine import RequestStream
from jserve.errors import ConfigError, InvalidRequestError, JserveError
from jserve.server import openai_protocol as oai
from jserve.server.convert import TokenText
from jserve.server.metrics import CONTENT_TYPE
from jserve.server.service import ServingContext, status_of


def _error_response(error: BaseException) -> JSONResponse:
  status = status_of(error)
  headers = {"Retry-After": "1"} if status.http_status in (429, 503) else None
  return JSONResponse(oai.error_body(str(error), status.openai_type, status.http_status),
                      status_code=status.http_status, headers=headers)


def _sse(data) -> bytes:
  return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _EventStream(StreamingResponse):
  """A server-sent-event response that stops its event source as soon as the client disconnects.

  (Starlette's own StreamingResponse notices a disconnect only at its next write under ASGI 2.4, which
  for a request still waiting for its first token can be long after.)
  """

  def __init__(self, events):
    super().__init__(events, media_type="text/event-stream",
                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    self.events = events

  async def __call__(self, scope, receive, send):
    async def write():
      await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
      async for chunk in self.events:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
      await send({"type": "http.response.body", "body": b"", "more_body": False})

    try:
      await _until_disconnect(receive, write())
    finally:
      await self.events.aclose()  # runs the generator's finally: aborts what is still in the engine


async def _until_disconnect(receive, coro):
  """Runs `coro`; cancels it when the client disconnects first (then returns None)."""
  async def disconnected():
    while (await receive())["type"] != "http.disconnect":
      pass

  task, watch = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
  try:
    await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
  finally:
    watch.cancel()
    if not task.done():
      task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await task
  return None if task.cancelled() else task.result()


async def _merged(streams: list[RequestStream]):
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


class _Endpoint:
  """One generation request's shared plumbing: parse, admit, run, abort."""

  def __init__(self, ctx: ServingContext):
    self.ctx = ctx

  async def read_json(self, request: Request) -> dict:
    ctx = self.ctx
    ctx.authenticate(request.headers.get("authorization"))
    ctx.require_serving()
    length = request.headers.get("content-length")
    if length and length.isdigit():
      ctx.check_size(int(length))
    body = bytearray()
    async for chunk in request.stream():
      body += chunk
      ctx.check_size(len(body))
    try:
      data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
      raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
      raise InvalidRequestError("the request body must be a JSON object")
    ctx.check_model(oai.get(data, "model", str))
    return data

  async def add(self, prompts, params, priority: int) -> list[RequestStream]:
    streams = []
    try:
      for p in prompts:
        streams.append(await self.ctx.engine.add_request(p, params, priority=priority))
    except BaseException:
      for s in streams:
        s.abort()
      raise
    return streams


async def _completions(request: Request):
  ctx: ServingContext = request.app.state.ctx
  ep = _Endpoint(ctx)
  body = await ep.read_json(request)
  engine = ctx.require_serving()
  params = oai.sampling_params(body, chat=False, default_max_tokens=16)
  opts = oai.stream_options(body)
  prompts = oai.completion_prompts(body)
  echo = oai.get(body, "echo", bool, False)
  streams = await ep.add(prompts, params, oai.get(body, "priority", int, 0))
  run = _CompletionRun(ctx, engine.tokenizer, streams, prompts, params, echo,
                       oai.get(body, "return_token_ids", bool, False))
  if opts.stream:
    return _EventStream(run.events(opts.include_usage))
  result = await _until_disconnect(request.receive, run.collect())
  return JSONResponse(result) if result is not None else Response(status_code=499)


async def _chat(request: Request):
  ctx: ServingContext = request.app.state.ctx
  ep = _Endpoint(ctx)
  body = await ep.read_json(request)
  engine = ctx.require_serving()
  params = oai.sampling_params(body, chat=True, default_max_tokens=None)
  opts = oai.stream_options(body)
  messages = oai.chat_messages(body)
  add_generation_prompt = oai.get(body, "add_generation_prompt", bool, True)
  text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  prompt = engine.tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
  streams = await ep.add([prompt], params, oai.get(body, "priority", int, 0))
  run = _ChatRun(ctx, engine.tokenizer, streams, params, oai.get(body, "return_token_ids", bool, False))
  if opts.stream:
    return _EventStream(run.events(opts.include_usage))
  result = await _until_disconnect(request.receive, run.collect())
  return JSONResponse(result) if result is not None else Response(status_code=499)


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
      async for i, out in _merged(self.streams):
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
      async for i, out in _merged(self.streams):
        self._count(i, out)
        for c in out.outputs:
          for choice in self._chunk_choices(i, c):
            if self.return_token_ids:
              choice["token_ids"] = list(c.token_ids)
            yield _sse(self._envelope([choice], chunk=True))
      if include_usage:
        chunk = self._envelope([], chunk=True)
        chunk["usage"] = self.usage()
        yield _sse(chunk)
    except JserveError as e:
      # The status line is sent already; the error goes in the stream, as OpenAI's servers do.
      status = status_of(e)
      yield _sse(oai.error_body(str(e), status.openai_type, status.http_status))
    finally:
      for s in self.streams:
        s.abort()
    yield _sse("[DONE]")


class _CompletionRun(_Run):
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


class _ChatRun(_Run):
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


async def _models(request: Request):
  ctx: ServingContext = request.app.state.ctx
  ctx.authenticate(request.headers.get("authorization"))
  engine = ctx.engine.engine
  card = {"id": ctx.model_name, "object": "model", "created": request.app.state.started, "owned_by": "jserve"}
  if engine is not None:
    card["max_model_len"] = engine.max_model_len
  if request.path_params.get("model") is not None:
    ctx.check_model(request.path_params["model"])
    return JSONResponse(card)
  return JSONResponse({"object": "list", "data": [card]})


async def _health(request: Request):
  ctx: ServingContext = request.app.state.ctx
  if ctx.serving:
    return JSONResponse({"status": "ok"})
  if ctx.draining:
    return JSONResponse({"status": "draining"}, status_code=503)
  state = "loading" if ctx.engine.engine is None else "failed"
  return JSONResponse({"status": state, "detail": ctx.engine.not_ready_reason()}, status_code=503)


async def _metrics(request: Request):
  ctx: ServingContext = request.app.state.ctx
  stats = await ctx.engine.get_stats()
  return Response(ctx.metrics.render(stats), media_type=CONTENT_TYPE)


def _on_error(request: Request, error: Exception):
  if isinstance(error, HTTPException):
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(oai.error_body(f"{request.method} {request.url.path}: {error.detail}", kind,
                                       error.status_code), status_code=error.status_code)
  if not isinstance(error, (JserveError, ValueError, TypeError)):
    logging.exception("internal error on %s %s", request.method, request.url.path)
  elif request.url.path.startswith("/v1/"):
    request.app.state.ctx.rejected(error, "http")
  return _error_response(error)


def build_app(ctx: ServingContext) -> Starlette:
  routes = [Route("/v1/completions", _completions, methods=["POST"]),
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/v1/models/{model:path}", _models, methods=["GET"]),
            Route("/health", _health, methods=["GET"]),
            Route("/metrics", _metrics, methods=["GET"])]
  handlers = {HTTPException: _on_error, JserveError: _on_error, ValueError: _on_error, TypeError: _on_error,
              Exception: _on_error}
  app = Starlette(routes=routes, exception_handlers=handlers)
  app.state.ctx = ctx
  app.state.started = oai.now()
  return app


class _Server(uvicorn.Server):
  # serve() owns SIGINT/SIGTERM here: uvicorn must neither take them over nor re-raise them at exit.
  @contextlib.contextmanager
  def capture_signals(self):
    yield


class HttpFrontend:
  """uvicorn serving the app on a socket bound at construction (so a busy port fails early)."""

  def __init__(self, ctx: ServingContext, host: str, port: int, *, tls_cert: str | None = None,
               tls_key: str | None = None, graceful_timeout_s: float = 5.0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self.sock = socket.socket(family, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      self.sock.bind((host, port))
    except OSError as e:
      self.sock.close()
      raise ConfigError(f"HTTP cannot listen on {host}:{port}: {e.strerror}") from None
    self.sock.listen(2048)
    self.port = self.sock.getsockname()[1]
    self.address = f"{'https' if tls_cert else 'http'}://{host}:{self.port}"
    config = uvicorn.Config(build_app(ctx), log_config=None, log_level="warning", access_log=False,
                            lifespan="off", ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                            timeout_graceful_shutdown=graceful_timeout_s, timeout_keep_alive=30)
    self.server = _Server(config)
    self._task: asyncio.Task | None = None

  async def start(self):
    self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
    while not self.server.started:
      if self._task.done():
        self._task.result()
        raise ConfigError(f"the HTTP server on {self.address} stopped while starting")
      await asyncio.sleep(0.01)
    logging.info("HTTP server listening on %s", self.address)

  async def stop(self):
    self.server.should_exit = True
    if self._task is not None:
      await self._task


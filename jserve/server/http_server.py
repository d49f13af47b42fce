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
from jserve.server.metrics import CONTENT_TYPE
from jserve.server.openai_output import ChatRun, CompletionRun
from jserve.server.service import ServingContext, status_of


def _error_response(error: BaseException) -> JSONResponse:
  status = status_of(error)
  headers = {"Retry-After": "1"} if status.http_status in (429, 503) else None
  return JSONResponse(oai.error_body(str(error), status.openai_type, status.http_status),
                      status_code=status.http_status, headers=headers)


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
  run = CompletionRun(ctx, engine.tokenizer, streams, prompts, params, echo,
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
  run = ChatRun(ctx, engine.tokenizer, streams, params, oai.get(body, "return_token_ids", bool, False))
  if opts.stream:
    return _EventStream(run.events(opts.include_usage))
  result = await _until_disconnect(request.receive, run.collect())
  return JSONResponse(result) if result is not None else Response(status_code=499)


async def _models(request: Request):
  ctx: ServingContext = request.app.state.ctx
  ctx.authenticate(request.headers.get("authorization"))
  engine = ctx.engine.engine
  card = {"id": ctx.model_name, "object": "model", "created": request.app.state.started, "owned_by": "jserve"}
  if engine is not None:
    # Beside OpenAI's fields, as vLLM's card has max_model_len: what a client may need to know of the
    # weights it talks to ("fp8", or None when they are not quantized), the projections' inputs ("fp8" for
    # w8a8, else None) and the KV cache's element type.
    card["max_model_len"] = engine.max_model_len
    card["quantization"] = engine.quantization
    card["activation_quantization"] = engine.activation_quantization
    card["kv_cache_dtype"] = engine.kv_cache_dtype
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


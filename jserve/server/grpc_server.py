"""The gRPC front end: jserve.v1.Generation, grpc.health.v1.Health and server reflection on grpc.aio.

A Generate call lives as long as its stream: when the client cancels, its
deadline passes or its connection drops, grpc.aio cancels the handler task and
the `finally` below aborts the request in the engine, freeing its pages.
"""

import grpc
import jax
from absl import logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jserve.engine.async_engine import EngineUnavailableError
from jserve.errors import ConfigError, JserveError
from jserve.server import convert
from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from jserve.server.service import ServingContext, UnauthenticatedError, status_of

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"


class GenerationServicer(pb_grpc.GenerationServicer):
  """jserve.v1.Generation over an AsyncEngine."""

  def __init__(self, ctx: ServingContext):
    self.ctx = ctx

  async def _reject(self, context, error: BaseException):
    self.ctx.rejected(error, "grpc")
    await context.abort(status_of(error).grpc_code, str(error))

  async def Generate(self, request, context):
    ctx = self.ctx
    try:
      tokenizer = ctx.require_serving().tokenizer
      ctx.check_model(request.model)
      params = convert.sampling_params_from_proto(request.sampling_params)
      prompt = convert.prompt_from_proto(request, tokenizer)
      stream = await ctx.engine.add_request(prompt, params, priority=request.priority,
                                            request_id=request.request_id or None)
    except (JserveError, ValueError, TypeError) as e:
      await self._reject(context, e)
      return
    request_id = request.request_id or stream.request_id
    token_text = convert.TokenText(tokenizer)
    num_tokens, first = 0, True
    try:
      async for out in stream:
        num_tokens += sum(len(c.token_ids) for c in out.outputs)
        yield convert.response_from_output(out, request_id, first=first, params=params, token_text=token_text,
                                           completion_tokens=num_tokens)
        first = False
    except EngineUnavailableError as e:
      await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    finally:
      stream.abort()

  async def GetModelInfo(self, request, context):
    try:
      engine = self.ctx.require_ready()
    except JserveError as e:
      await self._reject(context, e)
      return None
    cfg, ec = engine.model_config, engine.config
    devices = jax.devices()
    return pb.ModelInfo(
        model_name=self.ctx.model_name, architecture=cfg.architecture, max_model_len=engine.max_model_len,
        vocab_size=cfg.vocab_size, dtype=ec.dtype, page_size=ec.page_size, num_kv_pages=engine.kv.num_usable_pages,
        max_num_seqs=ec.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
        eos_token_ids=sorted(engine.eos_token_ids), quantization=engine.quantization or "",
        activation_quantization=engine.activation_quantization or "", kv_cache_dtype=engine.kv_cache_dtype,
        sharding=pb.ShardingPlan(
            tensor_parallel_size=ec.tensor_parallel_size, pipeline_parallel_size=ec.pipeline_parallel_size,
            data_parallel_size=1, num_devices=ec.tensor_parallel_size * ec.pipeline_parallel_size,
            platform=devices[0].platform, device_kind=devices[0].device_kind))

  async def GetMetrics(self, request, context):
    stats = await self.ctx.engine.get_stats()
    text = self.ctx.metrics.render(stats).decode() if self.ctx.metrics else ""
    return pb.Metrics(
        num_requests_running=stats.num_running, num_requests_waiting=stats.num_waiting,
        kv_used_pages=stats.kv_used_pages, kv_cached_pages=stats.kv_cached_pages,
        kv_total_pages=stats.kv_total_pages, prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        num_preemptions=stats.num_preemptions, prometheus_text=text)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
  """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""
  async def unary(request_or_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

  async def streaming(request_or_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    yield  # never reached; makes this an async generator, as a streaming handler must be

  make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
  return make[(handler.request_streaming, handler.response_streaming)](
      streaming if handler.response_streaming else unary,
      request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class _AuthInterceptor(grpc.aio.ServerInterceptor):
  """Checks `authorization: Bearer <key>` metadata on every method but health checks."""

  def __init__(self, ctx: ServingContext):
    self.ctx = ctx

  async def intercept_service(self, continuation, details):
    handler = await continuation(details)
    if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
      return handler
    metadata = {k: v for k, v in (details.invocation_metadata or ())}
    try:
      self.ctx.authenticate(metadata.get("authorization"))
    except UnauthenticatedError as e:
      self.ctx.rejected(e, "grpc")
      return _deny(handler, str(e))
    return handler


def _address(host: str, port: int) -> str:
  return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcFrontend:
  """The grpc.aio server with its three services; health says NOT_SERVING until `set_serving(True)`."""

  def __init__(self, ctx: ServingContext, host: str, port: int, *, tls_cert: str | None = None,
               tls_key: str | None = None):
    self.ctx = ctx
    options = [("grpc.max_receive_message_length", ctx.max_message_bytes),
               ("grpc.max_send_message_length", max(ctx.max_message_bytes, 64 << 20)),
               ("grpc.so_reuseport", 0)]  # a second server on a busy port must fail, not share it
    interceptors = [_AuthInterceptor(ctx)] if ctx.api_keys else []
    self.server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(ctx), self.server)
    self.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server)
    address = _address(host, port)
    try:
      if tls_cert:
        with open(tls_key, "rb") as f_key, open(tls_cert, "rb") as f_cert:
          creds = grpc.ssl_server_credentials([(f_key.read(), f_cert.read())])
        self.port = self.server.add_secure_port(address, creds)
      else:
        self.port = self.server.add_insecure_port(address)
    except RuntimeError as e:
      raise ConfigError(f"gRPC cannot listen on {address}: {e}") from None
    self.address = _address(host, self.port)
    self.tls = bool(tls_cert)

  async def start(self):
    await self.set_serving(False)
    await self.server.start()
    logging.info("gRPC server listening on %s%s", self.address, " (TLS)" if self.tls else "")

  async def set_serving(self, serving: bool):
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
      await self.health.set(service, status)

  async def stop(self, grace_s: float):
    await self.server.stop(grace_s)

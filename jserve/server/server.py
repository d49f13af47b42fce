"""`serve()`: the engine, the gRPC and HTTP front ends, and their lifecycle from start to drained exit.

    start      engine thread loads and compiles; both front ends listen at once,
               health NOT_SERVING (HTTP /health 503), generation UNAVAILABLE
    serving    health SERVING once every step bucket is compiled
    SIGTERM/   drain: health NOT_SERVING, new requests UNAVAILABLE / 503,
    SIGINT     in-flight requests run on for up to shutdown_timeout_s, then
               are aborted (their clients get UNAVAILABLE / an error event);
               a second signal aborts at once. Then the listeners close, the
               engine thread ends, and serve() returns (exit status 0).
"""

import asyncio
import dataclasses
import os
import signal
import time

from absl import logging

from jserve.engine.async_engine import AsyncEngine
from jserve.engine.engine import EngineConfig
from jserve.errors import ConfigError
from jserve.server.grpc_server import GrpcFrontend
from jserve.server.http_server import HttpFrontend
from jserve.server.metrics import ServerMetrics
from jserve.server.service import ServingContext


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  """How `jserve serve` listens and what it accepts. A port of 0 turns that front end off."""

  host: str = "127.0.0.1"
  port: int = 50051
  http_port: int = 8000
  served_model_name: str | None = None
  api_keys: tuple[str, ...] = ()
  tls_cert: str | None = None
  tls_key: str | None = None
  max_message_bytes: int = 4 << 20
  max_waiting_requests: int = 1024
  shutdown_timeout_s: float = 30.0
  data_parallel_size: int = 1  # engine replicas on this host's devices, requests routed among them

  def __post_init__(self):
    for name in ("port", "http_port"):
      if not 0 <= getattr(self, name) <= 65535:
        raise ConfigError(f"{name}={getattr(self, name)}: need a port in [0, 65535] (0 turns it off)")
    if not self.port and not self.http_port:
      raise ConfigError("port=0 and http_port=0: at least one of gRPC and HTTP must be on")
    if bool(self.tls_cert) != bool(self.tls_key):
      raise ConfigError(f"tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}: give both or neither")
    for name in ("tls_cert", "tls_key"):
      path = getattr(self, name)
      if path and not os.path.isfile(path):
        raise ConfigError(f"{name}={path!r} does not exist")
    if self.max_message_bytes < 1024:
      raise ConfigError(f"max_message_bytes={self.max_message_bytes}: need at least 1024")
    if self.max_waiting_requests < 1:
      raise ConfigError(f"max_waiting_requests={self.max_waiting_requests}: need at least 1")
    if self.data_parallel_size < 1:
      raise ConfigError(f"data_parallel_size={self.data_parallel_size}: need at least 1")
    if self.shutdown_timeout_s < 0:
      raise ConfigError(f"shutdown_timeout_s={self.shutdown_timeout_s}: need >= 0")


def served_name(config: ServerConfig, engine_config: EngineConfig) -> str:
  return config.served_model_name or os.path.basename(os.path.normpath(engine_config.model_dir))


async def serve(config: ServerConfig, engine_config: EngineConfig, engine_factory=None):
  """Serves until SIGTERM/SIGINT, then drains and returns; raises what loading the model raised."""
  name = served_name(config, engine_config)
  metrics = ServerMetrics(name)
  if config.data_parallel_size > 1:
    from jserve.engine.replicated import ReplicatedAsyncEngine
    engine = ReplicatedAsyncEngine(engine_config, config.data_parallel_size,
                                   max_waiting_requests=config.max_waiting_requests, on_request_done=metrics.observe)
  else:
    engine = AsyncEngine(engine_config, max_waiting_requests=config.max_waiting_requests,
                         engine_factory=engine_factory, on_request_done=metrics.observe)
  ctx = ServingContext(engine, name, api_keys=config.api_keys, max_message_bytes=config.max_message_bytes,
                       metrics=metrics)
  loop = asyncio.get_running_loop()
  signals = asyncio.Queue()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, signals.put_nowait, sig)

  grpc_frontend = http_frontend = None
  try:
    # Bind both ports before the slow model load, so that a busy port fails in a second.
    if config.port:
      grpc_frontend = GrpcFrontend(ctx, config.host, config.port, tls_cert=config.tls_cert, tls_key=config.tls_key)
    if config.http_port:
      http_frontend = HttpFrontend(ctx, config.host, config.http_port, tls_cert=config.tls_cert,
                                   tls_key=config.tls_key, graceful_timeout_s=min(config.shutdown_timeout_s, 5.0))
    engine.start()
    if grpc_frontend:
      await grpc_frontend.start()
    if http_frontend:
      await http_frontend.start()
    first_signal = asyncio.ensure_future(signals.get())
    ready = asyncio.ensure_future(engine.wait_ready())
    await asyncio.wait((first_signal, ready), return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
      ready.result()  # a model that failed to load ends serve() with its error
      if grpc_frontend:
        await grpc_frontend.set_serving(True)
      logging.info("serving %s: gRPC %s, HTTP %s", name, grpc_frontend.address if grpc_frontend else "off",
                   http_frontend.address if http_frontend else "off")
      await first_signal
    else:
      ready.cancel()
    logging.info("received %s: draining", signal.Signals(first_signal.result()).name)
    await _drain(ctx, grpc_frontend, config.shutdown_timeout_s, signals)
  finally:
    if grpc_frontend:
      await grpc_frontend.stop(grace_s=1.0)
    if http_frontend:
      await http_frontend.stop()
    await engine.stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
      loop.remove_signal_handler(sig)
  logging.info("shut down cleanly")


async def _drain(ctx: ServingContext, grpc_frontend: GrpcFrontend | None, timeout_s: float,
                 signals: asyncio.Queue):
  """Refuses new work, lets in-flight requests finish for up to timeout_s, aborts the rest."""
  ctx.draining = True
  ctx.engine.stop_accepting()
  if grpc_frontend:
    await grpc_frontend.set_serving(False)
  deadline = time.monotonic() + timeout_s
  while ctx.engine.num_in_flight and time.monotonic() < deadline and signals.empty():
    await asyncio.sleep(0.05)
  left = ctx.engine.num_in_flight
  if left:
    logging.warning("aborting %d request(s) still in flight after the drain", left)
    await ctx.engine.abort_all("the server is shutting down; the request was aborted")
    await asyncio.sleep(0.1)  # let the handlers send their final messages before the listeners close

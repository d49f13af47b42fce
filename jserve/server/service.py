"""What the gRPC and HTTP front ends share: the engine, the served name, auth, limits, the drain.

Both front ends turn errors into statuses through `status_of`, so one kind of
bad input gets the same answer on either.
"""

import dataclasses
import hmac
import os

import grpc

from jserve.engine.async_engine import AsyncEngine, EngineUnavailableError
from jserve.errors import CapacityError, ConfigError, InvalidRequestError, JserveError, OverloadedError


class UnauthenticatedError(JserveError):
  """The request carries no API key, or a wrong one."""


class ModelNotFoundError(JserveError):
  """The request names a model that this server does not serve."""


class RequestTooLargeError(JserveError):
  """The request body is over the size limit."""


@dataclasses.dataclass(frozen=True)
class Status:
  grpc_code: grpc.StatusCode
  http_status: int
  openai_type: str  # the "type" of OpenAI's error JSON


_STATUS = (
    (UnauthenticatedError, Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")),
    (ModelNotFoundError, Status(grpc.StatusCode.NOT_FOUND, 404, "not_found_error")),
    (RequestTooLargeError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error")),
    (OverloadedError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")),
    (EngineUnavailableError, Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error")),
    # A request that can never fit the pool or the length limit is the caller's to change.
    (CapacityError, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")),
    (InvalidRequestError, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")),
)
_INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "internal_error")


def status_of(error: BaseException) -> Status:
  for cls, status in _STATUS:
    if isinstance(error, cls):
      return status
  if isinstance(error, (JserveError, ValueError, TypeError)):
    return _STATUS[-1][1]
  return _INTERNAL


def read_api_keys(api_key: str | None, api_key_file: str | None) -> tuple[str, ...]:
  """The accepted keys: `api_key` plus one key per non-empty line of `api_key_file`."""
  keys = [api_key] if api_key else []
  if api_key_file:
    if not os.path.exists(api_key_file):
      raise ConfigError(f"api_key_file={api_key_file!r} does not exist")
    with open(api_key_file) as f:
      keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not keys:
      raise ConfigError(f"api_key_file={api_key_file!r} holds no key")
  return tuple(keys)


class ServingContext:
  """State both front ends read: the engine, the served model's name, API keys and limits."""

  def __init__(self, engine: AsyncEngine, model_name: str, *, api_keys: tuple[str, ...] = (),
               max_message_bytes: int = 4 << 20, metrics=None):
    self.engine = engine
    self.model_name = model_name
    self.api_keys = tuple(k.encode() for k in api_keys)
    self.max_message_bytes = max_message_bytes
    self.metrics = metrics
    self.draining = False

  @property
  def serving(self) -> bool:
    return self.engine.ready and not self.draining

  def require_ready(self):
    """The loaded LLMEngine (for its tokenizer and config); raises EngineUnavailableError before."""
    if not self.engine.ready:
      raise EngineUnavailableError(f"the engine is not serving: {self.engine.not_ready_reason()}")
    return self.engine.engine

  def require_serving(self):
    """Like require_ready, and refuses new requests during the shutdown drain."""
    if self.draining:
      raise EngineUnavailableError("the server is shutting down")
    return self.require_ready()

  def authenticate(self, authorization: str | None):
    """Checks an `Authorization: Bearer <key>` value; raises UnauthenticatedError."""
    if not self.api_keys:
      return
    if not authorization:
      raise UnauthenticatedError("missing API key: send 'authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
      raise UnauthenticatedError("malformed authorization: expected 'Bearer <key>'")
    # Compare against every key in constant time: the time taken says nothing about a key.
    given = key.strip().encode()
    if not any([hmac.compare_digest(given, k) for k in self.api_keys]):  # noqa: C419 - compare all, always
      raise UnauthenticatedError("invalid API key")

  def check_model(self, name: str | None):
    if name and name != self.model_name:
      raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {self.model_name!r}")

  def check_size(self, num_bytes: int):
    if num_bytes > self.max_message_bytes:
      raise RequestTooLargeError(f"request of {num_bytes} bytes is over the limit of "
                                 f"{self.max_message_bytes} bytes (--max_message_bytes)")

  def rejected(self, error: BaseException, frontend: str):
    if self.metrics is not None:
      self.metrics.rejected(status_of(error).http_status, frontend)

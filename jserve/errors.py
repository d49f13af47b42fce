"""Exceptions that jserve raises for bad input or impossible requests.

Every message names the bad value and the rule it broke, so that the CLI can
print it as one line and the servers can map it to a status code.
"""


class JserveError(Exception):
  """Base class of every error jserve raises on purpose."""


class ConfigError(JserveError, ValueError):
  """A configuration value (checkpoint config, flag, engine option) is invalid."""


class CheckpointError(JserveError):
  """A checkpoint directory is missing, incomplete or malformed."""


class ShapeError(JserveError, ValueError):
  """An array does not have the shape a function needs."""


class InvalidRequestError(JserveError, ValueError):
  """A request (prompt or sampling parameters) is invalid."""


class CapacityError(JserveError):
  """A request can never fit the engine's memory or length limits."""


class OverloadedError(JserveError):
  """The engine's waiting queue is full; retry later."""

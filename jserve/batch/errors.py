"""Errors of the batch job: the input or output file is unusable as a whole (not one bad line)."""

from jserve.errors import JserveError


class BatchInputError(JserveError):
  """The input file cannot be used: missing, or ids that are not unique."""


class BatchOutputError(JserveError):
  """The output file is damaged beyond its last line, or does not hold every input id exactly once."""

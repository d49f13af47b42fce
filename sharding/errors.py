"""The error `sharding` raises for a mesh, degree or plan that cannot work.

`sharding` knows nothing of `jserve` (see DESIGN.md), so it cannot raise
`jserve.errors.ConfigError`; `ShardingError` is a `ValueError` so that callers
catching bad configuration catch it too.
"""


class ShardingError(ValueError):
  """A mesh shape, parallelism degree or placement is impossible; the message says what would work."""

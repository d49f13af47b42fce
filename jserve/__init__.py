"""jserve: LLM inference serving on JAX."""

import os

__version__ = "0.1.0"

# XLA's GPU allocator may use 75% of a card's memory unless told otherwise, and the KV pool is
# sized inside that (`gpu_memory_utilization` of it): the default would leave a quarter of the card
# idle. 0.92 leaves room outside the allocator for the CUDA context and libraries. It takes effect
# if set before JAX starts its GPU backend; a value already in the environment wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")


def __getattr__(name):
  # Lazy: `import jserve` stays cheap for the CLI's flag parsing and for tools.
  if name == "LLM":
    from jserve.engine.llm import LLM
    return LLM
  if name == "SamplingParams":
    from jserve.engine.request import SamplingParams
    return SamplingParams
  raise AttributeError(f"module 'jserve' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams"]

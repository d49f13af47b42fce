"""jserve: LLM inference serving on JAX."""

__version__ = "0.1.0"


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

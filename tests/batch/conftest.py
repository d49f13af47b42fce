"""Fixtures of the batch tests: one small in-process engine and a compilation cache they all share."""

import pytest

from tests.batch.util import ENGINE_KWARGS


@pytest.fixture(scope="session")
def batch_cache_dir(tmp_path_factory):
  """A JAX compilation cache shared by every engine of these tests, in-process or not: restarts load, not compile."""
  return str(tmp_path_factory.mktemp("batch_jax_cache"))


@pytest.fixture(scope="session")
def batch_engine(tiny_model_dir, batch_cache_dir):
  from jserve.engine.engine import EngineConfig, LLMEngine
  return LLMEngine(EngineConfig(model=tiny_model_dir, compilation_cache_dir=batch_cache_dir, **ENGINE_KWARGS))


@pytest.fixture
def replicas(batch_engine):
  """`make_replicas` for run_batch: the shared engine, and a count of how often the job asked for it."""
  from jserve.batch import Replica
  calls = []

  def make():
    calls.append(1)
    return [Replica(batch_engine)]

  make.calls = calls
  return make

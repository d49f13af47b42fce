"""Shared fixtures: small random Hugging Face checkpoints written by transformers itself."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bpe_tokenizer():
  """A byte-level BPE tokenizer trained once per session on a few standard-library files."""
  from tools.make_random_checkpoint import stdlib_files, train_tokenizer
  return train_tokenizer(1024, stdlib_files(40))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
  """A float32 tiny Llama checkpoint written by transformers (the reference, not by jserve)."""
  from tests.hf_models import write_hf_model
  out = tmp_path_factory.mktemp("tiny_llama")
  write_hf_model(str(out), bpe_tokenizer, "llama")
  return str(out)


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache per test session: engines of equal shapes compile once."""
  import jax
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

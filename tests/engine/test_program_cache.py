"""ProgramCache (jserve/engine/programs.py): exported step programs written, read back in a fresh cache,
and the plain jitted function whenever a program cannot be exported, read or run."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine import programs
from jserve.engine.step import TokenInputs


@functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("scale",))
def _fn(tokens, acc_N, *, scale):
  """A jserve dataclass in and out, a donated buffer, a static argument."""
  total = tokens.prompt_slot_T + tokens.output_slot_T * scale
  return dataclasses_out(total), acc_N + total.sum()


def dataclasses_out(total):
  return TokenInputs(prompt_slot_T=total, output_slot_T=-total, prompt_target_T=total * 0, prev_row_T=total + 1)


def _args(n=8):
  a = jnp.arange(n, dtype=jnp.int32)
  return TokenInputs(prompt_slot_T=a, output_slot_T=a * 2, prompt_target_T=a, prev_row_T=a), jnp.zeros(4, jnp.int32)


def _expected(scale):
  tokens, acc = _args()
  total = np.arange(8) + np.arange(8) * 2 * scale
  return total, acc + total.sum()


def _check(out, scale):
  total, acc = _expected(scale)
  np.testing.assert_array_equal(out[0].prompt_slot_T, total)
  np.testing.assert_array_equal(out[0].prev_row_T, total + 1)
  np.testing.assert_array_equal(out[1], acc)


def _cache(tmp_path):
  return programs.ProgramCache(_fn, name="t", key="k", directory=str(tmp_path), donate_argnums=(1,))


def test_a_fresh_cache_reads_back_what_the_first_one_exported(tmp_path):
  first = _cache(tmp_path)
  _check(first(*_args(), scale=3), 3)
  _check(first(*_args(), scale=5), 5)
  assert first.loaded == 0 and not first._failed
  assert len(os.listdir(tmp_path)) == 2  # one program per static argument
  second = _cache(tmp_path)
  tokens, acc = _args()
  _check(second(tokens, acc, scale=5), 5)
  assert acc.is_deleted()  # donated, as the jitted function donates it (else every step copies the KV pool)
  _check(second(*_args(), scale=3), 3)
  assert second.loaded == 2 and not second._failed
  assert second._cache_size() == 2


def test_a_different_key_or_shape_is_another_program(tmp_path):
  _cache(tmp_path)(*_args(), scale=3)
  other = programs.ProgramCache(_fn, name="t", key="other model", directory=str(tmp_path))
  other(*_args(), scale=3)
  assert other.loaded == 0
  tokens, acc = _args(16)
  again = _cache(tmp_path)
  again(tokens, acc, scale=3)
  assert again.loaded == 0
  assert len(os.listdir(tmp_path)) == 3


def test_a_corrupt_file_is_exported_again(tmp_path):
  _cache(tmp_path)(*_args(), scale=3)
  (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
  with open(path, "wb") as f:
    f.write(b"not a flatbuffer")
  again = _cache(tmp_path)
  _check(again(*_args(), scale=3), 3)
  assert again.loaded == 0 and not again._failed
  assert programs._deserialize(open(path, "rb").read()) is not None  # replaced by a whole program


def test_a_program_that_cannot_be_exported_runs_the_jitted_function(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise NotImplementedError("no export here")
  monkeypatch.setattr(programs.export, "export", refuse)
  cache = _cache(tmp_path)
  _check(cache(*_args(), scale=3), 3)
  assert cache._failed and os.listdir(tmp_path) == []
  assert cache._cache_size() == _fn._cache_size()


def test_an_exported_program_whose_first_call_fails_falls_back(tmp_path, monkeypatch):
  def broken_jit(fn, **kwargs):
    def run(*args):
      raise RuntimeError("the backend would not compile this module")
    return run
  monkeypatch.setattr(programs.jax, "jit", broken_jit)
  cache = _cache(tmp_path)
  _check(cache(*_args(), scale=3), 3)
  assert cache._failed


def test_a_dataclass_with_meta_fields_is_refused():
  @dataclasses.dataclass
  class WithMeta:
    x: jax.Array
    tag: str
  WithMeta.__module__ = "jserve.fake"
  jax.tree_util.register_dataclass(WithMeta, data_fields=["x"], meta_fields=["tag"])
  with pytest.raises(ValueError, match="meta fields"):
    programs._register_tree_types(WithMeta(x=jnp.zeros(2), tag="a"))


def test_prepare_compiles_ahead_and_the_call_only_runs(tmp_path):
  first = _cache(tmp_path)
  assert not first.stored(*_args(), scale=3)
  first(*_args(), scale=3)
  second = _cache(tmp_path)
  assert second.stored(*_args(), scale=3) and not second.stored(*_args(), scale=4)
  second.prepare(*_args(), scale=3)
  second.prepare(*_args(), scale=3)  # (once per program)
  assert second.prepared == 1 and second.loaded == 1
  tokens, acc = _args()
  _check(second(tokens, acc, scale=3), 3)
  assert acc.is_deleted()  # the prepared program donates as the jitted function does
  assert second.loaded == 1 and not second._failed  # not read a second time


def test_a_stored_program_on_a_gpu_loads_the_kernel_runtimes_first(tmp_path, monkeypatch):
  # A Mosaic GPU kernel's executable looks up runtime symbols that importing JAX's Mosaic GPU module
  # provides; a warm start that read stored programs without it failed on an H100 (docs/benchmarks/e2e_log.md).
  import sys
  monkeypatch.delitem(sys.modules, "pallas_kernels.mosaic_gpu", raising=False)
  programs._load_kernel_runtimes("cpu")
  assert "pallas_kernels.mosaic_gpu" not in sys.modules
  programs._load_kernel_runtimes("gpu")
  assert "pallas_kernels.mosaic_gpu" in sys.modules
  _cache(tmp_path)(*_args(), scale=3)
  order = []
  monkeypatch.setattr(programs, "_load_kernel_runtimes", lambda platform: order.append("runtimes"))
  deserialize = programs._deserialize
  monkeypatch.setattr(programs, "_deserialize", lambda data: order.append("read") or deserialize(data))
  _check(_cache(tmp_path)(*_args(), scale=3), 3)
  assert order == ["runtimes", "read"]


def test_the_gpu_compile_options_are_known_to_this_xla():
  # XLA's debug options are one list for every backend: an option this jaxlib knows, its GPU backend
  # takes too, and an unknown one would fail every step program's compile, so it is probed first.
  assert programs.supported(programs.GPU_COMPILER_OPTIONS)
  assert not programs.supported({"xla_gpu_no_such_option": 0})
  assert programs.compiler_options(True) is None and programs.compiler_options(False) is None  # CPU: none


def test_a_type_another_thread_registered_meanwhile_is_read_on_the_next_attempt(monkeypatch):
  # The start-up reads its stored buckets on several threads. One thread's read can fail on a jserve dataclass
  # not yet registered for serialization while another thread registers it before the first looks: the first
  # must then read again, not give up and export the program anew (found as a warm start that loaded 2 of 3).
  from jax import export
  name = f"{TokenInputs.__module__}.{TokenInputs.__qualname__}"
  programs._register_class(TokenInputs)  # "the other thread" has registered it
  calls = []

  def deserialize(data):
    calls.append(1)
    if len(calls) == 1:  # this thread's attempt, made before the registration
      raise ValueError(f"Cannot deserialize: unregistered type `{name}`")
    return "the program"
  monkeypatch.setattr(export, "deserialize", deserialize)
  assert programs._deserialize(b"stored") == "the program" and len(calls) == 2
  # A type that is no dataclass is still an error, not a loop.
  monkeypatch.setattr(export, "deserialize", lambda data: (_ for _ in ()).throw(
      ValueError("Cannot deserialize: unregistered type `jserve.engine.programs.ProgramCache`")))
  with pytest.raises(ValueError, match="unregistered type"):
    programs._deserialize(b"stored")

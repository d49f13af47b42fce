"""Step programs kept as serialized `jax.export` modules, so that a warm start skips tracing and lowering.

JAX's persistent compilation cache stores compiled executables, keyed by the lowered module: a start
with a warm cache still traces and lowers every program before it can look one up. For the 8B shape
on an H100 that was 13.9 s of a 25.2 s warm start (docs/benchmarks/e2e_log.md); on a Hopper GPU the
lowering also builds the Mosaic GPU prefill kernel. `ProgramCache` wraps a jitted step function:
the first call with a given set of static arguments and input shapes exports the program
(`jax.export`: the traced and lowered StableHLO), writes its serialized bytes (flatbuffers, not
pickle) under the compilation cache directory, and runs it through `jax.jit(exported.call)`; a later
process finds the file, deserializes it and only compiles, which the persistent cache answers.

The file name is a hash of everything the program depends on: jserve's own source (every .py file
under jserve/, pallas_kernels/ and sharding/), the JAX and jaxlib versions, the backend and device
kind, the caller's key (model and runner config) and the call's static arguments and input avals.
Where a program cannot be exported, read back or compiled (a missing `flatbuffers` package, a custom
call JAX will not export, a corrupt file), the cache logs one warning and calls the jitted function
as before.

Only single-device, single-process runners use it (see `ModelRunner`); a mesh's shardings are not
part of the key.
"""

import dataclasses
import functools
import hashlib
import importlib
import os
import pathlib
import re
import threading

import jax
import jaxlib
import numpy as np
from absl import logging
from jax import export

# Pallas kernels lower to these custom calls; export refuses custom calls it does not know unless told.
_KERNEL_CALLS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2", "tpu_custom_call")
_ROOTS = ("jserve", "pallas_kernels", "sharding")
_registered: set = set()
_lock = threading.Lock()


# GPU with fp8 activations: no dot merging. XLA's dot merger joins dots that share an operand by
# concatenating their other operands. With fp8 activations the q, k and v projections read one
# quantized activation, as do gate and up; in the decode burst's loop, whose weights do not change,
# such concatenations of weights could be hoisted out of the loop for every layer at once. Without
# this option the w8a8 burst of the 8B shape ran an H100 out of memory on a 4.26 GiB buffer, the size
# of every layer's wq, wk, wv, w_gate and w_up in fp8 (4.25 GiB); with it the engine runs (12,545
# output tok/s at 1000/1000). A 4-layer burst shows the merger's concatenations but not the hoisted
# buffer, so that the merger made it stays inferred (docs/benchmarks/e2e_log.md, fourteenth and fifteenth
# sessions). Other engines keep the merger: bf16 weights' decode step is 1.5-2.5% slower without it. (Such an
# engine now stores each layer's gate and up stacked, and k and v, quant.stack_pairs, so each pair is one GEMM
# without the merger; q stays apart.)
GPU_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


def supported(options: dict) -> bool:
  """Whether this jaxlib's XLA knows every one of `options` (an unknown one fails every compile)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except Exception as e:  # noqa: BLE001 - XLA names the option it does not know
    logging.warning("XLA compile options %s not taken: %s", options, str(e)[:200])
    return False
  return True


@functools.lru_cache(maxsize=2)
def compiler_options(fp8_activations: bool) -> dict | None:
  """XLA options the step programs compile with (the runner's and pipeline stages' jits, and the programs
  read back from this cache): `GPU_COMPILER_OPTIONS` for an engine with fp8 activations on a GPU whose
  XLA knows them, else none."""
  if fp8_activations and jax.devices()[0].platform == "gpu" and supported(GPU_COMPILER_OPTIONS):
    return GPU_COMPILER_OPTIONS
  return None


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
  """sha256 of the source of jserve and its kernels: a changed line makes every stored program stale."""
  h = hashlib.sha256()
  top = pathlib.Path(__file__).resolve().parents[2]
  for root in _ROOTS:
    for path in sorted((top / root).rglob("*.py")):
      h.update(str(path.relative_to(top)).encode())
      h.update(path.read_bytes())
  return h.hexdigest()


def _register_tree_types(tree) -> None:
  """Lets `Exported.serialize` write the jserve dataclasses found in `tree` (all without meta fields)."""
  pending = [jax.tree.structure(tree)]
  while pending:
    node = pending.pop()
    pending.extend(node.children())
    data = node.node_data()
    if data is None:
      continue
    cls, aux = data
    if not (dataclasses.is_dataclass(cls) and cls.__module__.startswith("jserve.")):
      continue
    if aux != ():
      raise ValueError(f"{cls.__qualname__} has meta fields; ProgramCache serializes dataclasses without")
    _register_class(cls)


def _register_class(cls) -> None:
  with _lock:
    if cls in _registered:
      return
    export.register_pytree_node_serialization(
        cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}", serialize_auxdata=lambda _: b"",
        deserialize_auxdata=lambda _: ())
    _registered.add(cls)


def _deserialize(data: bytes):
  """`export.deserialize`, registering the jserve dataclasses the module's trees name (by their
  serialized names, `module.qualname`) as it meets them."""
  for _ in range(32):
    try:
      return export.deserialize(bytearray(data))
    except ValueError as e:
      m = re.search(r"unregistered type `(jserve\.[\w.]+)`", str(e))
      if not m:
        raise
      module, _, name = m.group(1).rpartition(".")
      cls = getattr(importlib.import_module(module), name)
      if not dataclasses.is_dataclass(cls):
        raise
      # Registered here, or already by another thread that read a program at the same time (the start-up
      # reads its buckets on several threads): either way the next attempt finds it.
      _register_class(cls)
  raise ValueError("too many unregistered types")


def _load_kernel_runtimes(platform: str) -> None:
  """Imports what a stored program's kernels need at run time. A Mosaic GPU kernel calls into a runtime
  library (mosaic_gpu_launch_kernel, mosaic_gpu_init_tma_desc) that importing JAX's Mosaic GPU module
  makes findable; a start that traces the kernel imports it, one that reads a stored program would not,
  and its executable then fails to load ("Symbols not found")."""
  if platform != "gpu":
    return
  try:
    importlib.import_module("pallas_kernels.mosaic_gpu")
  except ImportError:  # a jaxlib without Mosaic GPU: its programs have no such kernel either
    pass


def _aval_key(x) -> str:
  return f"{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x).__name__)}"


class ProgramCache:
  """A jitted function's programs, one per (static arguments, input avals), stored as exported modules.

  Called as the jitted function is: `cache(*args, **static)`. `donate_argnums` and `compiler_options`
  as for that function.
  """

  def __init__(self, fn, *, name: str, key: str, directory: str, donate_argnums: tuple[int, ...] = (),
               compiler_options: dict | None = None):
    self._fn = fn
    self._name = name
    self._key = key
    self._dir = directory
    self._donate = donate_argnums
    self._options = compiler_options
    self._programs: dict = {}
    self._prepared: dict = {}  # compiled by `prepare`, not yet called
    self.loaded = 0  # programs read back from files (the rest were exported here)
    self.prepared = 0  # programs compiled ahead of their first call by `prepare`
    self._failed = False

  def _cache_size(self) -> int:
    """Programs compiled so far (as a jitted function's `_cache_size`)."""
    exported = sum(p._cache_size() for p in self._programs.values() if hasattr(p, "_cache_size"))
    return exported + (self._fn._cache_size() if self._failed else 0)

  def __call__(self, *args, **static):
    key = tuple(sorted(static.items()))
    program = self._programs.get(key)
    if program is not None:
      return program(*args)
    program = self._prepared.pop(key, None) or self._build(args, static)
    try:
      out = program(*args)  # compiles: an exported module the backend will not compile falls back here
    except Exception as e:  # noqa: BLE001
      if isinstance(program, functools.partial):
        raise
      self._failed = True
      logging.warning("program cache off for %s: its first call failed: %s: %s", self._name, type(e).__name__,
                      str(e)[:300])
      program = functools.partial(self._fn, **static)
      out = program(*args)
    self._programs[key] = program
    return out

  def program(self, args, static):
    """The jitted program these arguments run (built as a call would, without running it): static arguments
    bound, so it is called, or lowered, with `args` alone."""
    return self._programs.get(tuple(sorted(static.items()))) or self._build(args, static)

  def stored(self, *args, **static) -> bool:
    """Whether a file holds the program for these arguments (a warm start)."""
    return not self._failed and os.path.exists(self._path(args, static))

  def prepare(self, *args, **static) -> None:
    """Reads or exports the program for these arguments and compiles it, without running it, so that
    the first call only runs. Several threads may prepare different programs at once (the start-up
    loads its buckets so); the arguments are only looked at for their shapes, nothing is donated.
    A failure here is left to the first call, which falls back as usual."""
    key = tuple(sorted(static.items()))
    if key in self._programs or key in self._prepared:
      return
    program = self._build(args, static)
    if isinstance(program, functools.partial):
      return
    try:
      compiled = program.lower(*args).compile()
    except Exception:  # noqa: BLE001 - the first call retries and reports it
      return
    with _lock:
      self._prepared.setdefault(key, compiled)
      self.prepared += 1

  def _path(self, args, static) -> str:
    h = hashlib.sha256()
    avals = ",".join(_aval_key(x) for x in jax.tree.leaves(args))
    device = jax.devices()[0]
    for part in (source_hash(), jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
                 self._name, self._key, repr(sorted(static.items())), str(jax.tree.structure(args)), avals):
      h.update(part.encode())
      h.update(b"\0")
    return os.path.join(self._dir, f"{self._name}-{h.hexdigest()[:32]}.jaxexport")

  def _build(self, args, static):
    fallback = functools.partial(self._fn, **static)
    if self._failed:
      return fallback
    try:
      path = self._path(args, static)
      exported = None
      if os.path.exists(path):
        _load_kernel_runtimes(jax.devices()[0].platform)
        try:
          with open(path, "rb") as f:
            exported = _deserialize(f.read())
          with _lock:
            self.loaded += 1
        except Exception as e:  # noqa: BLE001 - a stale or corrupt file: export again and replace it
          logging.warning("program cache: could not read %s (%s); exporting again", path, e)
      if exported is None:
        _register_tree_types(args)
        checks = [export.DisabledSafetyCheck.custom_call(name) for name in _KERNEL_CALLS]
        exported = export.export(self._fn, disabled_checks=checks)(*args, **static)
        _register_tree_types(jax.tree.unflatten(exported.out_tree, [0] * exported.out_tree.num_leaves))
        os.makedirs(self._dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
          f.write(exported.serialize())
        os.replace(tmp, path)  # readers see a whole file or none
      return jax.jit(exported.call, donate_argnums=self._donate, compiler_options=self._options)
    except Exception as e:  # noqa: BLE001 - the plain jit still works; say once why the cache does not
      self._failed = True
      logging.warning("program cache off for %s: %s: %s", self._name, type(e).__name__, str(e)[:300])
      return fallback

"""Serialized step programs: a warm start that neither traces, lowers nor compiles them.

JAX's persistent compilation cache saves the XLA compile, but it is keyed by the lowered program,
so every start still traces and lowers each step program to find its key: on an H200 that was 24 s
of a 39 s warm start of the 8B shape (docs/benchmarks/e2e.md). This cache keys each program by
what determines it instead, and stores the compiled executable itself
(`jax.experimental.serialize_executable`):

- a fingerprint of the process: JAX and jaxlib versions, the platform and its version, the kinds,
  ids and count of the devices the engine runs on, `XLA_FLAGS`, and a hash of the source of every
  module that builds the programs (jserve, pallas_kernels, sharding). Editing the code, upgrading
  JAX or moving to another card changes it, and nothing stale is loaded;
- the model and runner configuration (`repr`), and the program's name;
- the call's static arguments (the step's input layout and sampler path: one program per bucket).

`Program` wraps a `jax.jit` function: the first call with given static arguments loads the
executable from `<directory>/<key>.jexe`, or lowers and compiles it and writes the file (atomically,
so concurrent engines never read half a file); later calls run the in-memory executable. A file
that fails to load is logged and compiled again. A program's executables are told apart by its
static arguments only (hashing every argument's shape per call would cost the host time the step
saves): each call with the same static arguments must pass arguments of the same shapes, dtypes
and placements. The step and burst programs do (their input layout fixes the packed buffer's size),
and so does the slot writer (fixed-size groups).
"""

import functools
import hashlib
import os
import pickle
import tempfile

import jax
from absl import logging
from jax.experimental import serialize_executable

_PACKAGES = ("jserve", "pallas_kernels", "sharding")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache
def source_hash() -> str:
  """SHA-256 over the Python source of the packages that build the step programs."""
  h = hashlib.sha256()
  for package in _PACKAGES:
    root = os.path.join(_REPO, package)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for name in sorted(filenames):
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          h.update(os.path.relpath(path, _REPO).encode())
          with open(path, "rb") as f:
            h.update(f.read())
  return h.hexdigest()


def fingerprint(devices, *parts) -> str:
  """The process-wide part of every key: software, devices, flags, code, and the caller's `parts`."""
  import jaxlib
  backend = devices[0].client
  items = [jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
           repr([(d.id, d.device_kind) for d in devices]), os.environ.get("XLA_FLAGS", ""), source_hash(),
           *map(repr, parts)]
  return hashlib.sha256("\n".join(items).encode()).hexdigest()


class ExecutableCache:
  """Serialized executables under `directory` for programs of one fingerprint (see the module doc)."""

  def __init__(self, directory: str, key: str, devices):
    self.directory = os.path.expanduser(directory)
    os.makedirs(self.directory, exist_ok=True)
    self.key = key
    self.devices = list(devices)
    self.loaded = 0
    self.compiled = 0

  def path(self, name: str, static: tuple) -> str:
    digest = hashlib.sha256(f"{self.key}\n{name}\n{static!r}".encode()).hexdigest()
    return os.path.join(self.directory, f"{name}-{digest[:32]}.jexe")

  def wrap(self, jitted, name: str) -> "Program":
    return Program(self, jitted, name)


class Program:
  """A jitted function whose executables come from an `ExecutableCache`: one per set of static args."""

  def __init__(self, cache: ExecutableCache, jitted, name: str):
    self._cache = cache
    self._jitted = jitted
    self._name = name
    self._executables = {}

  def __call__(self, *args, **static):
    key = tuple(sorted(static.items()))
    exe = self._executables.get(key)
    if exe is None:
      exe = self._executables[key] = self._load_or_compile(args, static, key)
    return exe(*args)

  def _cache_size(self) -> int:
    """Executables this program holds (as `jax.jit`'s `_cache_size`: the engine counts them)."""
    return len(self._executables)

  def _load_or_compile(self, args, static, key):
    path = self._cache.path(self._name, key)
    if os.path.exists(path):
      try:
        with open(path, "rb") as f:
          payload, in_tree, out_tree = pickle.load(f)
        exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                        backend=self._cache.devices[0].client,
                                                        execution_devices=self._cache.devices)
        self._cache.loaded += 1
        return exe
      except Exception as e:  # noqa: BLE001 - a bad file must never stop the engine: compile instead
        logging.warning("executable cache: could not load %s (%s); compiling it again", path, e)
    exe = self._jitted.lower(*args, **static).compile()
    self._cache.compiled += 1
    try:
      blob = pickle.dumps(serialize_executable.serialize(exe))
      fd, tmp = tempfile.mkstemp(dir=self._cache.directory, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(blob)
      os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - the program runs; only the next start loses the shortcut
      logging.warning("executable cache: could not write %s (%s)", path, e)
    return exe

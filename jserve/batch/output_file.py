"""The output JSONL file: resumed, appended to one whole line at a time, verified at the end.

Each record is written with a single `os.write` on an O_APPEND descriptor, so there is no
user-space buffer to lose: once `append` returns, a killed process keeps the line. A kill
in the middle of that write can still leave a partial last line (no newline); `recover`
finds it and cuts it off before anything is appended, and the request is run again.
"""

import collections
import dataclasses
import json
import os
import threading

from absl import logging

from jserve.batch.errors import BatchOutputError
from jserve.batch.records import record_key


def scan(path: str, repair: bool) -> tuple[collections.Counter, int]:
  """Counts the keys of the complete lines of `path`; returns (counts, bytes of complete lines).

  A last line without its newline is partial: with `repair` it is cut off (and logged),
  otherwise it raises. Any other unreadable line raises: the file was changed by hand.
  """
  counts = collections.Counter()
  if not os.path.exists(path):
    return counts, 0
  good_bytes = 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.endswith(b"\n"):
        if not repair:
          raise BatchOutputError(f"{path}: line {line_no} is partly written (no newline at the end of the file); "
                                 f"rerun the batch job on this file to repair it")
        logging.warning("%s: line %d is partly written (%d bytes, the job was killed while writing it); "
                        "removing it, its request runs again", path, line_no, len(raw))
        break
      if raw.strip():
        try:
          key = record_key(json.loads(raw))
        except ValueError:
          key = None
        if key is None:
          raise BatchOutputError(f"{path}: line {line_no} is not an output record of jserve batch "
                                 f"({raw[:60]!r}); was the file changed by hand?")
        counts[key] += 1
      good_bytes += len(raw)
  if repair and os.path.getsize(path) != good_bytes:
    with open(path, "r+b") as f:
      f.truncate(good_bytes)
  return counts, good_bytes


class OutputFile:
  """Appends records to the output file; safe to call from several replica threads."""

  def __init__(self, path: str):
    self.path = path
    self._lock = threading.Lock()
    self._fd = None

  def recover(self) -> collections.Counter:
    """Repairs a partial last line and returns how often each key is already in the file."""
    counts, _ = scan(self.path, repair=True)
    return counts

  def append(self, record: dict):
    data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    with self._lock:
      if self._fd is None:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      view = memoryview(data)
      while view:  # a regular file takes it in one write; the loop only guards against short writes
        view = view[os.write(self._fd, view):]

  def close(self):
    with self._lock:
      if self._fd is not None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None


@dataclasses.dataclass
class Verification:
  """How the output's keys compare with the input's."""

  num_expected: int
  missing: list[str]
  duplicated: list[str]
  unexpected: list[str]

  @property
  def ok(self) -> bool:
    return not self.missing and not self.duplicated

  def describe(self, path: str) -> str:
    if self.ok:
      text = f"verified {path}: all {self.num_expected} input ids appear exactly once"
      if self.unexpected:
        text += f" ({len(self.unexpected)} other ids too, e.g. {self.unexpected[0]!r}: from another input?)"
      return text
    parts = []
    for name, keys in (("missing", self.missing), ("written more than once", self.duplicated)):
      if keys:
        parts.append(f"{len(keys)} {name} (e.g. {', '.join(map(repr, keys[:3]))})")
    return f"{path} does not hold every input id exactly once: {'; '.join(parts)}"


def verify(path: str, expected_keys: list[str]) -> Verification:
  """Reads `path` again and checks that each of `expected_keys` appears in it exactly once."""
  counts, _ = scan(path, repair=False)
  expected = set(expected_keys)
  return Verification(num_expected=len(expected),
                      missing=[k for k in expected_keys if counts[k] == 0],
                      duplicated=[k for k in expected_keys if counts[k] > 1],
                      unexpected=sorted(k for k in counts if k not in expected))

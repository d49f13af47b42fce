"""Merging the outputs of sharded runs (`jserve batch --merge=...`) into one file.

Each host runs `--num_shards=N --shard_index=i` on the same input and writes its own output;
the merge reads them all, refuses partial lines and ids answered twice, and, given the input,
checks that every input id is answered and writes the lines in input order.
"""

import dataclasses
import glob
import json
import os

from absl import logging

from jserve.batch.errors import BatchOutputError
from jserve.batch.items import read_input
from jserve.batch.output_file import scan
from jserve.batch.records import record_key


@dataclasses.dataclass
class MergeSummary:
  num_files: int
  num_records: int
  in_input_order: bool


def expand(patterns: str | list[str]) -> list[str]:
  """Comma-separated paths or globs (`out.shard-*.jsonl`) -> existing files, each pattern's sorted."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  paths = []
  for pattern in patterns:
    pattern = pattern.strip()
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches or not all(os.path.isfile(m) for m in matches):
      raise BatchOutputError(f"merge: no file matches {pattern!r}")
    paths.extend(m for m in matches if m not in paths)
  if not paths:
    raise BatchOutputError("merge: no shard outputs given")
  return paths


def merge_outputs(shards: str | list[str], output_path: str, input_path: str | None = None,
                  input_format: str = "auto") -> MergeSummary:
  """Writes the records of `shards` to `output_path` (atomically: a temporary file, then a rename)."""
  paths = expand(shards)
  records: dict[str, bytes] = {}
  where: dict[str, str] = {}
  for path in paths:
    scan(path, repair=False)  # raises on a partial last line: that shard must be resumed first
    with open(path, "rb") as f:
      for raw in f:
        if not raw.strip():
          continue
        key = record_key(json.loads(raw))
        if key in records:
          raise BatchOutputError(f"merge: id {key!r} is answered in both {where[key]} and {path}; "
                                 f"were two shards run with the same --shard_index?")
        records[key], where[key] = raw, path
  order = list(records)
  if input_path is not None:
    _, _, input_keys = read_input(input_path, input_format)
    missing = [k for k in input_keys if k not in records]
    if missing:
      raise BatchOutputError(f"merge: {len(missing)} input ids have no output line (e.g. "
                             f"{', '.join(map(repr, missing[:3]))}); finish or rerun those shards")
    extra = set(records) - set(input_keys)
    if extra:
      raise BatchOutputError(f"merge: {len(extra)} output ids are not in {input_path} (e.g. {min(extra)!r})")
    order = input_keys
  tmp = output_path + ".merging"
  with open(tmp, "wb") as f:
    for key in order:
      f.write(records[key])
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, output_path)
  logging.info("merged %d records from %d file(s) into %s%s", len(order), len(paths), output_path,
               f", in the order of {input_path}; every input id appears exactly once" if input_path else "")
  return MergeSummary(num_files=len(paths), num_records=len(order), in_input_order=input_path is not None)

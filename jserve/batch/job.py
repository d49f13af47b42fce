"""One batch job: read the input, skip what the output already holds, run the rest, verify.

    input lines ──read_input──▶ items ──skip keys already in output──▶ bad lines: error records
                                                                  └──▶ good lines ──WorkQueue──▶ feeders
    feeders (one per replica) ──each finished request──▶ OutputFile.append (one write, flushed)
    at the end: re-read the output, check every input id of this shard is there exactly once
"""

import dataclasses
import os
import threading
import time
from collections.abc import Callable

from absl import logging

from jserve.batch.errors import BatchOutputError
from jserve.batch.feeder import EngineFeeder, WorkQueue
from jserve.batch.items import FORMATS, BatchItem, make_params, read_input, sampling_fields
from jserve.batch.output_file import OutputFile, verify
from jserve.batch.progress import MODES, BatchSummary, Progress
from jserve.batch.records import error_record, result_record
from jserve.batch.replicas import Replica
from jserve.errors import ConfigError, InvalidRequestError


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
  """What to run and how; the engine's own settings are in EngineConfig."""

  input_path: str
  output_path: str
  input_format: str = "auto"  # "auto", "jserve" or "openai"
  defaults: dict = dataclasses.field(default_factory=dict)  # SamplingParams fields for every line
  sort_by_prefix: bool = False
  num_shards: int = 1
  shard_index: int = 0
  progress: str = "auto"  # "auto" (a bar on a terminal, log lines otherwise), "bar", "log", "none"
  log_every_s: float = 10.0
  max_pending: int | None = None  # unfinished requests per engine; default 2 x max_num_seqs

  def __post_init__(self):
    if self.input_format not in FORMATS:
      raise ConfigError(f"input_format={self.input_format!r}: expected one of {', '.join(FORMATS)}")
    if self.progress not in MODES:
      raise ConfigError(f"progress={self.progress!r}: expected one of {', '.join(MODES)}")
    if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
      raise ConfigError(f"shard_index={self.shard_index}, num_shards={self.num_shards}: "
                        f"need num_shards >= 1 and 0 <= shard_index < num_shards")
    if os.path.abspath(self.input_path) == os.path.abspath(self.output_path):
      raise ConfigError(f"output {self.output_path!r} is the input file")
    unknown = sorted(set(self.defaults) - sampling_fields())
    if unknown:
      raise ConfigError(f"default sampling parameters: unknown field(s) {', '.join(map(repr, unknown))}")
    try:
      make_params(self.defaults, {})
    except InvalidRequestError as e:  # wrong for every line: stop before reading any
      raise ConfigError(f"default sampling parameters: {e}") from None


class _Sink:
  """Turns engine results and errors into output lines; counts them."""

  def __init__(self, output: OutputFile, fmt: str, progress: Progress, summary: BatchSummary):
    self.output, self.fmt, self.progress, self.summary = output, fmt, progress, summary
    self._lock = threading.Lock()

  def result(self, item: BatchItem, out, engine):
    model_name = os.path.basename(os.path.normpath(engine.config.model_dir))
    self.output.append(result_record(item, out, engine.tokenizer, model_name))
    num_tokens = sum(len(c.token_ids) for c in out.outputs)
    with self._lock:
      self.summary.finished += 1
      self.summary.prompt_tokens += len(out.prompt_token_ids)
      self.summary.output_tokens += num_tokens
    self.progress.update(1, num_tokens)

  def error(self, item: BatchItem, message: str):
    self.output.append(error_record(item, message, self.fmt))
    with self._lock:
      self.summary.failed += 1
    self.progress.update(1, 0)


def _run_feeders(feeders: list[EngineFeeder]):
  if len(feeders) == 1:
    feeders[0].run()
    return
  stop = threading.Event()
  errors = []

  def run(feeder):
    try:
      feeder.run(stop)
    except BaseException as e:  # noqa: BLE001 (stops the other replicas; re-raised below)
      errors.append(e)
      stop.set()

  threads = [threading.Thread(target=run, args=(f,), name=f"feeder-{i}") for i, f in enumerate(feeders)]
  for t in threads:
    t.start()
  try:
    for t in threads:
      while t.is_alive():
        t.join(timeout=0.5)  # a timed join keeps the main thread responsive to Ctrl-C
  except BaseException:
    stop.set()
    raise
  if errors:
    raise errors[0]


def run_batch(config: BatchConfig, make_replicas: Callable[[], list[Replica]]) -> BatchSummary:
  """Runs the job; `make_replicas` is called only if some input is not yet answered in the output.

  Raises BatchOutputError if, at the end, the output does not hold each input id of this
  shard exactly once (the output is left as it is, for a rerun to complete it).
  """
  fmt, items, _ = read_input(config.input_path, config.input_format, config.defaults,
                             config.num_shards, config.shard_index)
  output = OutputFile(config.output_path)
  done = output.recover()
  todo = [it for it in items if done[it.key] == 0]
  summary = BatchSummary(total=len(items), skipped=len(items) - len(todo))
  shard = f" (shard {config.shard_index} of {config.num_shards})" if config.num_shards > 1 else ""
  logging.info("batch: %d lines%s of %s (%s format); %d already in %s, %d to run", len(items), shard,
               config.input_path, fmt, summary.skipped, config.output_path, len(todo))
  progress = Progress(len(items), summary.skipped, config.progress, config.log_every_s)
  sink = _Sink(output, fmt, progress, summary)
  try:
    for item in todo:
      if item.error is not None:
        sink.error(item, item.error)
    work = [it for it in todo if it.error is None]
    if config.sort_by_prefix:
      work.sort(key=BatchItem.prefix_key)
    if work:
      start = time.monotonic()
      replicas = make_replicas()
      summary.num_replicas = len(replicas)
      summary.load_s = time.monotonic() - start
      queue = WorkQueue(work)
      feeders = [EngineFeeder(r.engine, queue, sink, r.device, config.max_pending) for r in replicas]
      progress.start_clock()
      start = time.monotonic()
      _run_feeders(feeders)
      summary.elapsed_s = time.monotonic() - start
  finally:
    progress.close()
    output.close()
  logging.info("%s", summary.describe())
  check = verify(config.output_path, [it.key for it in items])
  summary.verified, summary.verification = check.ok, check.describe(config.output_path)
  if not check.ok:
    raise BatchOutputError(summary.verification)
  logging.info("%s", summary.verification)
  return summary

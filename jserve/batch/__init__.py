"""`jserve batch`: offline JSONL inference, resumable, with progress, over data-parallel replicas.

    summary = run_batch(BatchConfig(input_path="in.jsonl", output_path="out.jsonl"),
                        lambda: build_replicas(EngineConfig(model=DIR), num_replicas=1))

docs/batch.md describes the file formats, resume, sharding and merging.
"""

from jserve.batch.job import BatchConfig, BatchSummary, run_batch
from jserve.batch.merge import merge_outputs
from jserve.batch.replicas import Replica, build_replicas

__all__ = ["BatchConfig", "BatchSummary", "Replica", "build_replicas", "merge_outputs", "run_batch"]

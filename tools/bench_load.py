"""Weight load time: the Hugging Face safetensors checkpoint against its `jserve convert` orbax copy.

    python -m tools.bench_load --preset=llama-3.2-1b --tensor_parallel_size=1 --out_dir=/tmp/bench_load

Writes a random-weight checkpoint of the preset, converts it with `jserve
convert`, then loads each into the engine's placement (`load_engine_params`,
each tensor into its shards of a `--tensor_parallel_size` mesh) `--repeats`
times, alternating, and reports the best and median seconds and GB/s of each.
Both are read through the operating system's page cache after the first
round (the files were just written): the figures compare the two readers, not
the disk. Writes load.json under --out_dir; prints a short table last.
"""

import datetime
import json
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-3.2-1b", "model preset (random weights)")
flags.DEFINE_integer("num_layers", None, "fewer layers than the preset, for a quicker run")
flags.DEFINE_integer("tensor_parallel_size", 1, "devices the weights are split over")
flags.DEFINE_integer("repeats", 3, "loads of each format")
flags.DEFINE_string("out_dir", "/tmp/bench_load", "results directory")


def main(argv):
  del argv
  import jax
  import numpy as np

  from jserve.convert import convert_to_orbax
  from jserve.engine.placement import engine_mesh, load_engine_params
  from tools.make_random_checkpoint import make_checkpoint
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  root = tempfile.mkdtemp()
  hf_dir, orbax_dir = os.path.join(root, "hf"), os.path.join(root, "orbax")
  cfg = make_checkpoint(FLAGS.preset, hf_dir, num_layers=FLAGS.num_layers)
  convert_s = convert_to_orbax(hf_dir, orbax_dir)
  tp = FLAGS.tensor_parallel_size
  mesh = engine_mesh(cfg, tp, jax.devices()[:tp] if tp > 1 else None)
  times = {"safetensors": [], "orbax": []}
  nbytes = 0
  for _ in range(FLAGS.repeats):
    for name, path in (("safetensors", hf_dir), ("orbax", orbax_dir)):
      t = time.perf_counter()
      params = load_engine_params(path, cfg, "bfloat16", mesh)
      jax.block_until_ready(params)
      times[name].append(time.perf_counter() - t)
      nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
      del params
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "preset": FLAGS.preset,
            "num_layers": cfg.num_layers, "tensor_parallel_size": tp, "weight_bytes": nbytes,
            "convert_s": convert_s, "load_s": times}
  with open(os.path.join(FLAGS.out_dir, "load.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"{result['device']}, JAX {result['jax']}, {result['date']}: {FLAGS.preset} ({cfg.num_layers} layers, "
        f"{nbytes / 1e9:.2f} GB bf16), tensor {tp}; convert {convert_s:.1f} s")
  print("| format | best s | median s | GB/s (best) |")
  print("| --- | --- | --- | --- |")
  for name, ts in times.items():
    print(f"| {name} | {min(ts):.2f} | {float(np.median(ts)):.2f} | {nbytes / min(ts) / 1e9:.2f} |")


if __name__ == "__main__":
  app.run(main)

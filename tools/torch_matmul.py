"""cuBLAS's time for the decode matmul shapes, through PyTorch: the bar tools/bench_matmul.py measures kernels against.

`torch_time` multiplies by the very weight buffers JAX holds (shared through DLPack), so both libraries
read the same bytes, and replays the calls from one CUDA graph so launch overhead is not timed.
"""

import time

import jax
import numpy as np


def torch_time(shape, x, ws, reps, rounds):
  """torch.matmul over the same weight buffers (shared through DLPack), replayed from one CUDA graph."""
  import torch
  cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
  try:  # the same buffers, so both libraries read the same bytes
    to_torch = torch.from_dlpack
    tx = to_torch(x)
  except Exception:  # noqa: BLE001 - fresh random tensors of the same shapes time the same
    device = "cuda" if cuda else "cpu"
    to_torch = lambda a: torch.randn(a.shape, dtype=torch.bfloat16, device=device)
    tx = to_torch(x)
  if shape.kind == "gate_up":
    tws = [(to_torch(g), to_torch(u)) for g, u in ws]
  else:
    tws = [to_torch(w) for w in ws]

  def run():
    outs = []
    for w in tws:
      if shape.kind == "kn":
        outs.append(torch.matmul(tx, w))
      elif shape.kind == "nk":
        outs.append(torch.matmul(tx, w.t()))
      else:
        outs.append(torch.nn.functional.silu(torch.matmul(tx, w[0])) * torch.matmul(tx, w[1]))
    return outs

  if not cuda:
    run()
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      for _ in range(reps):
        run()
      times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times)), "eager (cpu)"
  torch.cuda.synchronize()
  stream = torch.cuda.Stream()
  stream.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(stream):
    for _ in range(2):
      run()
  torch.cuda.current_stream().wait_stream(stream)
  how = "cuda graph"
  try:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
      run()
    replay = graph.replay
  except Exception as e:  # noqa: BLE001 - eager launches still give a number
    how = f"eager ({type(e).__name__})"
    replay = run
  replay()
  torch.cuda.synchronize()
  times = []
  for _ in range(rounds):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
      replay()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end) / 1e3 / reps)
  return float(np.median(times)), how

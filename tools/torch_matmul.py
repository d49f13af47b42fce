"""cuBLAS's time for the decode matmul shapes, through PyTorch: the bar tools/bench_matmul.py measures kernels against.

`torch_time` multiplies by the very weight buffers JAX holds (shared through DLPack), so both libraries
read the same bytes, and replays the calls from one CUDA graph so launch overhead is not timed.

For fp8 weights (a shape with `fp8` set; each weight a (float8 weight, float32 scale) pair) the anchor
is plain PyTorch weight-only fp8: the weight converted to bfloat16 by `.to()` (a copy through memory),
then cuBLAS, then the scale. `torch._scaled_mm` is not the anchor there: it multiplies fp8 by fp8, so it
would quantize the activations too, a different product.

That product is the anchor of a w8a8 shape (`a8` set; each weight a (float8 weight [N, K], float32 scale)
pair, a gate_up's two stacked as ([2, N, K], [2, N])): x quantized to fp8 once per call with a scale per row
(as `quant.quantize_rows`), then `torch._scaled_mm` per weight with the row and column scales (PyTorch's
rowwise-scaled fp8 GEMM), a stacked pair's halves each on its own, then silu(gate) * up.
"""

import time

import jax
import numpy as np


ANCHOR_FP8 = "torch: fp8 .to(bfloat16) + cuBLAS"
ANCHOR_A8 = "torch: x quantized per row + torch._scaled_mm (rowwise scales)"


def torch_time(shape, x, ws, reps, rounds):
  """torch.matmul over the same weight buffers (shared through DLPack), replayed from one CUDA graph."""
  import torch
  cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
  fp8 = getattr(shape, "fp8", False)
  a8 = getattr(shape, "a8", False)

  def to_torch(a):
    try:  # the same buffers, so both libraries read the same bytes
      return torch.from_dlpack(a)
    except Exception:  # noqa: BLE001 - fresh random tensors of the same shapes and dtypes time the same
      t = torch.randn(a.shape, device="cuda" if cuda else "cpu")
      return t.to(getattr(torch, str(a.dtype)))

  tx = to_torch(x)
  tws = [jax.tree_util.tree_map(to_torch, w) for w in ws]  # arrays, pairs or pairs of pairs, as given

  def mm(w, x8=None):
    if not fp8:
      return torch.matmul(tx, w)
    w8, scale = w
    if a8:  # w8 is [N, K]: its transpose is the column-major operand _scaled_mm takes
      return torch._scaled_mm(x8[0], w8.t(), scale_a=x8[1], scale_b=scale.view(1, -1), out_dtype=tx.dtype)
    return torch.matmul(tx, w8.to(tx.dtype)) * scale

  def quantized_x():
    """(x in float8 e4m3, its float32 scale per row [M, 1]), as quant.quantize_rows makes them."""
    x32 = tx.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (x32 / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale

  def run():
    outs = []
    x8 = quantized_x() if a8 else None
    for w in tws:
      if shape.kind == "kn":
        outs.append(mm(w, x8))
      elif shape.kind == "nk":
        outs.append(torch.matmul(tx, w.t()))
      else:  # w8a8: the stacked pair's halves (views, no copy); else a (gate, up) pair
        gate, up = ((w[0][0], w[1][0]), (w[0][1], w[1][1])) if a8 else w
        outs.append(torch.nn.functional.silu(mm(gate, x8)) * mm(up, x8))
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

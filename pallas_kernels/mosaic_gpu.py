"""What jserve's two Mosaic GPU (Hopper) kernels share: the module import, the device check, the
compiler parameters and the interpreter's parameters.

ragged_paged_attention/hopper.py (prefill attention) and decode_matmul/hopper.py (decode matmuls)
both use TMA, wgmma and setmaxnreg, so both need a Hopper GPU when compiled and both run in JAX's
Mosaic GPU interpreter on a CPU for the tests.
"""

import jax

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jaxlib without Mosaic GPU
  plgpu = None


def device_supports() -> str | None:
  """None when JAX's default device is a Hopper GPU (compute capability 9.x: wgmma, TMA, setmaxnreg);
  otherwise why not. The interpreter needs no such device, so callers skip this when interpreting."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or not str(capability or "").startswith("9"):
    return f"{device.device_kind} ({device.platform}, compute capability {capability}) is not a Hopper GPU"
  return None


def lane_params(**kw):
  """Compiler parameters with Lane semantics, named: the kernels are written per thread, with explicit
  register layouts.

  JAX 0.11 made warpgroup semantics the default. Its layout inference asks
  every TMA copy into a tiled buffer to start on a whole tile in global
  memory, which a ragged batch's query rows do not (on JAX 0.11.2 the check
  fails with an AssertionError inside layout inference).
  """
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, **kw)


def interpret_params():
  """Mosaic GPU interpreter parameters (simulated threads, TMA and barriers on the CPU).

  Reads past the end of a buffer return uninitialized memory (NaN) where TMA
  would read zeros: in the attention kernel only query rows past the end of
  `q_TNH` do that, and their outputs are never stored. The interpreter's race
  detector stays off: with it on (JAX 0.10), runs of the attention kernel hung
  now and then inside the interpreter's barrier waits, with or without ping-pong.
  """
  kw = dict(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
  if hasattr(plgpu, "InterpretGPUParams"):  # where JAX exports it
    return plgpu.InterpretGPUParams(**kw)
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # JAX 0.10
  return InterpretGPUParams(**kw)

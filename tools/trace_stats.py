"""What tools/profile_step.py reads from a trace's kernels: their kind by name, the union of their intervals, and
the per-step counts (kernels, idle time between them, short kernels). Plain arithmetic without flags, so tests
import it."""

import re

_KINDS = [  # (kind, pattern over lowercased kernel names), first match wins
    ("attention", r"ragged|paged|attention|flash"),
    ("kv write", r"scatter|dynamic.update|dynamic_update"),
    ("matmul", r"gemm|matmul|dot|cublas|nvjet|sm90_xmma|cutlass|wgmma"),
    ("sort / top-k", r"sort|topk|top_k"),
    ("copy", r"memcpy|memset|copy"),
]


def kind_of(name: str) -> str:
  low = name.lower()
  for kind, pattern in _KINDS:
    if re.search(pattern, low):
      return kind
  return "other (fusions)"


def busy_ns(events) -> float:
  """Length of the union of the events' intervals."""
  spans = sorted((s, s + d) for _, s, d in events)
  total, end = 0.0, None
  for s, e in spans:
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


SMALL_KERNEL_NS = 5_000  # a kernel this short is mostly its fixed cost (launch, ramp, tail) on a GPU


def kernel_stats(events, steps: int) -> dict:
  """Per step: how many kernels ran, the idle time between them (from the first kernel's start to the last
  one's end, less their union), and the kernels shorter than SMALL_KERNEL_NS. A step of many small kernels
  (batch 1) pays a fixed cost per kernel that the bytes it moves do not explain: this is where it shows."""
  if not events:
    return {"kernels_per_step": 0.0, "median_kernel_us": 0.0, "idle_between_kernels_ms_per_step": 0.0,
            "small_kernels_per_step": 0.0, "small_kernels_ms_per_step": 0.0}
  durations = sorted(d for _, _, d in events)
  span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
  small = [d for d in durations if d < SMALL_KERNEL_NS]
  return {"kernels_per_step": len(events) / steps, "median_kernel_us": durations[len(durations) // 2] / 1e3,
          "idle_between_kernels_ms_per_step": (span - busy_ns(events)) / steps / 1e6,
          "small_kernels_per_step": len(small) / steps, "small_kernels_ms_per_step": sum(small) / steps / 1e6}

"""What tools/bench_e2e.py measures its runs against: the workloads' lengths (the long-tailed, chat-like
distribution) and the device-time bounds of a workload and of a decode step (the roofline and the serial bound),
from the weight and KV bytes, the matmul FLOPs and the ceilings measured in the same run. Plain arithmetic: no
flags, no device, so tests import it.
"""

import heapq
import math

# The long-tailed workload: chat-like lengths (ShareGPT-style traffic has prompts of a few hundred
# tokens with a tail into the thousands, and answers of a couple of hundred tokens with a tail to
# about two thousand). Each length is round(exp(N(log(median), sigma^2))) clipped to [lo, hi],
# input and output drawn independently, from numpy's default_rng(seed). Means before clipping:
# input 250 * e^0.5 = 412, output 200 * e^0.32 = 275; 99th percentiles 2,560 and 1,287.
LONGTAIL = {"input": {"median": 250, "sigma": 1.0, "clip": [4, 4096]},
            "output": {"median": 200, "sigma": 0.8, "clip": [4, 2048]},
            "seed": 0}


def longtail_lengths(count: int, max_total: int):
  """`count` (input, output) lengths drawn from LONGTAIL, and the distribution with the drawn
  lengths' statistics, for the results. A request longer than `max_total` (the model's length) has
  its input cut, then its output, to fit; `cut_to_model_len` counts them."""
  import numpy as np
  rng = np.random.default_rng(LONGTAIL["seed"])
  lens = {}
  for key in ("input", "output"):
    d = LONGTAIL[key]
    x_N = np.rint(np.exp(rng.normal(math.log(d["median"]), d["sigma"], size=count)))
    lens[key] = np.clip(x_N, *d["clip"]).astype(np.int64)
  in_N, out_N = lens["input"], lens["output"]
  over_N = in_N + out_N > max_total
  in_N = np.where(over_N, np.maximum(max_total - out_N, 4), in_N)
  out_N = np.minimum(out_N, max_total - in_N)

  def stats(x_N):
    return {"mean": float(x_N.mean()), "p50": float(np.percentile(x_N, 50)), "p90": float(np.percentile(x_N, 90)),
            "p99": float(np.percentile(x_N, 99)), "min": int(x_N.min()), "max": int(x_N.max()),
            "total": int(x_N.sum())}

  spec = dict(LONGTAIL, form="round(exp(N(log(median), sigma^2))) clipped to clip, input and output independent, "
              "numpy default_rng(seed): normal for inputs, then for outputs")
  spec.update(cut_to_model_len=int(over_N.sum()), drawn={"input": stats(in_N), "output": stats(out_N)})
  return in_N.tolist(), out_N.tolist(), spec


def longtail_text(spec: dict) -> str:
  """One line that says the long-tailed distribution and what was drawn from it."""
  parts = []
  for key in ("input", "output"):
    d, s = spec[key], spec["drawn"][key]
    parts.append(f"{key} lognormal(median {d['median']}, sigma {d['sigma']}) clipped to [{d['clip'][0]}, "
                 f"{d['clip'][1]}], drawn mean {s['mean']:.0f} / p50 {s['p50']:.0f} / p90 {s['p90']:.0f} / "
                 f"p99 {s['p99']:.0f} / max {s['max']}")
  cut = f"; {spec['cut_to_model_len']} cut to the model's length" if spec.get("cut_to_model_len") else ""
  return f"longtail: {'; '.join(parts)}; independent, seed {spec['seed']}{cut}"


def decode_steps(out_lens: list[int], slots: int) -> int:
  """Decode steps of a workload: the makespan of the requests' output lengths on `slots` sequence
  slots, each request taking the first slot free in arrival order (continuous batching, prefill
  taking no steps). For equal lengths this is out_len * ceil(count / slots), the waves of the
  equal-length formula."""
  return max(slot_ends(out_lens, slots), default=0)


def slot_ends(out_lens: list[int], slots: int) -> list[int]:
  """The decode step at which each sequence slot runs out of work, in `decode_steps`' model; the batch
  of step t is the number of slots whose end is past t."""
  free = [0] * min(slots, len(out_lens))
  for n in out_lens:
    heapq.heappush(free, heapq.heappop(free) + n)
  return sorted(free)


def matmul_step_s(batch: int, *, weight_bytes: int, bandwidth: float, matmul_params: int, flop_rate: float) -> float:
  """Seconds of one decode step's matmuls: the larger of its weight reads and its FLOPs (2 x
  matmul_params per sequence). A large batch makes them compute-bound: on an H200 (4.2 TB/s, 750
  TFLOP/s) a bfloat16 matmul is past the ridge above about 180 rows."""
  return max(weight_bytes / bandwidth, 2 * matmul_params * batch / flop_rate)


def step_serial_s(batch: int, context: float, *, kv_per_token: int, **ceilings) -> float:
  """Seconds of one decode step with its KV reads at the memory bound, then its matmuls at theirs
  (`matmul_step_s`; `ceilings` as there): kernels that run one after the other cannot overlap
  compute-bound matmuls with memory-bound attention, so this bound is above the roofline wherever the
  matmuls are compute-bound."""
  return batch * context * kv_per_token / ceilings["bandwidth"] + matmul_step_s(batch, **ceilings)


def decode_matmul_s(out_lens: list[int], slots: int, **ceilings) -> float:
  """Seconds of all decode steps' matmuls (`matmul_step_s` at each step's batch); `ceilings` as there."""
  ends = slot_ends(out_lens, slots)
  total, start = 0.0, 0
  for j, end in enumerate(ends):  # steps start..end-1 run len(ends) - j sequences
    total += (end - start) * matmul_step_s(len(ends) - j, **ceilings)
    start = end
  return total


def workload_bounds(in_lens: list[int], out_lens: list[int], *, max_num_seqs: int, max_num_batched_tokens: int,
                    weight_bytes: int, kv_per_token: int, bandwidth: float, matmul_params: int = 0,
                    flop_rate: float = float("inf")) -> dict:
  """Seconds the device needs for a workload, by three bounds.

  memory_s: every decode step reads all weights (`decode_steps` of them), request i's out_i decode
  steps read its KV at a mean context of in_i + out_i / 2, and prefill reads the weights once per
  step of max_num_batched_tokens. compute_s: 2 x matmul_params FLOPs per token, prompt and output
  (attention's own FLOPs left out: under 3% of the total at these lengths on an 8B model). Long
  prompts make the second one the bound (1000 x 1024 prompt tokens on an 8B model: 16 PFLOP).
  roofline_s is the larger of the two: what the issue's targets are measured against.

  serial_s: decode's KV reads at the memory bound, decode's matmuls each step at the larger of its
  weight reads and its FLOPs (`decode_matmul_s`), plus prefill at its compute bound (or its weight
  reads, where larger). An executor that runs one kernel at a time cannot hide the compute of prompt
  tokens, or of a large decode batch's matmuls, under the memory traffic of attention, so this is the
  bound for it, and for vLLM's, SGLang's and TensorRT-LLM's single-stream steps alike.
  """
  steps = decode_steps(out_lens, max_num_seqs)
  kv_read = sum(o * (i + o / 2) for i, o in zip(in_lens, out_lens)) * kv_per_token
  prefill_steps = -(-sum(in_lens) // max_num_batched_tokens)
  memory_s = ((steps + prefill_steps) * weight_bytes + kv_read) / bandwidth
  compute_s = 2 * matmul_params * (sum(in_lens) + sum(out_lens)) / flop_rate
  decode_s = kv_read / bandwidth + decode_matmul_s(out_lens, max_num_seqs, weight_bytes=weight_bytes,
                                                  bandwidth=bandwidth, matmul_params=matmul_params,
                                                  flop_rate=flop_rate)
  prefill_s = max(prefill_steps * weight_bytes / bandwidth, 2 * matmul_params * sum(in_lens) / flop_rate)
  return {"memory_s": memory_s, "compute_s": compute_s, "roofline_s": max(memory_s, compute_s),
          "serial_s": max(decode_s + prefill_s, compute_s)}


def matmul_params_of(cfg) -> int:
  """Weights that take part in a token's matmuls: all but an untied input embedding (a gather)."""
  return cfg.param_count() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)

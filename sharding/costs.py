"""A roofline cost model of serving steps: bytes over bandwidth, FLOPs over compute, collectives over links.

Everything here is per device of one replica (one engine: `stage` x `tensor`
devices) and in seconds or bytes. The model is deliberately simple, so that a
plan's numbers can be checked by hand:

- a step reads its weights and the KV of its sequences once from HBM, and
  does 2 FLOPs per parameter per token plus attention's 4 per context
  position per head dimension; the step takes the longer of the two times;
- weights quantized to fp8 (`Workload.quantization`) are the layers'
  projections at one byte per element plus a float32 scale per output
  channel; the embedding, LM head and norms stay at `weight_bytes`;
- the KV cache is `kv_bytes` per element, which a separate cache dtype sets
  (one byte for fp8): the pool holds more tokens and a step reads fewer bytes;
- tensor parallelism adds two all-reduces of the activations per layer (after
  attention's output projection and the MLP's down projection), one for the
  vocabulary-parallel embedding and an all-gather of the logits, each a ring
  (`2 (t - 1) / t` of the bytes over the link) plus a fixed start-up latency;
- pipeline parallelism splits the layers; a decode round runs `stage`
  micro-batches through the stages, each stage reading its weights once per
  micro-batch, and a micro-batch cannot start its next token before its
  previous one has left the last stage.

Hardware numbers are nominal peaks (DevicePreset); measured steps are slower,
and the ratio measured/estimated is what the GPU benchmarks report.
"""

import dataclasses

from sharding.errors import ShardingError
from sharding.rules import layer_stages


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevicePreset:
  """One accelerator and its links. Bandwidths in GB/s (1e9 bytes), compute in dense bf16 TFLOP/s."""

  name: str
  memory_gib: float
  hbm_gbps: float
  tflops: float
  link_gbps: float  # per device and direction, inside a host (NVLink) or a slice (ICI)
  inter_host_gbps: float  # per device and direction, between hosts
  devices_per_host: int
  interconnect: str
  collective_latency_us: float  # fixed cost of one small collective, however few bytes it moves
  inter_host_latency_us: float  # the same for a collective that crosses hosts

  @property
  def memory_bytes(self) -> int:
    return int(self.memory_gib * 2**30)


# Sources: vendor data sheets. NVLink 4 is 900 GB/s per GPU both ways together, so 450 each way;
# inter-host GPU traffic is one 400 Gb/s InfiniBand NIC per GPU. TPU ICI figures are the published
# per-chip totals, halved for one direction; within a slice ICI also joins the hosts. The collective
# latencies are typical NCCL/ICI small-message figures, not measured here.
_NVLINK = dict(link_gbps=450, inter_host_gbps=50, devices_per_host=8, interconnect="NVLink",
               collective_latency_us=10, inter_host_latency_us=30)
_ICI = dict(interconnect="ICI", collective_latency_us=10, inter_host_latency_us=10)
DEVICE_PRESETS: dict[str, DevicePreset] = {
    "H100-80GB": DevicePreset(name="H100-80GB", memory_gib=80, hbm_gbps=3350, tflops=989, **_NVLINK),
    "H200-141GB": DevicePreset(name="H200-141GB", memory_gib=140, hbm_gbps=4800, tflops=989, **_NVLINK),
    "TPU-v5e": DevicePreset(name="TPU-v5e", memory_gib=16, hbm_gbps=819, tflops=197, link_gbps=100,
                            inter_host_gbps=100, devices_per_host=8, **_ICI),
    "TPU-v5p": DevicePreset(name="TPU-v5p", memory_gib=95, hbm_gbps=2765, tflops=459, link_gbps=300,
                            inter_host_gbps=300, devices_per_host=4, **_ICI),
    "TPU-v6e": DevicePreset(name="TPU-v6e", memory_gib=32, hbm_gbps=1640, tflops=918, link_gbps=224,
                            inter_host_gbps=224, devices_per_host=8, **_ICI),
}


# Bytes of a quantized projection: (per weight element, per output channel for its float32 scale).
QUANTIZED_BYTES = {"fp8": (1, 4)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
  """What the cluster must serve. `concurrency` counts sequences decoding at once, over all replicas."""

  max_model_len: int = 4096
  concurrency: int = 256
  prompt_len: int = 1024  # for the time-to-first-token estimate
  avg_context: int | None = None  # mean context of a decoding sequence; default max_model_len // 2
  max_num_batched_tokens: int = 8192  # the largest step, which sizes the activations
  max_num_seqs: int = 256  # rows that get logits in one step
  weight_bytes: int = 2  # bfloat16
  kv_bytes: int = 2
  memory_utilization: float = 0.9
  # None, or "fp8": the layers' projections in float8 with a float32 scale per output channel, as
  # jserve's quantization="fp8" and pre-quantized fp8 checkpoints hold them (the rest in weight_bytes).
  quantization: str | None = None
  # fp8 made at start-up from a full-precision checkpoint: each device first holds its weights in
  # weight_bytes, so those must fit the memory budget too (a pre-quantized checkpoint has no such peak).
  quantize_at_load: bool = False
  # The KV cache's dtype by name when it is set apart from the model's (jserve's kv_cache_dtype, say
  # "fp8"): a label for the plan's title only; its element size is `kv_bytes`.
  kv_cache_dtype: str | None = None

  def __post_init__(self):
    if self.quantization is not None and self.quantization not in QUANTIZED_BYTES:
      raise ShardingError(f"quantization={self.quantization!r}: use None or one of {', '.join(QUANTIZED_BYTES)}")
    if self.quantize_at_load and self.quantization is None:
      raise ShardingError("quantize_at_load=True needs a quantization")

  @property
  def context(self) -> int:
    return self.avg_context or self.max_model_len // 2

  def describe_weights(self) -> str:
    """The weights' storage in words: "16-bit", or "fp8 (the embedding, LM head and norms 16-bit)"."""
    bits = f"{8 * self.weight_bytes}-bit"
    if self.quantization is None:
      return bits
    return f"{self.quantization} (the embedding, LM head and norms {bits})"


@dataclasses.dataclass(frozen=True)
class Layout:
  data: int
  stage: int
  tensor: int


def _kv_heads_per_device(cfg, tp: int) -> int:
  return max(cfg.num_kv_heads // tp, 1)  # fewer KV heads than devices: one (replicated) head each


def layer_projection_params_per_device(cfg, tp: int) -> int:
  """Elements of one layer's projections (wq, wk, wv, wo, w_gate, w_up, w_down) on one device: what
  quantization stores in fewer bytes."""
  d, f, h, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads
  return (2 * d * n * h + 3 * d * f) // tp + 2 * d * h * _kv_heads_per_device(cfg, tp)


def layer_params_per_device(cfg, tp: int) -> int:
  """Parameters of one layer on one device: its projections' shares, its biases' and its norms."""
  d, h, n = cfg.hidden_size, cfg.head_dim, cfg.num_heads
  biases = n * h // tp + 2 * h * _kv_heads_per_device(cfg, tp) if cfg.attention_bias else 0
  norms = 2 * d + (2 * h if cfg.qk_norm else 0)
  return layer_projection_params_per_device(cfg, tp) + biases + norms


def layer_scales_per_device(cfg, tp: int) -> int:
  """Output channels of one layer's projections on one device: one float32 scale each when quantized.

  A scale is split as its weight's output axes are: wq's [N, H] and w_gate's and w_up's [F] by the
  tensor degree, wk's and wv's [K, H] to this device's KV heads; wo and w_down are split along the
  axes they contract, so their [D] scales are whole on every device.
  """
  d, f, h, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads
  return (n * h + 2 * f) // tp + 2 * h * _kv_heads_per_device(cfg, tp) + 2 * d


def vocab_params_per_device(cfg, tp: int) -> int:
  """One vocabulary matrix (embedding or LM head) on one device."""
  return cfg.vocab_size * cfg.hidden_size // (tp if cfg.vocab_size % tp == 0 else 1)


def stage_params_per_device(cfg, layout: Layout) -> list[int]:
  """Parameters on one device of each stage: its layers, plus the embedding (first) and head (last)."""
  stages = layer_stages(cfg.num_layers, layout.stage)
  out = [len(r) * layer_params_per_device(cfg, layout.tensor) for r in stages]
  out[0] += vocab_params_per_device(cfg, layout.tensor)
  if not cfg.tie_word_embeddings or layout.stage > 1:  # a tied head on another stage needs its own copy
    out[-1] += vocab_params_per_device(cfg, layout.tensor)
  out[-1] += cfg.hidden_size
  return out


def stage_weight_bytes_per_device(cfg, layout: Layout, workload: Workload, *,
                                  quantized: bool = True) -> list[int]:
  """Weight bytes on one device of each stage: `stage_params_per_device` at `workload.weight_bytes`,
  except the layers' projections under `workload.quantization` (unless `quantized` is False: the
  full-precision weights that quantization at load starts from)."""
  params = stage_params_per_device(cfg, layout)
  if workload.quantization is None or not quantized:
    return [p * workload.weight_bytes for p in params]
  element, scale = QUANTIZED_BYTES[workload.quantization]
  proj = layer_projection_params_per_device(cfg, layout.tensor)
  per_layer = proj * (element - workload.weight_bytes) + layer_scales_per_device(cfg, layout.tensor) * scale
  stages = layer_stages(cfg.num_layers, layout.stage)
  return [p * workload.weight_bytes + len(layers) * per_layer for p, layers in zip(params, stages)]


def kv_bytes_per_token_layer(cfg, tp: int, workload: Workload) -> int:
  """KV bytes one token of context costs in one layer on one device."""
  return 2 * _kv_heads_per_device(cfg, tp) * cfg.head_dim * workload.kv_bytes


def kv_bytes_per_token(cfg, layout: Layout, workload: Workload) -> int:
  """KV bytes one token of context costs on a device of the stage with the most layers."""
  layers = len(layer_stages(cfg.num_layers, layout.stage)[0])
  return layers * kv_bytes_per_token_layer(cfg, layout.tensor, workload)


def activation_bytes(cfg, layout: Layout, workload: Workload) -> int:
  """Peak live activations of the largest step, all float32 (a rough bound, not a measurement).

  Per token: a few copies of the hidden state, this device's Q/K/V/O heads and
  its slice of the MLP's gate, up and product; per sampled row its logits.
  """
  tp, t = layout.tensor, workload.max_num_batched_tokens
  heads = (cfg.num_heads + 2 * _kv_heads_per_device(cfg, tp) * tp) * cfg.head_dim // tp
  per_token = 4 * cfg.hidden_size + 2 * heads + 3 * cfg.intermediate_size // tp
  return 4 * (t * per_token + workload.max_num_seqs * cfg.vocab_size // tp)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Seconds of one step on the bottleneck device, by cause."""

  hbm_s: float
  compute_s: float
  collective_s: float
  transfer_s: float  # pipeline stage-to-stage sends

  @property
  def total_s(self) -> float:
    return max(self.hbm_s, self.compute_s) + self.collective_s + self.transfer_s

  @property
  def bound(self) -> str:
    parts = {"memory": self.hbm_s, "compute": self.compute_s, "collectives": self.collective_s + self.transfer_s}
    if parts["memory"] >= parts["compute"]:
      del parts["compute"]
    else:
      del parts["memory"]
    return max(parts, key=parts.get)


def _tensor_link(device: DevicePreset, tp: int, devices_per_host: int) -> tuple[float, float]:
  """(GB/s, latency in s) of the tensor group's collectives: a ring across hosts runs at the slower link."""
  if tp <= devices_per_host:
    return device.link_gbps, device.collective_latency_us * 1e-6
  return device.inter_host_gbps, device.inter_host_latency_us * 1e-6


def _ring_s(nbytes: float, group: int, gbps: float, latency_s: float, all_reduce: bool = True) -> float:
  if group == 1:
    return 0.0
  factor = 2 * (group - 1) / group if all_reduce else (group - 1) / group
  return factor * nbytes / (gbps * 1e9) + latency_s


def stage_step_cost(cfg, layout: Layout, device: DevicePreset, workload: Workload, *, tokens: int,
                    context_tokens: float, attn_flops_per_layer: float, devices_per_host: int) -> StepCost:
  """One step of `tokens` tokens on the slowest stage, which reads KV for `context_tokens` positions in all.

  `attn_flops_per_layer` is attention's score and value FLOPs of the step in one layer, all heads.
  """
  tp = layout.tensor
  stages = layer_stages(cfg.num_layers, layout.stage)
  weights = stage_weight_bytes_per_device(cfg, layout, workload)
  link, latency = _tensor_link(device, tp, devices_per_host)
  act = tokens * cfg.hidden_size * workload.weight_bytes
  worst = None
  for s, layers in enumerate(stages):
    weight_bytes = weights[s]
    kv_bytes = context_tokens * len(layers) * kv_bytes_per_token_layer(cfg, tp, workload)
    flops = 2 * tokens * len(layers) * layer_params_per_device(cfg, tp) + len(layers) * attn_flops_per_layer / tp
    collectives = len(layers) * 2 * _ring_s(act, tp, link, latency)
    if s == 0:
      collectives += _ring_s(act, tp, link, latency)  # vocabulary-parallel embedding
    if s == len(stages) - 1:
      flops += 2 * tokens * vocab_params_per_device(cfg, tp)
      collectives += _ring_s(tokens * cfg.vocab_size * 4, tp, link, latency, all_reduce=False)
    transfer = 0.0
    if layout.stage > 1:
      gbps, send_latency = _tensor_link(device, layout.stage * tp, devices_per_host)
      transfer = act / (gbps * 1e9) + send_latency
    cost = StepCost(hbm_s=(weight_bytes + kv_bytes) / (device.hbm_gbps * 1e9),
                    compute_s=flops / (device.tflops * 1e12), collective_s=collectives, transfer_s=transfer)
    if worst is None or cost.total_s > worst.total_s:
      worst = cost
  return worst


def decode_round(cfg, layout: Layout, device: DevicePreset, workload: Workload, batch: int,
                 devices_per_host: int) -> tuple[float, StepCost]:
  """Seconds for every one of a replica's `batch` sequences to get one token, and the stage step cost."""
  micro = max(1, min(layout.stage, batch))
  per_micro = batch / micro
  ctx = workload.context
  step = stage_step_cost(cfg, layout, device, workload, tokens=per_micro, context_tokens=per_micro * ctx,
                         attn_flops_per_layer=4 * per_micro * ctx * cfg.num_heads * cfg.head_dim,
                         devices_per_host=devices_per_host)
  # Each stage runs every micro-batch once per round; a micro-batch also waits for its own trip
  # through all the stages before its next token can start.
  return max(micro * step.total_s, layout.stage * step.total_s), step


def prefill_seconds(cfg, layout: Layout, device: DevicePreset, workload: Workload, devices_per_host: int) -> float:
  """Time to first token of one `prompt_len` prompt on an idle replica (its stages run one after another)."""
  p = workload.prompt_len
  step = stage_step_cost(cfg, layout, device, workload, tokens=p, context_tokens=p,
                         attn_flops_per_layer=2 * p * p * cfg.num_heads * cfg.head_dim,  # causal: half of 4p^2
                         devices_per_host=devices_per_host)
  return layout.stage * step.total_s


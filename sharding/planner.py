"""The planner behind `jserve plan`: which (data, stage, tensor) degrees to serve a model with.

`plan(...)` lists every layout of the devices that fits in memory, with its
per-device memory split and its estimated decode throughput and latency from
the roofline model in `costs.py`, ranked by throughput (then inter-token
latency); `format_plans` prints them as a table and says why the winner won.
When nothing fits it raises `ShardingError` saying what would.

A model config is anything with the fields of `jserve.config.ModelConfig`
(this package does not import jserve).
"""

import dataclasses

from sharding.costs import (DEVICE_PRESETS, DevicePreset, Layout, StepCost, Workload, activation_bytes,
                            decode_round, kv_bytes_per_token, prefill_seconds, stage_weight_bytes_per_device)
from sharding.errors import ShardingError
from sharding.rules import check_tensor_degree

GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """One feasible layout and its estimates; memory is per device, throughput for the whole cluster."""

  data: int
  stage: int
  tensor: int
  cross_host_tensor: bool
  weights_bytes: int
  kv_bytes: int
  activation_bytes: int
  kv_tokens: int  # KV capacity of one replica, in tokens
  batch: int  # sequences each replica decodes at once
  decode_round_s: float  # inter-token latency: one token for every sequence of a replica
  prefill_s: float  # time to first token of one prompt on an idle replica
  step: StepCost

  @property
  def layout(self) -> Layout:
    return Layout(self.data, self.stage, self.tensor)

  @property
  def tokens_per_s(self) -> float:
    return self.data * self.batch / self.decode_round_s

  def describe(self) -> str:
    return f"data={self.data} stage={self.stage} tensor={self.tensor}"


def get_device(name: str, **overrides) -> DevicePreset:
  """A device preset by name, with fields replaced (say `memory_gib=80` from `--device_memory_gib`)."""
  if name not in DEVICE_PRESETS:
    raise ShardingError(f"unknown device preset {name!r}; known: {', '.join(DEVICE_PRESETS)}")
  return dataclasses.replace(DEVICE_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(cfg, num_devices: int, devices_per_host: int, data=None, stage=None, tensor=None):
  """Every (data, stage, tensor) using all devices, whose tensor groups fill hosts evenly."""
  for tp in _divisors(num_devices):
    if not check_tensor_degree(cfg, tp, raise_error=False):
      continue
    if (devices_per_host % tp) if tp <= devices_per_host else (tp % devices_per_host):
      continue
    for pp in _divisors(num_devices // tp):
      if pp > cfg.num_layers:
        continue
      layout = Layout(num_devices // (tp * pp), pp, tp)
      if all(want in (None, got) for want, got in zip((data, stage, tensor), dataclasses.astuple(layout))):
        yield layout


def _evaluate(cfg, layout: Layout, device: DevicePreset, workload: Workload, devices_per_host: int):
  """The plan for `layout`, or (None, bytes short) when it does not fit."""
  budget = int(device.memory_bytes * workload.memory_utilization)
  weights = max(stage_weight_bytes_per_device(cfg, layout, workload))
  if workload.quantize_at_load:
    # The full-precision weights are on the devices before they are quantized; nothing else is yet.
    loaded = max(stage_weight_bytes_per_device(cfg, layout, workload, quantized=False))
    if loaded > budget:
      return None, loaded - budget
  act = activation_bytes(cfg, layout, workload)
  per_token = kv_bytes_per_token(cfg, layout, workload)
  kv = budget - weights - act
  need = per_token * workload.max_model_len  # at least one full-length sequence per replica
  if kv < need:
    return None, need - kv
  kv_tokens = kv // per_token
  want = -(-workload.concurrency // layout.data)
  batch = max(1, min(want, kv_tokens // workload.context))
  round_s, step = decode_round(cfg, layout, device, workload, batch, devices_per_host)
  return Plan(data=layout.data, stage=layout.stage, tensor=layout.tensor,
              cross_host_tensor=layout.tensor > devices_per_host, weights_bytes=weights, kv_bytes=kv,
              activation_bytes=act, kv_tokens=kv_tokens, batch=batch, decode_round_s=round_s,
              prefill_s=prefill_seconds(cfg, layout, device, workload, devices_per_host), step=step), 0


def plan(cfg, num_devices: int, device: DevicePreset, workload: Workload = Workload(), *, num_hosts: int | None = None,
         data: int | None = None, stage: int | None = None, tensor: int | None = None,
         model_name: str = "the model") -> list[Plan]:
  """Feasible plans, best first. `data`/`stage`/`tensor` pin a degree; `num_hosts` defaults to full hosts."""
  if num_devices < 1:
    raise ShardingError(f"num_devices={num_devices}: need at least one device")
  num_hosts = num_hosts or -(-num_devices // device.devices_per_host)
  if num_devices % num_hosts:
    raise ShardingError(f"num_devices={num_devices} does not split evenly over num_hosts={num_hosts}")
  per_host = num_devices // num_hosts
  if tensor is not None:
    check_tensor_degree(cfg, tensor)
  for name, value in (("data", data), ("stage", stage), ("tensor", tensor)):
    if value is not None and num_devices % value:
      raise ShardingError(f"{name}={value} does not divide num_devices={num_devices}")
  layouts = list(_layouts(cfg, num_devices, per_host, data, stage, tensor))
  if not layouts:
    raise ShardingError(f"no (data, stage, tensor) layout of {num_devices} devices ({per_host} per host) "
                        f"{_pinned(data, stage, tensor)}splits {model_name}'s {cfg.num_heads} heads and "
                        f"{cfg.num_kv_heads} KV heads with tensor groups inside a host")
  plans, short = _feasible(cfg, layouts, device, workload, per_host)
  if not plans:
    raise ShardingError(_no_fit_message(cfg, num_devices, device, workload, short, model_name,
                                        _pinned(data, stage, tensor)))
  return plans


def _feasible(cfg, layouts, device, workload, per_host) -> tuple[list[Plan], int]:
  """The plans of `layouts` that fit, best first, and how many bytes per device the closest miss lacks."""
  plans, shortfalls = [], []
  for layout in layouts:
    p, short = _evaluate(cfg, layout, device, workload, per_host)
    if p is None:
      shortfalls.append(short)
    else:
      plans.append(p)
  plans.sort(key=lambda p: (-p.tokens_per_s, p.decode_round_s, p.stage, p.tensor))
  return plans, min(shortfalls, default=0)


def _smallest_fit(cfg, device: DevicePreset, workload: Workload, start: int) -> tuple[int, Plan] | None:
  """The fewest devices of `device` (start, 2 start, 4 start, ... up to 4096) that fit, and the best plan there."""
  count = start
  while count <= 4096:
    per_host = min(count, device.devices_per_host)
    plans, _ = _feasible(cfg, list(_layouts(cfg, count, per_host)), device, workload, per_host)
    if plans:
      return count, plans[0]
    count *= 2
  return None


def _pinned(data, stage, tensor) -> str:
  pins = [f"{n}={v}" for n, v in (("data", data), ("stage", stage), ("tensor", tensor)) if v is not None]
  return f"with {', '.join(pins)} " if pins else ""


def _no_fit_message(cfg, num_devices, device, workload, short, model_name, pinned) -> str:
  weights = sum(stage_weight_bytes_per_device(cfg, Layout(1, 1, 1), workload))
  budget = num_devices * device.memory_bytes * workload.memory_utilization
  msg = (f"{model_name} does not fit on {num_devices} x {device.name} {pinned}for max_model_len="
         f"{workload.max_model_len}: its weights alone are {weights / GIB:.1f} GiB in "
         f"{workload.describe_weights()}")
  if workload.quantize_at_load:
    loaded = sum(stage_weight_bytes_per_device(cfg, Layout(1, 1, 1), workload, quantized=False))
    msg += (f", loaded as {loaded / GIB:.1f} GiB in {8 * workload.weight_bytes}-bit before they are "
            "quantized (a pre-quantized checkpoint skips that peak)")
  msg += (f", the devices give {budget / GIB:.1f} GiB at memory_utilization={workload.memory_utilization}, "
          f"and the best layout is {short / GIB:.1f} GiB short per device")
  fits = []
  others = [device] + [d for d in DEVICE_PRESETS.values() if d.name != device.name]
  for other in others:
    name = other.name
    found = _smallest_fit(cfg, other, workload, max(1, num_devices if other is device else 1))
    if found:
      fits.append(f"{found[0]} x {name} ({found[1].describe()})")
  return msg + ("; it would fit on " + ", or ".join(fits) if fits else "; no preset cluster up to 4096 devices fits")


def explain(plans: list[Plan]) -> str:
  """Why the first plan won, with numbers."""
  best = plans[0]
  s = best.step
  text = (f"{best.describe()} wins at {best.tokens_per_s:,.0f} tokens/s: weights take "
          f"{best.weights_bytes / GIB:.1f} GiB per device, leaving {best.kv_bytes / GIB:.1f} GiB of KV pool "
          f"({best.kv_tokens:,} tokens per replica), so each of {best.data} replica(s) decodes {best.batch} "
          f"sequences per round of {best.decode_round_s * 1e3:.2f} ms; its stage step is {s.bound}-bound "
          f"(HBM {s.hbm_s * 1e3:.2f} ms, compute {s.compute_s * 1e3:.2f} ms, collectives "
          f"{s.collective_s * 1e3:.2f} ms, stage sends {s.transfer_s * 1e3:.2f} ms).")
  if len(plans) > 1:
    second = plans[1]
    text += (f" Runner-up {second.describe()}: {second.tokens_per_s:,.0f} tokens/s "
             f"({100 * (1 - second.tokens_per_s / best.tokens_per_s):.0f}% less), "
             f"{second.decode_round_s * 1e3:.2f} ms per token.")
    fastest = min(plans, key=lambda p: p.decode_round_s)
    if fastest is not best:
      text += (f" For the lowest latency pick {fastest.describe()}: {fastest.decode_round_s * 1e3:.2f} ms per "
               f"token at {fastest.tokens_per_s:,.0f} tokens/s.")
  return text


COLUMNS = ("rank", "data", "stage", "tensor", "weights GiB", "KV GiB", "act GiB", "KV tokens/replica",
           "batch/replica", "ms/token", "decode tok/s", "TTFT ms", "bound")


def plan_row(rank: int, p: Plan) -> list[str]:
  tensor = f"{p.tensor}*" if p.cross_host_tensor else str(p.tensor)
  return [str(rank), str(p.data), str(p.stage), tensor, f"{p.weights_bytes / GIB:.1f}", f"{p.kv_bytes / GIB:.1f}",
          f"{p.activation_bytes / GIB:.1f}", f"{p.kv_tokens:,}", str(p.batch), f"{p.decode_round_s * 1e3:.2f}",
          f"{p.tokens_per_s:,.0f}", f"{p.prefill_s * 1e3:.1f}", p.step.bound]


def markdown_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def format_plans(plans: list[Plan], limit: int = 10) -> str:
  """The ranked plans as a table (`*`: a tensor group across hosts), then the reason for the winner."""
  table = markdown_table(COLUMNS, [plan_row(i + 1, p) for i, p in enumerate(plans[:limit])])
  more = f"\n({len(plans) - limit} more feasible plans not shown)" if len(plans) > limit else ""
  return f"{table}{more}\n\n{explain(plans)}"


def summary_table(models: dict, clusters: list[tuple[str, int]], workload: Workload = Workload()) -> str:
  """The winning plan of each model (name -> config) on each (device preset, device count), as markdown."""
  header = ("model", "devices", "hosts", "plan (data, stage, tensor)", "weights / KV / act GiB per device",
            "KV tokens/replica", "batch/replica", "ms/token", "decode tok/s", "TTFT ms", "bound")
  rows = []
  for name, cfg in models.items():
    for device_name, count in clusters:
      device = get_device(device_name)
      hosts = -(-count // device.devices_per_host)
      cells = [name, f"{count} x {device_name}", str(hosts)]
      try:
        best = plan(cfg, count, device, workload, model_name=name)[0]
      except ShardingError as e:
        reason = str(e)
        fits = reason.split("it would fit on ", 1)[-1].split(", or ")[0] if "would fit" in reason else "-"
        rows.append(cells + ["does not fit", f"needs {fits}"] + ["-"] * 5)
        continue
      tensor = f"{best.tensor} (across hosts)" if best.cross_host_tensor else str(best.tensor)
      rows.append(cells + [f"{best.data}, {best.stage}, {tensor}",
                           f"{best.weights_bytes / GIB:.1f} / {best.kv_bytes / GIB:.1f} / "
                           f"{best.activation_bytes / GIB:.1f}",
                           f"{best.kv_tokens:,}", str(best.batch), f"{best.decode_round_s * 1e3:.2f}",
                           f"{best.tokens_per_s:,.0f}", f"{best.prefill_s * 1e3:.1f}", best.step.bound])
  return markdown_table(header, rows)


def device_table() -> str:
  header = ("preset", "HBM GiB", "HBM GB/s", "bf16 TFLOP/s", "link GB/s (one way)", "inter-host GB/s",
            "devices/host", "collective latency us (in / across hosts)")
  rows = [[d.name, f"{d.memory_gib:g}", f"{d.hbm_gbps:g}", f"{d.tflops:g}", f"{d.link_gbps:g} ({d.interconnect})",
           f"{d.inter_host_gbps:g}", str(d.devices_per_host),
           f"{d.collective_latency_us:g} / {d.inter_host_latency_us:g}"]
          for d in DEVICE_PRESETS.values()]
  return markdown_table(header, rows)


def plan_report(cfg, *, model_name: str, num_devices: int, device: str = "H100-80GB", num_hosts: int | None = None,
                device_memory_gib: float | None = None, workload: Workload = Workload(), data: int | None = None,
                stage: int | None = None, tensor: int | None = None, limit: int = 10) -> str:
  """What `jserve plan` prints: a title line, the ranked table and the reason (raises `ShardingError`)."""
  dev = get_device(device, memory_gib=device_memory_gib)
  plans = plan(cfg, num_devices, dev, workload, num_hosts=num_hosts, data=data, stage=stage, tensor=tensor,
               model_name=model_name)
  hosts = num_hosts or -(-num_devices // dev.devices_per_host)
  weights = ""
  if workload.quantization is not None:
    weights = f", {workload.quantization} weights" + (" quantized at start-up" if workload.quantize_at_load else "")
  kv = f", {workload.kv_cache_dtype} KV cache" if workload.kv_cache_dtype is not None else ""
  title = (f"{model_name} on {num_devices} x {dev.name} ({dev.memory_gib:g} GiB, {hosts} host(s)), "
           f"max_model_len={workload.max_model_len}, concurrency={workload.concurrency}{weights}{kv}: "
           f"{len(plans)} feasible plan(s)")
  return f"{title}\n\n{format_plans(plans, limit)}"

"""The short table and the markdown report of tools/bench_multi_gpu.py, from its JSON results."""


def cross_checks(parts: dict) -> dict:
  """The distributed run's tokens against the engine's one-device tokens of the equality part (same
  prompts, same random weights, float32 with true float32 matmuls in both)."""
  dist = parts.get("distributed", {})
  one = parts.get("equality", {}).get("runs", {}).get("tp1", {})
  if "tokens" in dist and "tokens" in one:
    return {"distributed_equals_engine_tp1": dist["tokens"] == one["tokens"]}
  return {}


def _f(x, fmt="{:.2f}") -> str:
  return "-" if x is None else fmt.format(x)


def _ratio(a, b) -> str:
  return "-" if a is None or not b else f"{a / b:.2f}"


def _yes(x) -> str:
  return {True: "yes", False: "NO", None: "-"}[x]


def _header(results: dict) -> list[str]:
  c = results["parts"].get("ceilings", {})
  devices = c.get("devices") or ["?"]
  what = "SMOKE (tiny shapes, simulated CPU devices: times mean nothing)" if results.get("smoke") else "GPU run"
  lines = [f"bench_multi_gpu, {what}: {len(devices)} x {devices[0]}, JAX {c.get('jax', '?')}, {results['date']}, "
           f"{results.get('wall_s', 0):.0f} s ("
           + ", ".join(f"{n} {r['wall_s']:.0f} s" for n, r in results["parts"].items() if "wall_s" in r) + ")"]
  if "copy_GBps" in c:
    lines.append("ceilings: copy GB/s per device (best of JAX and PyTorch, read + write): "
                 + ", ".join(f"{x:.0f}" for x in c["copy_GBps"]))
  for g, r in c.get("allreduce", {}).items():
    big = max(r["sizes"], key=lambda row: row["bytes"])
    lines.append(f"  psum over {g}: bus {r['busbw_GBps']:.0f} GB/s at {big['bytes'] >> 20} MiB per device, "
                 f"{r['latency_us']:.0f} us at {r['sizes'][0]['bytes'] >> 10} KiB")
  return lines


def _equality(results: dict) -> list[str]:
  e = results["parts"].get("equality", {})
  if not e.get("runs"):
    return [f"equality: {e.get('skipped') or ('failed' if 'error' in e else 'not run')}"] + _distributed(results)
  runs = []
  for name, r in e["runs"].items():
    if name == "tp1":
      continue
    state = "equal" if r.get("equal") else ("DIFFERENT" if "equal" in r else (r.get("skipped") or "failed"))
    if r.get("first_differences"):
      d = r["first_differences"][0]
      state += f" (first at prompt {d['prompt']} token {d['position']}, tp1 top-2 margin {d['reference_top2_margin']})"
    runs.append(f"{name} {state}")
  return [f"equality ({e.get('model')}, {len(e.get('prompt_lens', []))} prompts x {e.get('new_tokens')} tokens, "
          f"against tp1): " + "; ".join(runs)] + _distributed(results)


def _distributed(results: dict) -> list[str]:
  lines = []
  d = results["parts"].get("distributed")
  if d is None:
    lines.append("distributed: not run")
  elif "equal" in d:
    lines.append(f"distributed (2 processes x {d['local_devices']} device, {d['platform']}, {d['mode']}): equal to "
                 f"one process: {_yes(d['equal'])}; equal to the engine's tp1: "
                 f"{_yes(results.get('cross_checks', {}).get('distributed_equals_engine_tp1'))}")
  else:
    lines.append(f"distributed: {d.get('skipped') or 'failed'}")
  return lines


TABLE_HEAD = ["| model | plan | step | measured ms | cost model ms (H200 nominal) | ratio | cost model ms (measured "
              "ceilings) | ratio | roofline ms | tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]


def _rows(model: str, plan: str, steps: dict) -> list[str]:
  rows = []
  for step, r in steps.items():
    ms = r.get("device_ms")
    label = f"decode B={r['batch']} ctx {r['context']}" if "batch" in r else f"prefill {r.get('tokens')}"
    tok_s = r.get("tokens_per_s") or (r.get("tokens", 0) / ms * 1e3 if ms else None)
    rows.append(f"| {model} | {plan} | {label} | {_f(ms)} | {_f(r.get('nominal_ms'))} | "
                f"{_ratio(ms, r.get('nominal_ms'))} | {_f(r.get('measured_ms'))} | {_ratio(ms, r.get('measured_ms'))} "
                f"| {_f(r.get('roofline_ms'))} | {_f(tok_s, '{:.0f}')} |")
  return rows


def _table(results: dict) -> list[str]:
  t = results["parts"].get("timing", {})
  b = results["parts"].get("big", {})
  rows = []
  for plan, r in t.get("plans", {}).items():
    if "steps" in r:
      rows += _rows(t.get("name", "?"), plan, r["steps"])
    else:
      rows.append(f"| {t.get('name', '?')} | {plan} | {(r.get('skipped') or 'failed')} | | | | | | | |")
  if "steps" in b:
    rows += _rows(b.get("name", "?"), f"tp{b['tp']}", b["steps"])
  lines = TABLE_HEAD + rows if rows else ["timing: " + ("failed" if "error" in t else "not run")]
  for key, label, target in (("tp2_vs_tp1_decode_speedup", "TP2/TP1", " (#11 target: >= 1.7x)"),
                             ("tp4_vs_tp1_decode_speedup", "TP4/TP1", "")):
    if t.get(key):
      lines.append(f"decode throughput {label}: " + ", ".join(f"B={k.split('_')[1]} {v:.2f}x" for k, v in
                                                              t[key].items()) + target)
  return lines


def _big(results: dict) -> list[str]:
  b = results["parts"].get("big", {})
  if "tp" not in b:
    return [f"big: {b.get('skipped') or ('failed' if 'error' in b else 'not run')}"]
  line = (f"big ({b['model']}, tensor {b['tp']}): weights {b['weights_GiB_total']:.1f} GiB in all, "
          f"{_f(b.get('weight_GiB_per_device'), '{:.1f}')} GiB per device (JAX limit per device "
          f"{_f(b.get('device_limit_GiB'), '{:.1f}')} GiB); engine start {_f(b.get('start_s'), '{:.0f}')} s")
  lines = [line]
  e = b.get("e2e")
  if e:
    lines.append(f"  end to end {e['requests']} x {e['input_len']}/{e['output_len']}: {e['output_tok_s']:.0f} output "
                 f"tok/s, {e['steps']} steps, {e['wall_ms_per_step']:.1f} ms wall per step")
  o = b.get("offline")
  if o:
    if "output_tok_s" in o:
      fewer = " (fewer requests than a full run, to fit the budget)" if o["requests"] < 1000 else ""
      lines.append(f"  offline {o['input_len']}/{o['output_len']} x {o['requests']} requests{fewer}: "
                   f"{o['output_tok_s']:.0f} output tok/s, {o['total_tok_s']:.0f} total tok/s, {o['elapsed_s']:.0f} s, "
                   f"{o['wall_ms_per_step']:.1f} ms wall per step")
    else:
      lines.append(f"  offline {o['input_len']}/{o['output_len']} x {o['requests']}: {o.get('skipped')}")
  return lines


def _failures(results: dict) -> list[str]:
  bad = [name for name, r in results["parts"].items() if "error" in r]
  sub = []
  for name in ("equality", "timing"):
    group = results["parts"].get(name, {}).get("runs" if name == "equality" else "plans", {})
    sub += [f"{name}/{k}" for k, r in group.items() if "error" in r]
  return [f"FAILED: {', '.join(bad + sub)} (tracebacks in multi_gpu.json and multi_gpu.log)"] if bad or sub else []


def _details(results: dict) -> list[str]:
  """Markdown only: all-reduce sizes, and where each plan's start-up time went (for planning runs)."""
  lines = []
  for g, r in results["parts"].get("ceilings", {}).get("allreduce", {}).items():
    lines += [f"psum over {g} devices (bf16, per device):", "", "| bytes | us | algorithm GB/s | bus GB/s |",
              "|---|---|---|---|"]
    lines += [f"| {row['bytes']} | {row['us']:.1f} | {row['algbw_GBps']:.1f} | {row['busbw_GBps']:.1f} |"
              for row in r["sizes"]] + [""]
  plans = dict(results["parts"].get("timing", {}).get("plans", {}))
  big = results["parts"].get("big", {})
  if "tp" in big:
    plans[f"big tp{big['tp']}"] = dict(big, compile_s=big.get("start_s"))
  rows = [f"| {name} | {_f(r.get('weights_s'), '{:.1f}')} | {_f(r.get('compile_s'), '{:.1f}')} | {r.get('buckets')} | "
          f"{_f(r.get('weight_GiB_per_device'))} | {r.get('memory_GiB_device0')} |" for name, r in plans.items()]
  if rows:
    lines += ["| plan | weights s | compile s (engine start for big) | buckets | weights GiB/device | memory GiB "
              "(device 0) |", "|---|---|---|---|---|---|", *rows, ""]
  runs = results["parts"].get("equality", {}).get("runs", {})
  if runs:
    lines.append("equality engine start s: " + ", ".join(f"{n} {_f(r.get('start_s'), '{:.0f}')}"
                                                          for n, r in runs.items()))
  return lines


def summary(results: dict) -> str:
  return "\n".join(_header(results) + _equality(results) + _table(results) + _big(results) + _failures(results))


def markdown(results: dict) -> str:
  out = ["# Multi-GPU run (tools/bench_multi_gpu.py)", "", "```", *_header(results), "```", "",
         "## Equality", "", *_equality(results), "", "## Step times against the cost model", "",
         "Measured: the engine's jit step dispatched back to back (median of 3 rounds). Cost model: "
         "`sharding/costs.py`, with the H200 preset and with this run's copy bandwidth, psum bus bandwidth and "
         "latency; with pipeline stages the engine runs the stages one after another, so the estimate is "
         "stages x the slowest stage's step. Roofline: weights and KV read once at the measured copy bandwidth.",
         "", *_table(results), "", "## Big shape", "", *_big(results), "", "## Details", "", *_details(results),
         "", *_failures(results)]
  return "\n".join(out) + "\n"

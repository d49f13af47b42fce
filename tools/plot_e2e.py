"""PNG plots of benchmark results, for a reader to look at beside the tables.

    PYTHONPATH=. python -m tools.plot_e2e $OUT/e2e.json --out_dir=$OUT
    PYTHONPATH=. python -m tools.plot_e2e docs/benchmarks/raw/e2e_burst_*.json --out_dir=docs/benchmarks \\
        --only=throughput --labels=...
    PYTHONPATH=. python -m tools.plot_e2e rate_*.json --out_dir=$OUT     # bench_serving results

Arguments are JSON files; each is recognized by its keys (missing keys are tolerated, so the raw
files of earlier runs in docs/benchmarks/raw/ plot too):

- tools/bench_e2e.py results (a "workloads" list): `throughput` (output tokens/s of each workload,
  one bar per file, with the workload's roofline as a black tick and the fraction above it; one
  panel per model) and, for each file with a "step_sweep", `step_sweep_<file>` (time per decode
  step against batch, per context, beside the memory roofline, the FLOP bound and, when the engine
  ran bursts, the single step; below it the tokens/s that gives, beside the bound's tokens/s).
- tools/bench_e2e.py results with an "hf_anchor" (its `--hf_batch` rows): `anchor_<file>` (output
  tokens/s of transformers `generate` and of jserve on the same prompts against the batch, with the
  ratio above each pair).
- tools/bench_serving.py results (a "request_rate" and "ttft_ms"; one file per rate, or a JSON list
  of them) and tools/bench_online.py results (a "runs" list, one per API and rate): `latency` (TTFT
  and TPOT p50 and p99 against the request rate, a line per API; an infinite rate, all requests at
  once, is drawn right of the others; and TPOT p50 against output tokens/s, the latency-throughput
  curve).
- tools/bench_multi_gpu.py results (parts.timing.plans): `tp_scaling` (decode tokens/s of each plan
  over tensor 1's, per batch, beside the ideal).

Writes <out_dir>/<prefix><name>.png for each plot it has data for, and prints the paths.
"""

import json
import math
import os
import textwrap

from absl import app, flags

FLAGS = flags.FLAGS
DPI = 120  # resolution of the PNGs (--dpi when run as a script)


def _define_flags():
  # Defined only when run as a script: tests import the plotting functions beside benchmarks that define
  # flags of the same names (--out_dir).
  flags.DEFINE_string("out_dir", ".", "where the PNGs go")
  flags.DEFINE_string("prefix", "e2e_", "file name prefix of the PNGs")
  flags.DEFINE_list("labels", None, "a legend label per bench_e2e file, in order (default: file name and date)")
  flags.DEFINE_list("only", None, "plots to make, of throughput, step_sweep, anchor, latency, tp_scaling "
                    "(default: all)")
  flags.DEFINE_integer("dpi", DPI, "resolution of the PNGs")


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def kind_of(data) -> str | None:
  """Which benchmark wrote `data`: e2e, serving, multi_gpu, or None."""
  if isinstance(data, list):
    return "serving" if data and all(isinstance(d, dict) and "ttft_ms" in d for d in data) else None
  if not isinstance(data, dict):
    return None
  if "workloads" in data or "step_sweep" in data:
    return "e2e"
  if "ttft_ms" in data and "request_rate" in data:
    return "serving"
  if isinstance(data.get("runs"), list) and data["runs"] and all("summary" in r for r in data["runs"]):
    return "online"
  if isinstance(data.get("parts"), dict) and "timing" in data["parts"]:
    return "multi_gpu"
  return None


def workload_label(row: dict) -> str:
  """A workload's name: bench_e2e's own label, or in/out x requests for rows written before it had one."""
  if row.get("label"):
    return row["label"]
  return f"{row.get('input_len', '?')}/{row.get('output_len', '?')} x {row.get('requests', '?')}"


def plot_throughput(runs: list[tuple[str, dict]], path: str):
  """Output tokens/s per workload, a bar per run that has it (its value inside), the workload roofline
  as a tick with the fraction above it; a panel per model, one color per run label across panels."""
  plt = _plt()
  models = list(dict.fromkeys(d.get("preset", "?") for _, d in runs))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colors = {label: cycle[i % len(cycle)] for i, label in enumerate(dict.fromkeys(label for label, _ in runs))}
  fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
  for ax, model in zip(axes[0], models):
    mine = [(label, {workload_label(r): r for r in d.get("workloads", [])})
            for label, d in runs if d.get("preset", "?") == model]
    names = list(dict.fromkeys(n for _, rows in mine for n in rows))
    width = 0.8 / max(len(mine), 1)
    drawn, top = set(), 0.0
    for k, name in enumerate(names):
      here = [(label, rows[name]) for label, rows in mine if name in rows]
      for j, (label, r) in enumerate(here):
        x, y = k + (j - (len(here) - 1) / 2) * width, r.get("output_tok_s", 0)
        ax.bar(x, y, width * 0.9, color=colors[label], label=None if label in drawn else label)
        drawn.add(label)
        ax.annotate(f"{y / 1e3:.1f}k", (x, y), ha="center", va="bottom", fontsize=7)
        roof = r.get("roofline_output_tok_s")
        top = max(top, y, roof or 0)
        if roof:
          ax.hlines(roof, x - width * 0.45, x + width * 0.45, colors="black", linewidth=2)
          ax.annotate(f"{y / roof:.2f}", (x, roof), ha="center", va="bottom", fontsize=7)
    ax.plot([], [], color="black", linewidth=2, label="workload roofline (fraction of it above)")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{model}: LLM.generate, ignore_eos", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, top * 1.3 or 1)  # headroom: the legend sits above the bars and ticks
    ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def plot_step_sweep(data: dict, title: str, path: str) -> bool:
  """Step ms and tokens/s against batch, a column per context, beside the bounds; False if no rows ran."""
  plt = _plt()
  sweep = data.get("step_sweep") or {}
  rows = [r for r in sweep.get("rows", []) if "step_ms" in r]
  if not rows:
    return False
  contexts = sorted({r["context"] for r in rows})
  fig, axes = plt.subplots(2, len(contexts), figsize=(max(7, 5 * len(contexts)), 7.5), squeeze=False, sharex=True)
  k = sweep.get("num_decode_steps", 1)
  for c, context in enumerate(contexts):
    mine = sorted((r for r in rows if r["context"] == context), key=lambda r: r["batch"])
    b = [r["batch"] for r in mine]
    top, bottom = axes[0][c], axes[1][c]
    top.plot(b, [r["step_ms"] for r in mine], "o-", label=f"step ({'burst of ' + str(k) if k > 1 else 'single'})")
    if k > 1:
      top.plot(b, [r.get("single_step_ms", math.nan) for r in mine], "s:", alpha=0.6, label="single step")
    top.plot(b, [r.get("roofline_ms", math.nan) for r in mine], "k--", label="memory roofline")
    top.plot(b, [r.get("flop_bound_ms", math.nan) for r in mine], "k:", label="FLOP bound")
    if any("serial_ms" in r for r in mine):  # bench_e2e rows from the twelfth session on
      top.plot(b, [r.get("serial_ms", math.nan) for r in mine], "k-.", alpha=0.7,
               label="serial bound (KV reads, then matmuls)")
    for r in mine:
      top.annotate(f"{r.get('fraction', math.nan):.2f}" + (f"\n(capped from {r['capped_from']})"
                                                          if "capped_from" in r else ""),
                   (r["batch"], r["step_ms"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    top.set_title(f"context {context}", fontsize=10)
    top.set_ylabel("ms per decode step (fraction of bound)")
    bottom.plot(b, [r.get("tokens_per_s", r["batch"] / r["step_ms"] * 1e3) for r in mine], "o-", label="measured")
    bottom.plot(b, [r["batch"] / r["bound_ms"] * 1e3 if r.get("bound_ms") else math.nan for r in mine], "k--",
                label="at the bound")
    bottom.set_ylabel("decode tokens/s")
    bottom.set_xlabel("batch (sequences)")
    for ax in (top, bottom):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xticks(b, [str(x) for x in b])
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=7)
  skipped = [f"{r['batch']}x{r['context']}: {r['skipped']}" for r in sweep.get("rows", []) if "skipped" in r]
  title = textwrap.fill(title, 40 * max(2, len(contexts)))
  fig.suptitle(title + ("\nskipped: " + "; ".join(skipped) if skipped else ""), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return True


def online_points(data: dict) -> list[dict]:
  """bench_online's runs as serving points: each run's summary, with its API as "backend"."""
  return [dict(r["summary"], backend=r.get("backend", r["summary"].get("backend", "?"))) for r in data["runs"]]


def plot_anchor(data: dict, title: str, path: str) -> bool:
  """transformers and jserve output tokens/s against the batch (log-log), the ratio above each pair."""
  rows = sorted(data.get("hf_anchor") or [], key=lambda r: r["batch"])
  rows = [r for r in rows if r.get("hf_output_tok_s") and r.get("jserve_output_tok_s")]
  if not rows:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  b = [r["batch"] for r in rows]
  ax.plot(b, [r["hf_output_tok_s"] for r in rows], "s--", label="transformers generate")
  ax.plot(b, [r["jserve_output_tok_s"] for r in rows], "o-", label="jserve LLM.generate")
  for r in rows:
    ax.annotate(f"{r['jserve_output_tok_s'] / r['hf_output_tok_s']:.1f}x", (r["batch"], r["jserve_output_tok_s"]),
                textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(b, [str(x) for x in b])
  ax.set_xlabel("batch (sequences)")
  ax.set_ylabel("output tokens/s")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return True


def plot_latency(points: list[dict], path: str):
  """TTFT and TPOT p50 / p99 against the request rate (an infinite rate right of the finite ones), a line
  per API; and TPOT p50 against output tokens/s."""
  plt = _plt()
  rate = lambda p: float(p.get("request_rate", math.inf))
  finite = [rate(p) for p in points if math.isfinite(rate(p))]
  inf_x = max(finite) * 1.5 if finite else 1.0
  x_of = lambda p: rate(p) if math.isfinite(rate(p)) else inf_x
  apis = list(dict.fromkeys(p.get("backend", "") for p in points))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for api in apis:
    mine = sorted((p for p in points if p.get("backend", "") == api), key=rate)
    name_of = f"{api} " if api else ""
    for ax, name in zip(axes, ("ttft", "tpot")):
      for q, style in (("p50", "o-"), ("p99", "s--")):
        ax.plot([x_of(p) for p in mine], [p.get(f"{name}_ms", {}).get(q, math.nan) for p in mine], style,
                label=f"{name_of}{name.upper()} {q}")
    axes[2].plot([p.get("output_token_throughput", math.nan) for p in mine],
                 [p.get("tpot_ms", {}).get("p50", math.nan) for p in mine], "o-", label=f"{name_of}TPOT p50")
  for ax, name in zip(axes, ("ttft", "tpot")):
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("ms")
    ax.set_title(f"{name.upper()} against request rate", fontsize=10)
    if any(not math.isfinite(rate(p)) for p in points):
      ticks = sorted({x_of(p) for p in points})
      ax.set_xticks(ticks, [("inf" if t == inf_x and inf_x not in finite else f"{t:g}") for t in ticks])
  axes[2].set_xlabel("output tokens/s")
  axes[2].set_ylabel("TPOT p50 ms")
  axes[2].set_title("latency against throughput", fontsize=10)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def plot_tp_scaling(data: dict, path: str) -> bool:
  """Decode tokens/s of each tensor/pipeline plan over tensor 1's, per batch; False without tp1."""
  plt = _plt()
  plans = data.get("parts", {}).get("timing", {}).get("plans", {})
  base = plans.get("tp1", {}).get("steps", {})
  keys = sorted((k for k in base if k.startswith("decode") and "device_ms" in base[k]),
                key=lambda k: int(k.split("_")[1]))
  others = [n for n in plans if n != "tp1" and "steps" in plans[n]]
  if not keys or not others:
    return False
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  width = 0.8 / len(others)
  for j, name in enumerate(others):
    steps = plans[name]["steps"]
    ys = [base[k]["device_ms"] / steps[k]["device_ms"] if k in steps and steps[k].get("device_ms") else math.nan
          for k in keys]
    xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(keys))]
    ax.bar(xs, ys, width * 0.9, label=name)
    tp = plans[name].get("tp", 1)
    ax.hlines([tp] * len(keys), [x - width * 0.45 for x in xs], [x + width * 0.45 for x in xs], colors="black")
  ax.plot([], [], color="black", label="ideal (tensor size)")
  ax.set_xticks(range(len(keys)), [f"batch {k.split('_')[1]}" for k in keys])
  ax.set_ylabel("decode tokens/s over tensor 1's")
  ax.set_title(f"{data['parts']['timing'].get('name', '')} decode step, context "
               f"{data['parts']['timing'].get('context', '?')}", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return True


def main(argv):
  global DPI
  DPI = FLAGS.dpi
  files = argv[1:]
  if not files:
    raise app.UsageError("give result JSON files")
  want = set(FLAGS.only or ["throughput", "step_sweep", "anchor", "latency", "tp_scaling"])
  e2e, serving, multi = [], [], []
  for f in files:
    with open(f) as fh:
      data = json.load(fh)
    kind = kind_of(data)
    if kind == "e2e":
      e2e.append((f, data))
    elif kind == "serving":
      serving += data if isinstance(data, list) else [data]
    elif kind == "online":
      serving += online_points(data)
    elif kind == "multi_gpu":
      multi.append((f, data))
    else:
      print(f"{f}: not a result this script knows; skipped")
  if FLAGS.labels and len(FLAGS.labels) != len(e2e):
    raise app.UsageError(f"{len(FLAGS.labels)} labels for {len(e2e)} bench_e2e files")
  labels = FLAGS.labels or [f"{os.path.splitext(os.path.basename(f))[0]} ({d.get('date', '?')})" for f, d in e2e]
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  out = lambda name: os.path.join(FLAGS.out_dir, f"{FLAGS.prefix}{name}.png")
  written = []
  if "throughput" in want and any(d.get("workloads") for _, d in e2e):
    plot_throughput([(label, d) for label, (_, d) in zip(labels, e2e) if d.get("workloads")], out("throughput"))
    written.append(out("throughput"))
  if "step_sweep" in want:
    stems = [os.path.splitext(os.path.basename(f))[0] for f, _ in e2e]
    for i, (f, d) in enumerate(e2e):
      stem = stems[i] if stems.count(stems[i]) == 1 else f"{stems[i]}{i}"
      name = "step_sweep" if len(e2e) == 1 else f"step_sweep_{stem}"
      title = (f"{d.get('preset', '?')} on {d.get('device', '?')}, {d.get('date', '?')}: decode step "
               f"(copy {d.get('ceiling', {}).get('best_GBps', math.nan):.0f} GB/s, matmul "
               f"{d.get('ceiling', {}).get('matmul_TFLOPs', math.nan):.3g} TFLOP/s)")
      if plot_step_sweep(d, title, out(name)):
        written.append(out(name))
  if "anchor" in want:
    for f, d in e2e:
      name = "anchor" if len(e2e) == 1 else f"anchor_{os.path.splitext(os.path.basename(f))[0]}"
      title = (f"{d.get('preset', '?')} on {d.get('device', '?')}, {d.get('date', '?')}: same prompts, "
               f"greedy, ignore_eos")
      if plot_anchor(d, title, out(name)):
        written.append(out(name))
  if "latency" in want and serving:
    plot_latency(serving, out("latency"))
    written.append(out("latency"))
  if "tp_scaling" in want:
    for f, d in multi:
      name = "tp_scaling" if len(multi) == 1 else f"tp_scaling_{os.path.splitext(os.path.basename(f))[0]}"
      if plot_tp_scaling(d, out(name)):
        written.append(out(name))
  for p in written:
    print(p)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""The tables of tools/bench_matmul.py, from its result rows: the short table printed last, the tuning
tables to paste into pallas_kernels/decode_matmul/tuning.py, and the markdown report."""

from pallas_kernels.decode_matmul import tuning
from tools.torch_matmul import ANCHOR_A8, ANCHOR_FP8


def fmt_us(row, k):
  return f"{row[f'{k}_s'] * 1e6:.1f} ({row[f'{k}_TBps']:.2f})" if f"{k}_s" in row else "-"


def fp8_speedups(r, rows):
  """For an fp8 row: the bfloat16 time of the same shape and M over the fp8 time, Pallas and XLA each."""
  bf16 = next((q for q in rows if not q.get("fp8") and q["shape"] == r.get("bf16_shape") and q["m"] == r["m"]), None)
  if not r.get("fp8") or bf16 is None:
    return "-"
  return " / ".join(f"{bf16[f'{k}_s'] / r[f'{k}_s']:.2f}x" if f"{k}_s" in r and f"{k}_s" in bf16 else "-"
                    for k in ("pallas", "xla"))


def table_lines(rows, ceiling_TBps=0.0):
  """The results table; with the copy ceiling, the time the weight bytes take at it (the roofline)."""
  lines = ["| shape | M | K x N | roofline us | XLA us (TB/s) | torch us (TB/s) | Pallas us (TB/s) | Pallas / torch | "
           "tiles | fp8 speed-up Pallas / XLA | Hopper us (TB/s) | Hopper / torch | Hopper blocks | "
           "w8a8 store weight-only us (TB/s) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    ratio = f"{r['torch_s'] / r['pallas_s']:.2f}x" if "torch_s" in r and "pallas_s" in r else "-"
    h_ratio = f"{r['torch_s'] / r['hopper_s']:.2f}x" if "torch_s" in r and "hopper_s" in r else "-"
    roof = f"{r['weight_bytes'] / ceiling_TBps / 1e6:.1f}" if ceiling_TBps else "-"
    lines.append(f"| {r['shape']} | {r['m']} | {r['k']} x {r['n']} | {roof} | {fmt_us(r, 'xla')} | "
                 f"{fmt_us(r, 'torch')} | {fmt_us(r, 'pallas')} | {ratio} | {r.get('pallas_config', '')} | "
                 f"{fp8_speedups(r, rows)} | {fmt_us(r, 'hopper')} | {h_ratio} | {r.get('hopper_config', '')} | "
                 f"{fmt_us(r, 'xla_wo')} |")
  return lines


def tuning_tables(rows):
  """Python source of GPU_TABLE and GPU_TABLE_GATE_UP from the winners (M = 1 shares the M = 16 bucket), and of
  the fp8 weights' (`_FP8`) and w8a8 (`_A8`) tables where their rows have winners."""
  out = {"GPU_TABLE": [], "GPU_TABLE_GATE_UP": [], "GPU_TABLE_FP8": [], "GPU_TABLE_GATE_UP_FP8": [],
         "GPU_TABLE_A8": [], "GPU_TABLE_GATE_UP_A8": []}
  seen = set()
  for r in rows:
    if "pallas_cfg" not in r or r["m"] == 1 and any(q["m"] == 16 and q["shape"] == r["shape"] for q in rows):
      continue
    key = (min(tuning.m_bucket(r["m"]), tuning.MAX_M), r["k"], r["n"])
    table = (("GPU_TABLE_GATE_UP" if r["kind"] == "gate_up" else "GPU_TABLE")
             + ("_A8" if r.get("a8") else "_FP8" if r.get("fp8") else ""))
    if (table, key) in seen:
      continue
    seen.add((table, key))
    c = r["pallas_cfg"]
    note = f"  # {r['shape']}: {r['pallas_TBps']:.2f} TB/s"
    note += "".join(f", {name} {r[f'{k}_TBps']:.2f}" for k, name in (("xla", "XLA"), ("torch", "cuBLAS"))
                    if f"{k}_TBps" in r)
    if "xla_s" in r and r["xla_s"] < r["pallas_s"]:  # impl="auto" leaves this shape to XLA
      out[table].append(f"    {key}: None,{note}")
      continue
    out[table].append(
        f"    {key}: GpuConfig(block_m={c['block_m']}, block_n={c['block_n']}, block_k={c['block_k']}, "
        f"num_splits={c['num_splits']}, num_warps={c['num_warps']}, num_stages={c['num_stages']}),{note}")
  return "\n".join(f"{name} = {{\n" + "\n".join(lines) + "\n}" for name, lines in out.items()
                   if lines or not name.endswith(("_FP8", "_A8")))


def markdown(meta, ceiling, checks, rows, host_bound=()):
  lines = [f"Device: {meta['device']}; JAX {meta['jax']}; torch {meta.get('torch')}; {meta['date']}.", "",
           f"Copy ceiling: {ceiling.get('ceiling_TBps', 0):.2f} TB/s (bytes read plus written; "
           f"torch copy {ceiling.get('torch_copy_TBps', 0):.2f}, JAX elementwise "
           f"{ceiling.get('jax_elementwise_TBps', 0):.2f}). Figures are per matmul; TB/s counts weight bytes "
           "(fp8 rows: one byte per element; roofline: those bytes at the ceiling).", ""]
  if any(r.get("fp8") and not r.get("a8") for r in rows):
    lines += [f"fp8 rows: XLA is jserve's quant.fp8_dot; torch is the anchor `{ANCHOR_FP8}` (the weight "
              "converted through memory first); Pallas converts in registers; no Hopper kernel.", ""]
  if any(r.get("a8") for r in rows):
    lines += [f"w8a8 rows: XLA is jserve's quant.fp8_dot_a8 (x quantized per row, fp8 x fp8, both scales; gate "
              "and up stacked, one product); Pallas is gpu.matmul_a8_nt or gpu.gate_up_silu_a8 (x quantized by "
              f"quant.quantize_rows, fp8 x fp8 in the kernel); torch is the anchor `{ANCHOR_A8}`; no Hopper "
              "kernel. Their errors against the exact product include the activations' e4m3 rounding. Their "
              "speed-up column divides the bf16 row's time by theirs; the last column multiplies the same [N, K] "
              "fp8 weights weight-only (quant.fp8_dot_nk, activations unquantized).", ""]
  lines += table_lines(rows, ceiling.get("ceiling_TBps", 0.0))
  lines += ["", f"GPU edge checks: {sum(c['ok'] for c in checks)} of {len(checks)} pass."]
  if host_bound:
    lines.append(f"WARNING: {len(host_bound)} timings were host-bound (issuing took over half the call time).")
  lines += [f"- FAILED {c['case']}: err={c.get('err')} {c.get('error', '')[-300:]}" for c in checks if not c["ok"]]
  lines += ["", "Tuning tables (paste into pallas_kernels/decode_matmul/tuning.py):", "", "```python",
            tuning_tables(rows), "```", "", "| shape | M | config | us | err |", "| --- | --- | --- | --- | --- |"]
  for r in rows:
    for s in r.get("sweep", []):
      us = f"{s['s'] * 1e6:.1f}" if "s" in s else s.get("error", "failed check")[:80]
      lines.append(f"| {r['shape']} | {r['m']} | {s['config']} | {us} | {s.get('err', '')} |")
  return "\n".join(lines) + "\n"

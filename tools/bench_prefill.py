"""Prefill attention on a GPU: the Hopper (Mosaic GPU) kernel against the Triton one and cuDNN, same run.

Run on the GPU machine from the source tree:

    PYTHONPATH=. python -m tools.bench_prefill --out_dir=$OUT

First it checks the Hopper prefill path (`GpuConfig.prefill_kernel="hopper"`,
the Triton decode launch beside it) against the reference on the GPU: the
kernel tests' named shapes, head dims 64 and 128, GQA 1 to 8, window and
soft cap, and a batch with long prompts after cached prefixes. Then, on the
prefill cases of tools/bench_kernels.py and on its mixed batch, it times the
Triton prefill with its tuned tiles, every Hopper candidate of
`tuning.HOPPER_SWEEP` and cuDNN's causal attention, each output checked
against an exact attention first. Prints one table; writes prefill.md and
prefill.json under OUT_DIR.
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if any(a.startswith("--interpret") for a in sys.argv[1:]):  # see tests/kernels/hopper_interpret_worker.py
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from pallas_kernels.ragged_paged_attention import gpu, hopper, reference, tuning  # noqa: E402
from tests.kernels import rpa_cases  # noqa: E402
from tools import bench_kernels  # noqa: E402
from tools.bench_kernels import (BenchCase, args_of, build, bytes_and_flops, cudnn_row, groups_of, log,  # noqa: E402
                                 rel_err, time_fn, xla_attend)

# --out_dir, --quick ("tiny cases and one candidate") and --interpret (the kernels in their
# interpreters, with --quick on a CPU) are tools/bench_kernels.py's flags, shared by importing it.
_OUT_DIR, _QUICK, _INTERPRET = bench_kernels._OUT_DIR, bench_kernels._QUICK, bench_kernels._INTERPRET

GARBAGE = 100.0  # finite stand-in for rpa_cases' NaN in unused pool slots (hopper.py reads whole pages)


def hopper_config(head_dim, page_size, group, blocks=tuning.HopperBlocks()):
  return dataclasses.replace(tuning.gpu_config(head_dim, page_size, group), prefill_kernel="hopper", hopper=blocks)


def checks(quick):
  """The Hopper path on the GPU against the reference; one row per shape."""
  combos = [(name, 8, 2, 64, 8, {}) for name in rpa_cases.SEQS]
  combos += [("mixed", 8, 8, 128, 8, {}), ("mixed", 8, 1, 128, 8, {}),
             ("mixed", 8, 2, 64, 8, dict(sliding_window=8)), ("mixed", 8, 2, 64, 8, dict(soft_cap=5.0)),
             ("long", 32, 8, 128, 16, {}), ("long", 32, 8, 128, 16, dict(sliding_window=100, soft_cap=30.0)),
             ("long", 16, 4, 64, 32, {})]
  seqs = dict(rpa_cases.SEQS, long=[(300, 420), (1, 77), (129, 129), (40, 1000), (64, 64), (3, 30)])
  if quick:
    combos = [("prefill_only", 2, 1, 64, 8, {})]
  device_why_not = None if _INTERPRET.value else hopper.device_supports()
  if device_why_not:  # the dispatcher would quietly run the Triton prefill: nothing here would test Hopper
    return [dict(case="all", err=None, ok=False, error=f"not run: {device_why_not}")]
  rows = []
  for name, nh, nkv, hd, ps, kw in combos:
    label = f"{name} N={nh} K={nkv} H={hd} page={ps} {kw}"
    try:
      c = rpa_cases.make_case(1, seqs[name], num_heads=nh, num_kv_heads=nkv, head_dim=hd, page_size=ps,
                              dtype=jnp.bfloat16)
      c = dataclasses.replace(c, kv_pages_PSCH=jnp.nan_to_num(c.kv_pages_PSCH, nan=GARBAGE))
      ref = jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=hd**-0.5, **kw))(
          *c.reference_args())
      poison = jnp.full(c.q_TNH.shape, jnp.nan, jnp.bfloat16)
      out = np.asarray(gpu.ragged_paged_attention(*c.args(), sm_scale=hd**-0.5, out_TNH=poison,
                                                  config=hopper_config(hd, ps, nh // nkv), interpret=_INTERPRET.value,
                                                  **kw), np.float32)
      live = c.live_rows
      err = rel_err(out[:live], ref[:live])
      ok = err <= 1e-2 and not np.isnan(out[:live]).any() and np.isnan(out[live:]).all()
      rows.append(dict(case=label, err=err, ok=bool(ok)))
      if not ok:  # which rows are wrong, as (first, last, sequence) runs: says where to look
        rows[-1]["bad_rows"] = bad_row_runs(out[:live], np.asarray(ref[:live], np.float32), c.cu_q_lens_E)
    except Exception:  # noqa: BLE001 - one failing shape must not stop the run
      rows.append(dict(case=label, err=None, ok=False, error=traceback.format_exc(limit=-4)))
    log(f"  check {label}: err={rows[-1].get('err')} ok={rows[-1]['ok']} bad rows={rows[-1].get('bad_rows')}")
  return rows


def bad_row_runs(out_TNH, ref_TNH, cu_q_lens_E):
  """Runs of query rows whose relative error is over 1e-2: [(first row, last row, sequence), ...]."""
  diff = np.linalg.norm((out_TNH - ref_TNH).reshape(len(out_TNH), -1), axis=1)
  bad = ~(diff <= 1e-2 * np.maximum(np.linalg.norm(ref_TNH.reshape(len(ref_TNH), -1), axis=1), 1e-6))
  seq_of = np.searchsorted(np.asarray(cu_q_lens_E), np.arange(len(out_TNH)), side="right") - 1
  runs = []
  for t in np.flatnonzero(bad):
    if runs and runs[-1][1] == t - 1 and runs[-1][2] == seq_of[t]:
      runs[-1][1] = int(t)
    else:
      runs.append([int(t), int(t), int(seq_of[t])])
  return runs


def cases(quick):
  if quick:
    return [BenchCase("prefill 1x160 H64", [(160, 160)], num_heads=2, num_kv_heads=1, head_dim=64, kind="prefill")]
  return [BenchCase("prefill 4x4096 causal H128", [(4096, 4096)] * 4, kind="prefill"),
          BenchCase("prefill 8x2048 causal H64 (1B)", [(2048, 2048)] * 8, head_dim=64, kind="prefill"),
          BenchCase("prefill 8x512 @2048 (mixed's prefill part)", [(512, 2048)] * 8, kind="prefill"),
          BenchCase("mixed 8x512 + 248 decodes @2048", [(512, 2048)] * 8 + [(1, 2048)] * 248, kind="mixed")]


def time_case(case, quick):
  """Triton prefill, each Hopper candidate and cuDNN on one case; rows with us, TFLOP/s and err."""
  a = build(case)
  args = args_of(a)
  exact = xla_attend(*args, groups=groups_of(case), sm_scale=case.head_dim**-0.5, exact=True)
  _, flops = bytes_and_flops(case)
  group = case.num_heads // case.num_kv_heads
  base = dataclasses.replace(tuning.gpu_config(case.head_dim, case.page_size, group), prefill_kernel="triton")
  variants = [("triton " + _blocks_str(base.prefill), base)]
  for hb in tuning.HOPPER_SWEEP[:1] if quick else tuning.HOPPER_SWEEP:
    variants.append((f"hopper n{hb.block_kv} st{hb.num_stages}{'' if hb.ping_pong else ' no ping-pong'}",
                     hopper_config(case.head_dim, case.page_size, group, hb)))
  rows = []
  for label, cfg in variants:
    row = dict(case=case.name, kernel=label)
    why_not = None
    if cfg.prefill_kernel == "hopper":
      why_not = hopper.supports(args[0], args[1], cfg.hopper)
      why_not = why_not or (None if _INTERPRET.value else hopper.device_supports())
    if why_not:  # the call would quietly run the Triton prefill instead
      rows.append(dict(row, error=f"not run: {why_not}"))
      continue
    try:
      fn = jax.jit(functools.partial(gpu.ragged_paged_attention, sm_scale=case.head_dim**-0.5, config=cfg,
                                     interpret=_INTERPRET.value))
      row["err"] = rel_err(fn(*args), exact)
      if row["err"] <= 1e-2:  # a wrong answer is not timed
        t = time_fn(fn, *args, reps=1, rounds=1) if _INTERPRET.value else time_fn(fn, *args)
        row.update(us=t * 1e6, TFLOPs=flops / t / 1e12)
    except Exception:  # noqa: BLE001
      row["error"] = traceback.format_exc(limit=-4)
    rows.append(row)
    log(f"  {case.name} {label}: {row.get('us')} us err={row.get('err')} {row.get('error', '')[-300:]}")
  cd = cudnn_row(case, a, exact)
  if "cudnn_us" in cd:
    rows.append(dict(case=case.name, kernel="cuDNN (unpaged)", us=cd["cudnn_us"], TFLOPs=cd["cudnn_TFLOPs"],
                     err=cd["cudnn_err"]))
  elif cd:
    rows.append(dict(case=case.name, kernel="cuDNN (unpaged)", error=cd["cudnn_error"]))
  return rows


def _blocks_str(b):
  return f"m{b.block_m} n{b.block_n} w{b.num_warps} st{b.num_stages}"


def markdown(meta, check_rows, rows):
  lines = [f"Device: {meta['device']}; JAX {meta['jax']}; {meta['date']}.", "",
           f"Hopper prefill path against the reference on the GPU: {sum(r['ok'] for r in check_rows)} of "
           f"{len(check_rows)} shapes pass."]
  lines += [f"- FAILED {r['case']}: err={r.get('err')} {r.get('error', '')[-300:]}" for r in check_rows
            if not r["ok"]]
  lines += ["", "| case | kernel | us | TFLOP/s | % of cuDNN | err vs exact |", "| --- | --- | --- | --- | --- | --- |"]
  cudnn = {r["case"]: r["TFLOPs"] for r in rows if r["kernel"].startswith("cuDNN") and "TFLOPs" in r}
  for r in rows:
    if "us" not in r:
      why = r.get("error", "")[-100:].replace("\n", " ") or f"wrong answer, err={r.get('err')}"
      lines.append(f"| {r['case']} | {r['kernel']} | failed: {why} | | | |")
      continue
    frac = f"{100 * r['TFLOPs'] / cudnn[r['case']]:.0f}%" if r["case"] in cudnn else ""
    lines.append(f"| {r['case']} | {r['kernel']} | {r['us']:.1f} | {r['TFLOPs']:.0f} | {frac} | {r['err']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  meta = bench_kernels.start_run()
  res = dict(meta=meta, checks=checks(_QUICK.value), rows=[])

  def save():
    with open(os.path.join(_OUT_DIR.value, "prefill.json"), "w") as f:
      json.dump(res, f, indent=1, default=str)
    with open(os.path.join(_OUT_DIR.value, "prefill.md"), "w") as f:
      f.write(markdown(meta, res["checks"], res["rows"]))

  save()
  for case in cases(_QUICK.value):
    try:
      res["rows"] += time_case(case, _QUICK.value)
    except Exception:  # noqa: BLE001
      res["rows"].append(dict(case=case.name, kernel="all", error=traceback.format_exc(limit=-4)))
    save()
  print(markdown(meta, res["checks"], res["rows"]))


if __name__ == "__main__":
  app.run(main)

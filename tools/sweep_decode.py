"""Sweeps the attention kernel's decode tiles over page sizes and KV pool dtypes, on a GPU.

    PYTHONPATH=. python tools/sweep_decode.py --out_dir=$OUT [--shapes=64x2048,256x1536] [--budget_s=240]
    PYTHONPATH=. python tools/sweep_decode.py --quick --interpret --out_dir=/tmp/sweep   # a CPU smoke run

Decode-only calls (`decode_only=True`, as the engine's decode bursts make) of the 8B attention shape,
built with tools/bench_kernels.py's cases, for pages of 16, 32 and 64 and bf16 and fp8 pools. Each
tile is checked against an exact float32 attention before it is timed. Prints and writes
decode_sweep.md (per case, the tuning table's tiles beside the best) and decode_sweep.json.
--out_dir, --quick and --interpret are tools/bench_kernels.py's flags, shared by importing it.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels.ragged_paged_attention import tuning  # noqa: E402
from tools import bench_kernels  # noqa: E402
from tools.bench_kernels import (BenchCase, args_of, build, bytes_and_flops, fmt, groups_of, log, ours_fn,  # noqa: E402
                                 rel_err, time_fn, xla_attend)
from tools.ceilings import copy_ceilings  # noqa: E402

_OUT_DIR, _QUICK = bench_kernels._OUT_DIR, bench_kernels._QUICK
_SHAPES = flags.DEFINE_list("shapes", ["64x2048", "256x1536"], "which shapes (batch x context)")
_BUDGET_S = flags.DEFINE_float("budget_s", 240.0, "seconds after which no new group starts")
_PAGES = flags.DEFINE_list("pages", ["16", "32", "64"], "page sizes")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "time the tuning table's tiles only (with an fp8 pool, also "
                                "with f16_dot), not the sweep's other tiles: a short run")


DECODE_SWEEP_TILES = tuning.GPU_SWEEP_DECODE_WIDE  # the table's own tiles are tried first, beside these


def decode_sweep(ceiling):
  """Decode-only calls of the 8B attention shape (32 query heads, 8 KV heads, head dim 128) at batch 64
  (context 2048) and batch 256 (context 1536, the 8B 1000/1000 workload's full batch), for pages of 16,
  32 and 64 and bf16 and fp8 pools: every tile of DECODE_SWEEP_TILES (and the table's own) checked
  against the exact attention, then timed. Rows carry the group's best and the table's tiles."""
  rows = []
  shapes = tuple(s for s in (("64x2048", [(1, 2048)] * 64, (1, 2)), ("256x1536", [(1, 1536)] * 256, (1,)))
                 if s[0] in _SHAPES.value)
  sweep_tiles = () if _TABLE_ONLY.value else DECODE_SWEEP_TILES
  if _QUICK.value:  # a smoke run on a CPU, in interpret mode
    shapes, sweep_tiles = (("4x128", [(1, 128)] * 4, (1, 2)),), DECODE_SWEEP_TILES[:1]
  for name, seqs, split_list in shapes:
    for page in map(int, _PAGES.value):
      for fp8 in (False, True):
        if time.perf_counter() - bench_kernels._T0 > _BUDGET_S.value:
          log(f"decode sweep: past the {_BUDGET_S.value:.0f} s budget, {name} p{page} fp8={fp8} not run")
          continue
        case = BenchCase(f"decode {name} H128 p{page}" + (" [fp8 KV]" if fp8 else ""), seqs, page_size=page)
        a = build(case, pool_dtype=jnp.float8_e4m3fn if fp8 else None)
        args = args_of(a)
        exact_args = (args[0], args[1].astype(jnp.float32)) + args[2:]
        exact = xla_attend(*exact_args, groups=groups_of(case), sm_scale=case.head_dim**-0.5, exact=True)
        nbytes = bytes_and_flops(case, kv_itemsize=1 if fp8 else 2)[0]
        table = tuning.gpu_config(case.head_dim, page, case.num_heads // case.num_kv_heads)
        tiles = (table.decode,) + tuple(t for t in sweep_tiles if t != table.decode)
        if fp8:  # each tile also widening the pool's rows to float16 (tuning.GpuBlocks.f16_dot)
          tiles += tuple(dataclasses.replace(t, f16_dot=not t.f16_dot) for t in tiles)
        group = []
        for tile in tiles:
          for splits in split_list:
            label = (f"m{tile.block_m} n{tile.block_n} w{tile.num_warps} st{tile.num_stages} splits{splits}"
                     + (" f16" if tile.f16_dot else "") + (" (table)" if tile == table.decode else ""))
            row = dict(case=case.name, variant=label)
            try:
              fn = ours_fn(case, config=dataclasses.replace(table, decode=tile), num_splits=splits, decode_only=True)
              row["err"] = rel_err(fn(*args), exact)
              t = time_fn(fn, *args)
              row.update(us=t * 1e6, TBps=nbytes / t / 1e12, frac=nbytes / t / 1e12 / ceiling)
            except Exception as e:  # noqa: BLE001
              row["error"] = repr(e)[:300]
            group.append(row)
            log(f"  decode sweep {case.name} {label}: {fmt(row.get('us'))} us err={row.get('err')}")
        ok = [r for r in group if "us" in r and r["err"] <= 1e-2]
        best = min(ok, key=lambda r: r["us"], default=None)
        for r in group:
          r["best"] = r is best
        rows += group
        del a, args, exact_args, exact
  return rows


def decode_sweep_markdown(rows):
  """Per case: the table's tiles, the best tiles, and their times."""
  lines = ["| case | table tiles us (TB/s, % of copy) | best tiles | best us (TB/s, % of copy) | errors |",
           "| --- | --- | --- | --- | --- |"]
  cases = list(dict.fromkeys(r["case"] for r in rows))
  for c in cases:
    group = [r for r in rows if r["case"] == c]
    table = next((r for r in group if "(table)" in r["variant"] and "us" in r), None)
    best = next((r for r in group if r.get("best")), None)
    cell = lambda r: f"{r['us']:.1f} ({r['TBps']:.2f}, {100 * r['frac']:.0f}%)" if r else "-"
    failed = sum("us" not in r or r["err"] > 1e-2 for r in group)
    lines.append(f"| {c} | {cell(table)} | {best['variant'] if best else '-'} | {cell(best)} | "
                 f"{failed} of {len(group)} failed |")
  return lines


def main(argv):
  del argv
  meta = bench_kernels.start_run()
  ceilings = copy_ceilings((256 << 20) if _QUICK.value else (4 << 30))
  log(f"ceilings {ceilings}")
  rows = decode_sweep(ceilings["ceiling_TBps"])
  with open(os.path.join(_OUT_DIR.value, "decode_sweep.json"), "w") as f:
    json.dump(dict(meta=meta, ceilings=ceilings, decode_sweep=rows, log=bench_kernels._LOG), f, indent=1, default=str)
  text = "\n".join([f"Device: {meta['device']}; JAX {meta['jax']}; {meta['date']}; copy ceiling "
                    f"{ceilings['ceiling_TBps']:.2f} TB/s.", ""] + decode_sweep_markdown(rows))
  with open(os.path.join(_OUT_DIR.value, "decode_sweep.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)

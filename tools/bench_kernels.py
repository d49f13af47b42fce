"""Benchmarks ragged paged attention on a GPU: our kernel, the copy-bandwidth ceiling, JAX's shipped kernels.

Run on the GPU machine from the source tree:

    PYTHONPATH=. python tools/bench_kernels.py --out_dir=/tmp/bench [--sweep]

It first checks the compiled kernel against the reference on the GPU (the
test shapes, then every benchmark case), then times each case with our
kernel and the baselines in the same process, and prints one table. Results
go to OUT_DIR/kernels.md (the table, with device, JAX version and date) and
OUT_DIR/kernels.json (everything). `--sweep` also times the block-size
candidates of `tuning.py`, which is how its table was produced.

It also times the step's KV write both ways on two decode cases and one
prefill case: `write_kv_pages` then the attention kernel, jitted together,
against `gpu.ragged_paged_attention_write` (the write inside the kernel),
each with the pool donated, after checking that the two give the same
output and the same pool. `--fused_only` runs only that comparison; `--nofused`
skips it. `--fp8` runs every case a second time over an fp8 (e4m3) KV pool,
whose bytes count one per element. tools/sweep_decode.py sweeps the decode
launch's tiles over page sizes and pool dtypes with this file's cases.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tools.ceilings import copy_ceilings  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels.ragged_paged_attention import gpu, reference, tuning  # noqa: E402
from tests.kernels import rpa_cases  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_kernels", "where kernels.md and kernels.json go")
_SWEEP = flags.DEFINE_bool("sweep", False, "also time the block-size candidates of tuning.py")
_QUICK = flags.DEFINE_bool("quick", False, "tiny cases: a smoke run of this script")
_INTERPRET = flags.DEFINE_bool("interpret", False, "run our kernel in interpret mode (with --quick, on a CPU)")
_FUSED_ONLY = flags.DEFINE_bool("fused_only", False, "only the fused-KV-write against separate-scatter comparison")
_FUSED = flags.DEFINE_bool("fused", True, "time the fused-KV-write comparison (first)")
_FP8 = flags.DEFINE_bool("fp8", False, "also run every case with an fp8 (e4m3) KV pool: our kernel only, checked "
                         "against the exact attention over the same 8-bit values, its bytes counted at 1 per element")

_LOG = []


_T0 = time.perf_counter()


def log(msg):
  msg = f"[{time.perf_counter() - _T0:6.1f}s] {msg}"
  print(msg, flush=True)
  _LOG.append(msg)


def time_fn(fn, *args, reps=10, rounds=7):
  """Median over rounds of the mean time of `reps` back-to-back calls, in seconds."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


# ---------------------------------------------------------------- ceilings

# ---------------------------------------------------------------- cases

@dataclasses.dataclass
class BenchCase:
  name: str
  seqs: list
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  page_size: int = 16
  kind: str = "decode"  # decode | prefill | mixed


def build(case, dtype=jnp.bfloat16, seed=0, pool_dtype=None):
  """Device arrays of a case: random pool (in `pool_dtype`, default `dtype`) and queries, randomly
  permuted page tables."""
  rng = np.random.default_rng(seed)
  q_lens = np.array([q for q, _ in case.seqs], np.int32)
  kv_lens = np.array([k for _, k in case.seqs], np.int32)
  pages_B = -(-kv_lens // case.page_size)
  pages_per_seq = int(pages_B.max())
  num_pages = int(pages_B.sum())
  order = rng.permutation(num_pages).astype(np.int32)
  page_indices = np.zeros((len(case.seqs), pages_per_seq), np.int32)
  ends = np.cumsum(pages_B)
  for b in range(len(case.seqs)):
    page_indices[b, :pages_B[b]] = order[ends[b] - pages_B[b]:ends[b]]
  k1, k2 = jax.random.split(jax.random.key(seed))
  kv = jax.random.normal(k1, (num_pages, case.page_size, 2 * case.num_kv_heads, case.head_dim), dtype)
  if pool_dtype is not None:
    kv = reference.to_pool_dtype(kv, pool_dtype)
  q = jax.random.normal(k2, (int(q_lens.sum()), case.num_heads, case.head_dim), dtype)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  return dict(q_TNH=q, kv_pages_PSCH=kv, kv_lens_B=jnp.asarray(kv_lens), page_indices_BP=jnp.asarray(page_indices),
              cu_q_lens_E=jnp.asarray(cu), num_seqs=jnp.asarray([len(case.seqs)], jnp.int32))


def args_of(a):
  return (a["q_TNH"], a["kv_pages_PSCH"], a["kv_lens_B"], a["page_indices_BP"], a["cu_q_lens_E"], a["num_seqs"])


def bytes_and_flops(case, itemsize=2, kv_itemsize=2):
  kv = sum(k for _, k in case.seqs) * case.num_kv_heads * 2 * case.head_dim * kv_itemsize
  qo = 2 * sum(q for q, _ in case.seqs) * case.num_heads * case.head_dim * itemsize
  visible = sum(sum(k - q + 1 + r for r in range(q)) for q, k in case.seqs)
  return kv + qo, 4 * case.head_dim * case.num_heads * visible


def groups_of(case):
  """Sequences grouped by query length (static), for the XLA gather-then-attend path."""
  groups = {}
  for b, (q, _) in enumerate(case.seqs):
    groups.setdefault(q, []).append(b)
  return tuple((q, tuple(ids)) for q, ids in sorted(groups.items()))


@functools.partial(jax.jit, static_argnames=("groups", "sm_scale", "exact"))
def xla_attend(q_TNH, kv_pages_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs, *, groups, sm_scale, exact):
  """Gather each sequence's pages, attend densely; one batched einsum per group of equal query length.

  exact=True computes in float32 at highest precision (the check for large
  cases, where the reference's per-token gather would not fit); False keeps
  the input dtype with float32 accumulation (the baseline).
  """
  del num_seqs
  num_tokens, num_heads, head_dim = q_TNH.shape
  _, page_size, num_combined, _ = kv_pages_PSCH.shape
  num_kv_heads = num_combined // 2
  group = num_heads // num_kv_heads
  prec = jax.lax.Precision.HIGHEST if exact else None
  cdt = jnp.float32 if exact else q_TNH.dtype
  out_TNH = jnp.zeros(q_TNH.shape, q_TNH.dtype)
  for q_len, ids in groups:
    sel_b = jnp.asarray(ids, jnp.int32)
    nb = len(ids)
    kv_bXCH = kv_pages_PSCH[page_indices_BP[sel_b]].reshape(nb, -1, num_combined, head_dim).astype(cdt)
    k_bXKH, v_bXKH = kv_bXCH[:, :, 0::2], kv_bXCH[:, :, 1::2]
    t_bQ = cu_q_lens_E[sel_b][:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    q_bQKGH = q_TNH[t_bQ].reshape(nb, q_len, num_kv_heads, group, head_dim).astype(cdt)
    s_bKGQX = jnp.einsum("bqkgh,bxkh->bkgqx", q_bQKGH, k_bXKH, precision=prec,
                         preferred_element_type=jnp.float32) * sm_scale
    pos_bQ = kv_lens_B[sel_b][:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    x_X = jnp.arange(k_bXKH.shape[1], dtype=jnp.int32)
    mask_bQX = (x_X[None, None, :] <= pos_bQ[:, :, None])
    s_bKGQX = jnp.where(mask_bQX[:, None, None], s_bKGQX, -1e30)
    p_bKGQX = jax.nn.softmax(s_bKGQX, axis=-1).astype(cdt)
    o_bQKGH = jnp.einsum("bkgqx,bxkh->bqkgh", p_bKGQX, v_bXKH, precision=prec, preferred_element_type=jnp.float32)
    out_TNH = out_TNH.at[t_bQ].set(o_bQKGH.reshape(nb, q_len, num_heads, head_dim).astype(q_TNH.dtype))
  return out_TNH


def rel_err(a, b):
  return rpa_cases.relative_error(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---------------------------------------------------------------- correctness on the GPU

def check_test_shapes():
  """The test matrix, compiled for the GPU, against the reference. Returns rows."""
  rows = []
  # Mostly bfloat16: a float32 kernel (IEEE-precision dots) took 15-20 s to
  # compile on the H200, a bfloat16 one about 3 s.
  combos = [(name, jnp.bfloat16, 8, 2, 64, {}) for name in rpa_cases.SEQS]
  combos += [("mixed", jnp.float32, 8, 2, 64, {}), ("mixed", jnp.bfloat16, 8, 8, 128, {}),
             ("mixed", jnp.bfloat16, 8, 1, 128, {}), ("mixed", jnp.bfloat16, 8, 2, 64, dict(sliding_window=8)),
             ("mixed", jnp.bfloat16, 8, 2, 64, dict(soft_cap=5.0)),
             ("decode_only", jnp.float32, 8, 2, 128, dict(num_splits=4)),
             ("mixed", jnp.bfloat16, 8, 2, 128, dict(num_splits=2, sliding_window=16, soft_cap=20.0))]
  if _QUICK.value:
    combos = combos[:1] + combos[-1:]
  for name, dtype, nh, nkv, hd, kw in combos:
    label = f"{name} {jnp.dtype(dtype).name} N={nh} K={nkv} H={hd} {kw}"
    try:
      c = rpa_cases.make_case(1, rpa_cases.SEQS[name], num_heads=nh, num_kv_heads=nkv, head_dim=hd, page_size=8,
                              dtype=dtype, shape=rpa_cases.SEQS_SHAPE)  # one shape: fewer compiles
      # The test shapes are small: check the Hopper prefill kernel on them too, as the large buckets run it.
      cfg = dataclasses.replace(tuning.gpu_config(hd, 8, nh // nkv), hopper_min_tokens=0)
      if gpu._use_hopper(c.q_TNH, c.kv_pages_PSCH, cfg, _INTERPRET.value, False):
        # The Hopper prefill kernel reads whole pages and assumes finite values past each context
        # (hopper.py; the engine's pool never holds NaN): a large finite poison instead of NaN.
        c = dataclasses.replace(c, kv_pages_PSCH=jnp.nan_to_num(c.kv_pages_PSCH, nan=1e4))
        label += " (Hopper prefill: finite poison)"
      ref_kw = {k: v for k, v in kw.items() if k != "num_splits"}
      ref = jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=hd**-0.5, **ref_kw))(
          *c.reference_args())
      poison = jnp.full(c.q_TNH.shape, jnp.nan, dtype)
      out = np.asarray(gpu.ragged_paged_attention(*c.args(), sm_scale=hd**-0.5, out_TNH=poison, config=cfg,
                                                  interpret=_INTERPRET.value, **kw), np.float32)
      live = c.live_rows
      err = rel_err(out[:live], ref[:live])
      tol = 1e-5 if dtype == jnp.float32 else 1e-2
      ok = err <= tol and not np.isnan(out[:live]).any() and np.isnan(out[live:]).all()
      rows.append(dict(case=label, err=err, tol=tol, ok=bool(ok)))
    except Exception:  # noqa: BLE001 - one failing shape must not stop the run
      rows.append(dict(case=label, err=None, tol=None, ok=False, error=traceback.format_exc(limit=3)))
    log(f"  check {label}: {rows[-1].get('err')} ok={rows[-1]['ok']}")
  return rows


# ---------------------------------------------------------------- the benchmark

def bench_cases(quick):
  if quick:
    small = dict(num_heads=8, num_kv_heads=2, head_dim=64)
    return [BenchCase("decode 4x128 p16", [(1, 128)] * 4, **small),
            BenchCase("prefill 1x128", [(128, 128)], kind="prefill", **small),
            BenchCase("mixed 2x32+6 decodes @128", [(32, 128)] * 2 + [(1, 128)] * 6, kind="mixed", **small)]
  return [
      BenchCase("decode 64x2048 H128 p16", [(1, 2048)] * 64),
      BenchCase("decode 64x2048 H128 p32", [(1, 2048)] * 64, page_size=32),
      BenchCase("decode 64x2048 H128 p64", [(1, 2048)] * 64, page_size=64),
      BenchCase("decode 256x1024 H64 p16", [(1, 1024)] * 256, head_dim=64),
      BenchCase("prefill 4x4096 causal", [(4096, 4096)] * 4, kind="prefill"),
      BenchCase("mixed 8x512 + 248 decodes @2048", [(512, 2048)] * 8 + [(1, 2048)] * 248, kind="mixed"),
      BenchCase("  mixed: prefill part 8x512 @2048", [(512, 2048)] * 8, kind="prefill"),
      BenchCase("  mixed: decode part 248 @2048", [(1, 2048)] * 248),
  ]


def ours_fn(case, **kw):
  sm_scale = case.head_dim**-0.5
  return jax.jit(functools.partial(gpu.ragged_paged_attention, sm_scale=sm_scale, interpret=_INTERPRET.value, **kw))


def run_case(case, ceiling, config=None, num_splits=None, fp8=False):
  from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
  a = build(case, pool_dtype=jnp.float8_e4m3fn if fp8 else None)
  args = args_of(a)
  sm_scale = case.head_dim**-0.5
  nbytes, flops = bytes_and_flops(case, kv_itemsize=1 if fp8 else 2)
  row = dict(case=case.name + (" [fp8 KV]" if fp8 else ""), bytes=nbytes, flops=flops)
  exact_args = (args[0], args[1].astype(jnp.float32)) + args[2:] if fp8 else args
  exact = xla_attend(*exact_args, groups=groups_of(case), sm_scale=sm_scale, exact=True)
  ours = ours_fn(case, config=config, num_splits=num_splits)
  out = ours(*args)
  row["err"] = rel_err(out, exact)
  row["ok"] = row["err"] <= 1e-2
  t = time_fn(ours, *args)
  row.update(ours_us=t * 1e6, ours_TBps=nbytes / t / 1e12, ours_frac=nbytes / t / 1e12 / ceiling,
             ours_TFLOPs=flops / t / 1e12)
  if case.kind == "decode":  # the engine's decode bursts skip the prefill launch: time that call too
    only = ours_fn(case, config=config, num_splits=num_splits, decode_only=True)
    row["decode_only_err"] = rel_err(only(*args), exact)
    row["ok"] = row["ok"] and row["decode_only_err"] <= 1e-2
    t = time_fn(only, *args)
    row.update(decode_only_us=t * 1e6, decode_only_TBps=nbytes / t / 1e12)
  if fp8:  # the baselines read 16-bit pools: see the bfloat16 row of the same case
    return row
  try:
    if case.name.startswith(" "):
      raise ValueError("not run: part of the mixed case, only ours is timed")
    xla = jax.jit(functools.partial(xla_attend, groups=groups_of(case), sm_scale=sm_scale, exact=False))
    row["xla_err"] = rel_err(xla(*args), exact)
    row["xla_us"] = time_fn(xla, *args, reps=3, rounds=3) * 1e6
  except Exception as e:  # noqa: BLE001
    row["xla_error"] = repr(e)[:300]
  if case.kind == "decode" and not case.name.startswith(" "):
    try:
      kv = a["kv_pages_PSCH"]
      k_pages = jnp.transpose(kv[:, :, 0::2], (2, 0, 1, 3))
      v_pages = jnp.transpose(kv[:, :, 1::2], (2, 0, 1, 3))
      q_scaled = (a["q_TNH"].astype(jnp.float32) * sm_scale).astype(a["q_TNH"].dtype)
      fn = jax.jit(functools.partial(jax_paged.paged_attention, interpret=_INTERPRET.value))
      pa_args = (q_scaled, k_pages, v_pages, a["page_indices_BP"], a["kv_lens_B"])
      row["jax_paged_err"] = rel_err(fn(*pa_args), exact)
      t = time_fn(fn, *pa_args)
      row.update(jax_paged_us=t * 1e6, jax_paged_TBps=nbytes / t / 1e12)
    except Exception as e:  # noqa: BLE001
      row["jax_paged_error"] = repr(e)[:300]
  row.update(cudnn_row(case, a, exact))
  return row


def cudnn_row(case, a, exact):
  """cuDNN's causal attention on the same shapes, unpaged (prefill cases of equal whole sequences only)."""
  if not (case.kind == "prefill" and all(q == k for q, k in case.seqs) and len({q for q, _ in case.seqs}) == 1):
    return {}
  try:
    nb, seq_len = len(case.seqs), case.seqs[0][0]
    kv_bXCH = a["kv_pages_PSCH"][a["page_indices_BP"]].reshape(nb, seq_len, 2 * case.num_kv_heads, case.head_dim)
    k, v = kv_bXCH[:, :, 0::2], kv_bXCH[:, :, 1::2]
    q = a["q_TNH"].reshape(nb, seq_len, case.num_heads, case.head_dim)
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=case.head_dim**-0.5, is_causal=True,
                                   implementation="cudnn"))
    err = rel_err(fn(q, k, v).reshape(a["q_TNH"].shape), exact)
    t = time_fn(fn, q, k, v)
    return dict(cudnn_err=err, cudnn_us=t * 1e6, cudnn_TFLOPs=bytes_and_flops(case)[1] / t / 1e12)
  except Exception as e:  # noqa: BLE001
    return dict(cudnn_error=repr(e)[:300])


def sweep(case, variants):
  """Times (GpuConfig, num_splits) variants on one case; returns rows and the fastest correct variant."""
  rows = []
  a = build(case)
  args = args_of(a)
  exact = xla_attend(*args, groups=groups_of(case), sm_scale=case.head_dim**-0.5, exact=True)
  best = None
  for cfg, splits in variants:
    blocks = cfg.decode if case.kind == "decode" else cfg.prefill
    label = f"m{blocks.block_m} n{blocks.block_n} w{blocks.num_warps} st{blocks.num_stages} splits{splits}"
    try:
      fn = ours_fn(case, config=cfg, num_splits=splits)
      err = rel_err(fn(*args), exact)
      t = time_fn(fn, *args)
      rows.append(dict(case=case.name, variant=label, us=t * 1e6, err=err))
      if err <= 1e-2 and (best is None or t < best[0]):
        best = (t, cfg, splits)
    except Exception as e:  # noqa: BLE001
      rows.append(dict(case=case.name, variant=label, error=repr(e)[:300]))
    log(f"  sweep {case.name} {label}: {rows[-1].get('us')} err={rows[-1].get('err')}")
  return rows, best


def sweep_all(cases):
  """The tuning sweep: decode tiles x splits on the two decode shapes, prefill tiles on the prefill case.

  Returns the sweep rows and, per case name, the (config, splits) the table then uses.
  """
  dec_h128, dec_h64, pre = cases[0], cases[3], cases[4]
  base = tuning.gpu_config(128, 16, 4)
  rows, chosen = [], {}
  variants = [(dataclasses.replace(base, decode=d), s) for d in tuning.GPU_SWEEP_DECODE[:2] for s in (1, 2, 4)]
  r, best = sweep(dec_h128, variants)
  rows += r
  if best:
    for c in cases[:3]:
      chosen[c.name] = (best[1], best[2])
  base64 = tuning.gpu_config(64, 16, 4)
  r, best = sweep(dec_h64, [(dataclasses.replace(base64, decode=d), 1)
                            for d in tuning.GPU_SWEEP_DECODE[:2] + tuning.GPU_SWEEP_DECODE[3:]])
  rows += r
  if best:
    chosen[dec_h64.name] = (best[1], best[2])
  # The Triton prefill tiles (tools/bench_prefill.py sweeps the Hopper kernel's).
  r, best = sweep(pre, [(dataclasses.replace(base, prefill=p, prefill_kernel="triton"), 1)
                        for p in tuning.GPU_SWEEP_PREFILL[:3]])
  rows += r
  if best:
    dec_cfg = chosen.get(dec_h128.name, (base, None))[0]
    cfg = dataclasses.replace(dec_cfg, prefill=best[1].prefill)
    for c in cases[4:]:
      chosen[c.name] = (cfg, None if c.kind != "decode" else chosen.get(dec_h128.name, (None, None))[1])
  return rows, chosen


def write_kv_cost(case):
  """Time of the separate scatter of one step's new keys and values (write_kv_pages) for this case's tokens."""
  from pallas_kernels.ragged_paged_attention import write_kv_pages
  a = build(case)
  kv = a["kv_pages_PSCH"]
  num_tokens = a["q_TNH"].shape[0]
  k = jax.random.normal(jax.random.key(3), (num_tokens, case.num_kv_heads, case.head_dim), kv.dtype)
  slots = jax.random.permutation(jax.random.key(4), kv.shape[0] * kv.shape[1])[:num_tokens].astype(jnp.int32)
  fn = jax.jit(write_kv_pages, donate_argnums=0)
  kv = fn(kv, k, k, slots)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(10):
      kv = fn(kv, k, k, slots)
    kv.block_until_ready()
    times.append((time.perf_counter() - t0) / 10)
  return float(np.median(times)) * 1e6


def new_kv_of(case, a, seed=5):
  """The step's new keys, values and slots for a built case: row t of sequence b is position
  kv_len - q_len + (t - cu[b]), and its slot is that position's slot under the page table."""
  page_indices = np.asarray(a["page_indices_BP"])
  slots = []
  for b, (q, k) in enumerate(case.seqs):
    pos = np.arange(k - q, k)
    slots.append(page_indices[b, pos // case.page_size] * case.page_size + pos % case.page_size)
  slots_T = jnp.asarray(np.concatenate(slots).astype(np.int32))
  kv = a["kv_pages_PSCH"]
  shape = (slots_T.shape[0], case.num_kv_heads, case.head_dim)
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape, kv.dtype), jax.random.normal(k2, shape, kv.dtype), slots_T


def time_donated(fn, pool, *args, reps=10, rounds=7):
  """Like time_fn for fn(pool, *args) -> (out, pool) with the pool donated: each call gets the last pool."""
  pool = fn(pool, *args)[1]
  pool.block_until_ready()
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      pool = fn(pool, *args)[1]
    pool.block_until_ready()
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


def fused_write_case(case):
  """(a) write_kv_pages then attention in one jit against (b) the fused kernel, pool donated in both.

  (b) is checked against (a) first: its output within bfloat16 error, its
  pool equal bit for bit. Returns a row of the fused table.
  """
  from pallas_kernels.ragged_paged_attention import write_kv_pages
  a = build(case)
  q, pool, kv_lens, pages, cu, num_seqs = args_of(a)
  k, v, slots = new_kv_of(case, a)
  kw = dict(sm_scale=case.head_dim**-0.5, interpret=_INTERPRET.value)

  def separate(pool_PSCH, q_TNH, k_TKH, v_TKH, slots_T, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs):
    pool_PSCH = write_kv_pages(pool_PSCH, k_TKH, v_TKH, slots_T)
    return gpu.ragged_paged_attention(q_TNH, pool_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                                      **kw), pool_PSCH

  def fused(pool_PSCH, q_TNH, k_TKH, v_TKH, slots_T, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs):
    return gpu.ragged_paged_attention_write(q_TNH, pool_PSCH, kv_lens_B, page_indices_BP, cu_q_lens_E, num_seqs,
                                            k_TKH, v_TKH, slots_T, **kw)

  rest = (q, k, v, slots, kv_lens, pages, cu, num_seqs)
  separate, fused = jax.jit(separate, donate_argnums=0), jax.jit(fused, donate_argnums=0)
  out_a, pool_a = separate(jnp.copy(pool), *rest)
  out_b, pool_b = fused(jnp.copy(pool), *rest)
  row = dict(case=case.name, err=rel_err(out_b, out_a), pool_equal=bool(jnp.array_equal(pool_a, pool_b)))
  row["ok"] = row["err"] <= 1e-2 and row["pool_equal"]
  del out_a, pool_a, out_b, pool_b
  if not row["ok"]:
    return row
  row["separate_us"] = time_donated(separate, jnp.copy(pool), *rest) * 1e6
  row["fused_us"] = time_donated(fused, pool, *rest) * 1e6
  row["ratio"] = row["fused_us"] / row["separate_us"]
  return row


def fused_cases(cases, quick):
  """The decode cases (64 x 2048 H128 page 16, 256 x 1024 H64) and the prefill case, or the quick ones."""
  return cases[:2] if quick else [cases[0], cases[3], cases[4]]


def cfg_str(cfg):
  d, p = cfg.decode, cfg.prefill
  return (f"decode m{d.block_m} n{d.block_n} w{d.num_warps} st{d.num_stages}, "
          f"prefill ({cfg.prefill_kernel}) m{p.block_m} n{p.block_n} w{p.num_warps} st{p.num_stages}")


def fmt(v, spec=".1f"):
  return "" if v is None else format(v, spec)


def fused_markdown(fused):
  """The fused-write table: one row per case, both times and fused / separate."""
  lines = ["| KV write case | write_kv_pages + attention us | fused write us | fused / separate "
           "| out err | pool equal |", "| --- | --- | --- | --- | --- | --- |"]
  for r in fused:
    if "fused_us" not in r:
      why = r.get("error", "") or f"check failed: err={r.get('err')}, pool equal={r.get('pool_equal')}"
      lines.append(f"| {r['case']} | failed: {why[-120:]} | | | | |")
      continue
    lines.append(f"| {r['case']} | {r['separate_us']:.1f} | {r['fused_us']:.1f} | {r['ratio']:.2f} | "
                 f"{r['err']:.1e} | {r['pool_equal']} |")
  return lines


def markdown(meta, checks, rows, sweeps, kv_write, ceilings=None, chosen=None, fused=()):
  lines = [f"Device: {meta['device']}; JAX {meta['jax']}; {meta['date']}.", ""]
  if fused:
    lines += fused_markdown(fused) + [""]
  if ceilings is None:  # --fused_only, or saved before the ceilings are measured
    return "\n".join(lines)
  lines += [f"Copy ceiling: {ceilings['ceiling_TBps']:.2f} TB/s (PyTorch device-to-device copy "
            f"{fmt(ceilings.get('torch_copy_TBps'), '.2f')} TB/s, JAX elementwise pass "
            f"{ceilings['jax_elementwise_TBps']:.2f} TB/s; bytes read plus written).", "",
            "| case | ours us | bytes MB | ours TB/s | % of copy | ours TFLOP/s | decode only us (TB/s) "
            "| JAX paged us (TB/s) | cuDNN us (TFLOP/s) | XLA gather us | err vs exact |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if "ours_us" not in r:
      lines.append(f"| {r['case']} | failed: {r.get('error', '')[:80]} | | | | | | | | | |")
      continue
    pa = f"{r['jax_paged_us']:.1f} ({r['jax_paged_TBps']:.2f})" if "jax_paged_us" in r else ""
    cd = f"{r['cudnn_us']:.1f} ({r['cudnn_TFLOPs']:.0f})" if "cudnn_us" in r else ""
    do = f"{r['decode_only_us']:.1f} ({r['decode_only_TBps']:.2f})" if "decode_only_us" in r else ""
    lines.append(f"| {r['case']} | {r['ours_us']:.1f} | {r['bytes'] / 1e6:.0f} | {r['ours_TBps']:.2f} | "
                 f"{100 * r['ours_frac']:.0f}% | {r['ours_TFLOPs']:.0f} | {do} | {pa} | {cd} | "
                 f"{fmt(r.get('xla_us'))} | {r['err']:.1e} |")
  if chosen:
    lines += ["", "Tiles used (from the sweep below): "
              + "; ".join(f"{k.strip()}: {c}, splits={sp}" for k, (c, sp) in chosen.items())]
  lines += ["", f"Separate KV write (write_kv_pages scatter): {kv_write}", "",
            f"GPU correctness on the test shapes: {sum(c['ok'] for c in checks)} of {len(checks)} pass."]
  for c in checks:
    if not c["ok"]:
      lines.append(f"- FAILED {c['case']}: err={c.get('err')} {c.get('error', '')[-300:]}")
  if sweeps:
    lines += ["", "| sweep case | variant | us | err |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['case']} | {s['variant']} | {fmt(s.get('us'))} | {s.get('err', s.get('error', ''))} |"
              for s in sweeps]
  return "\n".join(lines) + "\n"


def dump(**results):
  with open(os.path.join(_OUT_DIR.value, "kernels.json"), "w") as f:
    json.dump(dict(results, log=_LOG), f, indent=1, default=str)


def start_run() -> dict:
  """Makes --out_dir and logs what this run measures on: device, JAX version, date, backend (shared by
  bench_prefill and sweep_decode)."""
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, date=datetime.date.today().isoformat(),
              backend=jax.default_backend())
  log(f"{meta}")
  return meta


def main(argv):
  del argv
  meta = start_run()
  res = dict(meta=meta, checks=[], rows=[], sweeps=[], kv_write={}, fused=[])

  def save():
    dump(**res)
    with open(os.path.join(_OUT_DIR.value, "kernels.md"), "w") as f:
      f.write(markdown(**res))

  cases = bench_cases(_QUICK.value)
  for case in (fused_cases(cases, _QUICK.value) if _FUSED.value or _FUSED_ONLY.value else []):
    try:
      res["fused"].append(fused_write_case(case))
    except Exception:  # noqa: BLE001
      res["fused"].append(dict(case=case.name, error=traceback.format_exc(limit=4)))
    log(f"  fused write {res['fused'][-1]}")
    save()
  if _FUSED_ONLY.value:
    print(markdown(**res))
    return
  res["ceilings"] = copy_ceilings((256 << 20) if _QUICK.value else (4 << 30))
  log(f"ceilings {res['ceilings']}")
  res["checks"] = check_test_shapes()
  save()
  chosen = {}
  if _SWEEP.value and not _QUICK.value:
    res["sweeps"], chosen = sweep_all(cases)
    res["chosen"] = {k: (cfg_str(c), s) for k, (c, s) in chosen.items()}
    save()
  for case in cases:
    cfg, splits = chosen.get(case.name, (None, None))
    for fp8 in (False, True) if _FP8.value else (False,):
      try:
        res["rows"].append(run_case(case, res["ceilings"]["ceiling_TBps"], config=cfg, num_splits=splits, fp8=fp8))
      except Exception:  # noqa: BLE001
        res["rows"].append(dict(case=case.name + (" [fp8 KV]" if fp8 else ""), error=traceback.format_exc(limit=4)))
      log(f"  case {res['rows'][-1]}")
      save()
  for case in (cases[0], cases[4] if len(cases) > 4 else cases[1]):
    try:
      res["kv_write"][case.name] = f"{write_kv_cost(case):.1f} us"
    except Exception as e:  # noqa: BLE001
      res["kv_write"][case.name] = repr(e)[:200]
  save()
  print(markdown(**res))


if __name__ == "__main__":
  app.run(main)

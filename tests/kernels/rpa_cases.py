"""Random ragged paged attention inputs for the kernel tests and the benchmark.

A case is built from a list of (query length, context length) per live
sequence. Everything a kernel must not read or write is poisoned: padding
query rows are NaN, free pages and the tail of each last page are NaN, page
table entries past a sequence's pages and padding sequences' rows hold an
index far outside the pool. `reference_pool` is the same pool with the poison
zeroed, for the reference, which reads whole page-table rows.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

_FAR_PAGE = 1 << 30  # a page index no pool has: reading it unmasked would fault on a GPU


@dataclasses.dataclass(frozen=True)
class Case:
  q_TNH: object
  kv_pages_PSCH: object
  kv_lens_B: object
  page_indices_BP: object
  cu_q_lens_E: object
  num_seqs: object
  live_rows: int

  def args(self):
    return (self.q_TNH, self.kv_pages_PSCH, self.kv_lens_B, self.page_indices_BP, self.cu_q_lens_E, self.num_seqs)

  def reference_args(self):
    clean_PSCH = jnp.nan_to_num(self.kv_pages_PSCH, nan=0.0)
    return (self.q_TNH, clean_PSCH) + self.args()[2:]


def make_case(seed, seqs, *, num_heads, num_kv_heads, head_dim, page_size, dtype, extra_seqs=1, extra_tokens=3,
              extra_pages=3, permute=True, shape=None, pool_dtype=None):
  """seqs: [(q_len, kv_len), ...] with q_len <= kv_len; the pool in `pool_dtype` (default `dtype`).

  `shape` (num_tokens, max_seqs, pages_per_seq, num_pages) pads every array to
  fixed sizes, so that cases share one compiled kernel.
  """
  rng = np.random.default_rng(seed)
  q_lens = np.array([q for q, _ in seqs], np.int32)
  kv_lens = np.array([k for _, k in seqs], np.int32)
  assert (q_lens <= kv_lens).all()
  num_seqs = len(seqs)
  max_seqs = num_seqs + extra_seqs
  live_rows = int(q_lens.sum())
  num_tokens = live_rows + extra_tokens
  pages_B = -(-kv_lens // page_size)
  pages_per_seq = int(pages_B.max()) + 1
  num_pages = int(pages_B.sum()) + extra_pages
  if shape is not None:
    need = (num_tokens, max_seqs, pages_per_seq, num_pages)
    assert all(a >= b for a, b in zip(shape, need)), f"shape={shape} is smaller than {need}"
    num_tokens, max_seqs, pages_per_seq, num_pages = shape
  order = rng.permutation(num_pages) if permute else np.arange(num_pages)

  page_indices_BP = np.full((max_seqs, pages_per_seq), _FAR_PAGE, np.int32)
  kv_PSCH = rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim), np.float32)
  poison_PS = np.ones((num_pages, page_size), bool)
  used = 0
  for b in range(num_seqs):
    pages = order[used:used + pages_B[b]]
    used += pages_B[b]
    page_indices_BP[b, :pages_B[b]] = pages
    x_X = np.arange(kv_lens[b])
    poison_PS[pages[x_X // page_size], x_X % page_size] = False
  kv_PSCH[poison_PS] = np.nan

  q_TNH = rng.standard_normal((num_tokens, num_heads, head_dim), np.float32)
  q_TNH[live_rows:] = np.nan
  cu_E = np.full(max_seqs + 1, live_rows, np.int32)
  cu_E[:num_seqs + 1] = np.concatenate([[0], np.cumsum(q_lens)])
  kv_lens_B = np.full(max_seqs, 1 << 20, np.int32)
  kv_lens_B[:num_seqs] = kv_lens
  return Case(q_TNH=jnp.asarray(q_TNH, dtype), kv_pages_PSCH=jnp.asarray(kv_PSCH, pool_dtype or dtype),
              kv_lens_B=jnp.asarray(kv_lens_B), page_indices_BP=jnp.asarray(page_indices_BP),
              cu_q_lens_E=jnp.asarray(cu_E), num_seqs=jnp.asarray([num_seqs], jnp.int32), live_rows=live_rows)


def relative_error(out, ref):
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# Array sizes that hold every case of SEQS with page size 8 (tokens, sequence
# slots, pages per sequence, pages): the tests compile each kernel once for them.
SEQS_SHAPE = (48, 6, 9, 32)

# Named shapes of the kernel tests, also checked on the GPU by tools/bench_kernels.py.
# Each: (query length, context length) per live sequence; page size 8 makes
# most contexts end inside a page.
SEQS = {
    "decode_only": [(1, 37), (1, 16), (1, 5), (1, 64)],
    "prefill_only": [(24, 24), (13, 40), (7, 7)],
    "mixed": [(1, 37), (20, 50), (1, 9), (9, 33), (3, 17)],
    "kv_len_not_page_multiple": [(2, 19), (1, 27), (5, 11)],
    "q_len_equals_context": [(19, 19), (8, 8), (1, 1)],
}


def with_new_kv(case, seed):
  """The case as a step that also writes its new keys and values: (case, k_TKH, v_TKH, slots_T).

  Each live row's slot is its position's slot under the page table; padding
  rows get the engine's slot, one past the pool, and NaN keys and values.
  The returned case's pool has every step slot poisoned (NaN): a fused
  kernel must take the step's positions from k_TKH / v_TKH, not the pool.
  """
  rng = np.random.default_rng(seed)
  num_pages, page_size, num_combined, head_dim = case.kv_pages_PSCH.shape
  num_tokens = case.q_TNH.shape[0]
  kv_lens_B, pages_BP, cu_E = (np.asarray(a) for a in (case.kv_lens_B, case.page_indices_BP, case.cu_q_lens_E))
  slots_T = np.full(num_tokens, num_pages * page_size, np.int32)
  for b in range(int(np.asarray(case.num_seqs)[0])):
    pos_Q = kv_lens_B[b] - (cu_E[b + 1] - cu_E[b]) + np.arange(cu_E[b + 1] - cu_E[b])
    slots_T[cu_E[b]:cu_E[b + 1]] = pages_BP[b, pos_Q // page_size] * page_size + pos_Q % page_size
  k_TKH, v_TKH = rng.standard_normal((2, num_tokens, num_combined // 2, head_dim), np.float32)
  k_TKH[case.live_rows:] = np.nan
  v_TKH[case.live_rows:] = np.nan
  live_slots = slots_T[:case.live_rows]
  flat_ZCH = np.array(case.kv_pages_PSCH, np.float32).reshape(num_pages * page_size, num_combined, head_dim)
  flat_ZCH[live_slots] = np.nan
  dtype = case.kv_pages_PSCH.dtype
  pool_PSCH = jnp.asarray(flat_ZCH.reshape(case.kv_pages_PSCH.shape), dtype)
  return (dataclasses.replace(case, kv_pages_PSCH=pool_PSCH), jnp.asarray(k_TKH, dtype), jnp.asarray(v_TKH, dtype),
          jnp.asarray(slots_T))

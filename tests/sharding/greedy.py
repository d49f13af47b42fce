"""A minimal greedy decoding loop over `llama.forward` for the sharding tests.

Every step (the prefill of all prompts, then one token per sequence) is padded
to the same token and sequence counts, so each parallel layout compiles once.
Sequence i owns pages [i * pages_per_seq, (i + 1) * pages_per_seq).
"""

import dataclasses

import numpy as np

from jserve.models.llama import StepInputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
  page_size: int = 8
  pages_per_seq: int = 4
  max_seqs: int = 4
  num_tokens: int = 32

  @property
  def num_pages(self) -> int:
    return self.max_seqs * self.pages_per_seq


def step_inputs(chunks: list[list[int]], starts: list[int], layout: Layout, seq_ids=None) -> StepInputs:
  """Inputs of one step in which sequence `seq_ids[i]` (default i) appends `chunks[i]` at `starts[i]`."""
  seq_ids = range(len(chunks)) if seq_ids is None else seq_ids
  t, b, ps = layout.num_tokens, layout.max_seqs, layout.page_size
  tok = np.zeros(t, np.int32)
  pos = np.zeros(t, np.int32)
  slots = np.full(t, layout.num_pages * ps, np.int32)  # padding rows write nowhere
  cu = np.zeros(b + 1, np.int32)
  kv = np.zeros(b, np.int32)
  last = np.zeros(b, np.int32)
  all_pages = np.arange(b * layout.pages_per_seq, dtype=np.int32).reshape(b, layout.pages_per_seq)
  pages = np.zeros_like(all_pages)
  pages[:len(chunks)] = all_pages[list(seq_ids)]
  row = 0
  for i, (chunk, start) in enumerate(zip(chunks, starts)):
    for j, token in enumerate(chunk):
      p = start + j
      tok[row], pos[row] = token, p
      slots[row] = pages[i, p // ps] * ps + p % ps
      row += 1
    cu[i + 1] = row
    kv[i] = start + len(chunk)
    last[i] = row - 1
  cu[len(chunks) + 1:] = row
  return StepInputs(token_ids_T=tok, positions_T=pos, slots_T=slots, cu_q_lens_E=cu, kv_lens_B=kv,
                    page_indices_BP=pages, num_seqs=np.array([len(chunks)], np.int32), logits_indices_B=last)


def greedy(run, prompts: list[list[int]], num_new: int, layout: Layout, groups=None):
  """Decodes `prompts` greedily; `run([StepInputs, ...]) -> [logits_BV, ...]` keeps its own KV pools.

  `groups` splits the sequences into micro-batches or replicas (default: one
  group of all); each step passes one StepInputs per group. Returns the new
  tokens of each prompt and the logits of every step, [steps, num prompts, V].
  """
  groups = groups or [list(range(len(prompts)))]
  out = [[] for _ in prompts]
  all_logits = []
  chunks, starts = [list(p) for p in prompts], [0] * len(prompts)
  for _ in range(num_new):
    batches = [step_inputs([chunks[i] for i in g], [starts[i] for i in g], layout, g) for g in groups]
    logits = [np.asarray(x) for x in run(batches)]
    logits_BV = np.zeros((len(prompts), logits[0].shape[-1]), np.float32)
    for g, x in zip(groups, logits):
      logits_BV[g] = x[:len(g)]
    all_logits.append(logits_BV)
    next_tokens = logits_BV.argmax(-1)
    starts = [s + len(c) for s, c in zip(starts, chunks)]
    chunks = [[int(t)] for t in next_tokens]
    for o, t in zip(out, next_tokens):
      o.append(int(t))
  return out, np.stack(all_logits)

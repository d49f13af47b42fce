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


def step_inputs(chunks: list[list[int]], starts: list[int], layout: Layout) -> StepInputs:
  """Inputs of one step in which sequence i appends `chunks[i]` at position `starts[i]`."""
  t, b, ps = layout.num_tokens, layout.max_seqs, layout.page_size
  tok = np.zeros(t, np.int32)
  pos = np.zeros(t, np.int32)
  slots = np.full(t, layout.num_pages * ps, np.int32)  # padding rows write nowhere
  cu = np.zeros(b + 1, np.int32)
  kv = np.zeros(b, np.int32)
  last = np.zeros(b, np.int32)
  pages = np.arange(b * layout.pages_per_seq, dtype=np.int32).reshape(b, layout.pages_per_seq)
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


def greedy(step, prompts: list[list[int]], num_new: int, layout: Layout):
  """Runs `step(StepInputs) -> logits_BV` (which keeps its own KV pool) greedily.

  Returns (the new tokens of each prompt, the logits of every step stacked [steps, B, V]).
  """
  out = [[] for _ in prompts]
  all_logits = []
  chunks, starts = [list(p) for p in prompts], [0] * len(prompts)
  for _ in range(num_new):
    logits_BV = np.asarray(step(step_inputs(chunks, starts, layout)))[:len(prompts)]
    all_logits.append(logits_BV)
    next_tokens = logits_BV.argmax(-1)
    starts = [s + len(c) for s, c in zip(starts, chunks)]
    chunks = [[int(t)] for t in next_tokens]
    for o, t in zip(out, next_tokens):
      o.append(int(t))
  return out, np.stack(all_logits)

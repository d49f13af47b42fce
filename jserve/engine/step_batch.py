"""A step's ragged batch, built on the host in numpy from the scheduler's requests.

The batch is padded to a bucket: the token count to the next of the runner's token buckets, the sequence
count to `min(max_num_seqs, token bucket)`, so that every shape a step can take was compiled at start-up.
`build` fills the model's `StepInputs` (token ids, positions, KV slots, `cu_q_lens`, `kv_lens`, page
table), the sampler's `SamplingInputs` and the step's `TokenInputs`, vectorized over sequences; only rows
with logprobs, penalties, bias tables or grammars take a per-row path. jserve/engine/runner.py puts the
arrays on the device and runs the step.
"""

import dataclasses
import itertools

import numpy as np

from jserve.engine.request import Request
from jserve.engine.sampler import SamplingInputs
from jserve.engine.slot_table import SlotTable
from jserve.engine.step import TokenInputs
from jserve.models.llama import StepInputs


@dataclasses.dataclass
class StepPlan:
  """What the host needs to read a step's results: which rows asked for logprobs or prompt logprobs."""

  num_seqs: int
  want_logprobs: bool
  # request_id -> (first row on the token axis, number of rows, prompt position of the first target)
  prompt_rows: dict


def _tracked(req: Request) -> bool:
  """Whether a request needs a slot: penalties need token counts, logit_bias and min_tokens a bias table."""
  p = req.params
  return p.penalized or bool(p.logit_bias) or p.min_tokens > 0


class BatchBuilder:
  """Builds the padded batches of one runner: its config (`RunnerConfig`), token buckets and slot table."""

  def __init__(self, rc, buckets: list[int], slot_table: SlotTable):
    self.rc = rc
    self.buckets = buckets
    self.slot_table = slot_table
    self.num_slots = slot_table.num_slots

  def bucket_for(self, num_tokens: int) -> int:
    for b in self.buckets:
      if num_tokens <= b:
        return b
    raise AssertionError(f"{num_tokens} tokens exceed max_num_batched_tokens={self.rc.max_num_batched_tokens}")

  def empty_inputs(self, num_tokens: int, staged: bool = False):
    """An all-padding batch of `num_tokens` tokens (what start-up compiles with); `staged` marks row 0 as
    asking for logprobs, which selects the staged sampler's program."""
    rc = self.rc
    num_seqs = min(rc.max_num_seqs, num_tokens)
    inputs = StepInputs(
        token_ids_T=np.zeros(num_tokens, np.int32),
        positions_T=np.zeros(num_tokens, np.int32),
        slots_T=np.full(num_tokens, rc.num_pages * rc.page_size, np.int32),
        cu_q_lens_E=np.zeros(num_seqs + 1, np.int32),
        kv_lens_B=np.zeros(num_seqs, np.int32),
        page_indices_BP=np.zeros((num_seqs, rc.pages_per_seq), np.int32),
        num_seqs=np.zeros(1, np.int32),
        logits_indices_B=np.zeros(num_seqs, np.int32))
    f32, i32, b = np.float32, np.int32, np.bool_
    sampling = SamplingInputs(
        temperature_B=np.zeros(num_seqs, f32), top_k_B=np.zeros(num_seqs, i32), top_p_B=np.ones(num_seqs, f32),
        min_p_B=np.zeros(num_seqs, f32), repetition_penalty_B=np.ones(num_seqs, f32),
        presence_penalty_B=np.zeros(num_seqs, f32), frequency_penalty_B=np.zeros(num_seqs, f32),
        slot_B=np.full(num_seqs, self.num_slots, i32), use_bias_B=np.zeros(num_seqs, b),
        ban_stop_B=np.zeros(num_seqs, b), use_mask_B=np.zeros(num_seqs, b), logprobs_B=np.zeros(num_seqs, b),
        seed_B=np.zeros(num_seqs, np.uint32), position_B=np.zeros(num_seqs, i32))
    sampling.logprobs_B[0] = staged  # (padding rows: nothing is read back)
    untracked = self.num_slots + 1  # past the table, so the scatter drops it
    tokens = TokenInputs(prompt_slot_T=np.full(num_tokens, untracked, i32),
                         output_slot_T=np.full(num_tokens, untracked, i32),
                         prompt_target_T=np.full(num_tokens, -1, i32), prev_row_T=np.full(num_tokens, -1, i32))
    return inputs, sampling, tokens

  def build(self, requests: list[Request], num_new_tokens: list[int], page_tables: dict[str, list[int]],
            constrained: set | None = None):
    """The padded ragged batch of one step, in numpy. `constrained`: ids of rows with a grammar mask.

    Vectorized over sequences: at 256 running sequences this runs on the host every step, so it
    must stay well under a millisecond. Only rows with logprobs, penalties, bias tables or grammars
    take the per-row path.
    """
    rc = self.rc
    count = len(requests)
    n_B = np.asarray(num_new_tokens, np.int32)
    total = int(n_B.sum())
    inputs, sampling, tokens = self.empty_inputs(self.bucket_for(total))
    start_B = np.fromiter((r.num_computed_tokens for r in requests), np.int32, count)
    end_B = start_B + n_B
    cu_B = np.cumsum(n_B, dtype=np.int32)
    inputs.cu_q_lens_E[1:count + 1] = cu_B
    inputs.cu_q_lens_E[count + 1:] = total
    inputs.num_seqs[0] = count
    inputs.kv_lens_B[:count] = end_B
    inputs.logits_indices_B[:count] = cu_B - 1
    starts, ends = start_B.tolist(), end_B.tolist()
    if total == count:  # decodes only: one token each
      inputs.token_ids_T[:total] = [r.all_token_ids[s] for r, s in zip(requests, starts)]
    else:
      inputs.token_ids_T[:total] = list(itertools.chain.from_iterable(
          r.all_token_ids[s:e] for r, s, e in zip(requests, starts, ends)))
    row_T = np.repeat(np.arange(count, dtype=np.int32), n_B)
    unknown_T = inputs.token_ids_T[:total] < 0  # PLACEHOLDER: sampled by the step still running
    if unknown_T.any():
      prev_B = np.fromiter((-1 if r.pending_row is None else r.pending_row for r in requests), np.int32, count)
      tokens.prev_row_T[:total] = np.where(unknown_T, prev_B[row_T], -1)
      if (tokens.prev_row_T[:total][unknown_T] < 0).any():
        raise AssertionError("a token is unknown but its request has no pending row")
    pos_T = np.arange(total, dtype=np.int32) + np.repeat(start_B - (cu_B - n_B), n_B)
    inputs.positions_T[:total] = pos_T
    table_BP = inputs.page_indices_BP
    for i, r in enumerate(requests):
      table = page_tables[r.request_id]
      table_BP[i, :len(table)] = table
    inputs.slots_T[:total] = table_BP[row_T, pos_T // rc.page_size] * rc.page_size + pos_T % rc.page_size

    params = [r.params for r in requests]
    sampling.temperature_B[:count] = [p.temperature for p in params]
    sampling.top_k_B[:count] = [max(p.top_k, 0) for p in params]
    sampling.top_p_B[:count] = [p.top_p for p in params]
    sampling.min_p_B[:count] = [p.min_p for p in params]
    sampling.seed_B[:count] = [r.seed for r in requests]
    sampling.position_B[:count] = end_B
    plan = StepPlan(num_seqs=count, want_logprobs=False, prompt_rows={})
    batch_ids = None
    offsets = (cu_B - n_B).tolist()
    for i, (req, p) in enumerate(zip(requests, params)):
      if (p.logprobs is None and p.prompt_logprobs is None and not _tracked(req)
          and not (constrained and req.request_id in constrained)):
        continue
      batch_ids = batch_ids if batch_ids is not None else {r.request_id for r in requests}
      self._fill_sampling(sampling, tokens, i, req, starts[i], ends[i], offsets[i], batch_ids, plan, constrained)
    return inputs, sampling, tokens, plan

  def _fill_sampling(self, s: SamplingInputs, tokens: TokenInputs, i: int, req: Request, start: int, end: int,
                     offset: int, batch_ids: set, plan: StepPlan, constrained):
    """The per-row sampling inputs beyond the common ones: grammar, logprobs, penalties, bias."""
    p = req.params
    s.use_mask_B[i] = constrained is not None and req.request_id in constrained
    if p.logprobs is not None:
      s.logprobs_B[i] = plan.want_logprobs = True
    if p.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
      # Row t's logits give the log-probability of the prompt token at t + 1.
      last = min(end, req.num_prompt_tokens - 1)
      tokens.prompt_target_T[offset:offset + last - start] = req.all_token_ids[start + 1:last + 1]
      plan.prompt_rows[req.request_id] = (offset, last - start, start + 1)
    if not _tracked(req):
      return
    slot = self.slot_table.slot_for(req, start, end, batch_ids)
    s.slot_B[i] = slot
    s.use_bias_B[i] = bool(p.logit_bias) or p.min_tokens > 0
    # Under a grammar the grammar decides where the output ends; banning EOS could leave no token allowed.
    s.ban_stop_B[i] = req.num_output_tokens < p.min_tokens and req.grammar is None
    s.repetition_penalty_B[i] = p.repetition_penalty
    s.presence_penalty_B[i] = p.presence_penalty
    s.frequency_penalty_B[i] = p.frequency_penalty
    split = min(max(req.num_prompt_tokens - start, 0), end - start)  # rows before `split` are prompt tokens
    tokens.prompt_slot_T[offset:offset + split] = slot
    tokens.output_slot_T[offset + split:offset + end - start] = slot

"""The host's padded ragged batch of one step, checked field by field on a small example."""

import numpy as np

from jserve.engine.request import Request, SamplingParams
from jserve.engine.runner import RunnerConfig, token_buckets
from jserve.engine.slot_table import SlotTable
from jserve.engine.step_batch import BatchBuilder

RC = RunnerConfig(num_pages=9, page_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=16)


def _builder():
  return BatchBuilder(RC, token_buckets(RC.max_num_batched_tokens), SlotTable(RC.max_num_seqs, 100))


def test_a_prefill_chunk_and_a_decode_fill_one_padded_batch():
  builder = _builder()
  a = Request("a", [10, 11, 12, 13, 14, 15], SamplingParams(temperature=0.0))  # 5 prompt tokens this step
  b = Request("b", [20, 21, 22], SamplingParams(temperature=0.7, top_k=5))
  b.all_token_ids += [23, 24]
  b.num_computed_tokens = 4  # decodes its token at position 4
  inputs, sampling, tokens, plan = builder.build([a, b], [5, 1], {"a": [3, 1], "b": [5, 6]})
  assert inputs.token_ids_T.shape == (16,)  # 6 tokens pad to the 16-token bucket
  assert inputs.token_ids_T[:6].tolist() == [10, 11, 12, 13, 14, 24]
  assert inputs.positions_T[:6].tolist() == [0, 1, 2, 3, 4, 4]
  # slot = page_table[pos // 4] * 4 + pos % 4; padding rows point past the pool (9 pages x 4 slots)
  assert inputs.slots_T[:6].tolist() == [12, 13, 14, 15, 4, 24]
  assert (inputs.slots_T[6:] == 36).all()
  assert inputs.cu_q_lens_E.tolist() == [0, 5, 6, 6, 6] and inputs.num_seqs.tolist() == [2]
  assert inputs.kv_lens_B.tolist() == [5, 5, 0, 0]
  assert inputs.logits_indices_B[:2].tolist() == [4, 5]
  assert sampling.temperature_B[:2].tolist() == [0.0, np.float32(0.7)] and sampling.top_k_B[:2].tolist() == [0, 5]
  assert plan.num_seqs == 2 and not plan.want_logprobs
  # Neither request has penalties or a bias table: no slot, and their token rows write nowhere.
  assert builder.slot_table.pending == [] and (tokens.prompt_slot_T == RC.max_num_seqs + 1).all()


def test_a_penalized_request_gets_a_slot_and_its_rows_name_it():
  builder = _builder()
  a = Request("a", [10, 11, 12], SamplingParams(repetition_penalty=1.3))
  _, sampling, tokens, _ = builder.build([a], [3], {"a": [1]})
  [(slot, req, start)] = builder.slot_table.pending
  assert req is a and start == 0 and sampling.slot_B[0] == slot
  assert tokens.prompt_slot_T[:3].tolist() == [slot] * 3  # three prompt rows counted into its slot

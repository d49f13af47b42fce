"""The sampler's slot table: which slot a tracked request holds, when its row is (re)written, and the row."""

import numpy as np

from jserve.engine.request import BIAS_TABLE_SIZE, Request, SamplingParams
from jserve.engine.slot_table import SLOT_WRITE_ROWS, SlotTable

VOCAB = 50


def _req(rid, prompt=(3, 4, 4), **params):
  return Request(rid, list(prompt), SamplingParams(repetition_penalty=1.2, **params), eos_token_ids=frozenset({2}))


def test_a_row_is_written_when_a_request_starts_and_again_only_when_it_restarts():
  table, a = SlotTable(4, VOCAB), _req("a")
  slot = table.slot_for(a, 0, 3, {"a"})
  assert [(s, r.request_id, start) for s, r, start in table.pending] == [(slot, "a", 0)]
  table.take_writes()
  assert table.slot_for(a, 3, 4, {"a"}) == slot and table.pending == []  # continues where it ended
  table.advance("a", 7)  # a burst ran 7 more steps than its batch said
  assert table.slot_for(a, 11, 12, {"a"}) == slot and table.pending == []
  assert table.slot_for(a, 5, 6, {"a"}) == slot  # recomputed from 5 after a preemption: rewritten
  assert [start for _, _, start in table.pending] == [5]


def test_a_full_table_reclaims_the_slot_of_a_request_outside_the_batch():
  table = SlotTable(2, VOCAB)
  s_a, s_b = table.slot_for(_req("a"), 0, 3, {"a", "b"}), table.slot_for(_req("b"), 0, 3, {"a", "b"})
  assert {s_a, s_b} == {0, 1}
  assert table.slot_for(_req("c"), 0, 3, {"b", "c"}) == s_a  # "a" was preempted: its slot goes to "c"
  # "a" comes back through the restart path: a slot and a fresh row.
  table.release("b")
  assert table.slot_for(_req("a"), 0, 5, {"a"}) == s_b
  assert [r.request_id for _, r, _ in table.pending][-1] == "a"


def test_writes_go_in_calls_of_eight_rows_with_unused_rows_past_the_table():
  table = SlotTable(16, VOCAB)
  reqs = [_req(f"r{i}") for i in range(SLOT_WRITE_ROWS + 1)]
  slots = [table.slot_for(r, 0, 3, {r.request_id for r in reqs}) for r in reqs]
  calls = table.take_writes()
  assert len(calls) == 2 and table.pending == [] and table.take_writes() == []
  assert list(calls[0][0]) == slots[:SLOT_WRITE_ROWS]
  assert list(calls[1][0]) == [slots[-1]] + [16 + 1] * (SLOT_WRITE_ROWS - 1)
  assert len(table.take_writes(force=True)) == 1  # start-up: one call that writes nothing
  assert (table.take_writes(force=True)[0][0] == 17).all()


def test_a_row_holds_the_prompt_mask_output_counts_bias_and_min_tokens_stops():
  table = SlotTable(4, VOCAB)
  req = _req("a", prompt=(3, 4, 4), logit_bias={7: 1.5}, min_tokens=5, stop_token_ids=[9])
  req.all_token_ids += [8, 8, 11]  # three output tokens
  prompt_V, counts_V, ids_J, vals_J, stop_J = table.row(req, start=5)  # the tokens before position 5
  assert np.flatnonzero(prompt_V).tolist() == [3, 4]
  assert counts_V[8] == 2 and counts_V.sum() == 2  # output tokens before 5: the two 8s, not the 11
  assert ids_J.shape == (BIAS_TABLE_SIZE,)
  assert ids_J[:3].tolist() == [7, 2, 9] and vals_J[0] == 1.5 and np.isneginf(vals_J[1:3]).all()
  assert stop_J[:3].tolist() == [False, True, True] and not stop_J[3:].any()

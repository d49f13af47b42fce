"""Which sampler slot each tracked request holds, and the rows written into a slot when it is (re)filled.

The sampler's per-request state (the prompt's token mask, the output's token counts, the logit-bias and
min-tokens table) lives on the device in `sampler.SlotState`, one row per slot, and the step updates
it as tokens are sampled. This host-side table assigns the slots and builds, in numpy, the rows to
write into them: a request's row is written when it first runs and again when it restarts (its step
starts somewhere other than where its last step ended: preempted and recomputed). Writes wait in
`pending` until the runner takes them, `SLOT_WRITE_ROWS` rows per device call.
"""

import numpy as np

from jserve.engine.request import BIAS_TABLE_SIZE, Request

SLOT_WRITE_ROWS = 8  # slot rows written per call when requests with penalties or biases arrive


class SlotTable:
  """Slots 0 .. num_slots - 1 for the requests the sampler tracks; a slot index of `num_slots + 1` in a
  write is past the table, and the device's scatter drops it."""

  def __init__(self, num_slots: int, vocab_size: int):
    self.num_slots = num_slots
    self.vocab_size = vocab_size
    self._slot_of: dict[str, int] = {}
    self._next_start: dict[str, int] = {}  # where a tracked request's next step starts; else it restarted
    self._free = list(range(num_slots))
    self.pending: list[tuple[int, Request, int]] = []  # (slot, request, start) rows not yet written

  def release(self, request_id: str):
    """Forgets a finished or aborted request's slot."""
    self._next_start.pop(request_id, None)
    slot = self._slot_of.pop(request_id, None)
    if slot is not None:
      self._free.append(slot)

  def slot_for(self, req: Request, start: int, end: int, batch_ids: set) -> int:
    """The slot of `req`'s step over tokens [start, end): its row is (re)written from the tokens before
    `start` when it is new or restarted. With every slot taken, one of a request outside `batch_ids` (a
    preempted one: it comes back through the restart path) is reclaimed."""
    rid = req.request_id
    slot = self._slot_of.get(rid)
    restarted = slot is None or self._next_start.get(rid) != start
    if slot is None:
      if not self._free:
        victim = next(r for r in self._slot_of if r not in batch_ids)
        self._next_start.pop(victim, None)
        self._free.append(self._slot_of.pop(victim))
      slot = self._free.pop()
      self._slot_of[rid] = slot
    if restarted:
      self.pending.append((slot, req, start))
    self._next_start[rid] = end
    return slot

  def advance(self, request_id: str, tokens: int):
    """A decode burst ran `tokens` more steps of the request than its batch said: its next step starts that
    much later (a request the table does not track is left alone)."""
    if request_id in self._next_start:
      self._next_start[request_id] += tokens

  def row(self, req: Request, start: int):
    """A slot's row from `req`'s tokens before `start`: (prompt mask [V] uint8, output counts [V] int32,
    bias ids, bias values, stop flags), the last three `BIAS_TABLE_SIZE` long: the logit bias, then
    while min_tokens holds, the stop tokens at -inf."""
    vocab = self.vocab_size
    p = req.params
    prompt_V = np.zeros(vocab, np.uint8)
    prompt_V[np.asarray(req.all_token_ids[:min(start, req.num_prompt_tokens)], np.int64)] = 1
    counts_V = np.bincount(np.asarray(req.all_token_ids[req.num_prompt_tokens:start], np.int64),
                           minlength=vocab).astype(np.int32)
    ids_J = np.zeros(BIAS_TABLE_SIZE, np.int32)
    vals_J = np.zeros(BIAS_TABLE_SIZE, np.float32)
    stop_J = np.zeros(BIAS_TABLE_SIZE, np.bool_)
    entries = list((p.logit_bias or {}).items())
    bias_n = len(entries)
    if p.min_tokens > 0:
      stops = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(req.eos_token_ids))
      entries += [(t, float("-inf")) for t in sorted(stops)]
    entries = entries[:BIAS_TABLE_SIZE]
    ids_J[:len(entries)] = [t for t, _ in entries]
    vals_J[:len(entries)] = [v for _, v in entries]
    stop_J[bias_n:len(entries)] = True
    return prompt_V, counts_V, ids_J, vals_J, stop_J

  def write_template(self) -> tuple:
    """One write call's arrays, zero: (slots [R], prompt [R, V], counts [R, V], bias ids, values, stops [R, J])."""
    vocab, rows = self.vocab_size, SLOT_WRITE_ROWS
    return (np.zeros(rows, np.int32), np.zeros((rows, vocab), np.uint8), np.zeros((rows, vocab), np.int32),
            np.zeros((rows, BIAS_TABLE_SIZE), np.int32), np.zeros((rows, BIAS_TABLE_SIZE), np.float32),
            np.zeros((rows, BIAS_TABLE_SIZE), np.bool_))

  def take_writes(self, force: bool = False) -> list[tuple]:
    """The pending rows as write calls of `SLOT_WRITE_ROWS` rows each (unused rows aimed past the table);
    none when nothing is pending, unless `force` (one call of nothing: compiles the write at start-up)."""
    if not self.pending and not force:
      return []
    writes, self.pending = self.pending, []
    calls = []
    for i in range(0, max(len(writes), 1), SLOT_WRITE_ROWS):
      args = self.write_template()
      args[0][:] = self.num_slots + 1
      for j, (slot, req, start) in enumerate(writes[i:i + SLOT_WRITE_ROWS]):
        args[0][j] = slot
        for a, r in zip(args[1:], self.row(req, start)):
          a[j] = r
      calls.append(args)
    return calls

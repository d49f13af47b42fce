"""Overlapped steps (step N+1 queued before step N's tokens are read) change nothing but timing."""

import numpy as np
import pytest

from jserve import LLM, SamplingParams
from jserve.engine.request import PLACEHOLDER

COMMON = dict(dtype="float32", max_model_len=256, compilation_cache_dir=None, max_num_seqs=8,
              max_num_batched_tokens=64)


def _workload(tokenizer):
  """Prompts and per-request parameters that touch every path of the step's bookkeeping."""
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 1000, size=int(n)).tolist() for n in rng.integers(1, 120, 20)]
  stop_text = tokenizer.decode(prompts[0][:2])
  params = [
      SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
      SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
      SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True),
      SamplingParams(max_tokens=10, temperature=0.7, seed=8, repetition_penalty=1.3, frequency_penalty=0.5,
                     logit_bias={5: 3.0}, min_tokens=4),
      SamplingParams(max_tokens=9, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True),
      SamplingParams(max_tokens=8, temperature=1.0, seed=9, n=3, ignore_eos=True),
      SamplingParams(max_tokens=16, temperature=1.0, seed=10, stop=[stop_text, "e"]),
      SamplingParams(max_tokens=16, temperature=1.0, seed=11, stop_token_ids=[int(t) for t in range(20, 84)]),
  ]
  return prompts, [params[i % len(params)] for i in range(len(prompts))]


def _summary(outs):
  """Everything but the log-probabilities' values, which other sequences in the batch may move in
  the last bits (their ids are compared)."""
  return [(o.request_id, [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                           None if c.logprobs is None else [sorted(d) for d in c.logprobs]) for c in o.outputs],
           None if o.prompt_logprobs is None else [None if d is None else sorted(d) for d in o.prompt_logprobs])
          for o in outs]


def _logprob_values(outs):
  values = []
  for o in outs:
    for c in o.outputs:
      values += [v for d in c.logprobs or () for _, v in sorted(d.items())]
    values += [v for d in o.prompt_logprobs or () if d for _, v in sorted(d.items())]
  return np.asarray(values)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
  # A pool of 24 pages of 16 tokens: 8 sequences of up to 160 tokens do not all fit, so requests
  # are preempted while a step is in flight.
  overlapped = LLM(tiny_model_dir, num_pages=24, overlap_steps=True, **COMMON)
  serial = LLM(tiny_model_dir, num_pages=24, overlap_steps=False, **COMMON)
  return overlapped, serial


def test_overlapped_steps_give_the_outputs_of_serial_steps(engines):
  overlapped, serial = engines
  prompts, params = _workload(serial.tokenizer)
  calls = []
  runner = overlapped.engine.runner
  execute, fetch = runner.execute, runner.fetch
  runner.execute = lambda *a: calls.append("execute") or execute(*a)
  runner.fetch = lambda *a: calls.append("fetch") or fetch(*a)
  try:
    got = overlapped.generate(prompts, params, use_tqdm=False)
  finally:
    del runner.execute, runner.fetch
  want = serial.generate(prompts, params, use_tqdm=False)
  assert _summary(got) == _summary(want)
  assert len(_logprob_values(got)) > 20
  np.testing.assert_allclose(_logprob_values(got), _logprob_values(want), rtol=1e-5)
  assert overlapped.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemptions"
  # Overlap happened: when the host read a step's tokens, the step after it was mostly queued already.
  ahead, executed, fetched = 0, 0, 0
  for call in calls:
    if call == "execute":
      executed += 1
    else:
      ahead += executed - fetched >= 2
      fetched += 1
  assert ahead >= fetched // 2, calls[:40]
  finish_reasons = {c.finish_reason for o in got for c in o.outputs}
  assert finish_reasons == {"stop", "length"}
  for llm in engines:
    kv = llm.engine.kv
    kv.check_invariants()
    assert not kv.page_tables and kv.num_free_pages == kv.num_usable_pages


def test_abort_while_a_step_is_in_flight_frees_everything(engines):
  overlapped, _ = engines
  engine = overlapped.engine
  rng = np.random.default_rng(5)
  ids = [engine.add_request(None, rng.integers(3, 1000, size=30).tolist(),
                            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, n=1 + i % 2))
         for i in range(6)]
  for _ in range(6):
    engine.step()
  assert engine._in_flight is not None
  out = engine.abort(ids[0])
  assert out.finished and out.outputs[0].finish_reason == "abort"
  assert PLACEHOLDER not in out.outputs[0].token_ids
  assert 0 < len(out.outputs[0].token_ids) < 40
  finals = {}
  while engine.has_unfinished():
    for o in engine.step():
      if o.finished:
        finals[o.request_id] = o
  assert set(finals) == set(ids[1:])
  assert all(len(c.token_ids) == 40 for o in finals.values() for c in o.outputs)
  engine.kv.check_invariants()
  assert not engine.kv.page_tables and engine.kv.num_free_pages == engine.kv.num_usable_pages
  assert not engine.requests and engine._in_flight is None


def test_several_decode_steps_per_call_give_the_outputs_of_single_steps(engines, tiny_model_dir):
  """num_decode_steps=4: decode-only batches run 4 steps per device call (tokens fed back on the device,
  pages reserved ahead); stop tokens and strings inside a burst drop the tokens after them."""
  _, serial = engines
  burst = LLM(tiny_model_dir, num_pages=48, num_decode_steps=4, **COMMON)
  rng = np.random.default_rng(11)
  prompts = [rng.integers(3, 1000, size=int(n)).tolist() for n in rng.integers(2, 40, 10)]
  options = [
      SamplingParams(max_tokens=37, temperature=0, ignore_eos=True),
      SamplingParams(max_tokens=30, temperature=0.8, seed=2, repetition_penalty=1.2, presence_penalty=0.3,
                     ignore_eos=True),
      SamplingParams(max_tokens=40, temperature=1.0, seed=3, stop_token_ids=[int(t) for t in range(20, 84)]),
      SamplingParams(max_tokens=40, temperature=1.0, seed=4, stop=["e"], n=2),
  ]
  params = [options[i % len(options)] for i in range(len(prompts))]
  bursts = []
  execute_burst = burst.engine.runner.execute_burst
  burst.engine.runner.execute_burst = lambda *a: bursts.append(1) or execute_burst(*a)
  try:
    got = burst.generate(prompts, params, use_tqdm=False)
  finally:
    del burst.engine.runner.execute_burst
  want = serial.generate(prompts, params, use_tqdm=False)
  assert [o[1:] for o in _summary(got)] == [o[1:] for o in _summary(want)]  # (the ids count per engine)
  assert len(bursts) >= 5
  assert burst.engine.num_steps > 4 * len(bursts) - 1
  kv = burst.engine.kv
  kv.check_invariants()
  assert not kv.page_tables and kv.num_free_pages == kv.num_usable_pages

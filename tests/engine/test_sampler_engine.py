"""Sampling through the whole engine on a tiny random checkpoint written by transformers."""

import dataclasses
import json
import re

import jsonschema
import numpy as np
import pytest
import torch
import transformers

from jserve import LLM, SamplingParams
from jserve.errors import InvalidRequestError

PROMPT = "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
  # 64 sequences fit one step (the batch-invariance test needs 64 rows); buckets 16, 32, 64.
  return LLM(tiny_model_dir, dtype="float32", max_model_len=256, max_num_seqs=64, max_num_batched_tokens=64,
             kv_cache_gib=0.02, compilation_cache_dir=None)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def hf_logits(hf_model, ids):
  with torch.no_grad():
    return hf_model(torch.tensor([ids])).logits[0].double().numpy()


def mixed_batch(target):
  """64 prompts: `target` at row 31 among 63 others with every sampling parameter in some mix."""
  rng = np.random.default_rng(0)
  others = []
  for i in range(63):
    kind = i % 7
    others.append(SamplingParams(
        max_tokens=int(rng.integers(4, 30)), ignore_eos=True, seed=int(rng.integers(0, 2**31)) if i % 2 else None,
        temperature=[0.0, 0.5, 1.0, 1.5, 0.8, 1.0, 0.7][kind], top_k=[-1, 5, -1, 50, -1, 3, -1][kind],
        top_p=[1.0, 1.0, 0.5, 0.9, 1.0, 1.0, 0.8][kind], min_p=[0, 0, 0, 0, 0.1, 0, 0][kind],
        repetition_penalty=[1.0, 1.2, 1.0, 1.0, 1.0, 1.0, 1.1][kind], frequency_penalty=0.5 * (kind == 2),
        logit_bias={7: 3.0} if kind == 5 else None, logprobs=3 if kind == 6 else None))
  prompts = [PROMPT[:int(n)] for n in rng.integers(3, len(PROMPT), 63)]
  return prompts[:31] + [PROMPT] + prompts[31:], others[:31] + [target] + others[31:]


TARGET = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


def test_seeded_request_gives_same_tokens_alone_and_in_a_batch_of_64(llm):
  alone = llm.generate([PROMPT], TARGET, use_tqdm=False)[0].outputs[0].token_ids
  outs = llm.generate(*mixed_batch(TARGET), use_tqdm=False)
  assert outs[31].outputs[0].token_ids == alone
  assert llm.engine.runner.num_compiled() == 3  # no parameter value compiled anything new


def test_host_chosen_sampler_paths_give_the_device_switchs_tokens(llm, tiny_model_dir):
  # sampler_paths="host" (the GPU default): a plain and a staged program per bucket, the host picking
  # one per step. Same tokens and logprobs as the one-program switch, for a plain-only batch and for
  # the mixed batch, and nothing compiled after start-up.
  host = LLM(tiny_model_dir, dtype="float32", max_model_len=256, max_num_seqs=64, max_num_batched_tokens=64,
             kv_cache_gib=0.02, compilation_cache_dir=None, sampler_paths="host")
  assert host.engine.runner.num_compiled() == 6
  plain = [SamplingParams(max_tokens=10, temperature=t, seed=i, ignore_eos=True)
           for i, t in enumerate([0.0, 0.7, 1.0, 1.3] * 4)]
  prompts = [PROMPT[:20 + 3 * i] for i in range(16)]
  prompts_64, params_64 = mixed_batch(TARGET)
  # Every row seeded: an unseeded request's seed comes from its engine's generator.
  params_64 = [dataclasses.replace(p, seed=1000 + i if p.seed is None else p.seed) for i, p in enumerate(params_64)]
  for batch in ((prompts, plain), (prompts_64, params_64)):
    want = llm.generate(*batch, use_tqdm=False)
    got = host.generate(*batch, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):  # a different program: the same values up to float rounding
      assert (g.outputs[0].logprobs is None) == (w.outputs[0].logprobs is None)
      for step_g, step_w in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or []):
        assert step_g.keys() == step_w.keys()
        np.testing.assert_allclose(list(step_g.values()), list(step_w.values()), rtol=1e-5, atol=1e-5)
  assert host.engine.runner.num_compiled() == 6


def test_n_completions_are_the_seeds_seed_plus_index_sharing_prefix_pages(llm):
  params = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
  kv = llm.engine.kv
  hits_before = kv.hit_tokens
  out = llm.generate([PROMPT + "# n"], SamplingParams(n=3, seed=7, **params), use_tqdm=False)[0]
  # Children 1 and 2 waited for child 0's prompt pages: each reused every full page of the prompt.
  full_pages = (len(out.prompt_token_ids) - 1) // kv.page_size
  assert kv.hit_tokens - hits_before >= 2 * full_pages * kv.page_size > 0
  assert [c.index for c in out.outputs] == [0, 1, 2]
  for i, c in enumerate(out.outputs):
    single = llm.generate([PROMPT + "# n"], SamplingParams(seed=7 + i, **params), use_tqdm=False)[0]
    assert c.token_ids == single.outputs[0].token_ids
  assert len({tuple(c.token_ids) for c in out.outputs}) == 3


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                                               "minItems": 1, "maxItems": 4},
                                      "ok": {"type": "boolean"}},
     "required": ["tags", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                                       "maximum": 9}},
                                "required": ["x"], "additionalProperties": False},
     "minItems": 1, "maxItems": 3},
]


def test_json_schema_generations_all_parse_and_validate(llm):
  schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(50)]
  params = [SamplingParams(json_schema=s, max_tokens=100, temperature=1.0, seed=i) for i, s in enumerate(schemas)]
  outs = llm.generate(["{"] * 25 + ["Data:"] * 25, params, use_tqdm=False)
  for schema, out in zip(schemas, outs):
    c = out.outputs[0]
    assert c.finish_reason == "stop", c.text
    jsonschema.validate(json.loads(c.text), schema)


def test_regex_generations_all_match(llm):
  patterns = [r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)!?"]
  params = [SamplingParams(regex=patterns[i % 3], max_tokens=40, temperature=1.0, seed=i) for i in range(24)]
  outs = llm.generate([PROMPT] * 24, params, use_tqdm=False)
  for i, out in enumerate(outs):
    assert re.fullmatch(patterns[i % 3], out.outputs[0].text), out.outputs[0].text


def test_stop_string_across_token_boundary_ends_the_text_where_it_starts(llm):
  base = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
  ref = llm.generate([PROMPT], base, use_tqdm=False)[0].outputs[0]
  tok = llm.tokenizer
  pieces = [tok.decode(ref.token_ids[:i + 1]) for i in range(len(ref.token_ids))]
  # A stop string made of the end of one token's text and the start of the next one's.
  i = next(i for i in range(5, len(pieces) - 1)
           if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
  stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]):len(pieces[i]) + 2]
  where = ref.text.index(stop)
  out = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]),
                     use_tqdm=False)[0].outputs[0]
  assert (out.text, out.finish_reason, out.stop_reason) == (ref.text[:where], "stop", stop)
  out = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop],
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
  assert out.text == ref.text[:where + len(stop)]
  # Streamed, the deltas hold back a possible stop-string start and add up to the same text.
  engine = llm.engine
  rid = engine.add_request(None, PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]),
                           stream=True)
  text = ""
  while engine.has_unfinished():
    text += "".join(o.outputs[0].text for o in engine.step() if o.request_id == rid)
  assert text == ref.text[:where]


def test_logprobs_equal_transformers_log_softmax(llm, hf_model):
  out = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True, logprobs=5,
                                              prompt_logprobs=4), use_tqdm=False)[0]
  c = out.outputs[0]
  ids = out.prompt_token_ids + c.token_ids
  logits = hf_logits(hf_model, ids)
  ref = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  num_prompt = len(out.prompt_token_ids)
  assert len(c.logprobs) == len(c.token_ids)
  for j, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
    row = ref[num_prompt - 1 + j]
    assert set(np.argsort(-row)[:5]) <= set(entry) and token in entry
    for t, lp in entry.items():
      assert abs(lp - row[t]) < 1e-4
  assert abs(c.cumulative_logprob - sum(e[t] for t, e in zip(c.token_ids, c.logprobs))) < 1e-4
  assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == num_prompt
  for p in range(1, num_prompt):
    entry, row = out.prompt_logprobs[p], ref[p - 1]
    assert ids[p] in entry and set(np.argsort(-row)[:4]) <= set(entry)
    for t, lp in entry.items():
      assert abs(lp - row[t]) < 1e-4


def test_penalized_greedy_tokens_follow_the_numpy_definition(llm, hf_model):
  rep, freq, pres = 1.3, 0.4, 0.3
  prompt = PROMPT * 2  # longer than a page: the second run takes its prefix from the cache
  for _ in range(2):
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=rep,
                                                frequency_penalty=freq, presence_penalty=pres), use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    for token in out.outputs[0].token_ids:
      x = hf_logits(hf_model, ids)[-1]
      counts = np.bincount(ids[len(out.prompt_token_ids):], minlength=len(x))
      seen = np.zeros(len(x), bool)
      seen[ids] = True
      x = np.where(seen, np.where(x > 0, x / rep, x * rep), x) - freq * counts - pres * (counts > 0)
      assert token == int(np.argmax(x))
      ids.append(token)
  assert out.num_cached_tokens > 0


def test_min_tokens_holds_back_eos_then_lets_it_end(llm):
  eos = min(llm.engine.eos_token_ids)
  out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, min_tokens=5, logit_bias={eos: 100}),
                     use_tqdm=False)[0].outputs[0]
  assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:-1]
  assert out.finish_reason == "stop"


@pytest.mark.parametrize("params, message", [
    (SamplingParams(logit_bias={5000: 1.0}), r"logit_bias token id 5000 is outside the vocabulary \[0, 1024\)"),
    (SamplingParams(stop_token_ids=[4096]), r"stop_token_ids token id 4096 is outside the vocabulary"),
])
def test_engine_refuses_token_ids_outside_the_vocabulary(llm, params, message):
  with pytest.raises(InvalidRequestError, match=message):
    llm.generate([PROMPT], params, use_tqdm=False)
  assert not llm.engine.has_unfinished()


def test_host_paths_burst_plain_batches_and_compile_staged_on_first_use(llm, tiny_model_dir):
  # precompile_staged_sampler=False: only the plain programs at start-up (3 step buckets, bursts of
  # 4 decode steps for the 16- and 32-token buckets); plain batches burst; a top-p request compiles
  # its staged step once, never bursts, and both give the one-program engine's tokens.
  host = LLM(tiny_model_dir, dtype="float32", max_model_len=256, max_num_seqs=32, max_num_batched_tokens=64,
             kv_cache_gib=0.02, compilation_cache_dir=None, sampler_paths="host", num_decode_steps=4,
             precompile_staged_sampler=False)
  runner = host.engine.runner
  started = runner.num_compiled()
  assert started == 3 + len(runner.burst_buckets)
  bursts = []
  execute_burst = runner.execute_burst
  runner.execute_burst = lambda *a: bursts.append(1) or execute_burst(*a)
  prompts = [PROMPT[:20 + 3 * i] for i in range(8)]
  plain = [SamplingParams(max_tokens=14, temperature=t, seed=i, ignore_eos=True)
           for i, t in enumerate([0.0, 0.7, 1.0, 1.3] * 2)]
  want = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
  assert [o.outputs[0].token_ids for o in host.generate(prompts, plain, use_tqdm=False)] == want
  assert bursts and runner.num_compiled() == started
  del bursts[:]
  top_p = [SamplingParams(max_tokens=14, temperature=1.0, top_p=0.8, seed=i, ignore_eos=True) for i in range(8)]
  want = [o.outputs[0].token_ids for o in llm.generate(prompts, top_p, use_tqdm=False)]
  assert [o.outputs[0].token_ids for o in host.generate(prompts, top_p, use_tqdm=False)] == want
  assert not bursts and runner.num_compiled() > started

"""An fp8 KV cache (kv_cache_dtype="fp8"): the pool holds 8-bit floats, fits more tokens, and the model's
prompt log-probabilities stay close to transformers' float32 ones."""

import numpy as np
import pytest
import torch
import transformers

from jserve import LLM, SamplingParams
from jserve.engine.engine import EngineConfig
from jserve.errors import ConfigError
from tests.hf_models import write_hf_model

PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\nimport sys\n\nclass Config:\n" * 4]


def _prompt_logprob_errors(llm, hf) -> np.ndarray:
  """|jserve - transformers| of each prompt token's log-probability given the tokens before it."""
  outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
  errs = []
  for o in outs:
    ids = o.prompt_token_ids
    with torch.no_grad():
      ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()
    errs += [abs(o.prompt_logprobs[i][ids[i]] - ref[i - 1, ids[i]]) for i in range(1, len(ids))]
  return np.array(errs)


@pytest.mark.parametrize("kv_cache_dtype,pool_dtype", [("fp8", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")])
def test_fp8_pool_holds_four_times_the_float32_tokens_and_stays_near_transformers(
    tmp_path, bpe_tokenizer, kv_cache_dtype, pool_dtype):
  model_dir = write_hf_model(str(tmp_path), bpe_tokenizer, "llama", seed=3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  kw = dict(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_gib=0.01,
            compilation_cache_dir=None)
  full = LLM(model_dir, **kw)
  fp8 = LLM(model_dir, kv_cache_dtype=kv_cache_dtype, **kw)
  assert str(fp8.engine.runner.kv_caches[0].dtype) == pool_dtype
  # One byte per element instead of four, in the same memory (page counts round down).
  assert fp8.engine.runner.rc.num_pages >= 4 * full.engine.runner.rc.num_pages - 4
  exact = _prompt_logprob_errors(full, hf)
  assert exact.max() < 1e-3  # the float32 pool: the same numbers as transformers
  errs = _prompt_logprob_errors(fp8, hf)
  # 3 (e4m3) or 2 (e5m2) mantissa bits on keys and values: close to, but not exactly, the float32 model.
  assert 1e-3 < errs.mean() < 0.05 and errs.max() < 0.25, (errs.mean(), errs.max())


def test_unknown_kv_cache_dtype_is_a_config_error():
  with pytest.raises(ConfigError, match=r"kv_cache_dtype='int4': use one of auto, bfloat16, float16, fp8"):
    EngineConfig(kv_cache_dtype="int4")

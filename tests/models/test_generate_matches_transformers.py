"""Greedy generation through the whole engine equals transformers' `generate`, token for token."""

import pytest
import torch
import transformers

from jserve import LLM, SamplingParams
from tests.hf_models import write_hf_model

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n", "#",
           "    return [x for x in range(10) if x % 2 == 0]\n" * 3]


@pytest.mark.parametrize("variant", ["llama", "qwen3", "qwen2", "mistral"])
def test_greedy_32_tokens_equal_transformers_for_batched_prompts(tmp_path, bpe_tokenizer, variant):
  model_dir = write_hf_model(str(tmp_path), bpe_tokenizer, variant, seed=3)
  # A small token budget so the longer prompts are prefilled in chunks beside other decodes.
  llm = LLM(model_dir, dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
            kv_cache_gib=0.01, compilation_cache_dir=None)
  outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  for out in outs:
    ids = out.prompt_token_ids
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    assert out.outputs[0].token_ids == ref.tolist()
    assert out.outputs[0].finish_reason == "length"

"""jserve's Llama-family forward pass against Hugging Face transformers on random checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jserve.config import load_model_config
from jserve.models.llama import StepInputs, compute_logits, forward, forward_dense
from jserve.weights import load_params
from tests.hf_models import VARIANTS, write_hf_model

PAGE_SIZE = 8


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_dir(request, tmp_path_factory, bpe_tokenizer):
  out = tmp_path_factory.mktemp(request.param)
  return write_hf_model(str(out), bpe_tokenizer, request.param, seed=len(request.param))


def _hf_logits(model_dir, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def _paged_logits(params, cfg, ids, chunks):
  """Runs the serving forward pass over `ids` in prompt chunks of the given sizes, all rows' logits."""
  num_pages = len(ids) // PAGE_SIZE + 2
  kv = [jnp.zeros((num_pages, PAGE_SIZE, 2 * cfg.num_kv_heads, cfg.head_dim), jnp.float32)
        for _ in range(cfg.num_layers)]
  pages = np.random.default_rng(0).permutation(np.arange(1, num_pages)).astype(np.int32)
  out, start = [], 0
  for n in chunks:
    pos = np.arange(start, start + n, dtype=np.int32)
    inputs = StepInputs(
        token_ids_T=np.asarray(ids[start:start + n], np.int32), positions_T=pos,
        slots_T=pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE,
        cu_q_lens_E=np.array([0, n], np.int32), kv_lens_B=np.array([start + n], np.int32),
        page_indices_BP=pages[None, :], num_seqs=np.array([1], np.int32),
        logits_indices_B=np.arange(n, dtype=np.int32))
    x, kv = forward(params, kv, inputs, cfg)
    out.append(np.asarray(compute_logits(params, x, cfg)))
    start += n
  return np.concatenate(out)


@pytest.mark.parametrize("length", [1, 7, 40, 300])
def test_logits_match_transformers_in_float32(variant_dir, bpe_tokenizer, length):
  ids = bpe_tokenizer.encode("import collections\nx = [1, 2]\n" * 60).ids[:length]
  cfg = load_model_config(variant_dir)
  params = load_params(variant_dir, cfg, "float32")
  ref = _hf_logits(variant_dir, ids)
  dense = np.asarray(forward_dense(params, jnp.asarray([ids]), cfg))[0]
  chunks = [length] if length < 3 else [length // 3, length - length // 3]
  paged = _paged_logits(params, cfg, ids, chunks)
  scale = np.abs(ref).max()
  assert np.abs(dense - ref).max() <= 1e-4 * scale
  assert np.abs(paged - ref).max() <= 1e-4 * scale


def test_rope_scaling_types_change_logits(tmp_path, bpe_tokenizer):
  """Guards the test above: a wrong rope type must show up as a logits difference."""
  ids = bpe_tokenizer.encode("x = 1\n" * 60).ids[:200]
  d = write_hf_model(str(tmp_path), bpe_tokenizer, "llama")
  cfg = load_model_config(d)
  params = load_params(d, cfg, "float32")
  import dataclasses
  wrong = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, rope_type="default"))
  a = np.asarray(forward_dense(params, jnp.asarray([ids]), cfg))
  b = np.asarray(forward_dense(params, jnp.asarray([ids]), wrong))
  assert np.abs(a - b).max() > 1e-3

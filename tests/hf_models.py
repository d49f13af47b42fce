"""Small random checkpoints written by Hugging Face transformers, the reference for model tests."""

import json
import os

from tools.make_random_checkpoint import BOS, CHAT_TEMPLATE, EOS

# name -> (transformers config class name, config overrides). Covers GQA ratios 1, 2 and 4, tied and
# untied embeddings, attention bias, q/k norm and each supported rope type.
VARIANTS = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 256})),
    "llama_tied_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                           tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                            "factor": 2.0})),
    "mistral": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                      sliding_window=None)),
    "mistral_window": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             sliding_window=24, tie_word_embeddings=True)),
    "qwen2_gqa_tied": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                           tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                  tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=True)),
}


def write_hf_model(out_dir: str, tokenizer, variant: str, seed: int = 0, **overrides) -> str:
  """Builds a random model of `variant` with transformers, saves it with `tokenizer`; returns out_dir."""
  import torch
  import transformers
  cls_name, kwargs = VARIANTS[variant]
  bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
  config = getattr(transformers, cls_name)(
      vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=4096,
      rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=bos, eos_token_id=eos,
      **{**kwargs, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.save_pretrained(out_dir, safe_serialization=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}, f)
  with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
    f.write(CHAT_TEMPLATE)
  return out_dir

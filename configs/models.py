"""Architecture presets with the shapes of published models (from their config.json files).

Only shapes: no weights. `tools/make_random_checkpoint.py` writes a checkpoint
with random weights for any of them, so benchmarks run real shapes offline.
"""

from jserve.config import ModelConfig, RopeConfig
from jserve.errors import ConfigError

_LLAMA3_ROPE = RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA31_ROPE = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA3_EOS = (128001, 128008, 128009)

MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope=_LLAMA3_ROPE,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=_LLAMA3_EOS),
    "llama-3.1-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=_LLAMA31_ROPE,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "llama-3.1-70b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=_LLAMA31_ROPE,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "llama-3.1-405b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=16384, intermediate_size=53248,
        num_layers=126, num_heads=128, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=_LLAMA31_ROPE,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "qwen2.5-7b": ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151645, 151643)),
    "qwen3-8b": ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=40960, qk_norm=True,
        bos_token_id=151643, eos_token_ids=(151645, 151643)),
    "mixtral-8x7b-attn": ModelConfig(  # attention and dense shapes only; MoE is not implemented
        architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
    # Tiny models for tests and the CPU demo.
    "tiny-llama": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope=_LLAMA3_ROPE,
        max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
    "tiny-qwen3": ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32, max_position_embeddings=2048,
        qk_norm=True, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}


def get_model_preset(name: str) -> ModelConfig:
  if name not in MODEL_PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
  return MODEL_PRESETS[name]

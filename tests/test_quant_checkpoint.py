"""Pre-quantized fp8 checkpoints (a `quantization_config` in config.json): read into `Fp8Weight`s exactly as
written, served as the model of their dequantized weights, and refused with a named reason when jserve
cannot read them right. The checkpoints are written by tests/fp8_checkpoints.py from the default model;
tensor parallelism is checked by tests/quant_tp_worker.py (run from tests/test_quant.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jserve import LLM
from jserve.config import load_model_config
from jserve.convert import convert_to_orbax
from jserve.engine.engine import DEFAULT_MODEL_DIR
from jserve.engine.placement import load_engine_params
from jserve.errors import CheckpointError
from jserve.models.llama import forward_dense, param_specs
from jserve.models.quant import CONTRACTED_AXES, Fp8Weight, dequantize
from jserve.tokenizer import Tokenizer
from jserve.weights import load_params
from tests.fp8_checkpoints import FORMATS, write_fp8_checkpoint
from tests.quant_tp_worker import ENGINE, GREEDY, PROMPTS
from tests.sharding.subprocess_util import ROOT

TEXT = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)"
        "\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n")
KEEP = ("model.layers.0.mlp.down_proj",)  # a projection the quantizer left alone (in its ignore list)


def _tensors(d) -> dict:
  """The checkpoint's tensors as numpy arrays, read through torch (independent of jserve's reader; safetensors'
  numpy reader cannot return float8)."""
  import torch
  from safetensors.torch import load_file
  return {k: (t.view(torch.uint8).numpy().view(jnp.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn
              else t.float().numpy()) for k, t in load_file(os.path.join(d, "model.safetensors")).items()}


def _projections(params):
  return [(i, name, layer[name]) for i, layer in enumerate(params["layers"]) for name in CONTRACTED_AXES]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fp8_weights_load_as_written_in_one_byte(fmt, tmp_path):
  d = write_fp8_checkpoint(DEFAULT_MODEL_DIR, str(tmp_path / "fp8"), fmt, keep=KEEP)
  cfg = load_model_config(d)
  params = load_params(d, cfg, "float32")
  written = _tensors(d)
  specs = param_specs(cfg)
  for i, name, q in _projections(params):
    spec = specs["layers"][i][name]
    if spec.hf_name.removesuffix(".weight") in KEEP:
      assert q.dtype == jnp.float32  # left unquantized: read as a plain weight in --dtype
      continue
    assert isinstance(q, Fp8Weight) and q.w.dtype == jnp.float8_e4m3fn and q.scale.dtype == jnp.float32
    assert q.scale.shape == spec.shape[CONTRACTED_AXES[name]:]  # per tensor too: one scale per output channel
    w8, scale = written[spec.hf_name], written[spec.hf_name + "_scale"]
    assert w8.dtype == jnp.float8_e4m3fn
    want = spec.from_hf(w8.astype(np.float32) * scale)  # torch [out, in] -> jserve's layout
    np.testing.assert_array_equal(np.asarray(dequantize(q)), want)
    np.testing.assert_array_equal(np.asarray(q.w), spec.from_hf(w8))  # the stored bytes, not re-rounded
  plain = load_params(DEFAULT_MODEL_DIR, cfg, "float32")
  np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(plain["embed"]))


@pytest.fixture(scope="module", params=["compressed-tensors channel", "fp8 tensor"])
def logits(request, tmp_path_factory):
  """Float32 logits over `TEXT` of an fp8 checkpoint, of the float32 checkpoint of its dequantized
  weights, and transformers' of the latter."""
  import torch
  import transformers
  root = tmp_path_factory.mktemp("logits")
  d = write_fp8_checkpoint(DEFAULT_MODEL_DIR, str(root / "fp8"), request.param, dequantized=str(root / "deq"))
  cfg = load_model_config(d)
  ids = Tokenizer(d).encode(TEXT)
  run = jax.jit(lambda p: forward_dense(p, jnp.asarray([ids]), cfg)[0])
  out = {"fp8": run(load_params(d, cfg, "float32")), "dequantized": run(load_params(str(root / "deq"), cfg,
                                                                                     "float32"))}
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "deq"), dtype=torch.float32)
  with torch.no_grad():
    out["transformers"] = hf(torch.tensor([ids])).logits[0].numpy()
  return {k: np.asarray(v) for k, v in out.items()}


def test_fp8_checkpoint_is_the_model_of_its_dequantized_weights(logits):
  fp8, deq, hf = logits["fp8"], logits["dequantized"], logits["transformers"]
  assert len(deq) > 50
  assert np.abs(fp8 - deq).max() <= 1e-5 * np.abs(deq).max()  # the scale multiplies after the matmul: rounding
  # The reference itself is sound: transformers reads the dequantized checkpoint to the same logits (the
  # tolerance of tests/models/test_llama_matches_transformers.py).
  assert np.abs(deq - hf).max() <= 1e-4 * np.abs(hf).max()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("engine")
  fp8 = write_fp8_checkpoint(DEFAULT_MODEL_DIR, str(root / "fp8"), "compressed-tensors channel",
                             dequantized=str(root / "deq"))
  return fp8, str(root / "deq")


def test_engine_serves_an_fp8_checkpoint_as_stored_with_quantization_none(checkpoints):
  fp8_dir, deq_dir = checkpoints
  kw = dict(ENGINE, quantization=None)
  fp8, deq = LLM(fp8_dir, **kw), LLM(deq_dir, **kw)
  assert fp8.engine.quantization == "fp8" and fp8.engine.runner.rc.quantization == "fp8"  # the checkpoint's
  assert deq.engine.quantization is None
  got = fp8.generate(PROMPTS, GREEDY, use_tqdm=False)
  ref = deq.generate(PROMPTS, GREEDY, use_tqdm=False)
  assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
  assert got[0].outputs[0].text.startswith("\n    ")  # still the default model: a function body follows
  # quantization="fp8" agrees with the checkpoint and quantizes nothing again: the same bytes.
  again = LLM(fp8_dir, **ENGINE)
  for (_, _, a), (_, _, b) in zip(_projections(fp8.engine.params), _projections(again.engine.params)):
    assert np.array_equal(np.asarray(a.w).view(np.uint8), np.asarray(b.w).view(np.uint8))
    assert np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
  # Dummy weights are random full-precision ones whatever the checkpoint says (as before it said anything).
  dummy = LLM(fp8_dir, load_format="dummy", **kw)
  assert dummy.engine.quantization is None
  assert not any(isinstance(w, Fp8Weight) for _, _, w in _projections(dummy.engine.params))


def _config_only(tmp_path, quantization_config) -> str:
  """A checkpoint directory of config.json only: a config error must come before any tensor is looked for."""
  d = tmp_path / "ckpt"
  d.mkdir()
  config = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "config.json")))
  json.dump(dict(config, quantization_config=quantization_config), open(d / "config.json", "w"))
  return str(d)


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     r"quant_method 'fp8' with weight_block_size=\[128, 128\] \(a scale per weight block"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
     r"quantization_config.quant_method='awq' is not supported; jserve reads fp8 checkpoints"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, r"quant_method='gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method='bitsandbytes'"),
    (dict(FORMATS["compressed-tensors channel"][0], format="int-quantized"),
     r"compressed-tensors format='int-quantized' is not supported"),
    (dict(FORMATS["compressed-tensors channel"][0], format="pack-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                           "symmetric": True}}}),
     r"compressed-tensors format='pack-quantized'"),
    (dict(FORMATS["compressed-tensors channel"][0], format="naive-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel",
                                           "symmetric": True}}}),
     r"config_groups.group_0.weights: type='int'; jserve reads fp8 checkpoints"),
    (dict(FORMATS["compressed-tensors channel"][0], config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                           "block_structure": [128, 128], "symmetric": True}}}),
     r"weights: block_structure=\[128, 128\], strategy='block'"),
])
def test_unsupported_quantization_is_refused_before_any_tensor_is_read(qc, message, tmp_path):
  d = _config_only(tmp_path, qc)  # no safetensors at all: the quantization is what gets named
  with pytest.raises(CheckpointError, match=message):
    load_params(d, load_model_config(d), "bfloat16")
  with pytest.raises(CheckpointError, match=message):
    LLM(d)  # the engine refuses it before its tokenizer, mesh or weights


def _fp8_variant(tmp_path, src=DEFAULT_MODEL_DIR, fmt="compressed-tensors channel", **kw) -> str:
  return write_fp8_checkpoint(src, str(tmp_path / "fp8"), fmt, **kw)


def test_an_fp8_lm_head_is_refused_by_name(tiny_model_dir, tmp_path):
  # tiny_model_dir has an LM head of its own (the default model ties it to the embedding).
  d = _fp8_variant(tmp_path, tiny_model_dir, extra=("lm_head.weight",), config_edit={"ignore": []})
  with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight' is quantized \(F8_E4M3, with "
                                            r"lm_head.weight_scale\): jserve keeps the embedding, LM head"):
    load_params(d, load_model_config(d), "bfloat16")
  ok = _fp8_variant(tmp_path / "ok", tiny_model_dir)  # the same with lm_head in `ignore`, as published
  params = load_params(ok, load_model_config(ok), "float32")
  assert params["lm_head"].dtype == jnp.float32 and isinstance(params["layers"][1]["wq"], Fp8Weight)


def test_a_missing_weight_scale_is_named(tmp_path):
  d = _fp8_variant(tmp_path, drop=("model.layers.1.self_attn.k_proj.weight_scale",))
  with pytest.raises(CheckpointError, match=r"lacks tensor 'model.layers.1.self_attn.k_proj.weight_scale', the "
                                            r"scale of the fp8 'model.layers.1.self_attn.k_proj.weight'"):
    load_params(d, load_model_config(d), "bfloat16")


def test_a_block_shaped_scale_is_named(tmp_path):
  d = _fp8_variant(tmp_path)
  tensors = _tensors(d)
  tensors["model.layers.0.mlp.up_proj.weight_scale"] = np.ones((5, 2), np.float32)  # [out / 128, in / 128]
  save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight_scale' has shape \[5, 2\]"):
    load_params(d, load_model_config(d), "bfloat16")


def test_fp8_tensors_without_a_quantization_config_are_refused(tmp_path):
  d = _fp8_variant(tmp_path)
  config = json.load(open(os.path.join(d, "config.json")))
  del config["quantization_config"]
  json.dump(config, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj.weight' is stored as F8_E4M3 but "
                                            r"config.json has no quantization_config"):
    load_params(d, load_model_config(d), "bfloat16")


def test_convert_and_orbax_refuse_a_quantized_checkpoint(tmp_path):
  d = _fp8_variant(tmp_path)
  with pytest.raises(CheckpointError, match=r"is a pre-quantized checkpoint \(compressed-tensors: fp8 e4m3 weights "
                                            r"with a scale per channel\): converting it to orbax is not supported"):
    convert_to_orbax(d, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  os.mkdir(os.path.join(d, "orbax"))  # as if converted, then given a quantization_config by hand
  with pytest.raises(CheckpointError, match="orbax checkpoints of quantized models are not supported"):
    load_engine_params(d, load_model_config(d), "bfloat16", None)


def test_fp8_checkpoints_load_without_torch(tmp_path):
  # torch is a test-only extra: safetensors' numpy reader has no float8, and the loader must not fall back on
  # torch's. A fresh process with torch made unimportable loads an fp8 checkpoint.
  d = _fp8_variant(tmp_path)
  code = ("import sys; sys.modules['torch'] = None\n"
          "from jserve.config import load_model_config; from jserve.weights import load_params\n"
          f"p = load_params({d!r}, load_model_config({d!r}), 'bfloat16')\n"
          "print(p['layers'][0]['wq'].w.dtype)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.stdout.split() == ["float8_e4m3fn"], proc.stderr[-2000:]

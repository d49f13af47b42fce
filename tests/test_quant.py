"""FP8 weight quantization (`quantization="fp8"`): the rounding stays within e4m3's half step per output
channel, the quantized matmul is the matmul of the dequantized weight, and the quantized model and
engine stay close to the unquantized one, on one device and on tensor-parallel meshes."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import LLM
from jserve.config import load_model_config
from jserve.engine.engine import DEFAULT_MODEL_DIR, EngineConfig
from jserve.engine.memory import _weight_bytes_on
from jserve.engine.placement import quantize_engine_params
from jserve.errors import ConfigError
from jserve.models.llama import forward_dense
from jserve.models.quant import (CONTRACTED_AXES, Fp8Weight, Fp8WeightNK, dequantize, fp8_dot, quantize_fp8,
                                 quantize_params)
from jserve.weights import load_params, save_hf_checkpoint
from sharding.costs import Layout, Workload, stage_weight_bytes_per_device
from sharding.planner import get_device, plan
from tests.fp8_checkpoints import write_fp8_checkpoint
from tests.quant_tp_worker import ENGINE, GREEDY, PROMPTS
from tests.sharding.subprocess_util import ROOT, run_worker

TEXT = ('import json\n\n\ndef load_config(path, defaults=None):\n    """Reads a JSON file and fills in the '
        'defaults."""\n    with open(path) as f:\n        data = json.load(f)\n    for key, value in (defaults or '
        '{}).items():\n        data.setdefault(key, value)\n    return data\n\n\nclass Counter:\n    def __init__(self'
        '):\n        self.counts = {}\n\n    def add(self, item):\n        self.counts[item] = self.counts.get(item, '
        '0) + 1\n')


def _channels_of_many_magnitudes(shape, num_contracted, seed=0):
  """A random weight whose output channels span four orders of magnitude, as real projections' do."""
  rng = np.random.default_rng(seed)
  out_shape = shape[num_contracted:]
  magnitude = 10.0 ** rng.uniform(-3, 1, size=out_shape)
  return (rng.standard_normal(shape) * magnitude).astype(np.float32)


def _within_e4m3_rounding(w, deq, scale_out, num_contracted):
  """|w - deq| <= 2^-4 |w| (3 mantissa bits, round to nearest) + 2^-10 scale (half the subnormal step
  below e4m3's smallest normal, 2^-6), with `scale_out` the scale of each output channel."""
  scale = np.broadcast_to(scale_out.reshape((1,) * num_contracted + scale_out.shape), w.shape)
  bound = 2.0**-4 * np.abs(w) + 2.0**-10 * scale
  return np.all(np.abs(w - deq) <= bound * (1 + 1e-6))


@pytest.mark.parametrize("shape,num_contracted", [((64, 4, 16), 1), ((4, 16, 64), 2), ((64, 96), 1)])
def test_round_trip_error_is_within_half_an_e4m3_step_of_each_output_channel(shape, num_contracted):
  w = _channels_of_many_magnitudes(shape, num_contracted)
  q = quantize_fp8(jnp.asarray(w), num_contracted)
  assert q.w.dtype == jnp.float8_e4m3fn and q.w.shape == shape
  assert q.scale.dtype == jnp.float32 and q.scale.shape == shape[num_contracted:]  # the output axes
  amax = np.abs(w).max(axis=tuple(range(num_contracted)))
  np.testing.assert_allclose(np.asarray(q.scale), amax / 448, rtol=1e-6)
  deq = np.asarray(dequantize(q))
  assert _within_e4m3_rounding(w, deq, np.asarray(q.scale), num_contracted)
  # Guards the bound: one scale per input row (the amax over the output axes instead) makes the small
  # output channels round to a few subnormal steps of the large ones, far outside it.
  moved = np.moveaxis(w, tuple(range(num_contracted)), tuple(range(w.ndim - num_contracted, w.ndim)))
  per_row = dequantize(quantize_fp8(jnp.asarray(moved), w.ndim - num_contracted))
  wrong = np.moveaxis(np.asarray(per_row), tuple(range(w.ndim - num_contracted, w.ndim)),
                      tuple(range(num_contracted)))
  assert not _within_e4m3_rounding(w, wrong, np.asarray(q.scale), num_contracted)


def test_a_zero_output_channel_quantizes_to_zeros_not_nan():
  w = _channels_of_many_magnitudes((32, 8), 1)
  w[:, 3] = 0.0
  q = quantize_fp8(jnp.asarray(w), 1)
  deq = np.asarray(dequantize(q))
  assert np.isfinite(np.asarray(q.scale)).all() and float(q.scale[3]) > 0
  assert np.all(deq[:, 3] == 0) and np.isfinite(deq).all()
  # Amax maps to e4m3's largest value and stays finite (e4m3fn has no infinity: overflow is NaN).
  assert np.abs(np.asarray(q.w, np.float32)).max() == 448


@pytest.mark.parametrize("eq,a_shape,w_shape,num_contracted", [
    ("...D,DNH->...NH", (2, 5, 64), (64, 4, 16), CONTRACTED_AXES["wq"]),
    ("...NH,NHD->...D", (7, 4, 16), (4, 16, 64), CONTRACTED_AXES["wo"]),
])
def test_fp8_dot_is_the_einsum_of_the_dequantized_weight(eq, a_shape, w_shape, num_contracted):
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
  q = quantize_fp8(jnp.asarray(_channels_of_many_magnitudes(w_shape, num_contracted)), num_contracted)
  got = np.asarray(fp8_dot(eq, a, q))
  ref = np.asarray(jnp.einsum(eq, a, dequantize(q), precision="highest"))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert fp8_dot(eq, a.astype(jnp.bfloat16), q).dtype == jnp.bfloat16  # the activations' dtype


def test_quantize_params_halves_bfloat16_projection_bytes_and_frees_the_originals():
  cfg = load_model_config(DEFAULT_MODEL_DIR)
  params = load_params(DEFAULT_MODEL_DIR, cfg, "bfloat16")
  originals = [layer[name] for layer in params["layers"] for name in CONTRACTED_AXES]
  before = sum(w.nbytes for w in originals)
  q = quantize_params(params)
  assert all(w.is_deleted() for w in originals)  # what the KV pool gets back (size_kv_pool reads bytes_in_use)
  quantized = [layer[name] for layer in q["layers"] for name in CONTRACTED_AXES]
  assert all(isinstance(x, Fp8Weight) and x.w.dtype == jnp.float8_e4m3fn for x in quantized)
  after = sum(x.w.nbytes + x.scale.nbytes for x in quantized)
  assert 0.5 < after / before < 0.51  # one byte per element plus a float32 per output channel
  assert q["embed"] is params["embed"] and q["layers"][0]["attn_norm"] is params["layers"][0]["attn_norm"]
  device = jax.devices()[0]
  assert _weight_bytes_on(q, device) == sum(x.nbytes for x in jax.tree_util.tree_leaves(q))


@pytest.fixture(scope="module")
def model_logits():
  """Logits of the default model over `TEXT` (float32 activations): unquantized, quantized, the quantized
  model's weights dequantized, a broken variant with the scales dropped, and transformers'."""
  import torch
  import transformers
  cfg = load_model_config(DEFAULT_MODEL_DIR)
  ids = jnp.asarray([_token_ids()])
  params = load_params(DEFAULT_MODEL_DIR, cfg, "float32")  # the bfloat16 checkpoint's values, exactly
  q = quantize_params(params, delete_originals=False)

  def per_weight(fn):
    return dict(q, layers=[{k: fn(v) if isinstance(v, Fp8Weight) else v for k, v in layer.items()}
                           for layer in q["layers"]])

  run = jax.jit(lambda p: forward_dense(p, ids, cfg)[0])
  out = {"model": run(params), "fp8": run(q), "dequantized": run(per_weight(dequantize)),
         "no_scale": run(per_weight(lambda x: Fp8Weight(x.w, jnp.ones_like(x.scale))))}
  hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
  with torch.no_grad():
    out["transformers"] = hf(torch.tensor(np.asarray(ids))).logits[0].numpy()
  return {k: np.asarray(v) for k, v in out.items()}


def _token_ids():
  from jserve.tokenizer import Tokenizer
  return Tokenizer(DEFAULT_MODEL_DIR).encode(TEXT)


def _close_to(logits, ref) -> bool:
  """Near enough for fp8 weights: the largest difference a tenth of the logits' range (measured: 0.027),
  and the same top token at 90% of positions (measured: 98%)."""
  return (np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()
          and (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9)


def test_quantized_model_is_the_model_of_its_dequantized_weights(model_logits):
  fp8, deq = model_logits["fp8"], model_logits["dequantized"]
  assert np.abs(fp8 - deq).max() <= 1e-5 * np.abs(deq).max()  # only the order of float32 rounding differs


@pytest.mark.parametrize("reference", ["model", "transformers"])
def test_quantized_model_stays_close_to_the_unquantized_one(model_logits, reference):
  ref = model_logits[reference]
  assert len(ref) > 100
  assert not np.array_equal(model_logits["fp8"], model_logits["model"])  # the weights did change
  assert _close_to(model_logits["fp8"], ref)
  assert not _close_to(model_logits["no_scale"], ref)  # guards the bound: a path that drops the scale fails it


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
  """An fp8 engine on the default model, and a float32 engine on a checkpoint of its dequantized weights."""
  cfg = load_model_config(DEFAULT_MODEL_DIR)
  q = quantize_params(load_params(DEFAULT_MODEL_DIR, cfg, "float32"))
  deq = dict(q, layers=[{k: dequantize(v) if isinstance(v, Fp8Weight) else v for k, v in layer.items()}
                        for layer in q["layers"]])
  out = str(tmp_path_factory.mktemp("dequantized"))
  save_hf_checkpoint(deq, cfg, out)
  for name in os.listdir(DEFAULT_MODEL_DIR):
    if not name.endswith(".safetensors"):
      shutil.copy(os.path.join(DEFAULT_MODEL_DIR, name), out)
  kw = {k: v for k, v in ENGINE.items() if k != "quantization"}
  return LLM(None, quantization="fp8", **kw), LLM(out, **kw)


def test_fp8_engine_generates_what_the_dequantized_checkpoint_does(engines):
  fp8, deq = engines
  got = fp8.generate(PROMPTS, GREEDY, use_tqdm=False)
  ref = deq.generate(PROMPTS, GREEDY, use_tqdm=False)
  assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
  assert got[0].outputs[0].text.startswith("\n    ")  # still the default model: a function body follows


def test_fp8_engine_keeps_projections_in_one_byte(engines):
  fp8, deq = engines
  assert fp8.engine.runner.rc.quantization == "fp8"  # in the program cache's key
  layer = fp8.engine.params["layers"][0]
  assert {str(layer[name].w.dtype) for name in CONTRACTED_AXES} == {"float8_e4m3fn"}
  assert layer["attn_norm"].dtype == jnp.float32 and fp8.engine.params["embed"].dtype == jnp.float32

  def projection_bytes(llm):
    return sum(x.nbytes for layer in llm.engine.params["layers"] for name in CONTRACTED_AXES
               for x in jax.tree_util.tree_leaves(layer[name]))

  assert 0.25 < projection_bytes(fp8) / projection_bytes(deq) < 0.26  # float32 -> float8, plus the scales
  device = jax.devices()[0]
  saved = projection_bytes(deq) - projection_bytes(fp8)
  assert _weight_bytes_on(deq.engine.params, device) - _weight_bytes_on(fp8.engine.params, device) == saved


def test_fp8_weights_are_stored_nk_for_the_kernel_only(engines):
  # matmul_impl="auto" multiplies fp8 weights through XLA on every measured shape (decode_matmul's
  # GPU_TABLE_FP8), so it keeps them [K, N] and generates what "xla" does.
  fp8, _ = engines
  kw = {k: v for k, v in ENGINE.items() if k != "quantization"}
  auto = LLM(None, quantization="fp8", matmul_impl="auto", **kw)
  assert all(type(layer[name]) is Fp8Weight for layer in auto.engine.params["layers"] for name in CONTRACTED_AXES)
  got = auto.generate(PROMPTS, GREEDY, use_tqdm=False)
  ref = fp8.generate(PROMPTS, GREEDY, use_tqdm=False)
  assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
  # "gpu" (the Triton kernel, which a CPU engine refuses) stores every projection [N, K] for the kernel's
  # transposed loads, in the same bytes.
  params = jax.tree.map(jnp.copy, fp8.engine.params)
  nk_params = quantize_engine_params(params, EngineConfig(quantization="fp8", matmul_impl="gpu"), None, None)
  for kn, nk in zip(fp8.engine.params["layers"], nk_params["layers"]):
    for name in CONTRACTED_AXES:
      assert isinstance(nk[name], Fp8WeightNK) and nk[name].w_NK.dtype == jnp.float8_e4m3fn
      assert nk[name].w_NK.size == kn[name].w.size and nk[name].scale.shape == kn[name].scale.shape
      k = int(np.prod(kn[name].w.shape[:CONTRACTED_AXES[name]]))
      np.testing.assert_array_equal(np.asarray(nk[name].w_NK, np.float32),
                                    np.asarray(kn[name].w, np.float32).reshape(k, -1).T)


def test_planner_predicts_the_fp8_engines_weight_bytes(engines):
  fp8, deq = engines
  device = jax.devices()[0]
  cfg = fp8.engine.model_config
  for llm, quantization in ((fp8, "fp8"), (deq, None)):
    workload = Workload(weight_bytes=4, quantization=quantization)  # the engines run in float32
    predicted = plan(cfg, 1, get_device("H100-80GB"), workload)[0].weights_bytes
    assert _weight_bytes_on(llm.engine.params, device) == predicted, quantization


def test_unknown_quantization_is_a_config_error():
  with pytest.raises(ConfigError, match=r"quantization='int8': use None \(no quantization\) or one of fp8"):
    EngineConfig(quantization="int8")
  assert EngineConfig(quantization="fp8").quantization == "fp8" and EngineConfig().quantization is None


@pytest.fixture(scope="module")
def parallel_report(tmp_path_factory):
  """tests/quant_tp_worker.py's report, with an fp8 checkpoint (tests/test_quant_checkpoint.py) served too:
  one worker process for both, since each costs a JAX start and its compiles."""
  fp8_dir = write_fp8_checkpoint(DEFAULT_MODEL_DIR, str(tmp_path_factory.mktemp("fp8")), "compressed-tensors channel")
  return run_worker("tests.quant_tp_worker", 8, fp8_dir)


def test_tensor_and_pipeline_parallel_fp8_engines_generate_what_one_device_does(engines, parallel_report):
  report = parallel_report
  ref = [o.outputs[0].token_ids for o in engines[0].generate(PROMPTS, GREEDY, use_tqdm=False)]
  for layout in ("tensor 2", "pipeline 2 x tensor 2"):
    got = report[layout]
    assert got["tokens"] == ref, layout
    assert got["dtypes"] == ["float8_e4m3fn"]
    # Each weight keeps its shards; its scale is sharded as the weight's output axes are.
    specs = got["specs"]
    assert specs["wq"] == [[None, "tensor", None], ["tensor", None]]
    assert specs["wo"] == [["tensor", None, None], [None]]
    assert specs["w_gate"] == [[None, "tensor"], ["tensor"]]
    assert specs["w_down"] == [["tensor", None], [None]]
    # The row-parallel wo and w_down reduce their amax across the devices: the same numbers as one device.
    assert all(got["equal_to_one_device"].values()) and len(got["equal_to_one_device"]) == len(CONTRACTED_AXES)
  assert report["tensor 2"]["scale_devices"] == [0, 1]
  assert report["pipeline 2 x tensor 2"]["last_layer_devices"] == [2, 3]  # a later stage's layers stay there


@pytest.mark.parametrize("layout,stage,tensor", [("tensor 2", 1, 2), ("pipeline 2 x tensor 2", 2, 2),
                                                 ("fp8 checkpoint", 1, 4)])
def test_planner_counts_each_devices_fp8_weights_and_scales(parallel_report, layout, stage, tensor):
  # Row-parallel wo and w_down keep whole [D] scales on every device; at tensor 4 the 2 KV heads are
  # widened to one per device, their scales with them; the last stage holds a copy of the tied LM head.
  got = parallel_report[layout]
  predicted = stage_weight_bytes_per_device(load_model_config(DEFAULT_MODEL_DIR), Layout(1, stage, tensor),
                                            Workload(weight_bytes=4, quantization="fp8"))
  assert len(got["device_weight_bytes"]) == stage * tensor
  for device, nbytes in got["device_weight_bytes"].items():
    assert nbytes == predicted[0 if int(device) in got["first_stage_devices"] else 1], device


def test_a_tensor_parallel_fp8_checkpoint_serves_what_one_device_does(parallel_report):
  got = parallel_report["fp8 checkpoint"]
  assert got["tokens"] == got["one_device_tokens"]
  assert got["dtypes"] == ["float8_e4m3fn"]  # the checkpoint's fp8 reached the devices as fp8
  # Each fp8 weight and its scale lie where online quantization puts them (the test above), and hold the
  # values one device reads, the 2 KV heads of wk and wv and their scales widened to one per device.
  assert got["specs"]["wk"] == [[None, "tensor", None], ["tensor", None]]
  assert got["specs"]["wo"] == [["tensor", None, None], [None]]
  assert got["specs"]["w_down"] == [["tensor", None], [None]]
  assert got["wk_shapes"] == [[256, 4, 64], [4, 64]] and got["wk_scale_shard"] == [1, 64]
  assert all(got["equal_to_one_device"].values()) and len(got["equal_to_one_device"]) == len(CONTRACTED_AXES)
  assert got["scale_devices"] == [0, 1, 2, 3]


def test_fp8_activations_on_a_pipeline_and_tensor_mesh_generate_what_one_device_does(parallel_report):
  # Each device transposes its own shards to [N, K]: the column-parallel projections split N, the
  # row-parallel wo and w_down split K, whose per-token amax XLA then reduces across the devices.
  got = parallel_report["w8a8"]
  assert got["tokens"] == got["one_device_tokens"]
  assert got["types"] == ["Fp8WeightA8"]
  cfg = load_model_config(DEFAULT_MODEL_DIR)
  d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  assert got["specs"]["wq"] == [["tensor", None], ["tensor", None]] and got["shard_shapes"]["wq"] == [n * h // 2, d]
  # Gate and up, k and v stacked (quant.stack_pairs): [2, N, D], N split as each was, so no device mixes them.
  assert not {"w_gate", "w_up", "wk", "wv"} & set(got["names"])
  assert got["specs"]["w_gate_up"] == [[None, "tensor", None], [None, "tensor"]]
  assert got["shard_shapes"]["w_gate_up"] == [2, f // 2, d]
  kv = cfg.num_kv_heads
  assert got["specs"]["wkv"] == [[None, "tensor", None], [None, "tensor", None]]
  assert got["shard_shapes"]["wkv"] == [2, kv * h // 2, d]
  assert got["specs"]["wo"] == [[None, "tensor"], [None]] and got["shard_shapes"]["wo"] == [d, n * h // 2]
  assert got["specs"]["w_down"] == [[None, "tensor"], [None]] and got["shard_shapes"]["w_down"] == [d, f // 2]
  assert got["first_stage_devices"] == [0, 1] and got["last_layer_devices"] == [2, 3]
  # With matmul_impl="auto" the small products multiply weight-only from the same store, sharded alike.
  assert got["auto_tokens"]["2"] == got["auto_tokens"]["1"]


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_quantization_flag_reaches_the_engine_config():
  code = ("import sys; from jserve.cli.flags import FLAGS, engine_config; FLAGS(sys.argv); "
          "print(engine_config().quantization)")
  assert _cli("-c", code, "--quantization=fp8").stdout.split() == ["fp8"]
  assert _cli("-c", code).stdout.split() == ["None"]
  assert _cli("-c", code, "--quantization=none").stdout.split() == ["None"]


def test_unknown_quantization_flag_is_the_usual_flag_error():
  proc = _cli("-m", "jserve", "generate", "--quantization=int8", "--prompt=hi")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "flag --quantization=int8: value should be one of <none|fp8>" in proc.stderr, proc.stderr

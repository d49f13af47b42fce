"""Two processes with four CPU devices each, joined by jax.distributed on localhost, decode as one device does."""

import json
import os
import socket
import sys

import jax
import jax.numpy as jnp
import pytest

from jserve.config import ModelConfig
from jserve.models import llama
from jserve.weights import save_hf_checkpoint
from tests.sharding.subprocess_util import ROOT, run_processes

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=8)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def leader_report(tmp_path_factory):
  ckpt = str(tmp_path_factory.mktemp("multihost_ckpt"))
  save_hf_checkpoint(llama.init_params(CFG, jax.random.key(0), dtype=jnp.float32), CFG, ckpt)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(free_port())
  results = run_processes([[sys.executable, "-m", "tests.sharding.multihost_worker", str(i), port, ckpt]
                           for i in (0, 1)], env)
  for code, _, err in results:
    if code:
      pytest.fail(f"multihost worker exited with {code}:\n{err[-4000:]}")
  lines = [line for line in results[0][1].splitlines() if line.startswith("{")]
  return json.loads(lines[-1])


def test_two_processes_see_eight_devices_four_of_them_local(leader_report):
  assert (leader_report["global_devices"], leader_report["local_devices"]) == (8, 4)


def test_tensor_parallel_across_processes_decodes_as_one_device(leader_report):
  assert leader_report["tokens"] == leader_report["reference_tokens"]

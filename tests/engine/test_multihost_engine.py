"""Two processes with two CPU devices each serve one engine (tensor 4 across them), as one process does."""

import json
import os
import sys

import numpy as np
import pytest

from jserve import LLM
from tests.engine.multihost_engine_worker import ENGINE, summarize, workload
from tests.sharding.subprocess_util import ROOT, run_processes
from tests.sharding.test_multihost import free_port


@pytest.fixture(scope="module")
def leader_report(tiny_model_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(free_port())
  results = run_processes([[sys.executable, "-m", "tests.engine.multihost_engine_worker", str(i), port,
                            tiny_model_dir] for i in (0, 1)], env, timeout=400)
  for code, _, err in results:
    if code:
      pytest.fail(f"multihost engine worker exited with {code}:\n{err[-4000:]}")
  return json.loads([line for line in results[0][1].splitlines() if line.startswith("{")][-1])


def test_two_processes_serve_the_outputs_of_one(leader_report, tiny_model_dir):
  assert (leader_report["devices"], leader_report["local_devices"]) == (4, 2)
  prompts, params = workload()
  want = json.loads(json.dumps(summarize(LLM(tiny_model_dir, **ENGINE).generate(prompts, params, use_tqdm=False))))
  got = leader_report["outputs"]
  assert [o["tokens"] for o in got] == [o["tokens"] for o in want]
  assert [o["finish"] for o in got] == [o["finish"] for o in want]
  values = lambda outs, key: np.asarray([v for o in outs for c in o[key] if c for _, v in (
      c if key == "prompt_logprobs" else [e for step in c for e in step])])
  for key in ("logprobs", "prompt_logprobs"):
    assert len(values(got, key)) > 10
    np.testing.assert_allclose(values(got, key), values(want, key), rtol=1e-4, atol=1e-5)

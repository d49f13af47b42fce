"""Pipeline (2 and 4 stages, uneven layers), data (2 replicas) and mixed layouts on 8 simulated CPU devices."""

import pytest

from sharding.costs import Layout, stage_params_per_device
from tests.sharding.parallel_worker import LAYOUTS_OF, VARIANTS
from tests.sharding.subprocess_util import run_worker

CASES = [(name, f"{d},{s},{t}") for name, layouts in LAYOUTS_OF.items() for d, s, t, _ in layouts]


@pytest.fixture(scope="module")
def report():
  return run_worker("tests.sharding.parallel_worker", 8)


@pytest.mark.parametrize("variant,layout", CASES)
def test_greedy_tokens_equal_one_device(report, variant, layout):
  assert report[variant]["layouts"][layout]["tokens"] == report[variant]["reference_tokens"]


@pytest.mark.parametrize("variant,layout", CASES)
def test_logits_close_to_one_device(report, variant, layout):
  assert report[variant]["layouts"][layout]["max_logit_diff"] < 1e-5


@pytest.mark.parametrize("variant,layout", CASES)
def test_each_device_holds_its_stage_share_as_the_planner_counts_it(report, variant, layout):
  cfg = VARIANTS[variant]
  data, stage, tensor = map(int, layout.split(","))
  got = report[variant]["layouts"][layout]
  assert len(got["device_weight_bytes"]) == data * stage * tensor
  expected = stage_params_per_device(cfg, Layout(data, stage, tensor))
  for device, nbytes in got["device_weight_bytes"].items():
    assert nbytes == 4 * expected[got["stage_of_device"][device]], device


def test_uneven_stages_put_more_layers_first(report):
  # 5 layers on 4 stages: 2, 1, 1, 1; the first stage also holds the embedding, the last the LM head.
  per_device = report["llama_gqa_5"]["layouts"]["1,4,1"]["device_weight_bytes"]
  assert per_device["0"] > per_device["3"] > per_device["1"] == per_device["2"]

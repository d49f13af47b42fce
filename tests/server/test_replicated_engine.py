"""Online data parallelism: two replicas behind one front end serve what one engine serves, routed by
load and by cached prefix."""

import pytest

from jserve import LLM, SamplingParams
from tests.server.replicated_worker import ENGINE
from tests.sharding.subprocess_util import run_worker


@pytest.fixture(scope="module")
def report(tiny_model_dir):
  return run_worker("tests.server.replicated_worker", 2, tiny_model_dir, timeout=400)


def test_two_replicas_each_on_its_own_device_both_serve(report):
  assert report["devices"] == 2
  assert len(set(report["replica_devices"])) == 2
  assert sorted(set(report["distinct_routes"])) == [0, 1]  # eight concurrent prompts are spread
  assert all(steps > 0 for steps in report["replica_steps"])


def test_requests_sharing_a_prefix_go_to_the_replica_that_holds_it(report):
  assert len(set(report["shared_routes"])) == 1, report["shared_routes"]


def test_outputs_equal_one_engine_and_nothing_is_left_counted(report, tiny_model_dir):
  llm = LLM(tiny_model_dir, **ENGINE)
  greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
  for prompts, tokens in ((report["distinct"], report["distinct_tokens"]), (report["shared"], report["shared_tokens"])):
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == tokens
  assert "max_model_len" in report["refused"]
  assert report["loads_after"] == [0, 0]  # every request released, the refused one too
  assert report["num_done"] == len(report["distinct"]) + len(report["shared"])
  assert report["kv_used_after"] == 0

"""The n completions of one request: what the parent reports for each child's output."""

from jserve.engine.groups import CompletionGroup
from jserve.engine.request import CompletionOutput, Request, RequestOutput, SamplingParams


def _child(index):
  return Request(f"p-{index}", [1, 2], SamplingParams(n=2), index=index, parent_id="p")


def _out(req, text, finished, prompt_logprobs=None):
  return RequestOutput(req.request_id, None, [1, 2], [CompletionOutput(req.index, text, [5])], finished,
                       prompt_logprobs=prompt_logprobs)


def test_a_non_streamed_group_reports_once_with_every_completion_in_index_order():
  group, a, b = CompletionGroup(n=2, stream=False, deferred=[]), _child(0), _child(1)
  assert group.collect(a, _out(a, "x", False, prompt_logprobs=[None, {2: -0.1}])) == (None, False)
  assert group.collect(b, _out(b, "second", True)) == (None, False)
  out, done = group.collect(a, _out(a, "first", True))
  assert done and out.request_id == "p" and out.finished
  assert [c.text for c in out.outputs] == ["first", "second"]
  assert out.prompt_logprobs == [None, {2: -0.1}]  # kept from the child that reported them


def test_a_streamed_group_passes_each_delta_through_under_the_parents_id():
  group, a, b = CompletionGroup(n=2, stream=True, deferred=[]), _child(0), _child(1)
  out, done = group.collect(b, _out(b, "y", True))
  assert not done and out.request_id == "p" and not out.finished and out.outputs[0].index == 1
  out, done = group.collect(a, _out(a, "z", True))
  assert done and out.finished  # the last completion's final delta finishes the parent

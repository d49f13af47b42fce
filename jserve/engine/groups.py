"""The n completions of one user request (`SamplingParams.n > 1`), reported as that request's.

The engine runs each completion as a child `Request` with id "<id>-<index>". A group collects the
children's outputs: a streamed request passes each child's deltas through under the parent's id; a
non-streamed one reports once, when every completion has finished, with all of them in index order.
"""

import dataclasses

from jserve.engine.request import Request, RequestOutput


@dataclasses.dataclass
class CompletionGroup:
  """The n completions of one user request, each a child `Request`."""

  n: int
  stream: bool
  deferred: list  # children that wait for the first child's prompt pages (prefix caching shares them)
  finals: dict = dataclasses.field(default_factory=dict)  # index -> final CompletionOutput
  prompt_logprobs: list | None = None

  def collect(self, req: Request, out: RequestOutput) -> tuple[RequestOutput | None, bool]:
    """(what the parent reports for this child's output, or None; whether every completion is done)."""
    self.prompt_logprobs = self.prompt_logprobs or out.prompt_logprobs
    if out.finished:
      self.finals[req.index] = out.outputs[0]
    done = len(self.finals) == self.n
    if self.stream:
      return dataclasses.replace(out, request_id=req.parent_id, finished=done), done
    if not done:
      return None, False
    return dataclasses.replace(out, request_id=req.parent_id, finished=True, prompt_logprobs=self.prompt_logprobs,
                               outputs=[self.finals[i] for i in range(self.n)]), True

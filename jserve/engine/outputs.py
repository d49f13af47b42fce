"""Turns sampled tokens into user-visible output: detokenization, stop conditions, RequestOutputs."""

import dataclasses

from jserve.engine.request import CompletionOutput, FinishReason, Request, RequestOutput, RequestStatus
from jserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class _State:
  detokenizer: IncrementalDetokenizer
  stream: bool
  text: str = ""
  sent_chars: int = 0
  sent_tokens: int = 0
  cumulative_logprob: float = 0.0


class OutputProcessor:
  """Per-request text and stop-condition state, on the host."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self._states: dict[str, _State] = {}

  def add(self, req: Request, stream: bool):
    detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)
    self._states[req.request_id] = _State(detok, stream)

  def append(self, req: Request, token: int, logprob: float, max_model_len: int) -> RequestOutput | None:
    """Records one sampled token; finishes the request if a stop condition holds."""
    st = self._states[req.request_id]
    p = req.params
    st.cumulative_logprob += logprob
    n_out = req.num_output_tokens
    can_stop = n_out > p.min_tokens  # the stopping token comes after min_tokens others
    if can_stop and p.stop_token_ids and token in p.stop_token_ids:
      self._finish(req, FinishReason.STOP, token)
    elif can_stop and not p.ignore_eos and token in req.eos_token_ids:
      self._finish(req, FinishReason.STOP, None)
    delta = st.detokenizer.add([token])
    start = len(st.text)
    st.text += delta
    if delta and p.stop and can_stop and not req.is_finished:
      self._check_stop_strings(req, st, start)
    if not req.is_finished and (n_out >= p.max_tokens or req.num_tokens >= max_model_len):
      self._finish(req, FinishReason.LENGTH, None)
    if req.is_finished:
      if not isinstance(req.stop_reason, str):
        st.text += st.detokenizer.flush()
      return self._output(req, st, final=True)
    return self._output(req, st, final=False) if st.stream else None

  def _check_stop_strings(self, req: Request, st: _State, start: int):
    longest = max(len(s) for s in req.params.stop)
    search_from = max(0, start - longest + 1)
    best = None
    for s in req.params.stop:
      idx = st.text.find(s, search_from)
      if idx >= 0 and (best is None or idx < best[0]):
        best = (idx, s)
    if best is not None:
      idx, s = best
      st.text = st.text[:idx + len(s)] if req.params.include_stop_str_in_output else st.text[:idx]
      self._finish(req, FinishReason.STOP, s)

  @staticmethod
  def _finish(req: Request, reason: FinishReason, stop_reason):
    req.status = RequestStatus.FINISHED
    req.finish_reason = reason
    req.stop_reason = stop_reason

  def finish(self, req: Request) -> RequestOutput:
    """The final output of a request that ended outside `append` (an abort)."""
    st = self._states[req.request_id]
    return self._output(req, st, final=True)

  def _output(self, req: Request, st: _State, final: bool) -> RequestOutput:
    if st.stream:
      # Hold back text that may still become the start of a stop string.
      hold = 0 if final or not req.params.stop else max(len(s) for s in req.params.stop) - 1
      end = max(st.sent_chars, len(st.text) - hold)
      text, token_ids = st.text[st.sent_chars:end], req.output_token_ids[st.sent_tokens:]
      st.sent_chars, st.sent_tokens = end, req.num_output_tokens
    else:
      text, token_ids = st.text, req.output_token_ids
    if final:
      del self._states[req.request_id]
    completion = CompletionOutput(
        index=0, text=text, token_ids=token_ids, cumulative_logprob=st.cumulative_logprob,
        finish_reason=req.finish_reason.value if final and req.finish_reason else None,
        stop_reason=req.stop_reason)
    return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                         outputs=[completion], finished=final, num_cached_tokens=req.num_cached_tokens)

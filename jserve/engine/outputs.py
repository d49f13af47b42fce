"""Turns sampled tokens into user-visible output: detokenization, stop conditions, logprobs, RequestOutputs."""

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
  logprobs: list | None = None  # one {token id: logprob} per output token, when asked for
  prompt_logprobs: list | None = None  # None first, then one dict per prompt token, when asked for
  prompt_logprobs_sent: bool = False
  # Text nobody reads before the end (not streamed, no stop strings) is decoded once at the finish:
  # two tokenizer calls per token per step were most of the host's time between decode steps.
  lazy_text: bool = False


def logprob_entry(token: int, logprob: float, top_ids, top_logprobs, num: int) -> dict[int, float]:
  """vLLM's shape: the chosen token's log-probability plus the `num` most likely tokens', best first."""
  entry = {int(t): float(v) for t, v in zip(top_ids[:num], top_logprobs[:num])}
  entry.setdefault(int(token), float(logprob))
  return entry


class OutputProcessor:
  """Per-request text and stop-condition state, on the host."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self._states: dict[str, _State] = {}

  def add(self, req: Request, stream: bool):
    detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)
    st = _State(detok, stream, lazy_text=not stream and not req.params.stop)
    if req.params.logprobs is not None:
      st.logprobs = []
    if req.params.prompt_logprobs is not None:
      st.prompt_logprobs = [None]
    self._states[req.request_id] = st

  def add_prompt_logprobs(self, req: Request, first_position: int, logprobs, top_ids, top_logprobs):
    """Records prompt logprobs for prompt positions first_position, first_position + 1, ..."""
    st = self._states[req.request_id]
    if st.prompt_logprobs is None:
      return
    num = req.params.prompt_logprobs
    assert first_position <= len(st.prompt_logprobs), "prompt chunks arrive in order"
    # After a preemption the prompt is computed again: skip the positions already recorded.
    for i in range(len(st.prompt_logprobs) - first_position, len(logprobs)):
      lp = logprobs[i]
      token = req.prompt_token_ids[first_position + i]
      st.prompt_logprobs.append(logprob_entry(token, lp, top_ids[i], top_logprobs[i], num))

  def append(self, req: Request, token: int, max_model_len: int, logprob: float | None = None,
             top_ids=(), top_logprobs=()) -> RequestOutput | None:
    """Records one sampled token; finishes the request if a stop condition holds."""
    st = self._states[req.request_id]
    p = req.params
    if st.logprobs is not None:
      st.cumulative_logprob += logprob
      st.logprobs.append(logprob_entry(token, logprob, top_ids, top_logprobs, p.logprobs))
    n_out = req.num_output_tokens
    can_stop = n_out > p.min_tokens  # the stopping token comes after min_tokens others
    if can_stop and p.stop_token_ids and token in p.stop_token_ids:
      self._finish(req, FinishReason.STOP, token)
    elif can_stop and not p.ignore_eos and token in req.eos_token_ids:
      self._finish(req, FinishReason.STOP, None)
    elif req.grammar is not None:
      req.grammar.consume_token(token)
      if req.grammar.is_stopped():  # complete (or broken): nothing but EOS could follow
        self._finish(req, FinishReason.STOP, None)
    if not st.lazy_text:
      delta = st.detokenizer.add([token])
      start = len(st.text)
      st.text += delta
      if delta and p.stop and can_stop and not req.is_finished:
        self._check_stop_strings(req, st, start)
    if not req.is_finished and (n_out >= p.max_tokens or req.num_tokens >= max_model_len):
      self._finish(req, FinishReason.LENGTH, None)
    if req.is_finished:
      if st.lazy_text:
        st.text = st.detokenizer.add(req.output_token_ids)
      if not isinstance(req.stop_reason, str):
        st.text += st.detokenizer.flush()
      return self._output(req, st, final=True)
    return self._output(req, st, final=False) if st.stream else None

  @staticmethod
  def _check_stop_strings(req: Request, st: _State, start: int):
    """Finds the earliest stop string that ends in the new text; it may begin in earlier tokens."""
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
      OutputProcessor._finish(req, FinishReason.STOP, s)

  @staticmethod
  def _finish(req: Request, reason: FinishReason, stop_reason):
    req.status = RequestStatus.FINISHED
    req.finish_reason = reason
    req.stop_reason = stop_reason

  def finish(self, req: Request) -> RequestOutput:
    """The final output of a request that ended outside `append` (an abort)."""
    st = self._states[req.request_id]
    if st.lazy_text:
      st.text = st.detokenizer.add(req.output_token_ids) + st.detokenizer.flush()
    return self._output(req, st, final=True)

  def _output(self, req: Request, st: _State, final: bool) -> RequestOutput:
    logprobs = None
    if st.stream:
      # Hold back text that may still become the start of a stop string.
      hold = 0 if final or not req.params.stop else max(len(s) for s in req.params.stop) - 1
      end = max(st.sent_chars, len(st.text) - hold)
      text, token_ids = st.text[st.sent_chars:end], req.output_token_ids[st.sent_tokens:]
      if st.logprobs is not None:
        logprobs = st.logprobs[st.sent_tokens:]
      st.sent_chars, st.sent_tokens = end, req.num_output_tokens
    else:
      text, token_ids, logprobs = st.text, req.output_token_ids, st.logprobs
    prompt_logprobs = None
    if st.prompt_logprobs is not None and not st.prompt_logprobs_sent:
      prompt_logprobs, st.prompt_logprobs_sent = st.prompt_logprobs, True
    if final:
      del self._states[req.request_id]
    completion = CompletionOutput(
        index=req.index, text=text, token_ids=token_ids, logprobs=logprobs,
        cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
        finish_reason=req.finish_reason.value if final and req.finish_reason else None,
        stop_reason=req.stop_reason)
    return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                         outputs=[completion], finished=final, prompt_logprobs=prompt_logprobs,
                         num_cached_tokens=req.num_cached_tokens)

"""`LLM`: the offline Python API, on top of `LLMEngine` (vLLM's interface)."""

import dataclasses
import sys

from tqdm import tqdm

from jserve.engine.engine import EngineConfig, LLMEngine
from jserve.engine.request import RequestOutput, SamplingParams
from jserve.errors import InvalidRequestError

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


def _compile_progress(desc: str):
  bar = None

  def update(done, total, bucket):
    nonlocal bar
    if bar is None:
      bar = tqdm(total=total, desc=desc, unit="bucket", file=sys.stderr, leave=False)
    bar.set_postfix_str(f"{bucket} tokens")
    bar.update(1)
    if done == total:
      bar.close()

  return update


class LLM:
  """Generates text for batches of prompts in-process.

      llm = LLM(model="/path/to/hf_dir", max_model_len=4096)
      outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))

  `model=None` uses the default model shipped with jserve. Keyword arguments
  are `EngineConfig`'s fields (vLLM's names); any other keyword is a TypeError.
  """

  def __init__(self, model: str | None = None, **kwargs):
    unknown = sorted(set(kwargs) - _ENGINE_FIELDS)
    if unknown:
      raise TypeError(f"LLM() got unexpected keyword argument(s) {', '.join(unknown)}; "
                      f"accepted: {', '.join(sorted(_ENGINE_FIELDS - {'model'}))}")
    self.engine = LLMEngine(EngineConfig(model=model, **kwargs),
                            progress=_compile_progress("compiling step buckets"))
    self.tokenizer = self.engine.tokenizer

  def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
               use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
    """Runs every prompt to completion; outputs come back in the order of `prompts`.

    A prompt is a string, a list of token ids, or a dict with `prompt` or `prompt_token_ids`.
    """
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
      prompts = [prompts]
    if sampling_params is None:
      sampling_params = SamplingParams()
    if isinstance(sampling_params, list):
      if len(sampling_params) != len(prompts):
        raise InvalidRequestError(f"{len(sampling_params)} SamplingParams for {len(prompts)} prompts; "
                                  "give one, or one per prompt")
      params_list = sampling_params
    else:
      params_list = [sampling_params] * len(prompts)
    ids = []
    try:
      for i, (prompt, params) in enumerate(zip(prompts, params_list)):
        if isinstance(prompt, dict):
          prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        ids.append(self.engine.add_request(None, prompt, params, priority=priority[i] if priority else 0))
    except Exception:
      for rid in ids:
        self.engine.abort(rid)
      raise
    return self._run(ids, use_tqdm)

  def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True):
    """Like `generate`, for one conversation (a list of messages) or a list of them."""
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    prompts = [self.tokenizer.apply_chat_template(m) for m in conversations]
    return self.generate([{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)}
                          for p in prompts], sampling_params, use_tqdm)

  def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
    results: dict[str, RequestOutput] = {}
    bar = tqdm(total=len(ids), desc="generating", unit="req", file=sys.stderr, disable=not use_tqdm)
    while self.engine.has_unfinished():
      for out in self.engine.step():
        if out.finished:
          results[out.request_id] = out
          bar.update(1)
    bar.close()
    return [results[i] for i in ids]

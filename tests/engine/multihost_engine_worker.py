"""Worker for test_multihost_engine.py: one of two processes (2 CPU devices each) serving one engine.

Usage: python -m tests.engine.multihost_engine_worker PROCESS_ID PORT MODEL_DIR

Both processes start the same engine with tensor parallelism 4 over all four
devices. Process 0 generates (the workload of `workload()`), then stops the
follower and prints the outputs as one JSON line; process 1 follows.
"""

import json
import sys

from sharding import distributed

ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_pages=64,
              compilation_cache_dir=None)


def workload():
  """Prompts and parameters whose steps send every kind of command: steps, sampler slot writes
  (penalties, bias), a grammar mask, prompt logprobs. The logits are split by vocabulary across the
  devices: the bias on token 900 is applied by a follower's device, so a follower that missed the
  slot write would change the tokens."""
  from jserve import SamplingParams
  prompts = [[5, 17, 42, 9, 300, 12], list(range(40, 110)), [7] * 20, [901, 33, 2, 64, 64, 64, 8]]
  params = [
      SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
      SamplingParams(max_tokens=10, temperature=0.8, seed=3, repetition_penalty=1.2, logit_bias={900: 6.0},
                     ignore_eos=True),
      SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=2, logprobs=2, ignore_eos=True, n=2),
      SamplingParams(max_tokens=24, temperature=0.7, seed=4, json_schema={"type": "object"}),
  ]
  return prompts, params


def summarize(outs):
  return [{"id": o.request_id, "tokens": [c.token_ids for c in o.outputs], "finish": [c.finish_reason for c in o.outputs],
           "logprobs": [[sorted(d.items()) for d in c.logprobs] if c.logprobs else None for c in o.outputs],
           "prompt_logprobs": [sorted(d.items()) if d else None for d in o.prompt_logprobs or []]} for o in outs]


def main(process_id: int, port: int, model_dir: str):
  distributed.initialize(f"localhost:{port}", 2, process_id)
  import jax

  from jserve import LLM
  llm = LLM(model_dir, tensor_parallel_size=4, **ENGINE)
  if process_id != 0:
    llm.engine.follow()
    return
  prompts, params = workload()
  outs = llm.generate(prompts, params, use_tqdm=False)
  llm.engine.stop_followers()
  print(json.dumps({"devices": jax.device_count(), "local_devices": jax.local_device_count(),
                    "outputs": summarize(outs)}))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

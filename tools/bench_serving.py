"""Online serving benchmark for a running `jserve serve`, over gRPC or the OpenAI-compatible HTTP API.

    python -m tools.bench_serving --backend=grpc --target=127.0.0.1:50051 --num_prompts=200 --request_rate=20
    python -m tools.bench_serving --backend=http --target=http://127.0.0.1:8000 --max_concurrency=16
    python -m tools.bench_serving --backend=http-chat --dataset=jsonl --dataset_path=prompts.jsonl

Arrivals are Poisson at --request_rate requests/s (inf: all at once), optionally capped at
--max_concurrency requests in flight (a fixed-concurrency run is --request_rate=inf --max_concurrency=N).
Prompts are random token ids (--random_input_len, --random_output_len, --random_range_ratio), or JSONL
lines with "prompt" (text) or "prompt_token_ids", and optionally "max_tokens".

Reported, as vLLM's serving benchmark does: request and token throughput; time to first token (TTFT),
time per output token after the first (TPOT), inter-token latency between streamed messages (ITL) and
end-to-end latency (E2E), each as mean, p50, p90, p99 in ms; and goodput, the requests per second that
met every limit of --goodput (e.g. --goodput=ttft:500,tpot:50, in ms).
"""

import asyncio
import dataclasses
import json
import math
import random
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("backend", "grpc", ["grpc", "http", "http-chat"], "which API to load")
flags.DEFINE_string("target", None, "host:port for grpc, base URL for http (default: the server's defaults)")
flags.DEFINE_string("api_key", None, "sent as 'authorization: Bearer <key>'")
flags.DEFINE_string("model", None, "model name for HTTP requests (default: the first of /v1/models)")
flags.DEFINE_integer("num_prompts", 200, "requests to send")
flags.DEFINE_float("request_rate", math.inf, "Poisson arrival rate in requests/s (inf: all at once)")
flags.DEFINE_integer("max_concurrency", None, "most requests in flight at once (default: no cap)")
flags.DEFINE_enum("dataset", "random", ["random", "jsonl"], "where prompts come from")
flags.DEFINE_string("dataset_path", None, "JSONL file for --dataset=jsonl")
flags.DEFINE_integer("random_input_len", 128, "prompt tokens of random prompts")
flags.DEFINE_integer("random_output_len", 64, "output tokens per request (when a JSONL line gives none, too)")
flags.DEFINE_float("random_range_ratio", 0.0, "lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
flags.DEFINE_integer("vocab_size", 1000, "random prompt token ids are drawn from [0, vocab_size)")
flags.DEFINE_string("tokenizer", None, "checkpoint directory whose tokenizer turns random prompts into text, for "
                    "--backend=http-chat (default: random words, about one token each)")
flags.DEFINE_bool("ignore_eos", True, "generate exactly max_tokens (so runs are comparable)")
flags.DEFINE_string("goodput", None, "limits for goodput in ms, e.g. ttft:500,tpot:50,e2e:5000")
flags.DEFINE_integer("seed", 0, "seed of prompts, lengths and arrival times")
flags.DEFINE_string("result_json", None, "also write the results here")
flags.DEFINE_float("timeout_s", 600, "per-request timeout")

DEFAULT_TARGETS = {"grpc": "127.0.0.1:50051", "http": "http://127.0.0.1:8000", "http-chat": "http://127.0.0.1:8000"}


@dataclasses.dataclass
class Prompt:
  text: str | None
  token_ids: list[int] | None
  max_tokens: int


@dataclasses.dataclass
class Result:
  ok: bool = False
  error: str = ""
  prompt_tokens: int = 0
  output_tokens: int = 0
  ttft: float = 0.0
  e2e: float = 0.0
  itl: list[float] = dataclasses.field(default_factory=list)
  start: float = dataclasses.field(default_factory=time.perf_counter)  # the request was sent
  last: float = 0.0  # the latest tokens arrived

  def arrived(self, new: int):
    """`new` tokens arrived now: the first set the TTFT, later ones add an inter-token latency."""
    if not new:
      return
    now = time.perf_counter()
    if self.output_tokens == 0:
      self.ttft = now - self.start
    else:
      self.itl.append(now - self.last)
    self.last = now
    self.output_tokens += new

  def finished(self):
    self.e2e, self.ok = time.perf_counter() - self.start, True

  @property
  def tpot(self) -> float | None:
    return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def _lengths(mean: int, ratio: float, n: int, rng: random.Random) -> list[int]:
  lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
  return [rng.randint(lo, hi) for _ in range(n)]


def load_prompts(rng: random.Random) -> list[Prompt]:
  n = FLAGS.num_prompts
  if FLAGS.dataset == "random":
    ins = _lengths(FLAGS.random_input_len, FLAGS.random_range_ratio, n, rng)
    outs = _lengths(FLAGS.random_output_len, FLAGS.random_range_ratio, n, rng)
    prompts = [Prompt(None, [rng.randrange(FLAGS.vocab_size) for _ in range(i)], o) for i, o in zip(ins, outs)]
    if FLAGS.backend == "http-chat":  # chat messages are text
      tokenizer = None
      if FLAGS.tokenizer:
        from jserve.tokenizer import Tokenizer
        tokenizer = Tokenizer(FLAGS.tokenizer)
      for p in prompts:
        p.text, p.token_ids = _as_text(p.token_ids, tokenizer, rng), None
    return prompts
  if not FLAGS.dataset_path:
    raise app.UsageError("--dataset=jsonl needs --dataset_path")
  with open(FLAGS.dataset_path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  if not lines:
    raise app.UsageError(f"{FLAGS.dataset_path} holds no prompt")
  prompts = []
  for i in range(n):
    line = lines[i % len(lines)]
    prompts.append(Prompt(line.get("prompt"), line.get("prompt_token_ids"),
                          int(line.get("max_tokens", FLAGS.random_output_len))))
  return prompts


_WORDS = ("the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from", "or", "an", "be",
          "this", "which", "value", "return", "list", "data", "file", "name", "time", "first", "number", "line")


def _as_text(token_ids: list[int], tokenizer, rng: random.Random) -> str:
  """Text of about len(token_ids) tokens: the ids decoded by --tokenizer, or common words."""
  if tokenizer is not None:
    return tokenizer.decode(token_ids)
  return " ".join(rng.choice(_WORDS) for _ in token_ids)


# --- clients --------------------------------------------------------------------------------------
class GrpcClient:
  def __init__(self, target: str, api_key: str | None):
    import grpc

    from jserve.server.proto import jserve_pb2, jserve_pb2_grpc
    self.pb = jserve_pb2
    self.channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    self.stub = jserve_pb2_grpc.GenerationStub(self.channel)
    self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

  async def run(self, p: Prompt) -> Result:
    pb = self.pb
    params = pb.SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=FLAGS.ignore_eos)
    request = (pb.GenerateRequest(token_ids=pb.TokenIds(ids=p.token_ids), sampling_params=params) if p.token_ids
               else pb.GenerateRequest(text=p.text, sampling_params=params))
    r = Result()
    try:
      async for msg in self.stub.Generate(request, metadata=self.metadata, timeout=FLAGS.timeout_s):
        r.arrived(sum(len(c.token_ids) for c in msg.choices))
        if msg.HasField("usage"):
          r.prompt_tokens = msg.usage.prompt_tokens
      r.finished()
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
      details = e.details() if hasattr(e, "details") else str(e)
      r.error = f"{type(e).__name__}: {details}"
    return r

  async def close(self):
    await self.channel.close()


class HttpClient:
  def __init__(self, base_url: str, api_key: str | None, chat: bool):
    import httpx2
    self.http = httpx2.AsyncClient(base_url=base_url.rstrip("/"), timeout=FLAGS.timeout_s,
                                   limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None),
                                   headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    self.chat = chat
    self.model = FLAGS.model

  async def run(self, p: Prompt) -> Result:
    if self.model is None:
      self.model = (await self.http.get("/v1/models")).json()["data"][0]["id"]
    body = {"model": self.model, "max_tokens": p.max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": FLAGS.ignore_eos, "stream_options": {"include_usage": True}, "return_token_ids": True}
    if self.chat:
      body["messages"], path = [{"role": "user", "content": p.text}], "/v1/chat/completions"
    else:
      body["prompt"], path = (p.token_ids if p.token_ids else p.text), "/v1/completions"
    r = Result()
    try:
      async with self.http.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
          r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
          return r
        async for line in resp.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          chunk = json.loads(line[6:])
          if "error" in chunk:
            r.error = chunk["error"]["message"]
            return r
          r.arrived(sum(len(c.get("token_ids") or []) for c in chunk.get("choices", [])))
          if chunk.get("usage"):
            r.prompt_tokens = chunk["usage"]["prompt_tokens"]
      r.finished()
    except Exception as e:  # noqa: BLE001
      r.error = f"{type(e).__name__}: {e}"
    return r

  async def close(self):
    await self.http.aclose()


# --- the run --------------------------------------------------------------------------------------
async def run_benchmark(prompts: list[Prompt], rng: random.Random) -> tuple[list[Result], float]:
  backend = FLAGS.backend
  target = FLAGS.target or DEFAULT_TARGETS[backend]
  client = GrpcClient(target, FLAGS.api_key) if backend == "grpc" else HttpClient(target, FLAGS.api_key,
                                                                                    backend == "http-chat")
  limit = asyncio.Semaphore(FLAGS.max_concurrency) if FLAGS.max_concurrency else None

  async def one(p):
    if limit is None:
      return await client.run(p)
    async with limit:
      return await client.run(p)

  await client.run(Prompt("warm up", None, 2))  # connections and first-request costs stay out of the numbers
  tasks = []
  start = time.perf_counter()
  for p in prompts:
    tasks.append(asyncio.ensure_future(one(p)))
    if FLAGS.request_rate != math.inf:
      await asyncio.sleep(rng.expovariate(FLAGS.request_rate))
  results = await asyncio.gather(*tasks)
  duration = time.perf_counter() - start
  await client.close()
  return results, duration


def _stats(values: list[float]) -> dict:
  if not values:
    return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
  a = np.asarray(values) * 1000.0
  return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
          "p99": float(np.percentile(a, 99))}


def parse_goodput(spec: str | None) -> dict[str, float]:
  limits = {}
  for part in (spec or "").split(","):
    if not part.strip():
      continue
    name, _, value = part.partition(":")
    if name not in ("ttft", "tpot", "e2e") or not value:
      raise app.UsageError(f"--goodput={spec!r}: expected name:ms pairs with names ttft, tpot, e2e")
    limits[name] = float(value) / 1000.0
  return limits


def summarize(results: list[Result], duration: float, limits: dict[str, float]) -> dict:
  ok = [r for r in results if r.ok]
  out_tokens = sum(r.output_tokens for r in ok)
  in_tokens = sum(r.prompt_tokens for r in ok)

  def good(r):
    return all((getattr(r, k) or 0.0) <= v for k, v in limits.items())

  summary = {
      "backend": FLAGS.backend, "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
      "request_rate": FLAGS.request_rate, "max_concurrency": FLAGS.max_concurrency, "duration_s": duration,
      "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
      "total_token_throughput": (in_tokens + out_tokens) / duration, "total_input_tokens": in_tokens,
      "total_output_tokens": out_tokens,
      "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
      "itl_ms": _stats([x for r in ok for x in r.itl]), "e2e_ms": _stats([r.e2e for r in ok]),
  }
  if limits:
    summary["goodput_limits_ms"] = {k: v * 1000 for k, v in limits.items()}
    summary["goodput"] = sum(1 for r in ok if good(r)) / duration
  errors = sorted({r.error for r in results if not r.ok})
  if errors:
    summary["errors"] = errors[:5]
  return summary


def report(s: dict):
  print(f"{'=' * 20} serving benchmark ({s['backend']}) {'=' * 20}")
  print(f"requests: {s['completed']} completed, {s['failed']} failed, in {s['duration_s']:.2f} s "
        f"(rate {s['request_rate']}, concurrency cap {s['max_concurrency']})")
  print(f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
        f"{s['total_token_throughput']:.1f} total tok/s")
  if "goodput" in s:
    print(f"goodput: {s['goodput']:.2f} req/s within {s['goodput_limits_ms']} ms")
  print(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
  for name in ("ttft", "tpot", "itl", "e2e"):
    st = s[f"{name}_ms"]
    print(f"{name.upper():<6}{st['mean']:>10.2f}{st['p50']:>10.2f}{st['p90']:>10.2f}{st['p99']:>10.2f}")
  for e in s.get("errors", []):
    print(f"error: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  rng = random.Random(FLAGS.seed)
  limits = parse_goodput(FLAGS.goodput)
  prompts = load_prompts(rng)
  results, duration = asyncio.run(run_benchmark(prompts, rng))
  summary = summarize(results, duration, limits)
  report(summary)
  if FLAGS.result_json:
    with open(FLAGS.result_json, "w") as f:
      json.dump(summary, f, indent=2)
  if not summary["completed"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

"""Prometheus metrics of one server: request latencies (histograms) and engine state (gauges).

Latencies are observed when a request ends, from the times the AsyncEngine
recorded, so gRPC and HTTP requests land in the same histograms. Engine state
(queues, KV pages, prefix hits, preemptions) is read from a snapshot taken in
the engine thread just before each scrape. The registry belongs to the server
instance, not to prometheus_client's process-wide default.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jserve.engine.async_engine import EngineStats, RequestTimes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets span a tiny model on a CPU (milliseconds) to a large one under load (tens of seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector:
  """Exposes the latest EngineStats snapshot as gauges and a counter."""

  def __init__(self, model_name: str):
    self.model_name = model_name
    self.stats = EngineStats()

  def collect(self):
    s, labels = self.stats, [self.model_name]

    def gauge(name, doc, value):
      g = GaugeMetricFamily(name, doc, labels=["model_name"])
      g.add_metric(labels, value)
      return g

    yield gauge("jserve_num_requests_running", "Requests in the running set (holding KV pages).", s.num_running)
    yield gauge("jserve_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
    yield gauge("jserve_kv_cache_used_pages", "KV pages held by requests (neither free nor cached).",
                s.kv_used_pages)
    yield gauge("jserve_kv_cache_cached_pages", "Free KV pages that still hold a reusable prefix.",
                s.kv_cached_pages)
    yield gauge("jserve_kv_cache_total_pages", "Usable KV pages in the pool.", s.kv_total_pages)
    yield gauge("jserve_kv_cache_usage_ratio", "Fraction of KV pages held by requests.",
                s.kv_used_pages / s.kv_total_pages if s.kv_total_pages else 0.0)
    yield gauge("jserve_prefix_cache_hit_rate", "Fraction of prompt tokens found in the prefix cache.",
                s.prefix_cache_hit_rate)
    c = CounterMetricFamily("jserve_num_preemptions", "Requests preempted for KV pages.", labels=["model_name"])
    c.add_metric(labels, s.num_preemptions)
    yield c
    c = CounterMetricFamily("jserve_engine_steps", "Engine steps run.", labels=["model_name"])
    c.add_metric(labels, s.num_steps)
    yield c


class ServerMetrics:
  """The server's registry; `observe` is the AsyncEngine's on_request_done callback."""

  def __init__(self, model_name: str):
    self.model_name = model_name
    self.registry = CollectorRegistry()
    r, labels = self.registry, ["model_name"]
    self.ttft = Histogram("jserve_time_to_first_token_seconds", "Time from arrival to the first output token.",
                          labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
    self.tpot = Histogram("jserve_time_per_output_token_seconds",
                          "Mean time between output tokens of a request (after the first).",
                          labels, buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
    self.e2e = Histogram("jserve_e2e_request_latency_seconds", "Time from arrival to the last output token.",
                         labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
    self.queue = Histogram("jserve_request_queue_time_seconds", "Time from arrival to first being scheduled.",
                           labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
    self._finished = Counter("jserve_requests", "Requests that ended, by finish reason (abort: cancelled, "
                             "disconnected, timed out or shut down).", labels + ["finish_reason"], registry=r)
    self.prompt_tokens = Counter("jserve_prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                 registry=r).labels(model_name)
    self.generation_tokens = Counter("jserve_generation_tokens", "Output tokens generated.", labels,
                                     registry=r).labels(model_name)
    self._rejected = Counter("jserve_rejected_requests", "Requests refused before reaching the engine, by "
                             "HTTP status and front end.", labels + ["status", "frontend"], registry=r)
    self._engine = _EngineCollector(model_name)
    r.register(self._engine)

  def observe(self, t: RequestTimes):
    self._finished.labels(self.model_name, t.finish_reason or "abort").inc()
    self.prompt_tokens.inc(t.num_prompt_tokens)
    self.generation_tokens.inc(t.num_output_tokens)
    if t.scheduled is not None:
      self.queue.observe(max(t.scheduled - t.arrival, 0.0))
    if t.first_token is not None:
      self.ttft.observe(t.first_token - t.arrival)
    if t.finish_reason == "abort" or t.finished is None:
      return  # a cut-short request says nothing about end-to-end latency or decode speed
    self.e2e.observe(t.finished - t.arrival)
    if t.first_token is not None and t.num_output_tokens > 1:
      self.tpot.observe((t.finished - t.first_token) / (t.num_output_tokens - 1))

  def rejected(self, http_status: int, frontend: str):
    self._rejected.labels(self.model_name, str(http_status), frontend).inc()

  def render(self, stats: EngineStats) -> bytes:
    """The Prometheus text exposition with engine gauges from `stats`."""
    self._engine.stats = stats
    return generate_latest(self.registry)

"""tools/bench_online.py: how many requests a run sends in its share of the budget, and its table."""

import math

from tools import bench_online


def test_a_slow_rate_sends_what_arrives_in_sixty_percent_of_its_share():
  # 4 requests/s for a 62 s share: 300 would take 75 s to arrive and be cut; 148 arrive in 37 s.
  assert bench_online.prompts_for_run("4", 62.0, 300) == 148
  assert bench_online.prompts_for_run("16", 62.0, 300) == 300  # 595 would fit: --num_prompts caps it
  assert bench_online.prompts_for_run("inf", 1.0, 300) == 300  # all at once: no arrival span
  assert bench_online.prompts_for_run("0.01", 10.0, 300) == 1  # never zero requests


def test_table_gives_each_runs_request_count_and_failures():
  s = {"completed": 148, "request_throughput": 3.9, "output_token_throughput": 780.0,
       **{k: {"p50": 1.0, "p99": 2.0} for k in ("ttft_ms", "tpot_ms", "itl_ms")}}
  results = {"runs": [{"backend": "grpc", "rate": 4.0, "requests": 148, "summary": s},
                      {"backend": "grpc", "rate": math.inf, "requests": 300, "summary": {"error": "cut at 62 s"}}]}
  header, _, ok, cut = bench_online.table(results)
  assert header.split("|")[3].strip() == "requests"
  assert [c.strip() for c in ok.split("|")[1:5]] == ["grpc", "4.0", "148", "3.90"]
  assert "failed: cut at 62 s" in cut and "| 300 |" in cut

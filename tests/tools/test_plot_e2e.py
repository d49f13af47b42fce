"""tools/plot_e2e.py: which result files it recognizes, and the series it draws from them."""

import json
import subprocess
import sys

from tools import plot_e2e


def _summary(api, rate, ttft, tpot, tok_s):
  return {"backend": api, "request_rate": rate, "output_token_throughput": tok_s,
          "ttft_ms": {"p50": ttft, "p99": 2 * ttft}, "tpot_ms": {"p50": tpot, "p99": 2 * tpot}}


ONLINE = {"preset": "tiny", "runs": [
    {"backend": "grpc", "rate": 4.0, "summary": _summary("grpc", 4.0, 90.0, 7.0, 900.0)},
    {"backend": "grpc", "rate": float("inf"), "summary": _summary("grpc", float("inf"), 60.0, 9.0, 5000.0)},
    {"backend": "http", "rate": 4.0, "summary": _summary("http", 4.0, 80.0, 6.5, 890.0)}]}
ANCHOR = {"preset": "tiny", "device": "cpu", "date": "2026-12-07", "workloads": [],
          "hf_anchor": [{"batch": 32, "hf_output_tok_s": 600.0, "jserve_output_tok_s": 18000.0},
                        {"batch": 1, "hf_output_tok_s": 20.0, "jserve_output_tok_s": 700.0}]}


def test_bench_online_results_are_serving_points_with_their_api():
  assert plot_e2e.kind_of(ONLINE) == "online"
  assert plot_e2e.kind_of(ANCHOR) == "e2e"
  points = plot_e2e.online_points(ONLINE)
  assert [(p["backend"], p["request_rate"]) for p in points] == [("grpc", 4.0), ("grpc", float("inf")), ("http", 4.0)]
  assert points[1]["tpot_ms"]["p50"] == 9.0


def test_latency_plot_draws_a_line_per_api_and_the_latency_throughput_curve(monkeypatch, tmp_path):
  plt = plot_e2e._plt()
  drawn = []
  real_subplots = plt.subplots

  def subplots(*a, **kw):
    fig, axes = real_subplots(*a, **kw)
    drawn.append(axes)
    return fig, axes

  monkeypatch.setattr(plt, "subplots", subplots)
  monkeypatch.setattr(plot_e2e, "_plt", lambda: plt)
  path = tmp_path / "latency.png"
  plot_e2e.plot_latency(plot_e2e.online_points(ONLINE), str(path))
  assert path.stat().st_size > 0
  ttft, _, curve = drawn[0]
  lines = {line.get_label(): list(line.get_ydata()) for line in ttft.get_lines()}
  assert lines["grpc TTFT p50"] == [90.0, 60.0] and lines["http TTFT p50"] == [80.0]
  grpc_curve = [line for line in curve.get_lines() if line.get_label() == "grpc TPOT p50"][0]
  assert list(grpc_curve.get_xdata()) == [900.0, 5000.0] and list(grpc_curve.get_ydata()) == [7.0, 9.0]


def test_command_line_writes_the_anchor_and_latency_plots(tmp_path):
  (tmp_path / "anchor.json").write_text(json.dumps(ANCHOR))
  (tmp_path / "online.json").write_text(json.dumps(ONLINE))
  out = subprocess.run([sys.executable, "-m", "tools.plot_e2e", f"--out_dir={tmp_path}", "--prefix=p_",
                        str(tmp_path / "anchor.json"), str(tmp_path / "online.json")],
                       capture_output=True, text=True, check=True)
  written = out.stdout.split()
  assert written == [str(tmp_path / "p_anchor.png"), str(tmp_path / "p_latency.png")], out.stdout + out.stderr
  assert all((tmp_path / f).stat().st_size > 0 for f in ("p_anchor.png", "p_latency.png"))


def test_step_sweep_plot_draws_the_serial_bound_where_the_rows_have_it(monkeypatch, tmp_path):
  plt = plot_e2e._plt()
  drawn = []
  real_subplots = plt.subplots
  monkeypatch.setattr(plt, "subplots", lambda *a, **kw: drawn.append(real_subplots(*a, **kw)) or drawn[-1])
  monkeypatch.setattr(plot_e2e, "_plt", lambda: plt)
  rows = [dict(batch=64, context=1024, step_ms=7.51, roofline_ms=5.58, flop_bound_ms=1.26, bound_ms=5.58,
               fraction=0.74, serial_ms=5.58, tokens_per_s=8522.0),
          dict(batch=256, context=1024, step_ms=16.13, roofline_ms=11.68, flop_bound_ms=5.03, bound_ms=11.68,
               fraction=0.72, serial_ms=13.14, tokens_per_s=15871.0)]
  for with_serial in (True, False):
    mine = [dict(r) if with_serial else {k: v for k, v in r.items() if k != "serial_ms"} for r in rows]
    assert plot_e2e.plot_step_sweep({"step_sweep": {"rows": mine}}, "8B", str(tmp_path / "s.png"))
    _, axes = drawn[-1]
    lines = {line.get_label(): list(line.get_ydata()) for line in axes[0][0].get_lines()}
    assert ("serial bound (KV reads, then matmuls)" in lines) == with_serial
    if with_serial:
      assert lines["serial bound (KV reads, then matmuls)"] == [5.58, 13.14]

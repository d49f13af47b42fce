"""The parts of tools/profile_step.py that turn a trace into figures."""

import pytest

from tools.profile_step import busy_ns, kind_of


def test_busy_time_is_the_union_of_kernel_intervals():
  # Overlapping (0-10, 5-12), nested (20-30 holds 22-25), touching (30-35) and apart (40-41).
  events = [("a", 0, 10), ("b", 5, 7), ("c", 20, 10), ("d", 22, 3), ("e", 30, 5), ("f", 40, 1)]
  assert busy_ns(events) == 12 + 15 + 1
  assert busy_ns(list(reversed(events))) == 28
  assert busy_ns([]) == 0


@pytest.mark.parametrize("name,kind", [
    ("ragged_paged_attention_m16_n64_s1", "attention"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("loop_dynamic_update_slice_fusion", "kv write"),
    ("input_scatter_fusion_3", "kv write"),
    ("sort_topk_kernel", "sort / top-k"),
    ("loop_multiply_fusion_12", "other (fusions)"),
])
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
  assert kind_of(name) == kind

"""Importing jserve lets XLA's GPU allocator have 92% of a card, not XLA's default 75%."""

import os
import subprocess
import sys


def _fraction_after_import(env_value):
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  if env_value is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = env_value
  code = "import os, jserve; print(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_import_sets_the_allocator_share_when_unset():
  assert _fraction_after_import(None) == "0.92"


def test_a_share_the_user_set_is_kept():
  assert _fraction_after_import("0.5") == "0.5"

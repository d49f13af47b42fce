"""The `jserve` command: `jserve <command> [--flags]`, with absl flags (`--helpfull` lists all)."""

import os
import sys

from absl import app, logging

COMMANDS = ("generate", "serve", "batch", "plan", "convert", "bench")
USAGE = f"usage: jserve {{{','.join(COMMANDS)}}} [--flags]   (jserve <command> --helpfull lists the flags)"


def _main(argv):
  from jserve.errors import JserveError
  command = argv[1] if len(argv) > 1 else None
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[2:]}; every option is a --flag")
  try:
    if command == "generate":
      from jserve.cli import generate
      generate.main()
    elif command in COMMANDS:
      import importlib
      module = importlib.import_module(f"jserve.cli.{command}")
      module.main()
    else:
      raise app.UsageError(f"unknown command {command!r}\n{USAGE}" if command else USAGE)
  except JserveError as e:
    # Bad input is the user's to fix: one line, no traceback.
    print(f"jserve {command}: error: {e}", file=sys.stderr)
    sys.exit(1)


def _register_flags():
  # Every command's flags are defined before absl parses argv.
  from jserve.cli import flags as _flags  # noqa: F401
  from jserve.cli import generate as _generate  # noqa: F401
  for name in ("serve", "batch", "plan", "convert", "bench"):
    try:
      __import__(f"jserve.cli.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"jserve.cli.{name}":
        raise


def run():
  """Console-script entry point."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _register_flags()
  logging.set_verbosity(logging.INFO)
  app.run(_main, argv=sys.argv)


if __name__ == "__main__":
  run()

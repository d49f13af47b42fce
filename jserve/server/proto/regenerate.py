"""Regenerates jserve_pb2.py, jserve_pb2.pyi and jserve_pb2_grpc.py from jserve.proto (needs grpcio-tools).

    python -m jserve.server.proto.regenerate

The proto is compiled from the repository root, so the generated stub imports
`jserve.server.proto.jserve_pb2` by its package path rather than as a
top-level module.
"""

import os
import sys

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(PROTO_DIR)))
PROTO = os.path.join("jserve", "server", "proto", "jserve.proto")
GENERATED = ("jserve_pb2.py", "jserve_pb2.pyi", "jserve_pb2_grpc.py")


def generate(out_root: str = ROOT) -> list[str]:
  """Writes the generated modules under out_root/jserve/server/proto/; returns their paths."""
  from grpc_tools import protoc
  os.makedirs(os.path.join(out_root, os.path.dirname(PROTO)), exist_ok=True)
  include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
  cwd = os.getcwd()
  os.chdir(ROOT)  # protoc names the file by its path relative to the include root
  try:
    rc = protoc.main(["grpc_tools.protoc", "-I.", f"-I{include}", f"--python_out={out_root}",
                      f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", PROTO])
  finally:
    os.chdir(cwd)
  if rc != 0:
    raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
  return [os.path.join(out_root, os.path.dirname(PROTO), name) for name in GENERATED]


if __name__ == "__main__":
  generate()
  sys.exit(0)

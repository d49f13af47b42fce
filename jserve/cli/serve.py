"""`jserve serve`: the gRPC service and the OpenAI-compatible HTTP endpoint for one model."""

import asyncio
import os
import sys
import threading

from absl import flags, logging

from jserve.cli.flags import engine_config
from jserve.server.service import read_api_keys

FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0 or :: for every interface)")
flags.DEFINE_integer("port", 50051, "gRPC port (0: no gRPC)")
flags.DEFINE_integer("http_port", 8000, "OpenAI-compatible HTTP port (0: no HTTP)")
flags.DEFINE_string("served_model_name", None, "model name clients send and see (default: the model directory's name)")
flags.DEFINE_string("api_key", None, "require 'Authorization: Bearer <key>' on gRPC and on HTTP /v1/*")
flags.DEFINE_string("api_key_file", None, "file of accepted API keys, one per line (with or without --api_key)")
flags.DEFINE_string("tls_cert", None, "PEM certificate chain: serve gRPC and HTTP over TLS (needs --tls_key)")
flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert")
flags.DEFINE_integer("max_message_bytes", 4 << 20, "largest request accepted: gRPC message or HTTP body")
flags.DEFINE_integer("max_waiting_requests", 1024,
                     "most requests waiting for the engine; beyond it RESOURCE_EXHAUSTED / HTTP 429 at once")
flags.DEFINE_float("shutdown_timeout_s", 30.0,
                   "on SIGTERM/SIGINT, how long in-flight requests may run on before they are aborted")
flags.DEFINE_integer("data_parallel_size", 1,
                     "engine replicas on this host, each on tensor_parallel_size x pipeline_parallel_size devices; "
                     "each request goes to the replica holding its longest cached prefix, or the least loaded")


def server_config():
  from jserve.server.server import ServerConfig
  return ServerConfig(
      host=FLAGS.host, port=FLAGS.port, http_port=FLAGS.http_port, served_model_name=FLAGS.served_model_name,
      api_keys=read_api_keys(FLAGS.api_key, FLAGS.api_key_file), tls_cert=FLAGS.tls_cert, tls_key=FLAGS.tls_key,
      max_message_bytes=FLAGS.max_message_bytes, max_waiting_requests=FLAGS.max_waiting_requests,
      shutdown_timeout_s=FLAGS.shutdown_timeout_s, data_parallel_size=FLAGS.data_parallel_size)


def main():
  from jserve.cli.flags import join_processes
  if join_processes():  # a follower: no server, it repeats process 0's steps on its devices
    from jserve.engine.engine import LLMEngine
    LLMEngine(engine_config()).follow()
    return
  from jserve.server.server import serve
  asyncio.run(serve(server_config(), engine_config()))
  if any(t.name == "jserve-engine" and t.is_alive() for t in threading.enumerate()):
    # Stopped while the model was still compiling: finalizing the interpreter under a thread that is
    # inside XLA aborts the process, so leave without it (the drain is done; nothing is lost).
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

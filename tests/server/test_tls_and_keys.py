"""TLS on both front ends and API keys from a key file, in-process over the fake engine (no compile)."""

import asyncio
import ssl
import subprocess

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.engine.async_engine import AsyncEngine
from jserve.engine.engine import EngineConfig
from jserve.errors import ConfigError
from jserve.server.grpc_server import GrpcFrontend
from jserve.server.http_server import HttpFrontend
from jserve.server.metrics import ServerMetrics
from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from jserve.server.server import ServerConfig
from jserve.server.service import ServingContext, read_api_keys
from tests.server.conftest import free_port
from tests.server.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
  # The openssl command is part of every machine this project runs on (Debian's base image).
  d = tmp_path_factory.mktemp("tls")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                  "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                  "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
  return str(d / "cert.pem"), str(d / "key.pem")


def test_tls_and_key_file(cert, tmp_path):
  cert_path, key_path = cert
  key_file = tmp_path / "keys.txt"
  key_file.write_text("# one key per line\nkey-one\n\nkey-two\n")
  keys = read_api_keys(None, str(key_file))
  assert keys == ("key-one", "key-two")

  with open(cert_path, "rb") as f:
    root_certificates = f.read()

  async def main():
    fake = FakeEngine()
    metrics = ServerMetrics("fake")
    engine = AsyncEngine(EngineConfig(), engine_factory=lambda: fake, on_request_done=metrics.observe)
    ctx = ServingContext(engine, "fake", api_keys=keys, metrics=metrics)
    engine.start()
    await engine.wait_ready()
    g = GrpcFrontend(ctx, "127.0.0.1", free_port(), tls_cert=cert_path, tls_key=key_path)
    h = HttpFrontend(ctx, "127.0.0.1", free_port(), tls_cert=cert_path, tls_key=key_path)
    await g.start()
    await h.start()
    await g.set_serving(True)
    try:
      creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
      async with grpc.aio.secure_channel(g.address, creds) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GenerationStub(channel)
        msgs = [m async for m in stub.Generate(pb.GenerateRequest(
            text="hi", sampling_params=pb.SamplingParams(max_tokens=3)), metadata=(("authorization", "Bearer key-two"),))]
        assert [t for m in msgs for c in m.choices for t in c.token_ids] == [0, 1, 2]
        with pytest.raises(grpc.aio.AioRpcError) as e:
          await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", "Bearer key-three"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
      async with grpc.aio.insecure_channel(g.address) as plain:  # a plaintext client cannot talk to it
        with pytest.raises(grpc.aio.AioRpcError) as e:
          await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
      assert h.address.startswith("https://")
      async with httpx2.AsyncClient(base_url=h.address, verify=ssl.create_default_context(cafile=cert_path)) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                            headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0 t1 "
        r = await http.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
    finally:
      await g.stop(0)
      await h.stop()
      await engine.stop()

  asyncio.run(asyncio.wait_for(main(), 60))


def test_busy_port_and_bad_flags_are_config_errors():
  with pytest.raises(ConfigError, match="at least one of gRPC and HTTP"):
    ServerConfig(port=0, http_port=0)
  with pytest.raises(ConfigError, match="give both or neither"):
    ServerConfig(tls_cert="/x.pem")
  with pytest.raises(ConfigError, match="does not exist"):
    read_api_keys(None, "/no/such/keys.txt")

  async def main():
    engine = AsyncEngine(EngineConfig(), engine_factory=FakeEngine)
    ctx = ServingContext(engine, "fake")
    first = HttpFrontend(ctx, "127.0.0.1", free_port())
    try:
      with pytest.raises(ConfigError, match=f"HTTP cannot listen on 127.0.0.1:{first.port}"):
        HttpFrontend(ctx, "127.0.0.1", first.port)
      with pytest.raises(ConfigError, match="gRPC cannot listen"):
        GrpcFrontend(ctx, "127.0.0.1", first.port)
    finally:
      first.sock.close()

  asyncio.run(main())

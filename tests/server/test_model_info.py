"""The served model's description says how its weights are stored: gRPC GetModelInfo through the generated
stub and HTTP /v1/models, in-process over the fake engine (no compile). test_grpc.py and test_http.py
check the unquantized answer of a real server."""

import asyncio

import grpc
import httpx2
import pytest

from jserve.engine.async_engine import AsyncEngine
from jserve.engine.engine import EngineConfig
from jserve.server.grpc_server import GrpcFrontend
from jserve.server.http_server import HttpFrontend
from jserve.server.proto import jserve_pb2 as pb
from jserve.server.proto import jserve_pb2_grpc as pb_grpc
from jserve.server.service import ServingContext
from tests.server.conftest import free_port
from tests.server.fake_engine import FakeEngine


@pytest.mark.parametrize("quantization,grpc_says", [("fp8", "fp8"), (None, "")])
def test_model_info_says_the_weights_quantization(quantization, grpc_says):
  async def main():
    engine = AsyncEngine(EngineConfig(), engine_factory=lambda: FakeEngine(quantization=quantization))
    ctx = ServingContext(engine, "fake")
    engine.start()
    await engine.wait_ready()
    g = GrpcFrontend(ctx, "127.0.0.1", free_port())
    h = HttpFrontend(ctx, "127.0.0.1", free_port())
    await g.start()
    await h.start()
    try:
      async with grpc.aio.insecure_channel(g.address) as channel:
        info = await pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
      assert info.quantization == grpc_says and info.model_name == "fake" and info.dtype == "float32"
      async with httpx2.AsyncClient(base_url=h.address) as http:
        listed = (await http.get("/v1/models")).json()["data"]
        card = (await http.get("/v1/models/fake")).json()
      assert listed == [card] and card["quantization"] == quantization and card["max_model_len"] == 64
    finally:
      await g.stop(0)
      await h.stop()
      await engine.stop()

  asyncio.run(asyncio.wait_for(main(), 60))

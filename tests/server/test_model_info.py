"""The served model's description says how its weights, the projections' inputs and the KV cache are
stored: gRPC GetModelInfo through the generated stub and HTTP /v1/models, in-process over the fake engine
(no compile). test_grpc.py and test_http.py check the unquantized answer of a real server."""

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


@pytest.mark.parametrize("quantization,activations,kv,grpc_says", [
    ("fp8", "fp8", "float8_e4m3fn", "fp8"), ("fp8", None, "bfloat16", "fp8"), (None, None, "float32", "")])
def test_model_info_says_the_weights_quantization(quantization, activations, kv, grpc_says):
  async def main():
    engine = AsyncEngine(EngineConfig(), engine_factory=lambda: FakeEngine(
        quantization=quantization, activation_quantization=activations, kv_cache_dtype=kv))
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
      assert info.activation_quantization == (activations or "") and info.kv_cache_dtype == kv
      async with httpx2.AsyncClient(base_url=h.address) as http:
        listed = (await http.get("/v1/models")).json()["data"]
        card = (await http.get("/v1/models/fake")).json()
      assert listed == [card] and card["quantization"] == quantization and card["max_model_len"] == 64
      assert card["activation_quantization"] == activations and card["kv_cache_dtype"] == kv
    finally:
      await g.stop(0)
      await h.stop()
      await engine.stop()

  asyncio.run(asyncio.wait_for(main(), 60))

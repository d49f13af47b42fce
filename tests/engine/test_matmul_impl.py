"""EngineConfig.matmul_impl: which decode matmul the step's projections use, checked at start."""

import pytest

from jserve import LLM
from jserve.engine.engine import EngineConfig
from jserve.errors import ConfigError


def test_an_unknown_matmul_impl_is_refused_with_the_choices():
  with pytest.raises(ConfigError, match="matmul_impl='cublas': use one of auto, gpu, hopper, xla"):
    EngineConfig(matmul_impl="cublas")


@pytest.mark.parametrize("impl", ["gpu", "hopper"])
def test_a_gpu_kernel_on_a_cpu_engine_is_refused_before_loading(tiny_model_dir, impl):
  with pytest.raises(ConfigError, match=f"matmul_impl='{impl}' is a GPU kernel and this engine runs on cpu"):
    LLM(tiny_model_dir, matmul_impl=impl, dtype="float32", compilation_cache_dir=None)

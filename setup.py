"""jserve: LLM inference serving runtime on JAX."""

from setuptools import find_packages, setup

setup(
    name="jserve",
    version="0.1.0",
    description="LLM inference serving on JAX: paged KV cache, continuous batching, Pallas kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["jserve*", "pallas_kernels*", "sharding*", "configs*", "tools*"]),
    package_data={"jserve": ["server/proto/*.proto", "default_model/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10,<0.12",
        "flax",
        "optax",
        "numpy",
        "ml_dtypes",
        "absl-py",
        "safetensors",
        "tokenizers",
        "jinja2",
        "tqdm",
        "grpcio",
        "grpcio-health-checking",
        "grpcio-reflection",
        "protobuf",
        "prometheus-client",
        "fastapi",
        "uvicorn",
        "llguidance",
        "orbax-checkpoint",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "torch>=2.4", "transformers>=4.45",
                 "openai", "jsonschema", "scipy", "grpcio-tools", "matplotlib"],
        "gpu": ["jax[cuda13]>=0.10,<0.12"],
        "tpu": ["jax[tpu]>=0.10,<0.12"],
    },
    entry_points={"console_scripts": ["jserve=jserve.cli.main:run"]},
)

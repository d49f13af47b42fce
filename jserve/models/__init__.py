"""Model families. Every supported architecture maps to one module of pure functions."""

from jserve.models.llama import (StepInputs, compute_logits, forward, forward_dense, init_params,
                                 param_specs)

__all__ = ["StepInputs", "compute_logits", "forward", "forward_dense", "init_params", "param_specs"]

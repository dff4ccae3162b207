"""Python face of the multitune C++ ops: typed wrappers, fake/autograd kernels, references.

Importing this package compiles nothing: the C++ extension is built (or loaded from its cache)
on the first op call or ``active_backend()``.
"""

from multitune.ops.extension import active_backend, extension_error
from multitune.ops.linear_cross_entropy import (
    linear_cross_entropy,
    reference_linear_cross_entropy,
)
from multitune.ops.linear_logprob import DEFAULT_CHUNK_SIZE
from multitune.ops.linear_token_logprobs import (
    linear_token_logprobs,
    reference_linear_token_logprobs,
)
from multitune.ops.packing import plan_packing, reference_plan_packing

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "active_backend",
    "extension_error",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "plan_packing",
    "reference_linear_cross_entropy",
    "reference_linear_token_logprobs",
    "reference_plan_packing",
]

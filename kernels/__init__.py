"""Triton kernels and their launchers (installed as ``shardsoftmax.kernels``).

Tensor in, tensor out: no autograd and no torch.distributed here. The math layer
(``shardsoftmax.partials`` and friends) calls these; nothing here imports the layers above.
"""

from .elementwise import cross_entropy_backward, softmax_write
from .linear import linear_cross_entropy_backward, linear_logits, linear_partials
from .partials import FIELDS, MAX_K, N_FIELDS, shard_partials
from .sample import gumbel_argmax

__all__ = [
    "FIELDS",
    "MAX_K",
    "N_FIELDS",
    "cross_entropy_backward",
    "gumbel_argmax",
    "interpreted",
    "linear_cross_entropy_backward",
    "linear_logits",
    "linear_partials",
    "shard_partials",
    "softmax_write",
]


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .partials import _shard_partials_kernel

    return isinstance(_shard_partials_kernel, InterpretedFunction)

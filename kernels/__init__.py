"""Triton kernels and their launchers (installed as ``shardsoftmax.kernels``).

Tensor in, tensor out: no autograd and no torch.distributed here. The math layer
(``shardsoftmax.partials`` and friends) calls these; nothing here imports the layers above.
"""

from .check import check_headers
from .elementwise import cross_entropy_backward, softmax_write
from .finalize import can_merge_topk, finalize_cross_entropy, finalize_stats, finalize_topk
from .linear import linear_cross_entropy_backward, linear_logits, linear_partials
from .partials import FIELDS, MAX_K, N_FIELDS, shard_partials
from .sample import gumbel_argmax

__all__ = [
    "FIELDS",
    "MAX_K",
    "N_FIELDS",
    "can_merge_topk",
    "check_headers",
    "cross_entropy_backward",
    "finalize_cross_entropy",
    "finalize_stats",
    "finalize_topk",
    "gumbel_argmax",
    "interpreted",
    "linear_cross_entropy_backward",
    "linear_logits",
    "linear_partials",
    "shard_partials",
    "softmax_write",
]


_INTERPRETED: list[bool] = []


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    if not _INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        from .partials import _shard_partials_kernel

        _INTERPRETED.append(isinstance(_shard_partials_kernel, InterpretedFunction))
    return _INTERPRETED[0]

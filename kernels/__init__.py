"""Triton kernels and their launchers (installed as ``shardsoftmax.kernels``).

Tensor in, tensor out: no autograd and no torch.distributed here. The math layer
(``shardsoftmax.partials`` and friends) calls these; nothing here imports the layers above.
"""

import os

from . import _compat

if os.environ.get("TRITON_INTERPRET") == "1":
    _compat.patch_interpreter_index()

from .check import check_headers  # noqa: E402
from .common import ID32_SENTINEL, KEY16_COLS, narrow_ids, pack_key16, unpack_key16, widen_ids  # noqa: E402
from .elementwise import cross_entropy_backward, softmax_write  # noqa: E402
from .finalize import can_merge_topk, finalize_cross_entropy, finalize_stats, finalize_topk  # noqa: E402
from .linear import linear_grad_logits, linear_logits, linear_partials  # noqa: E402
from .partials import FIELDS, MAX_K, N_FIELDS, shard_partials  # noqa: E402
from .sample import gumbel_argmax  # noqa: E402

__all__ = [
    "FIELDS",
    "ID32_SENTINEL",
    "KEY16_COLS",
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
    "linear_grad_logits",
    "linear_logits",
    "linear_partials",
    "narrow_ids",
    "pack_key16",
    "shard_partials",
    "softmax_write",
    "unpack_key16",
    "widen_ids",
]


_INTERPRETED: list[bool] = []


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    if not _INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        from .partials import _shard_partials_kernel

        _INTERPRETED.append(isinstance(_shard_partials_kernel, InterpretedFunction))
    return _INTERPRETED[0]

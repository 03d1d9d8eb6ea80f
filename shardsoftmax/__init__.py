"""shardsoftmax: exact softmax-family results over a vocabulary sharded across GPUs.

Each shard is read once by a Triton kernel into small per-row partials; one merge (and, across
ranks, one collective) turns them into exact global results.
"""

from . import nn as nn  # re-exported: ss.nn
from .api import (
    SoftmaxStats,
    cross_entropy,
    linear_cross_entropy,
    linear_softmax_stats,
    log_softmax,
    sample,
    softmax,
    softmax_stats,
    synchronize,
    topk,
)
from .backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "SoftmaxStats",
    "cross_entropy",
    "get_backend",
    "linear_cross_entropy",
    "linear_softmax_stats",
    "log_softmax",
    "set_backend",
    "sample",
    "softmax",
    "softmax_stats",
    "synchronize",
    "topk",
    "use_backend",
]

"""Chooses, per call, who computes a shard's partials and per-element passes: the Triton kernels
(CUDA, or the CPU under ``TRITON_INTERPRET=1``) or the PyTorch reference (CPU, float64)."""

from __future__ import annotations

import contextlib

import torch

from . import kernels, reference
from .partials import Partials, identity, merge_stacked

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA, or on CPU when Triton runs in interpreter mode; PyTorch otherwise),
    'triton' or 'torch'. Float64 logits always use the PyTorch path."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of ``set_backend``."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def triton_interpreted() -> bool:
    return kernels.interpreted()


def uses_triton(logits: torch.Tensor) -> bool:
    if logits.dtype not in TRITON_DTYPES or _backend == "torch":
        return False
    runnable = logits.is_cuda or (logits.device.type == "cpu" and triton_interpreted())
    if _backend == "triton" and not runnable:
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing shardsoftmax"
        )
    return runnable


def _merge_splits(stats: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor) -> Partials:
    """A kernel's per-split partials ([N_FIELDS, S, N], [S, N, k]) merged into one piece."""
    if stats.shape[1] == 1:
        return Partials(*stats[:, 0].unbind(0), vals[0], ids[0])
    return merge_stacked(Partials(*stats.unbind(0), vals, ids))


def shard_partials(logits: torch.Tensor, target: torch.Tensor | None, **kw) -> Partials:
    """Partials of one 2-D shard ([N] and [N, k] fields), merged over the kernel's column splits."""
    if uses_triton(logits):
        return _merge_splits(*kernels.shard_partials(logits, target, **kw))
    kw.pop("need_entropy", None), kw.pop("need_sum_x", None)  # the reference computes every field
    return reference.shard_partials(logits, target, **kw)


def linear_partials(hidden, weight, bias, target, **kw) -> Partials:
    """Partials of the logit shard ``hidden @ weight^T (+ bias)``, never stored whole: the fused
    kernel, or the PyTorch reference a chunk of rows at a time."""
    if uses_triton(hidden):
        return _merge_splits(*kernels.linear_partials(hidden, weight, bias, target, **kw))
    kw.pop("need_entropy", None), kw.pop("need_sum_x", None)
    return reference.shard_linear_partials(hidden, weight, bias, target, **kw)


def linear_cross_entropy_backward(hidden, weight, bias, target, lse, row_scale, **kw):
    """(grad_hidden in the compute dtype, grad_weight, grad_bias) of the fused LM head's loss."""
    if uses_triton(hidden):
        return kernels.linear_cross_entropy_backward(
            hidden, weight, bias, target, lse.float(), row_scale.float(), **kw
        )
    return reference.shard_linear_cross_entropy_backward(hidden, weight, bias, target, lse, row_scale, **kw)


def shard_softmax(logits: torch.Tensor, lse: torch.Tensor, **kw) -> torch.Tensor:
    if uses_triton(logits):
        return kernels.softmax_write(logits, lse.float(), **kw)
    return reference.shard_softmax(logits, lse, **kw)


def shard_cross_entropy_backward(logits, target, lse, row_scale, **kw) -> torch.Tensor:
    if uses_triton(logits):
        return kernels.cross_entropy_backward(logits, target, lse.float(), row_scale.float(), **kw)
    return reference.shard_cross_entropy_backward(logits, target, lse, row_scale, **kw)


def shard_gumbel_argmax(logits: torch.Tensor, **kw) -> Partials:
    """Top-1 partials of x' + gumbel noise, merged over column splits (other fields: identity)."""
    if uses_triton(logits):
        vals, ids = kernels.gumbel_argmax(logits, **kw)
    else:
        vals, ids = (t[None] for t in reference.shard_gumbel_argmax(logits, **kw))
    empty = identity(logits.shape[0], 0, device=logits.device)
    n_splits = vals.shape[0]
    scalars = [f[None].expand(n_splits, -1) for f in empty[:7]]
    return merge_stacked(Partials(*scalars, vals[..., None].float(), ids[..., None]))

"""Chooses, per call, who computes a shard's partials and per-element passes: the Triton kernels
(CUDA, or the CPU under ``TRITON_INTERPRET=1``) or the PyTorch reference (CPU, float64)."""

from __future__ import annotations

import contextlib

import torch

from . import kernels, reference
from . import partials as P
from .partials import Partials, Pieces, StatsRows, identity, merge_stacked

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


def check_headers(gathered: torch.Tensor, agreed: torch.Tensor, out: torch.Tensor) -> None:
    """The group exchange's steady-state header check (``kernels.check_headers``): ``out`` gets
    the gathered header words, then at ``G * head`` a flag (1: some rank's header differs from
    ``agreed``), and the gathered payload is filled with -1 words when it is 1. One launch with
    Triton; torch ops otherwise."""
    if _backend != "torch" and (gathered.is_cuda or (gathered.device.type == "cpu" and triton_interpreted())):
        return kernels.check_headers(gathered, agreed, out)
    words = gathered[:, : agreed.shape[1]]
    bad = (words != agreed).any()
    n_head = words.numel()
    out[:n_head].copy_(words.reshape(-1))
    out[n_head : n_head + 1].copy_(bad.view(1))
    gathered[:, agreed.shape[1] :].masked_fill_(bad, -1)


def _merge_splits(stats: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor) -> Partials:
    """A kernel's per-split partials ([F, S, N], [S, N, k]) merged into one piece."""
    if stats.shape[1] == 1:
        return Partials(*P.scalar_fields(stats[:, 0]), vals[0], ids[0])
    return merge_stacked(Partials(*P.scalar_fields(stats), vals, ids))


def merge_pieces(pieces: Pieces) -> Partials:
    """Pieces merged into one ([N] and [N, k] fields); no op for one unpacked piece."""
    if pieces.key_base is not None:
        return pieces.merged()
    return _merge_splits(pieces.stats, pieces.topk_vals, pieces.topk_ids)


def shard_partials(logits: torch.Tensor, target: torch.Tensor | None, **kw) -> Partials:
    """Partials of one 2-D shard ([N] and [N, k] fields), merged over the kernel's column splits."""
    if uses_triton(logits):
        return _merge_splits(*kernels.shard_partials(logits, target, **kw))
    kw.pop("need_entropy", None), kw.pop("need_sum_x", None)  # the reference computes every field
    return reference.shard_partials(logits, target, **kw)


def shard_pieces(
    logits: torch.Tensor, target: torch.Tensor | None, *, out: Pieces | None = None, **kw
) -> Pieces:
    """Partials of one 2-D shard as pieces for finalize: the Triton kernel's column splits as it
    wrote them (finalize merges them; into ``out`` when they fit, see ``kernels.shard_partials``),
    or the reference's partials as one piece."""
    if uses_triton(logits):
        slots = None if out is None else (out.stats, out.topk_vals, out.topk_ids)
        return Pieces(*kernels.shard_partials(logits, target, out=slots, **kw))
    kw.pop("need_entropy", None), kw.pop("need_sum_x", None)
    return P.pack(reference.shard_partials(logits, target, **kw))


def _kernel_finalize(logits: torch.Tensor, pieces: Pieces) -> bool:
    return uses_triton(logits) and pieces.stats.dtype == torch.float32


def finalize_stats(
    logits: torch.Tensor, pieces: Pieces, target: torch.Tensor | None, *, vocab_start: int, ignore_index: int
) -> StatsRows:
    """The per-row results of ``softmax_stats``: one finalize launch, or ``partials.stats_rows``."""
    if not _kernel_finalize(logits, pieces):
        return P.stats_rows(pieces.merged(), target, ignore_index)
    if not kernels.can_merge_topk(pieces.n_splits, pieces.k):
        pieces = P.pack(pieces.merged())
    rows, topk, ids = kernels.finalize_stats(
        pieces.stats,
        pieces.topk_vals,
        pieces.topk_ids,
        target,
        vocab_start=vocab_start,
        ignore_index=ignore_index,
        key_base=pieces.key_base,
    )
    lse, row_max, entropy, target_logprob = rows.unbind(0)
    return StatsRows(lse, row_max, entropy, None if target is None else target_logprob, topk, ids)


def merged_topk(
    logits: torch.Tensor, pieces: Pieces, *, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged top-k (values, ids) of the pieces."""
    if pieces.n_splits == 1:  # (packed pieces come from several ranks: S > 1)
        return pieces.topk_vals[0].contiguous(), kernels.widen_ids(pieces.topk_ids[0]).contiguous()
    if _kernel_finalize(logits, pieces) and kernels.can_merge_topk(pieces.n_splits, pieces.k):
        return kernels.finalize_topk(
            pieces.topk_vals, pieces.topk_ids, vocab_start=vocab_start, key_base=pieces.key_base
        )
    merged = pieces.merged()
    return merged.topk_vals, merged.topk_ids


def finalize_cross_entropy(
    logits: torch.Tensor, pieces: Pieces, target: torch.Tensor, **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse_bwd)`` (see ``partials.cross_entropy_rows``): one launch, or PyTorch."""
    if _kernel_finalize(logits, pieces):
        return kernels.finalize_cross_entropy(pieces.stats, target, **kw)
    return P.cross_entropy_rows(pieces.merged(), target, **kw)


def shard_softmax(logits: torch.Tensor, pieces: Pieces, **kw) -> torch.Tensor:
    """This shard of the (log-)softmax; the kernel merges the pieces' lse itself."""
    if _kernel_finalize(logits, pieces):
        return kernels.softmax_write(logits, pieces.stats, **kw)
    return reference.shard_softmax(logits, P.log_normalizer(pieces.merged()), **kw)


def shard_cross_entropy_backward(
    logits, target, lse_bwd, grad_out, *, ignore_index: int, **kw
) -> torch.Tensor:
    """The gradient w.r.t. this shard's logits, from what ``finalize_cross_entropy`` saved."""
    if uses_triton(logits) and lse_bwd.dtype == torch.float32:
        return kernels.cross_entropy_backward(
            logits, target, lse_bwd, grad_out, ignore_index=ignore_index, **kw
        )
    row_scale = P.backward_row_scale(lse_bwd, grad_out, target != ignore_index)
    return reference.shard_cross_entropy_backward(logits, target, lse_bwd[:-1], row_scale, **kw)


def linear_pieces(hidden, weight, bias, target, **kw) -> Pieces:
    """``shard_pieces`` of the logit shard ``hidden @ weight^T (+ bias)``, never stored whole: the
    fused kernel's column splits as it wrote them, or the PyTorch reference (a chunk of rows at a
    time) as one piece."""
    if uses_triton(hidden):
        return Pieces(*kernels.linear_partials(hidden, weight, bias, target, **kw))
    kw.pop("need_entropy", None), kw.pop("need_sum_x", None)
    return P.pack(reference.shard_linear_partials(hidden, weight, bias, target, **kw))


def linear_grad_logits(hidden, weight, bias, target, lse_bwd, grad_out, *, out, ignore_index: int, **kw):
    """dloss/dlogits of the logits ``hidden @ weight^T (+ bias)`` (``weight``: a chunk of the
    shard's rows), from logits never rounded to the inputs' dtype, written into ``out`` (the
    inputs' dtype) and returned: the fused tile kernel, or fp32 logits (fp64 for fp64 inputs) and
    ``shard_cross_entropy_backward``."""
    if uses_triton(hidden) and lse_bwd.dtype == torch.float32:
        return kernels.linear_grad_logits(
            hidden, weight, bias, target, lse_bwd, grad_out, out=out, ignore_index=ignore_index, **kw
        )
    logits = reference.linear_logits(hidden, weight, bias)
    grad = shard_cross_entropy_backward(logits, target, lse_bwd, grad_out, ignore_index=ignore_index, **kw)
    return out.copy_(grad)


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

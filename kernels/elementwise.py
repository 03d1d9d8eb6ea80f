"""Per-element passes that need the merged per-row statistics: the softmax / log-softmax shard and
the cross-entropy gradient. Each reads the logits once and writes one output of the same shape.
Both take the per-row statistics straight from what the partials and finalize kernels wrote, so
a call needs no torch op between the launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, cross_entropy_grad, next_pow2, transform_logits
from .finalize import merge_splits, split_block

BLOCK_COLS = 2048


@triton.jit
def _softmax_write_kernel(
    # pointers
    logits_ptr,
    stats_ptr,  # [>= 2, S, n_rows] fp32 partials of S column splits: max, sumexp, ...
    out_ptr,
    # sizes
    n_cols,
    n_valid_cols,
    n_splits,
    # strides
    stride_logits_row,
    stride_out_row,
    stride_stats_field,
    stride_stats_split,
    # transform
    softcap,
    inv_temperature,
    # meta
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits per load in the lse merge
):
    """Grid: (n_rows, cdiv(n_cols, BLOCK)). out = (x' - M) - log s (LOG) or exp(x' - M) / s, with
    (M, s) of the row's S splits merged (finalize.merge_splits); padding columns get -inf (LOG) or
    0."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(logits_ptr + row * stride_logits_row + cols, mask=in_row, other=0.0).to(tl.float32)
    x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    this_row = row + tl.arange(0, 1)
    m, s, _t, _sx, _c, _tl, _th = merge_splits(
        stats_ptr, this_row, this_row >= 0, n_splits, stride_stats_field, stride_stats_split,
        1, BLOCK_S, False, False, False,
    )  # fmt: skip
    # from x - M (exact near the max), not x - lse: lse = M + log s rounds at the scale of M
    valid = cols < n_valid_cols
    if LOG:
        y = tl.where(valid, (x - m) - tl.log(s), float("-inf"))
    else:
        y = tl.where(valid, tl.exp2((x - m) * 1.4426950408889634) * (1.0 / s), 0.0)
    tl.store(out_ptr + row * stride_out_row + cols, y.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _cross_entropy_backward_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    lse_ptr,  # [n_rows + 1]: lse per row (NaN: target found nowhere), then the reduction's scale
    grad_out_ptr,  # the loss's gradient: one per row (stride_grad_out) or one value (stride 0)
    grad_ptr,
    # sizes
    n_rows,
    n_cols,
    n_valid_cols,
    vocab_start,
    ignore_index,
    # strides
    stride_logits_row,
    stride_grad_row,
    stride_grad_out,
    # loss options
    smooth_per_class,  # label_smoothing / vocab_size
    target_weight,  # 1 - label_smoothing
    two_z_loss,  # 2 * z_loss
    # transform
    softcap,
    inv_temperature,
    # meta
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid: (n_rows, cdiv(n_cols, BLOCK)).

    dloss/dx'_j = row_scale * (p_j * (1 + 2 z lse) - (1 - eps) [j == target] - eps / C), p_j =
    exp(x'_j - lse), then times dx'/dx; row_scale = grad_out * (the reduction's scale), 0 on
    ignored rows. Padding columns and rows with row_scale == 0 get 0.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    raw = tl.load(logits_ptr + row * stride_logits_row + cols, mask=in_row, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    target = tl.load(target_ptr + row).to(tl.int64)
    scale = tl.load(grad_out_ptr + row * stride_grad_out).to(tl.float32) * tl.load(lse_ptr + n_rows)
    scale = tl.where(target == ignore_index, 0.0, scale)
    g = cross_entropy_grad(
        raw, cols, target - vocab_start, lse, scale, smooth_per_class, target_weight, two_z_loss,
        softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE,
    )  # fmt: skip
    # two wheres, not `block & scalar`: the Triton 3.8 interpreter cannot `&` a block with a scalar
    g = tl.where(cols < n_valid_cols, g, 0.0)
    g = tl.where(scale != 0.0, g, 0.0)
    tl.store(grad_ptr + row * stride_grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def _block(n_cols: int) -> int:
    return max(16, min(BLOCK_COLS, next_pow2(n_cols)))


def softmax_write(
    logits: torch.Tensor,
    stats: torch.Tensor,
    *,
    log: bool,
    n_valid_cols: int,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    """Write this shard of softmax (log=False) or log_softmax (log=True) in the logits' dtype, given
    ``stats`` [>= 2, S, N] fp32 (fields max, sumexp first; rows contiguous): the partials of the
    row's S pieces, merged in-kernel."""
    n_rows, n_cols = logits.shape
    out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or n_cols == 0:
        return out
    block = _block(n_cols)
    _softmax_write_kernel[(n_rows, cdiv(n_cols, block))](
        logits,
        stats,
        out,
        n_cols,
        n_valid_cols,
        stats.shape[1],
        logits.stride(0),
        out.stride(0),
        stats.stride(0),
        stats.stride(1),
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        LOG=log,
        BLOCK=block,
        BLOCK_S=split_block(stats.shape[1], 1),
        num_warps=8 if block >= 2048 else 4,
    )
    return out


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse_bwd: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    ignore_index: int,
    n_valid_cols: int,
    vocab_start: int,
    label_smoothing: float,
    vocab_size: int,
    z_loss: float,
    softcap: float | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. this shard's logits. ``lse_bwd`` [N + 1] fp32 is what
    ``finalize_cross_entropy`` wrote; ``grad_out`` the loss's gradient, [N] (any stride) or [] (the
    reduced loss). ``out`` may be ``logits`` itself (in-place); each element is read before it is
    written."""
    n_rows, n_cols = logits.shape
    grad = out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n_rows == 0 or n_cols == 0:
        return grad
    block = _block(n_cols)
    _cross_entropy_backward_kernel[(n_rows, cdiv(n_cols, block))](
        logits,
        target,
        lse_bwd,
        grad_out,
        grad,
        n_rows,
        n_cols,
        n_valid_cols,
        vocab_start,
        ignore_index,
        logits.stride(0),
        grad.stride(0),
        grad_out.stride(0) if grad_out.dim() == 1 else 0,
        float(label_smoothing) / float(vocab_size),
        1.0 - float(label_smoothing),
        2.0 * float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return grad

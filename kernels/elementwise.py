"""Per-element passes that need the merged per-row statistics: the softmax / log-softmax shard and
the cross-entropy gradient. Each reads the logits once and writes one output of the same shape."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cross_entropy_grad, transform_logits

BLOCK_COLS = 2048


@triton.jit
def _softmax_write_kernel(
    # pointers
    logits_ptr,
    lse_ptr,
    out_ptr,
    # sizes
    n_cols,
    n_valid_cols,
    # strides
    stride_logits_row,
    stride_out_row,
    # transform
    softcap,
    inv_temperature,
    # meta
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid: (n_rows, cdiv(n_cols, BLOCK)). out = x' - lse (LOG) or exp(x' - lse); padding columns
    get -inf (LOG) or 0."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(logits_ptr + row * stride_logits_row + cols, mask=in_row, other=0.0).to(tl.float32)
    x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    lse = tl.load(lse_ptr + row)
    valid = cols < n_valid_cols
    if LOG:
        y = tl.where(valid, x - lse, float("-inf"))
    else:
        y = tl.where(valid, tl.exp2((x - lse) * 1.4426950408889634), 0.0)
    tl.store(out_ptr + row * stride_out_row + cols, y.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _cross_entropy_backward_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    lse_ptr,
    row_scale_ptr,
    grad_ptr,
    # sizes
    n_cols,
    n_valid_cols,
    vocab_start,
    # strides
    stride_logits_row,
    stride_grad_row,
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
    exp(x'_j - lse), then times dx'/dx. Padding columns and rows with row_scale == 0 get 0.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    raw = tl.load(logits_ptr + row * stride_logits_row + cols, mask=in_row, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(row_scale_ptr + row)
    local_target = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    g = cross_entropy_grad(
        raw, cols, local_target, lse, scale, smooth_per_class, target_weight, two_z_loss, softcap,
        inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE,
    )  # fmt: skip
    # two wheres, not `block & scalar`: the Triton 3.8 interpreter cannot `&` a block with a scalar
    g = tl.where(cols < n_valid_cols, g, 0.0)
    g = tl.where(scale != 0.0, g, 0.0)
    tl.store(grad_ptr + row * stride_grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def _block(n_cols: int) -> int:
    return max(16, min(BLOCK_COLS, triton.next_power_of_2(max(n_cols, 1))))


def softmax_write(
    logits: torch.Tensor,
    lse: torch.Tensor,
    *,
    log: bool,
    n_valid_cols: int,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    """Write this shard of softmax (log=False) or log_softmax (log=True) in the logits' dtype."""
    n_rows, n_cols = logits.shape
    out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or n_cols == 0:
        return out
    block = _block(n_cols)
    _softmax_write_kernel[(n_rows, triton.cdiv(n_cols, block))](
        logits,
        lse,
        out,
        n_cols,
        n_valid_cols,
        logits.stride(0),
        out.stride(0),
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        LOG=log,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return out


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    n_valid_cols: int,
    vocab_start: int,
    label_smoothing: float,
    vocab_size: int,
    z_loss: float,
    softcap: float | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the per-row loss w.r.t. this shard's logits, scaled per row by ``row_scale``.
    ``out`` may be ``logits`` itself (in-place); each element is read before it is written."""
    n_rows, n_cols = logits.shape
    grad = out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n_rows == 0 or n_cols == 0:
        return grad
    block = _block(n_cols)
    _cross_entropy_backward_kernel[(n_rows, triton.cdiv(n_cols, block))](
        logits,
        target,
        lse,
        row_scale,
        grad,
        n_cols,
        n_valid_cols,
        vocab_start,
        logits.stride(0),
        grad.stride(0),
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

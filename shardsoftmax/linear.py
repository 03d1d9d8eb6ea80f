"""Math layer of the fused LM head: the partials of ``hidden @ weight^T (+ bias)`` without storing
the logits, through the same pieces -> finalize path as every other op (``ops.global_pieces``; one
process: the fused partials kernel, then the finalize kernel merges its column splits), and the
cross-entropy autograd Function whose backward recomputes the logits from hidden and weight.

Forward: one collective (the all-gather of the partials), as ``cross_entropy``. Backward: the
gradients of weight and bias are this shard's own; the gradient of the (replicated) hidden states
is this shard's partial sum, all-reduced over the group when ``reduce_hidden_grad`` (the
column-parallel rule; the only collective in backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import backend
from .collective import Layout
from .ops import ShardCall, ShardShape, finalize_loss, global_pieces, grad_kwargs, shard_kwargs
from .partials import Pieces


def linear_global_pieces(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target1d: torch.Tensor | None,
    call: ShardCall,
    process_group,
) -> tuple[Pieces, Layout]:
    """The global vocabulary's partials of the logits ``hidden2d [N, H] @ weight [V_shard, H]^T
    (+ bias)`` as pieces for finalize, and this shard's layout (see ``ops.global_pieces``)."""

    def pieces(layout: Layout) -> Pieces:
        return backend.linear_pieces(hidden2d, weight, bias, target1d, **shard_kwargs(call, layout))

    shape = ShardShape((hidden2d.shape[0], weight.shape[0]), hidden2d.dtype, hidden2d.device)
    return global_pieces(shape, target1d, call, process_group, pieces_fn=pieces)


def linear_cross_entropy_forward(
    hidden2d, weight, bias, target1d, call: ShardCall, reduction: str, process_group
) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """``(loss, lse_bwd, layout)`` as ``ops.cross_entropy_forward``, for the fused head's logits."""
    pieces, layout = linear_global_pieces(hidden2d, weight, bias, target1d, call, process_group)
    loss, lse_bwd = finalize_loss(hidden2d, pieces, target1d, call, reduction)
    return loss, lse_bwd, layout


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The reduced cross-entropy of the logit shard ``hidden @ weight^T (+ bias)``. Saves hidden,
    weight, bias (no copies), the targets and ``lse_bwd`` ([N + 1]: per-row lse, then the
    reduction's scale); no logits."""

    @staticmethod
    def forward(
        ctx, hidden2d, weight, bias, target1d, call: ShardCall, reduction: str, process_group,
        reduce_hidden_grad,
    ):  # fmt: skip
        loss, lse_bwd, layout = linear_cross_entropy_forward(
            hidden2d, weight, bias, target1d, call, reduction, process_group
        )
        ctx.save_for_backward(hidden2d, weight, bias, target1d, lse_bwd)
        ctx.call, ctx.layout = call, layout
        ctx.process_group, ctx.reduce_hidden_grad = process_group, reduce_hidden_grad
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        hidden2d, weight, bias, target1d, lse_bwd = ctx.saved_tensors
        call, layout = ctx.call, ctx.layout
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden, grad_weight, grad_bias = backend.linear_cross_entropy_backward(
            hidden2d,
            weight,
            bias,
            target1d,
            lse_bwd,
            grad_out,
            **grad_kwargs(call, layout),
            need_hidden_grad=need_hidden,
            need_weight_grad=need_weight,
            need_bias_grad=need_bias,
        )
        if grad_hidden is not None:
            group = ctx.process_group
            if ctx.reduce_hidden_grad and group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)  # in fp32
            grad_hidden = grad_hidden.to(hidden2d.dtype)
        return (
            grad_hidden,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            None,
            None,
            None,
            None,
            None,
        )

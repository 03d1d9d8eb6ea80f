"""Math layer of the fused LM head: the partials of ``hidden @ weight^T (+ bias)`` without storing
the logits, through the same exchange and merge as every other op (``ops.global_partials``), and
the cross-entropy autograd Function whose backward recomputes the logits from hidden and weight.

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
from .ops import ShardCall, ShardShape, global_partials, rows_loss
from .partials import Partials, log_normalizer


def linear_global_partials(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target1d: torch.Tensor | None,
    call: ShardCall,
    process_group,
) -> tuple[Partials, Layout]:
    """Merged partials of the global vocabulary for the logits ``hidden2d [N, H] @ weight
    [V_shard, H]^T (+ bias)``, and this shard's layout (see ``ops.global_partials``)."""

    def pieces(layout: Layout) -> Partials:
        return backend.linear_partials(
            hidden2d,
            weight,
            bias,
            target1d,
            k=call.k,
            n_valid_cols=layout.n_valid_cols,
            vocab_start=layout.vocab_start,
            ignore_index=call.ignore_index,
            softcap=call.softcap,
            temperature=call.temperature,
            need_entropy=call.need_entropy,
            need_sum_x=call.need_sum_x,
        )

    shape = ShardShape((hidden2d.shape[0], weight.shape[0]), hidden2d.dtype, hidden2d.device)
    return global_partials(shape, target1d, call, process_group, pieces_fn=pieces)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row cross-entropy of the logit shard ``hidden @ weight^T (+ bias)``. Saves hidden,
    weight, bias (no copies), the targets and per-row lse / target-found flags; no logits."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, target1d, call: ShardCall, process_group, reduce_hidden_grad):
        merged, layout = linear_global_partials(hidden2d, weight, bias, target1d, call, process_group)
        lse = log_normalizer(merged)
        valid = target1d != call.ignore_index
        ctx.save_for_backward(hidden2d, weight, bias, target1d, lse, valid, merged.target_hits)
        ctx.call, ctx.layout = call, layout
        ctx.process_group, ctx.reduce_hidden_grad = process_group, reduce_hidden_grad
        ctx.mark_non_differentiable(target1d)
        return rows_loss(merged, lse, valid, call)

    @staticmethod
    def backward(ctx, grad_rows):
        hidden2d, weight, bias, target1d, lse, valid, hits = ctx.saved_tensors
        call, layout = ctx.call, ctx.layout
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # 0 on ignored rows; NaN where the target was in no shard (its loss was NaN too).
        row_scale = torch.where(valid, torch.where(hits > 0, grad_rows.to(lse.dtype), float("nan")), 0.0)
        grad_hidden, grad_weight, grad_bias = backend.linear_cross_entropy_backward(
            hidden2d,
            weight,
            bias,
            target1d,
            lse,
            row_scale,
            n_valid_cols=layout.n_valid_cols,
            vocab_start=layout.vocab_start,
            label_smoothing=call.label_smoothing,
            vocab_size=layout.n_classes,  # C of the smoothing term, = merged.count of the forward
            z_loss=call.z_loss,
            softcap=call.softcap,
            temperature=call.temperature,
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
        )

"""Math layer: shard kernels -> partials -> one merge (over column splits, then over ranks) ->
global per-row results, and the cross-entropy autograd Function built on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import backend, collective
from .collective import Header, Layout
from .kernels import MAX_K  # noqa: F401  (re-exported for the public layer)
from .partials import Finalized, Partials, finalize, merge_stacked


@dataclass(frozen=True)
class ShardCall:
    """Everything the shard pass needs besides tensors; identical on every rank of a group."""

    op: str
    k: int = 0
    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100
    vocab_size: int | None = None
    vocab_start: int | None = None
    need_entropy: bool = False  # the kernel may skip sums nobody reads (they come back as NaN)
    need_sum_x: bool = False

    def header(self, logits2d: torch.Tensor | None, has_target: bool) -> Header:
        n_rows, width = (-1, -1) if logits2d is None else logits2d.shape
        dtype = None if logits2d is None else logits2d.dtype
        return Header.make(
            self.op, n_rows, self.k, dtype, has_target, width, self.vocab_start, self.vocab_size,
            self.ignore_index, self.temperature, self.softcap,
        )  # fmt: skip


def group_device(process_group) -> torch.device:
    """The device a group's collectives run on (CUDA for NCCL, CPU otherwise)."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reject_on_all_ranks(call: ShardCall, process_group, err: BaseException) -> None:
    """This rank's input is invalid: tell the other ranks (one exchange, so none hangs), then raise."""
    if process_group is not None:
        header = call.header(None, False)
        collective.exchange(header, None, process_group, device=group_device(process_group), error=err)
    raise err


def global_partials(
    logits2d: torch.Tensor, target1d: torch.Tensor | None, call: ShardCall, process_group, pieces_fn=None
) -> tuple[Partials, Finalized, Layout]:
    """Merged partials of the whole vocabulary for every row, their finalized values and this
    shard's layout. One collective when ``process_group`` is given, none otherwise.
    ``pieces_fn(layout)`` replaces the default shard pass (``backend.shard_partials``)."""

    def compute(layout: Layout) -> Partials:
        if pieces_fn is not None:
            return merge_stacked(pieces_fn(layout))
        pieces = backend.shard_partials(
            logits2d,
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
        return merge_stacked(pieces)  # over this shard's column splits

    if process_group is None:
        layout = collective.local_layout(logits2d.shape[1], call.vocab_start, call.vocab_size)
        check_k(call.k, layout.vocab_size)
        merged = merge_stacked(Partials(*(f[None] for f in compute(layout))))  # a merge over one shard
    else:
        header = call.header(logits2d, target1d is not None)
        parts, layout = collective.exchange(header, compute, process_group, device=logits2d.device)
        check_k(call.k, layout.vocab_size)
        merged = merge_stacked(parts)
    return merged, finalize(merged), layout


def check_k(k: int, vocab_size: int) -> None:
    if k > vocab_size:
        raise ValueError(f"k={k} is larger than the vocabulary (vocab_size={vocab_size})")


@dataclass(frozen=True)
class LossOptions:
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    inplace_backward: bool = False


def rows_loss(merged: Partials, fin: Finalized, valid: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """Per-row loss: (1 - eps)(lse - x_t) + eps (lse - sum_x / C) + z lse^2; 0 on ignored rows,
    NaN where the target lies outside the vocabulary."""
    eps = opts.label_smoothing
    lse = fin.lse
    loss = (1.0 - eps) * (lse - fin.target_logit)
    if eps > 0:
        loss = loss + eps * (lse - merged.sum_x / merged.count)
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row cross-entropy of a vocabulary shard. Saves the logits (no copy), the targets and the
    per-row lse; backward needs no collective."""

    @staticmethod
    def forward(ctx, logits2d, target1d, call: ShardCall, opts: LossOptions, process_group):
        merged, fin, layout = global_partials(logits2d, target1d, call, process_group)
        valid = target1d != call.ignore_index
        loss = rows_loss(merged, fin, valid, opts)
        one = torch.ones_like(fin.lse)
        row_ok = torch.where(valid, torch.where(merged.target_hits > 0, one, one * float("nan")), one * 0)
        ctx.save_for_backward(logits2d, target1d, fin.lse, row_ok)
        ctx.call, ctx.opts, ctx.layout = call, opts, layout
        ctx.mark_non_differentiable(target1d)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        logits2d, target1d, lse, row_ok = ctx.saved_tensors
        call, opts, layout = ctx.call, ctx.opts, ctx.layout
        row_scale = torch.where(row_ok == 0, torch.zeros_like(row_ok), grad_rows.to(row_ok.dtype) * row_ok)
        grad = backend.shard_cross_entropy_backward(
            logits2d,
            target1d,
            lse,
            row_scale,
            n_valid_cols=layout.n_valid_cols,
            vocab_start=layout.vocab_start,
            label_smoothing=opts.label_smoothing,
            vocab_size=layout.vocab_size,
            z_loss=opts.z_loss,
            softcap=call.softcap,
            temperature=call.temperature,
            out=logits2d if opts.inplace_backward else None,
        )
        return grad, None, None, None, None

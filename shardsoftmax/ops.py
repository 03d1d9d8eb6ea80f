"""Math layer: shard kernels -> partials -> one merge (over column splits, then over ranks) ->
global per-row results, and the cross-entropy autograd Function built on them.

One process (``process_group=None``) with the Triton backend is kernel -> finalize kernel: the
finalize kernel merges the partials kernel's column splits itself, so a call is two launches and
a few allocations, with no host sync (CUDA-graph capturable). With a group, the ranks' partials
are merged by ``merge_stacked`` after the one collective, then finalized the same way."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import backend, collective, reference
from .collective import Header, Layout
from .kernels import MAX_K  # noqa: F401  (re-exported for the public layer)
from .partials import Partials, Pieces, pack, topk_select


@dataclass(frozen=True)
class ShardCall:
    """Everything the shard pass needs besides tensors, and what decides the call's collectives
    (its header, see ``collective``); identical on every rank of a group."""

    op: str
    k: int = 0
    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100
    vocab_size: int | None = None
    vocab_start: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # The header's record of the call's collectives (the shard pass does not read them).
    reduction: str | None = None  # the loss's; None: not a loss
    impl: str | None = None  # the LM head's; None: not the LM head
    grads: int = 0  # collective.grad_bits of the LM head's loss
    call_rows: int | None = None  # the call's rows when it makes several exchanges (None: one)
    exchanges: int = 1

    # The kernel skips sums nobody reads (they come back as NaN).
    @property
    def need_entropy(self) -> bool:
        return self.op in ("stats", "linear_stats")

    @property
    def need_sum_x(self) -> bool:
        return self.label_smoothing > 0

    def header(self, logits2d: torch.Tensor | None, has_target: bool) -> Header:
        n_rows, width = (-1, -1) if logits2d is None else logits2d.shape
        dtype = None if logits2d is None else logits2d.dtype
        pack = collective.PACK_TOPK
        try:
            return _header(self, n_rows, width, dtype, has_target, pack)
        except TypeError:  # an unhashable option (rejected by the checks; its rank still sends a header)
            return _header.__wrapped__(self, n_rows, width, dtype, has_target, pack)


@functools.lru_cache(maxsize=256)
def _header(call: ShardCall, n_rows: int, width: int, dtype, has_target: bool, pack_topk: bool) -> Header:
    """The header of a call, built once per (options, shape, dtype): a training loop repeats them."""
    return Header.make(
        call.op, n_rows, call.k, dtype, has_target, width, call.vocab_start, call.vocab_size,
        call.ignore_index, call.temperature, call.softcap, call.label_smoothing, call.z_loss,
        impl=call.impl, reduction=call.reduction, grads=call.grads, call_rows=call.call_rows,
        exchanges=call.exchanges, pack_topk=pack_topk,
    )  # fmt: skip


class ShardShape(NamedTuple):
    """What ``global_partials`` needs to know of a logit shard that is never stored (the fused LM
    head): its ``shape`` (rows, V_shard), ``dtype`` and ``device``."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device


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
) -> tuple[Partials, Layout]:
    """``global_pieces`` merged into one piece ([N] and [N, k] fields)."""
    pieces, layout = global_pieces(logits2d, target1d, call, process_group, pieces_fn=pieces_fn)
    return backend.merge_pieces(pieces), layout


def shard_kwargs(call: ShardCall, layout: Layout) -> dict:
    return dict(
        k=call.k,
        n_valid_cols=layout.n_valid_cols,
        vocab_start=layout.vocab_start,
        ignore_index=call.ignore_index,
        softcap=call.softcap,
        temperature=call.temperature,
        need_entropy=call.need_entropy,
        need_sum_x=call.need_sum_x,
    )


def global_pieces(
    logits2d: torch.Tensor, target1d: torch.Tensor | None, call: ShardCall, process_group, pieces_fn=None
) -> tuple[Pieces, Layout]:
    """The whole vocabulary's partials of every row as pieces for finalize (which merges them),
    and this shard's layout. One process: the shard's own pieces (the kernel's column splits). A
    group: one piece per rank (one collective). ``pieces_fn(layout)`` (-> ``Pieces``) replaces
    the default shard pass; with it, ``logits2d`` may be a ``ShardShape``."""

    def compute(layout: Layout, out: Pieces | None = None) -> Pieces:
        if pieces_fn is not None:
            return pieces_fn(layout)
        return backend.shard_pieces(logits2d, target1d, out=out, **shard_kwargs(call, layout))

    if process_group is None:
        layout = collective.local_layout(logits2d.shape[1], call.vocab_start, call.vocab_size)
        check_k(call.k, layout.n_classes)
        return compute(layout), layout
    header = call.header(logits2d, target1d is not None)
    pieces, layout = collective.exchange(header, compute, process_group, device=logits2d.device)
    check_k(call.k, layout.n_classes)
    return pieces, layout


def check_k(k: int, n_classes: int) -> None:
    if k > n_classes:
        raise ValueError(f"k={k} is larger than the vocabulary ({n_classes} real columns)")


def cross_entropy_forward(
    logits2d: torch.Tensor, target1d: torch.Tensor, call: ShardCall, reduction: str, process_group
) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """``(loss, lse_bwd, layout)``: the reduced loss and what backward reads (see
    ``partials.cross_entropy_rows``)."""
    pieces, layout = global_pieces(logits2d, target1d, call, process_group)
    loss, lse_bwd = finalize_loss(logits2d, pieces, target1d, call, reduction)
    return loss, lse_bwd, layout


def finalize_loss(
    like: torch.Tensor, pieces: Pieces, target1d: torch.Tensor, call: ShardCall, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse_bwd)`` from the global pieces; ``like`` gives the backend (dtype, device)."""
    return backend.finalize_cross_entropy(
        like, pieces, target1d, ignore_index=call.ignore_index, reduction=reduction,
        label_smoothing=call.label_smoothing, z_loss=call.z_loss,
    )  # fmt: skip


def grad_kwargs(call: ShardCall, layout: Layout) -> dict:
    """The options of the cross-entropy gradient kernels (plain and fused head)."""
    return dict(
        ignore_index=call.ignore_index,
        n_valid_cols=layout.n_valid_cols,
        vocab_start=layout.vocab_start,
        label_smoothing=call.label_smoothing,
        # C of the smoothing term (= merged.count of the forward); a shard with no real column
        # (one process, vocab_start past vocab_size) has no column the term applies to.
        vocab_size=max(layout.n_classes, 1),
        z_loss=call.z_loss,
        softcap=call.softcap,
        temperature=call.temperature,
    )


class CrossEntropyFunction(torch.autograd.Function):
    """The reduced cross-entropy of a vocabulary shard. Saves the logits (no copy), the targets and
    ``lse_bwd`` ([N + 1]: per-row lse, then the reduction's scale); backward is one launch and
    needs no collective."""

    @staticmethod
    def forward(
        ctx, logits2d, target1d, call: ShardCall, reduction: str, inplace_backward: bool, process_group
    ):
        loss, lse_bwd, layout = cross_entropy_forward(logits2d, target1d, call, reduction, process_group)
        ctx.save_for_backward(logits2d, target1d, lse_bwd)
        ctx.call, ctx.inplace_backward, ctx.layout = call, inplace_backward, layout
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logits2d, target1d, lse_bwd = ctx.saved_tensors
        grad = backend.shard_cross_entropy_backward(
            logits2d, target1d, lse_bwd, grad_out, **grad_kwargs(ctx.call, ctx.layout),
            out=logits2d if ctx.inplace_backward else None,
        )  # fmt: skip
        return grad, None, None, None, None, None


def sample_ids(x2: torch.Tensor, call: ShardCall, process_group, *, seed: int, offset: int) -> torch.Tensor:
    """Gumbel-max sample of each row over the global vocabulary, one collective: [N] int64 ids,
    -1 for a row with no finite logit. ``call.k`` > 0 restricts to the global top-k first (the
    noise of those ids is recomputed here; it is a pure function of seed, offset + row and id)."""
    if call.k == 0:

        def pieces(layout: Layout) -> Pieces:
            return pack(backend.shard_gumbel_argmax(
                x2, seed=seed, row_offset=offset, n_valid_cols=layout.n_valid_cols,
                vocab_start=layout.vocab_start, softcap=call.softcap, temperature=call.temperature,
            ))  # fmt: skip

        merged, _ = global_partials(x2, None, replace(call, k=1), process_group, pieces_fn=pieces)
        vals, ids = merged.topk_vals, merged.topk_ids
    else:
        merged, _ = global_partials(x2, None, call, process_group)
        counters = offset + torch.arange(x2.shape[0], device=x2.device)
        noisy = merged.topk_vals.float() + reference.gumbel_noise(seed, counters, merged.topk_ids)
        noisy = torch.where(noisy.isnan(), float("inf"), noisy)  # NaN logits win, as in the kernel
        vals, ids = topk_select(noisy, merged.topk_ids, 1)
    return torch.where(vals[:, 0] > float("-inf"), ids[:, 0], -1)

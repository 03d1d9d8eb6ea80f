"""Public functions. Signatures follow PyTorch; options are keyword-only.

Common conventions:

* ``logits`` is this process's shard ``[..., V_shard]`` (float16, bfloat16, float32 or float64;
  the last dimension contiguous or it is copied). Leading dimensions are flattened and restored.
* ``process_group=None`` means one process holds the whole vocabulary (a merge over one shard).
  With a group, each rank passes its contiguous slice; every rank gets the same global results
  from exactly one collective. Pass ``torch.distributed.group.WORLD`` for the default group.
* ``vocab_start`` is this shard's first global id (default: 0 alone, or the sum of the widths of
  lower ranks in a group). ``vocab_size`` is the true vocabulary size; columns at or past it are
  padding and never count (default: every column is real).
* ``temperature`` and ``softcap`` apply first: x' = softcap * tanh(x / softcap) / temperature.
* Per-row results are float32 (float64 for float64 logits).
* Rows whose every logit is -inf: lse = max = -inf, entropy and log-probs NaN (as PyTorch).
  Rows with a NaN (or +inf) logit: lse, entropy and log-probs NaN.
* Top-k: ids are global int64, ordered by descending logit; equal logits: the lower id first.
* ``process_group=None``: no host sync and no per-call host tensor, so calls can be captured in a
  CUDA graph (after one warm-up call). With a group, a call has no host sync in steady state
  either, but is not capturable (the header check copies to pinned memory and records events).
* With a group on CUDA, a rank whose own call was valid may learn that another rank's call did not
  match only after its call returns (the header check runs on the device, see ``collective``):
  that call's results are NaN (ids -1) and the error is raised by the rank's next call on the
  group or by ``synchronize(process_group)``. ``SHARDSOFTMAX_SYNC_CHECKS=1`` checks within
  each call instead (a host sync per call). A call that makes several collectives (the eager
  forward of ``linear_cross_entropy``) resolves its first exchange's check before the second, so
  ranks that disagree never leave one rank waiting in a collective the others skip.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _validate as V
from . import backend
from .collective import IMPLS, grad_bits
from .collective import synchronize as synchronize  # noqa: F401  (public)
from .linear import LinearCrossEntropyFunction, linear_cross_entropy_forward, linear_global_pieces
from .ops import (
    MAX_K,
    CrossEntropyFunction,
    ShardCall,
    cross_entropy_forward,
    global_pieces,
    reject_on_all_ranks,
    sample_ids,
)
from .partials import StatsRows


class SoftmaxStats(NamedTuple):
    """Per-row results of ``softmax_stats``; leading shape ``[...]`` is the logits' without the vocab."""

    lse: torch.Tensor  # [...] log-sum-exp of the transformed logits
    max: torch.Tensor  # [...] max transformed logit
    entropy: torch.Tensor  # [...] entropy of the softmax, nats
    target_logprob: torch.Tensor | None  # [...] log p(target); 0.0 where ignored; None without target
    topk_ids: torch.Tensor  # [..., k] int64 global ids
    topk_logprobs: torch.Tensor  # [..., k] log-probabilities of those ids


def _flatten(logits: torch.Tensor, target: torch.Tensor | None):
    """2-D logits with a contiguous last dim and 1-D contiguous targets (the kernels index rows of
    the target by position). No op at all for inputs already in that form."""
    x2 = logits
    if logits.dim() != 2:  # explicit sizes: reshape(-1, 0) is ambiguous for a shard with no columns
        x2 = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, _flatten_target(target)


def _flatten_target(target: torch.Tensor | None) -> torch.Tensor | None:
    t1 = target
    if target is not None:
        if target.dim() != 1:
            t1 = target.reshape(-1)
        if not t1.is_contiguous():
            t1 = t1.contiguous()
    return t1


def _unflatten(t: torch.Tensor, shape) -> torch.Tensor:
    return t if t.shape == shape else t.reshape(shape)


def _checked(call: ShardCall, process_group, checks) -> None:
    """Run the argument checks; with a group, a failure on one rank is raised on every rank."""
    try:
        checks()
    except (TypeError, ValueError) as err:
        reject_on_all_ranks(call, process_group, err)


def softmax_stats(
    logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    k: int = 0,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
) -> SoftmaxStats:
    """lse, max, entropy, log p(target) and the global top-k of each row, from one pass over the
    shard. ``target``: ``[...]`` integer ids; rows equal to ``ignore_index`` get target_logprob 0;
    a target outside ``[0, vocab_size)`` gets NaN (loud, and no out-of-bounds read).
    ``0 <= k <= min(1024, vocab_size)``. Not differentiable (use ``cross_entropy`` for gradients)."""
    call = ShardCall("stats", k, temperature, softcap, ignore_index, vocab_size, vocab_start)

    def checks():
        V.check_logits(logits)
        if target is not None:
            V.check_target(target, logits)
        V.check_int(k, "k", low=0, high=MAX_K)
        V.check_int(ignore_index, "ignore_index")
        V.check_transform(temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)

    _checked(call, process_group, checks)
    x2, t1 = _flatten(logits, target)
    with torch.no_grad():
        pieces, layout = global_pieces(x2, t1, call, process_group)
        rows = backend.finalize_stats(
            x2, pieces, t1, vocab_start=layout.vocab_start, ignore_index=ignore_index
        )
    return _stats(rows, t1 is not None, logits.shape[:-1], k)


def _stats(rows: StatsRows, has_target: bool, lead, k: int) -> SoftmaxStats:
    lead_k = (*lead, k)
    return SoftmaxStats(
        lse=_unflatten(rows.lse, lead),
        max=_unflatten(rows.max, lead),
        entropy=_unflatten(rows.entropy, lead),
        target_logprob=_unflatten(rows.target_logprob, lead) if has_target else None,
        topk_ids=_unflatten(rows.topk_ids, lead_k),
        topk_logprobs=_unflatten(rows.topk_logprobs, lead_k),
    )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy as ``torch.nn.functional.cross_entropy`` (class-index targets), plus
    ``z_loss * lse**2`` per token, over the global vocabulary. Differentiable w.r.t. ``logits``.

    ``reduction``: "mean" over non-ignored tokens (NaN if every token is ignored, as PyTorch),
    "sum", or "none" (``[...]``, 0 at ignored tokens). ``label_smoothing`` spreads over the true
    vocabulary (``vocab_size`` classes). The result is float32 (float64 for float64 logits).
    A target outside ``[0, vocab_size)`` that is not ``ignore_index`` makes that token's loss NaN.
    Backward reads the logits and the saved per-row lse once and needs no collective;
    ``inplace_backward=True`` writes the gradient into the logits' memory (the logits are then lost).
    """
    call = ShardCall(
        "cross_entropy", 0, temperature, softcap, ignore_index, vocab_size, vocab_start,
        label_smoothing, z_loss, reduction=reduction,
    )  # fmt: skip

    def checks():
        V.check_logits(logits)
        V.check_target(target, logits)
        V.check_loss_kwargs(ignore_index, reduction, label_smoothing, z_loss, temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)
        if not isinstance(inplace_backward, bool):
            raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")

    _checked(call, process_group, checks)
    x2, t1 = _flatten(logits, target)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = CrossEntropyFunction.apply(x2, t1, call, reduction, inplace_backward, process_group)
    else:  # nothing to differentiate: the same forward without autograd's bookkeeping
        loss = cross_entropy_forward(x2, t1, call, reduction, process_group)[0]
    return _unflatten(loss, target.shape) if reduction == "none" else loss


def _softmax(logits, log: bool, temperature, softcap, vocab_size, vocab_start, process_group):
    call = ShardCall(
        "log_softmax" if log else "softmax", 0, temperature, softcap, -100, vocab_size, vocab_start
    )

    def checks():
        V.check_logits(logits)
        V.check_transform(temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)

    _checked(call, process_group, checks)
    x2, _ = _flatten(logits, None)
    with torch.no_grad():
        pieces, layout = global_pieces(x2, None, call, process_group)
        out = backend.shard_softmax(
            x2,
            pieces,
            log=log,
            n_valid_cols=layout.n_valid_cols,
            softcap=softcap,
            temperature=temperature,
        )
    return _unflatten(out, logits.shape)


def softmax(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """This shard of the exact global softmax, same shape and dtype as ``logits``; padding columns
    are 0; a row of all -inf gives NaN (as torch.softmax). Not differentiable."""
    return _softmax(logits, False, temperature, softcap, vocab_size, vocab_start, process_group)


def log_softmax(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """This shard of the exact global log-softmax, same shape and dtype as ``logits``; padding
    columns are -inf. Not differentiable."""
    return _softmax(logits, True, temperature, softcap, vocab_size, vocab_start, process_group)


def topk(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest transformed logits of each row over the global vocabulary: ``(values [..., k]
    float32, ids [..., k] int64 global ids)``, descending; equal values: the lower id first."""
    call = ShardCall("topk", k, temperature, softcap, -100, vocab_size, vocab_start)

    def checks():
        V.check_logits(logits)
        V.check_int(k, "k", low=0, high=MAX_K)
        V.check_transform(temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)

    _checked(call, process_group, checks)
    lead = logits.shape[:-1]
    x2, _ = _flatten(logits, None)
    with torch.no_grad():
        pieces, layout = global_pieces(x2, None, call, process_group)
        vals, ids = backend.merged_topk(x2, pieces, vocab_start=layout.vocab_start)
    return _unflatten(vals, (*lead, k)), _unflatten(ids, (*lead, k))


def sample(
    logits: torch.Tensor,
    *,
    seed: int,
    offset: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """One exact sample per row from the (temperature-scaled, optionally top-k-restricted) global
    softmax: ``[...]`` int64 global ids. Gumbel-max with noise that is a pure function of
    (seed, offset + row, global id), so the same seed gives the same tokens for any number of
    shards and any split. ``offset`` shifts the row counter (e.g. the decode step times the batch).
    Rows with no finite logit give -1."""
    call = ShardCall("sample", top_k or 0, temperature, softcap, -100, vocab_size, vocab_start)

    def checks():
        V.check_logits(logits)
        V.check_int(seed, "seed")
        V.check_int(offset, "offset", low=0)
        V.check_int(top_k, "top_k", low=1, high=MAX_K, allow_none=True)
        V.check_transform(temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)

    _checked(call, process_group, checks)
    x2, _ = _flatten(logits, None)
    with torch.no_grad():
        return sample_ids(x2, call, process_group, seed=seed, offset=offset).reshape(logits.shape[:-1])


# ------------------------------------------------------------------------------------------------
# The fused LM head: hidden states and this rank's weight slice in, no [N, V_shard] logits stored.
# ------------------------------------------------------------------------------------------------


def _flatten_hidden(hidden: torch.Tensor, target: torch.Tensor | None):
    """2-D hidden states (any strides: the fused kernels take both) and targets as ``_flatten``."""
    h2 = hidden
    if hidden.dim() != 2:
        h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
    return h2, _flatten_target(target)


def _check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def linear_softmax_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    k: int = 0,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
    impl: str = "chunked",
) -> SoftmaxStats:
    """``softmax_stats`` of the logits ``hidden @ weight.T (+ bias)`` without storing them all.

    ``hidden``: ``[..., H]`` (float16, bfloat16, float32 or float64), the same on every rank of a
    group; ``weight``: this rank's ``[V_shard, H]`` slice of the output projection, in hidden's
    dtype; ``bias``: ``[V_shard]`` or None. Everything else (``target``, ``k``, the transform,
    ignored and padded columns, the group, one collective) is as ``softmax_stats``; results are
    ``[...]`` / ``[..., k]``. Not differentiable.

    ``impl``: ``"chunked"`` (default) computes the logits one block of rows at a time, over all
    the shard's columns, with ``torch.mm`` (cuBLAS on CUDA) in the inputs' dtype, rounded to it as
    ``F.linear`` rounds them, and runs the partials kernel on each block; one block (at most
    ``linear.FORWARD_BLOCK_BYTES``, 512 MiB) exists at a time. ``"recompute"``: the same with
    blocks of at most ``linear.CHUNK_BYTES`` (128 MiB). ``"fused"``: the Triton kernels of
    ``kernels/linear.py``, which accumulate the logits in fp32 and never round them (k = 0 writes
    none; k > 0 writes fp32 logits of a chunk of rows, at most 1 GiB, at a time: cuBLAS with an
    fp32 output on CUDA, then the shard kernels). All give the same results up to that rounding."""
    call = ShardCall(
        "linear_stats", k, temperature, softcap, ignore_index, vocab_size, vocab_start, impl=impl
    )

    def checks():
        _check_impl(impl)
        V.check_linear(hidden, weight, bias)
        if target is not None:
            V.check_target(target, hidden, of="hidden")
        V.check_int(k, "k", low=0, high=MAX_K)
        V.check_int(ignore_index, "ignore_index")
        V.check_transform(temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)

    _checked(call, process_group, checks)
    h2, t1 = _flatten_hidden(hidden, target)
    with torch.no_grad():
        pieces, layout = linear_global_pieces(h2, weight, bias, t1, call, process_group, impl)
        rows = backend.finalize_stats(
            h2, pieces, t1, vocab_start=layout.vocab_start, ignore_index=ignore_index
        )
    return _stats(rows, t1 is not None, hidden.shape[:-1], k)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    process_group=None,
    reduce_hidden_grad: bool = True,
    impl: str = "chunked",
) -> torch.Tensor:
    """``cross_entropy`` of the logits ``hidden @ weight.T (+ bias)`` without storing them;
    differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Shapes, dtypes and options as ``linear_softmax_stats`` and ``cross_entropy`` (reductions,
    ignored tokens, label smoothing over the true vocabulary, z-loss); the loss is float32
    (float64 for float64 inputs). Weight and bias get this shard's gradient (padding rows: 0).
    ``hidden`` gets this shard's contribution, summed over the group by one all-reduce (in fp32)
    when ``reduce_hidden_grad`` (the column-parallel rule, for hidden states replicated on every
    rank; the only collective in backward); pass False to reduce it yourself.

    ``impl`` (each turns a block of logits into dloss/dlogits in place, in the inputs' dtype as
    the unfused backward, and takes the gradients from it with cuBLAS):

    * ``"chunked"`` (default): with gradients enabled, an input that requires them and reduction
      "mean" or "sum", the forward computes the three gradients itself (eager gradients): blocks of
      at least ``linear.EAGER_ROWS`` = 2048 rows (more while the widest shard's block of logits fits
      ``linear.EAGER_BLOCK_BYTES`` = 512 MiB; in a group the widest shard is taken as
      ceil(vocab_size / world size), or 2048 rows without ``vocab_size``), each block's logits over
      the whole shard -> its global partials (one all-gather per block in a group, all the same
      size) -> loss and gradient of the block -> ``grad_hidden`` rows (fp32), ``grad_weight`` and
      ``grad_bias`` accumulated in fp32 over the blocks. 3 GEMMs, the matmul floor of forward +
      backward; backward multiplies the saved gradients by grad_output and rounds them once to the
      inputs' dtype. Memory until backward: one block of logits (rows x V_shard in the inputs'
      dtype, 512 MiB at V_shard = 128256 bf16, during forward), fp32 grad_weight [V_shard, H] (2 GiB
      at H = 4096) and fp32 grad_hidden [N, H]. A forward with gradients enabled and no backward
      wastes two GEMMs: evaluate under ``torch.no_grad()``. Otherwise (no gradients, reduction
      "none") as ``"recompute"``'s forward. In a group every rank must take the same path: the
      header of the first all-gather holds ``impl``, ``reduction``, the rows, the number of
      all-gathers and the gradients computed (grad mode, ``requires_grad`` of each input,
      ``reduce_hidden_grad``), and ranks that differ raise there, each naming the argument; on
      CUDA a call of 2+ blocks waits for that header check (one host sync) before its second.
    * ``"recompute"``: forward as ``linear_softmax_stats`` (vocabulary chunks, nothing of size
      N x V_shard saved: backward reads hidden, weight and the per-row lse); backward recomputes
      each chunk's logits. 4 GEMMs, the least memory (one chunk of at most 128 MiB and fp32
      grad_hidden).
    * ``"fused"``: the Triton kernels, forward and backward (recomputing, fp32 logits)."""
    # The gradients this call computes decide its collectives (the eager forward's exchanges,
    # backward's all-reduce): they travel in the header, so ranks that differ raise at once.
    inputs = (hidden, weight, bias)
    needs = [torch.is_grad_enabled() and getattr(t, "requires_grad", False) is True for t in inputs]
    call = ShardCall(
        "linear_cross_entropy", 0, temperature, softcap, ignore_index, vocab_size, vocab_start,
        label_smoothing, z_loss, reduction=reduction, impl=impl,
        grads=grad_bits(*needs, reduce_hidden=reduce_hidden_grad is True),
    )  # fmt: skip

    def checks():
        _check_impl(impl)
        V.check_linear(hidden, weight, bias)
        V.check_target(target, hidden, of="hidden")
        V.check_loss_kwargs(ignore_index, reduction, label_smoothing, z_loss, temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")

    _checked(call, process_group, checks)
    h2, t1 = _flatten_hidden(hidden, target)
    if any(needs):
        loss = LinearCrossEntropyFunction.apply(
            h2, weight, bias, t1, call, reduction, process_group, reduce_hidden_grad, impl
        )
    else:  # nothing to differentiate: the same forward without autograd's bookkeeping
        loss = linear_cross_entropy_forward(h2, weight, bias, t1, call, reduction, process_group, impl)[0]
    return _unflatten(loss, target.shape) if reduction == "none" else loss

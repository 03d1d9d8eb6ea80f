"""Math layer of the LM head: the partials of ``hidden @ weight^T (+ bias)`` without storing the
[N, V_shard] logits, through the same pieces -> finalize path as every other op
(``ops.global_pieces``), and the cross-entropy autograd Function whose backward recomputes the
logits from hidden and weight. Two implementations (``impl``), the same results up to the
rounding of the matmul:

* ``"chunked"`` (the default): the shard's vocabulary in chunks of ``chunk_cols`` columns (one
  chunk of logits in the inputs' dtype, at most ``CHUNK_BYTES``, exists at a time). Forward, per
  chunk: ``logits_j = hidden @ W_j^T (+ b_j)`` with ``torch.mm`` / ``torch.addmm`` (cuBLAS on
  CUDA), then the shard partials (``backend.shard_pieces``) of that chunk, with its vocabulary
  offset and its count of real columns, so target logits, counts and global top-k ids are exact;
  the chunks' pieces are concatenated along the split axis and merged by finalize (or by the
  collective, which merges a rank's own pieces first) with the one merge of ``partials``. The
  logits are rounded to the inputs' dtype, as ``F.linear`` + the unfused API rounds them.
  Backward, per chunk: recompute ``logits_j``, overwrite it with dloss/dlogits_j
  (``backend.shard_cross_entropy_backward`` with ``out=`` the chunk), then ``grad_W_j = G_j^T @
  hidden`` (complete for those rows: no accumulation across chunks), ``grad_b_j = sum_rows G_j``
  (summed in fp32) and ``grad_hidden += G_j @ W_j`` in an fp32 accumulator (see
  ``_matmul_accumulate``). Only the real columns are computed (padding rows' gradients are 0).
* ``"fused"``: the Triton kernels of ``kernels/linear.py`` (``tl.dot`` tiles straight into the
  partials, fp32 logits never rounded; backward with Triton GEMMs).

Forward: one collective (the all-gather of the partials), as ``cross_entropy``. Backward: the
gradients of weight and bias are this shard's own; the gradient of the (replicated) hidden states
is this shard's partial sum, all-reduced over the group when ``reduce_hidden_grad`` (the
column-parallel rule; the only collective in backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import backend, reference
from .collective import Layout
from .ops import ShardCall, ShardShape, finalize_loss, global_pieces, grad_kwargs, shard_kwargs
from .partials import Pieces, identity, pack

IMPLS = ("chunked", "fused")
# One chunk of logits (and, in backward, of their gradient, in the same memory) in the inputs'
# dtype: N = 8192 rows of bf16 give chunks of 8192 columns. Larger chunks mean fewer, larger
# GEMMs and fewer passes over the fp32 grad_hidden accumulator, at this much extra memory.
CHUNK_BYTES = 128 << 20
CHUNK_ALIGN = 256  # chunk widths above this are multiples of it (GEMM and partials tiles)
# torch >= 2.8 on CUDA: fp16/bf16 GEMMs with an fp32 output (cuBLAS accumulates in fp32 anyway).
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
# addmm with an fp32 C and fp16/bf16 A, B: later torch versions accept it; earlier ones with
# out_dtype insist that C has A's dtype. Set to False by the first call that raises.
_addmm_out_dtype = [hasattr(torch.ops.aten.addmm, "dtype")]


def chunk_cols(n_rows: int, itemsize: int) -> int:
    """Vocabulary columns per chunk: as many as fit CHUNK_BYTES of logits in the inputs' dtype
    (at least 1), rounded down to a multiple of CHUNK_ALIGN when wider than that."""
    cols = max(1, CHUNK_BYTES // max(1, n_rows * itemsize))
    return cols // CHUNK_ALIGN * CHUNK_ALIGN if cols >= CHUNK_ALIGN else cols


def _chunks(n_valid_cols: int, width: int) -> list[tuple[int, int]]:
    """[c0, c1) column ranges covering the real columns [0, n_valid_cols) of the shard."""
    return [(c0, min(n_valid_cols, c0 + width)) for c0 in range(0, n_valid_cols, width)]


def _logits_chunk(hidden2d, weight, bias, c0: int, c1: int, buf: torch.Tensor) -> torch.Tensor:
    """``hidden2d @ weight[c0:c1]^T (+ bias[c0:c1])`` in the inputs' dtype, written into the first
    N * (c1 - c0) elements of the flat ``buf`` (a contiguous [N, c1 - c0] view)."""
    out = buf[: hidden2d.shape[0] * (c1 - c0)].view(hidden2d.shape[0], c1 - c0)
    w_t = weight[c0:c1].t()
    if bias is None:
        return torch.mm(hidden2d, w_t, out=out)
    return torch.addmm(bias[c0:c1], hidden2d, w_t, out=out)


def _chunk_buffer(hidden2d: torch.Tensor, n_valid_cols: int, width: int) -> torch.Tensor:
    return torch.empty(
        hidden2d.shape[0] * min(width, n_valid_cols), dtype=hidden2d.dtype, device=hidden2d.device
    )


def forward_blocks(n_rows: int, n_valid_cols: int, itemsize: int, k: int) -> tuple[bool, list[tuple]]:
    """The blocks ``(r0, r1, c0, c1)`` of logits the chunked forward computes, in order, each at
    most CHUNK_BYTES: vocabulary chunks of ``chunk_cols`` columns over every row, or, for top-k
    (k > 0) when the real columns need several chunks, blocks of rows over every real column
    (then the first value is True). The top-k selection after each (row, block) costs the same
    whatever the block's width, so vocabulary chunks would pay it once per chunk: measured on an
    H200, top-50 over 16 vocabulary chunks cost 1.23x the k = 0 forward, the unfused kernel on
    whole rows 1.01x."""
    spans = _chunks(n_valid_cols, chunk_cols(n_rows, itemsize))
    if k > 0 and len(spans) > 1:
        rows = max(1, CHUNK_BYTES // (n_valid_cols * itemsize))
        return True, [(r0, min(n_rows, r0 + rows), 0, n_valid_cols) for r0 in range(0, n_rows, rows)]
    return False, [(0, n_rows, c0, c1) for c0, c1 in spans]


def chunked_linear_pieces(
    hidden2d, weight, bias, target1d, *, n_valid_cols: int, vocab_start: int, k: int, **kw
) -> Pieces:
    """``backend.linear_pieces`` by the blocks of ``forward_blocks``: the pieces of every block's
    logits, concatenated along the split axis (vocabulary chunks: S = the chunks' splits
    together) or along the rows (row blocks, each block's column splits merged first). ``kw``:
    the other options of ``backend.shard_pieces``."""
    n_rows = hidden2d.shape[0]
    along_rows, blocks = forward_blocks(n_rows, n_valid_cols, hidden2d.element_size(), k)
    if not blocks:  # no real column in this shard: the monoid's identity
        dtype = reference.compute_dtype(hidden2d.dtype)
        return pack(identity(n_rows, k, dtype=dtype, device=hidden2d.device))
    size = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in blocks)
    buf = torch.empty(size, dtype=hidden2d.dtype, device=hidden2d.device)
    parts = []
    for r0, r1, c0, c1 in blocks:
        logits = _logits_chunk(hidden2d[r0:r1], weight, bias, c0, c1, buf)
        target = None if target1d is None else target1d[r0:r1]
        p = backend.shard_pieces(
            logits, target, k=k, n_valid_cols=c1 - c0, vocab_start=vocab_start + c0, **kw
        )
        parts.append(pack(p.merged()) if along_rows and p.n_splits != 1 else p)
    if len(parts) == 1:
        return parts[0]
    d = 1 if along_rows else 0  # the rows / splits axis of topk_vals and topk_ids; stats: d + 1
    return Pieces(
        torch.cat([p.stats for p in parts], dim=d + 1),
        torch.cat([p.topk_vals for p in parts], dim=d),
        torch.cat([p.topk_ids for p in parts], dim=d),
    )


def _matmul_accumulate(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, acc_dtype) -> torch.Tensor:
    """``acc + a @ b`` (``a @ b`` when acc is None) in ``acc_dtype`` (fp32, fp64 for fp64 inputs).

    Precision: fp16/bf16 inputs on CUDA take cuBLAS's fp32 output (``out_dtype``, torch >= 2.8):
    each chunk's product is accumulated in fp32 and never rounded, so grad_hidden is rounded once,
    at the end, as a single GEMM over the whole shard would round it. The sum is cuBLAS's own
    ``C + A @ B`` (fp32 C read in the epilogue) where torch accepts an fp32 C, else a separate
    fp32 add. Without ``out_dtype`` on CUDA, each chunk's product is rounded to the inputs' dtype
    before the fp32 sum (one more rounding per chunk). Off CUDA the inputs are upcast (exact
    products; slow, for tests and the CPU)."""
    if a.dtype == acc_dtype:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if not a.is_cuda:
        prod = torch.mm(a.to(acc_dtype), b.to(acc_dtype))
        return prod if acc is None else acc.add_(prod)
    if not _HAS_OUT_DTYPE:
        prod = torch.mm(a, b).to(acc_dtype)
        return prod if acc is None else acc.add_(prod)
    if acc is None:
        return torch.mm(a, b, out_dtype=acc_dtype)
    if _addmm_out_dtype[0]:
        try:
            return torch.addmm(acc, a, b, out_dtype=acc_dtype)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # raised by the argument check, before any launch
            _addmm_out_dtype[0] = False
    return acc.add_(torch.mm(a, b, out_dtype=acc_dtype))


def chunked_linear_backward(
    hidden2d,
    weight,
    bias,
    target1d,
    lse_bwd,
    grad_out,
    *,
    n_valid_cols: int,
    vocab_start: int,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = True,
    **kw,
):
    """``backend.linear_cross_entropy_backward`` by vocabulary chunks of ``chunk_cols`` columns:
    ``(grad_hidden [N, H] fp32 (fp64 for fp64 inputs; this shard's partial sum), grad_weight
    [V_shard, H] and grad_bias [V_shard] in their dtypes)``; a gradient not needed comes back as
    None. ``kw``: the other options of ``backend.shard_cross_entropy_backward`` (``ops.grad_kwargs``)."""
    n_rows = hidden2d.shape[0]
    acc_dtype = reference.compute_dtype(hidden2d.dtype)
    need_bias_grad = need_bias_grad and bias is not None
    grad_weight = (
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight_grad else None
    )
    grad_bias = torch.empty_like(bias) if need_bias_grad else None
    for g in (grad_weight, grad_bias):
        if g is not None:
            g[n_valid_cols:].zero_()  # padding rows: no gradient
    grad_hidden = None
    width = chunk_cols(n_rows, hidden2d.element_size())
    spans = _chunks(n_valid_cols, width) if (need_hidden_grad or need_weight_grad or need_bias_grad) else []
    if spans:
        buf = _chunk_buffer(hidden2d, n_valid_cols, width)
    for c0, c1 in spans:
        logits = _logits_chunk(hidden2d, weight, bias, c0, c1, buf)
        g = backend.shard_cross_entropy_backward(
            logits, target1d, lse_bwd, grad_out, n_valid_cols=c1 - c0, vocab_start=vocab_start + c0,
            out=logits, **kw,
        )  # fmt: skip
        if need_weight_grad:
            torch.mm(g.t(), hidden2d, out=grad_weight[c0:c1])
        if need_bias_grad:
            grad_bias[c0:c1] = g.sum(dim=0, dtype=acc_dtype)
        if need_hidden_grad:
            grad_hidden = _matmul_accumulate(grad_hidden, g, weight[c0:c1], acc_dtype)
    if need_hidden_grad and grad_hidden is None:  # no real column in this shard
        grad_hidden = torch.zeros(hidden2d.shape, dtype=acc_dtype, device=hidden2d.device)
    return grad_hidden, grad_weight, grad_bias


def linear_global_pieces(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target1d: torch.Tensor | None,
    call: ShardCall,
    process_group,
    impl: str = "chunked",
) -> tuple[Pieces, Layout]:
    """The global vocabulary's partials of the logits ``hidden2d [N, H] @ weight [V_shard, H]^T
    (+ bias)`` as pieces for finalize, and this shard's layout (see ``ops.global_pieces``)."""

    def pieces(layout: Layout) -> Pieces:
        kw = shard_kwargs(call, layout)
        if impl == "chunked":
            return chunked_linear_pieces(hidden2d, weight, bias, target1d, **kw)
        return backend.linear_pieces(hidden2d, weight, bias, target1d, **kw)

    shape = ShardShape((hidden2d.shape[0], weight.shape[0]), hidden2d.dtype, hidden2d.device)
    return global_pieces(shape, target1d, call, process_group, pieces_fn=pieces)


def linear_cross_entropy_forward(
    hidden2d, weight, bias, target1d, call: ShardCall, reduction: str, process_group, impl: str = "chunked"
) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """``(loss, lse_bwd, layout)`` as ``ops.cross_entropy_forward``, for the head's logits."""
    pieces, layout = linear_global_pieces(hidden2d, weight, bias, target1d, call, process_group, impl)
    loss, lse_bwd = finalize_loss(hidden2d, pieces, target1d, call, reduction)
    return loss, lse_bwd, layout


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The reduced cross-entropy of the logit shard ``hidden @ weight^T (+ bias)``. Saves hidden,
    weight, bias (no copies), the targets and ``lse_bwd`` ([N + 1]: per-row lse, then the
    reduction's scale); no logits."""

    @staticmethod
    def forward(
        ctx, hidden2d, weight, bias, target1d, call: ShardCall, reduction: str, process_group,
        reduce_hidden_grad, impl,
    ):  # fmt: skip
        loss, lse_bwd, layout = linear_cross_entropy_forward(
            hidden2d, weight, bias, target1d, call, reduction, process_group, impl
        )
        ctx.save_for_backward(hidden2d, weight, bias, target1d, lse_bwd)
        ctx.call, ctx.layout, ctx.impl = call, layout, impl
        ctx.process_group, ctx.reduce_hidden_grad = process_group, reduce_hidden_grad
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        hidden2d, weight, bias, target1d, lse_bwd = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_fn = chunked_linear_backward if ctx.impl == "chunked" else backend.linear_cross_entropy_backward
        grad_hidden, grad_weight, grad_bias = grad_fn(
            hidden2d,
            weight,
            bias,
            target1d,
            lse_bwd,
            grad_out,
            **grad_kwargs(ctx.call, ctx.layout),
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
            None,
        )

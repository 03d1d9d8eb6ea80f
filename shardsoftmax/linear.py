"""Math layer of the LM head: the partials of ``hidden @ weight^T (+ bias)`` without storing the
[N, V_shard] logits, through the same pieces -> finalize path as every other op
(``ops.global_pieces``), and the cross-entropy autograd Function. Three implementations
(``impl``), the same results up to the rounding of the matmul:

* ``"chunked"`` (the default). Forward without gradients (``linear_softmax_stats``, the loss under
  ``torch.no_grad()`` or with reduction "none"): blocks of rows (``forward_blocks``), each over
  the shard's real columns (one block of logits in the inputs' dtype, at most
  ``FORWARD_BLOCK_BYTES``, exists at a time). Per block: ``logits_i = hidden_i @ W^T (+ b)`` with
  ``torch.mm`` / ``torch.addmm`` (cuBLAS on CUDA), then the shard partials
  (``backend.shard_pieces``) of those rows; the blocks' pieces (each block's column splits merged
  first) are concatenated along the rows and merged by finalize (or by the collective) with the
  one merge of ``partials``. The logits are rounded to the inputs' dtype, as ``F.linear`` + the
  unfused API rounds them. The reduced loss ("mean" / "sum") with gradients: the *eager-gradient* forward
  (``eager_linear_cross_entropy``): blocks of rows (``eager_blocks``) over the whole shard, each
  block's logits -> its global partials (one collective per block in a group) -> its loss and,
  in the same buffer, dloss/dlogits -> its contribution to the three gradients. 3 GEMMs in all
  (the three-matmul floor); backward only scales the saved gradients by grad_output.
* ``"recompute"``: the chunked forward above (blocks of at most ``CHUNK_BYTES``), and a backward
  that recomputes the logits by vocabulary chunks of ``chunk_cols`` columns, per
  chunk: ``logits_j`` again, overwritten with dloss/dlogits_j
  (``backend.shard_cross_entropy_backward`` with ``out=`` the chunk), then ``grad_W_j = G_j^T @
  hidden`` (complete for those rows: no accumulation across chunks), ``grad_b_j = sum_rows G_j``
  (summed in fp32) and ``grad_hidden += G_j @ W_j`` in an fp32 accumulator (see
  ``_matmul_accumulate``). 4 GEMMs, the least memory (one chunk + fp32 grad_hidden). Only the
  real columns are computed (padding rows' gradients are 0).
* ``"fused"``: the Triton kernels of ``kernels/linear.py`` (``tl.dot`` tiles straight into the
  partials, fp32 logits never rounded). Backward as ``"recompute"``'s, except that each chunk's
  G comes from the fused tile kernel (logits recomputed in fp32 in registers, G rounded once to
  the inputs' dtype) instead of cuBLAS logits in the inputs' dtype.

Forward: one collective (the all-gather of the partials), as ``cross_entropy``; the eager
forward: one per block of rows, all with the same header, which holds the call's rows, its number
of exchanges, ``impl``, ``reduction`` and the gradients it computes, so ranks on different paths
raise at the first; its check is resolved before the second (``collective.confirm``: one host sync
on CUDA). Backward: the gradients of weight and bias
are this shard's own; the gradient of the (replicated) hidden states is this shard's partial
sum, all-reduced over the group when ``reduce_hidden_grad`` (the column-parallel rule; the only
collective in backward).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import backend, collective, reference
from .collective import Layout
from .ops import ShardCall, ShardShape, finalize_loss, global_pieces, grad_kwargs, shard_kwargs
from .partials import Pieces, identity, pack

# One chunk of logits (and, in backward, of their gradient, in the same memory) in the inputs'
# dtype: N = 8192 rows of bf16 give chunks of 8192 columns. Larger chunks mean fewer, larger
# GEMMs and fewer passes over the fp32 grad_hidden accumulator, at this much extra memory.
# "recompute" also takes its forward in blocks of rows of this size (its least memory).
CHUNK_BYTES = 128 << 20
# The chunked forward (statistics, the loss without gradients) goes by blocks of rows of at most
# FORWARD_BLOCK_BYTES of logits, over every real column. Tall blocks keep the GEMM at the whole
# matmul's efficiency and give the top-k selection's one-warp programs a few thousand rows. One
# H200, H = 4096, bf16, GPU time against F.linear + softmax_stats and the matmul in the same
# rotation (docs/performance.md v0.15): k = 0 over N = 4096-32768, V_shard = 32064-256000 took
# 1.04-1.08x of the matmul (unfused: 1.03-1.06x), where vocabulary chunks of 128 MiB took
# 1.08-1.15x; top-50 at N = 8192, V = 128256 (v0.7): 0.97x of k = 0 with 2093-row blocks of
# 512 MiB, 1.14x with 523-row blocks of 128 MiB.
FORWARD_BLOCK_BYTES = 512 << 20
CHUNK_ALIGN = 256  # chunk widths above this are multiples of it (GEMM and partials tiles)
# Rows per block of the eager-gradient forward (see ``eager_blocks``). Each block's grad_weight
# GEMM reads and writes the fp32 [V_shard, H] accumulator (8 V H bytes) for 2 rows V H FLOPs: 2048
# rows give 512 FLOP per byte of it, above an H100 / H200's ~200-300 (bf16 matmul rate over
# memory bandwidth), so that GEMM stays compute-bound.
EAGER_ROWS = 2048
# ... and as many more as fit this many bytes of logits in the inputs' dtype, over the group's
# widest shard (``eager_blocks``): each block's grad_weight GEMM reads and writes the fp32
# accumulator [V_shard, H] once, so narrow shards (TP = 2, 4) want fewer, taller blocks.
EAGER_BLOCK_BYTES = 512 << 20
# torch >= 2.8 on CUDA: fp16/bf16 GEMMs with an fp32 output (cuBLAS accumulates in fp32 anyway).
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
# How ``_matmul_accumulate`` adds an fp16/bf16 product to an fp32 C on CUDA: the first of these
# that torch accepts (later torch versions take an fp32 C with out_dtype, earlier ones insist that
# C has A's dtype); the index moves on at the first call that raises.
ADDMM_WAYS = ("addmm in place (fp32 C, out_dtype=fp32, out=C)", "addmm (fp32 C, out_dtype=fp32)",
              "mm(out_dtype=fp32) + add")  # fmt: skip
_addmm_way = [0 if hasattr(torch.ops.aten.addmm, "dtype") else 2]


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


def forward_blocks(n_rows: int, n_valid_cols: int, itemsize: int, block_bytes: int) -> list[tuple[int, int]]:
    """The blocks of rows ``(r0, r1)`` the chunked forward computes, in order, each over every real
    column: as many rows as fit ``block_bytes`` of logits (at least one row, so a block of a
    shard wider than ``block_bytes`` per row takes one row). An empty list for a shard without
    real columns or without rows."""
    if n_valid_cols == 0 or n_rows == 0:
        return []
    rows = max(1, block_bytes // (n_valid_cols * itemsize))
    return [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]


def chunked_linear_pieces(
    hidden2d, weight, bias, target1d, *, n_valid_cols: int, vocab_start: int, k: int, block_bytes: int, **kw
) -> Pieces:
    """``backend.linear_pieces`` by the blocks of rows of ``forward_blocks`` (at most
    ``block_bytes`` of logits each): the pieces of every block's logits, each block's column
    splits merged first when there are several blocks, concatenated along the rows. ``kw``: the
    other options of ``backend.shard_pieces``."""
    n_rows = hidden2d.shape[0]
    blocks = forward_blocks(n_rows, n_valid_cols, hidden2d.element_size(), block_bytes)
    if not blocks:  # no real column in this shard (or no row): the monoid's identity
        dtype = reference.compute_dtype(hidden2d.dtype)
        return pack(identity(n_rows, k, dtype=dtype, device=hidden2d.device))
    buf = torch.empty(
        (blocks[0][1] - blocks[0][0]) * n_valid_cols, dtype=hidden2d.dtype, device=hidden2d.device
    )
    parts = []
    for r0, r1 in blocks:
        logits = _logits_chunk(hidden2d[r0:r1], weight, bias, 0, n_valid_cols, buf)
        target = None if target1d is None else target1d[r0:r1]
        p = backend.shard_pieces(
            logits, target, k=k, n_valid_cols=n_valid_cols, vocab_start=vocab_start, **kw
        )
        parts.append(pack(p.merged()) if len(blocks) > 1 and p.n_splits != 1 else p)
    if len(parts) == 1:
        return parts[0]
    return Pieces(  # stats [F, 1, rows], topk [1, rows, k]
        torch.cat([p.stats for p in parts], dim=2),
        torch.cat([p.topk_vals for p in parts], dim=1),
        torch.cat([p.topk_ids for p in parts], dim=1),
    )


def _matmul_accumulate(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, acc_dtype) -> torch.Tensor:
    """``acc + a @ b`` (``a @ b`` when acc is None) in ``acc_dtype`` (fp32, fp64 for fp64 inputs),
    in ``acc``'s memory where possible.

    Precision: fp16/bf16 inputs on CUDA take cuBLAS's fp32 output (``out_dtype``, torch >= 2.8):
    each product is accumulated in fp32 and never rounded, so the sum is rounded once, at the end,
    as a single GEMM over everything would round it. The sum is cuBLAS's own ``C + A @ B`` (fp32 C
    read in the epilogue, written in place) where torch accepts an fp32 C (``ADDMM_WAYS``), else a
    separate fp32 add. Without ``out_dtype`` on CUDA, each product is rounded to the inputs' dtype
    before the fp32 sum (one more rounding per product). Off CUDA the inputs are upcast (exact
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
    while _addmm_way[0] < 2:
        try:
            if _addmm_way[0] == 0:
                return torch.addmm(acc, a, b, out_dtype=acc_dtype, out=acc)
            return torch.addmm(acc, a, b, out_dtype=acc_dtype)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # raised by the argument check, before any launch
            _addmm_way[0] += 1
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
    fused: bool = False,
    **kw,
):
    """The gradients of the LM head's loss by vocabulary chunks of ``chunk_cols`` columns:
    ``(grad_hidden [N, H] fp32 (fp64 for fp64 inputs; this shard's partial sum), grad_weight
    [V_shard, H] and grad_bias [V_shard] in their dtypes)``; a gradient not needed comes back as
    None. Each chunk's dloss/dlogits G: from cuBLAS logits in the inputs' dtype (``"recompute"``),
    or with ``fused`` from the fused tile kernel's fp32 logits (``backend.linear_grad_logits``);
    then the same GEMMs. ``kw``: the other options of ``backend.shard_cross_entropy_backward``
    (``ops.grad_kwargs``)."""
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
        chunk = dict(n_valid_cols=c1 - c0, vocab_start=vocab_start + c0)
        if fused:
            out = buf[: n_rows * (c1 - c0)].view(n_rows, c1 - c0)
            b = None if bias is None else bias[c0:c1]
            g = backend.linear_grad_logits(
                hidden2d, weight[c0:c1], b, target1d, lse_bwd, grad_out, out=out, **chunk, **kw
            )
        else:
            logits = _logits_chunk(hidden2d, weight, bias, c0, c1, buf)
            g = backend.shard_cross_entropy_backward(
                logits, target1d, lse_bwd, grad_out, out=logits, **chunk, **kw
            )
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
        if impl == "fused":
            return backend.linear_pieces(hidden2d, weight, bias, target1d, **kw)
        block = CHUNK_BYTES if impl == "recompute" else FORWARD_BLOCK_BYTES
        return chunked_linear_pieces(hidden2d, weight, bias, target1d, block_bytes=block, **kw)

    shape = ShardShape((hidden2d.shape[0], weight.shape[0]), hidden2d.dtype, hidden2d.device)
    return global_pieces(shape, target1d, call, process_group, pieces_fn=pieces)


def linear_cross_entropy_forward(
    hidden2d, weight, bias, target1d, call: ShardCall, reduction: str, process_group, impl: str = "chunked"
) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """``(loss, lse_bwd, layout)`` as ``ops.cross_entropy_forward``, for the head's logits."""
    pieces, layout = linear_global_pieces(hidden2d, weight, bias, target1d, call, process_group, impl)
    loss, lse_bwd = finalize_loss(hidden2d, pieces, target1d, call, reduction)
    return loss, lse_bwd, layout


# ------------------------------------------------------------------------------------------------
# The eager-gradient forward: loss and the three gradients in one pass of 3 GEMMs
# ------------------------------------------------------------------------------------------------


def eager_blocks(
    n_rows: int, max_width: int | None = None, itemsize: int = 2
) -> tuple[int, list[tuple[int, int]]]:
    """``(rows, [(r0, r1), ...])``: the eager forward's blocks of rows, balanced (``rows =
    ceil(N / n_blocks)``; the last may be shorter and is then padded to ``rows``), of at most
    ``max(EAGER_ROWS, EAGER_BLOCK_BYTES // (max_width * itemsize))`` rows: the widest shard's
    logits block within EAGER_BLOCK_BYTES, at least EAGER_ROWS rows (``max_width`` None: EAGER_ROWS).
    Every rank of a group must get the same blocks (each is one exchange, whose header holds its
    row count), so ``max_width`` is the same on every rank (``eager_max_width``), never this rank's
    own width (uneven shards differ)."""
    if n_rows == 0:
        return 0, []
    cap = EAGER_ROWS
    if max_width:
        cap = max(cap, EAGER_BLOCK_BYTES // (max_width * itemsize))
    n_blocks = -(-n_rows // cap)
    rows = -(-n_rows // n_blocks)
    return rows, [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]


def eager_max_width(width: int, vocab_size: int | None, process_group) -> int | None:
    """A width for sizing the eager blocks that every rank computes alike without a collective:
    one process, this shard's width; in a group, ``ceil(vocab_size / world_size)`` when
    ``vocab_size`` is given (equal on every rank, or the exchange raises), else None (EAGER_ROWS).
    Only real columns are computed, so with even shards this is the widest block's width."""
    if process_group is None:
        return width
    if vocab_size is None:
        return None
    return -(-vocab_size // dist.get_world_size(process_group))


class EagerGrads(NamedTuple):
    """What the eager forward leaves for backward, not yet scaled by grad_output, in the compute
    dtype (fp32; fp64 for fp64 inputs); None where not needed."""

    hidden: torch.Tensor | None  # [N, H], this shard's share (before the all-reduce)
    weight: torch.Tensor | None  # [n_valid_cols, H]: the real rows only (padding rows get 0)
    bias: torch.Tensor | None  # [n_valid_cols]


def eager_linear_cross_entropy(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target1d: torch.Tensor,
    call: ShardCall,
    reduction: str,
    process_group,
    *,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, EagerGrads]:
    """The reduced loss ("mean" or "sum") and its gradients w.r.t. hidden, weight and bias, by the
    blocks of ``eager_blocks``: 3 GEMMs in all, the logits of one block at a time.

    Per block (r0, r1), padded to ``rows``: ``logits = hidden[r0:r1] @ W[:nv]^T (+ b[:nv])`` in the
    inputs' dtype (only the ``nv`` real columns of the layout), its partials, the global pieces
    (one collective in a group, every block with the same header, so the group stays on its
    steady-state path), the block's loss sum and lse, then dloss/dlogits in place
    (``backend.shard_cross_entropy_backward``, scaled by 1 for "sum", 1 / (valid targets over all
    N) for "mean", so each row's gradient is rounded to the inputs' dtype as in the recomputing
    backward), and from it ``grad_hidden[r0:r1] = G @ W[:nv]`` (fp32 out), ``grad_W += G^T @
    hidden[r0:r1]`` (fp32 accumulator, see ``_matmul_accumulate``) and ``grad_b += sum_rows G``
    (fp32). Padding rows of the last block have logits 0 and target ``ignore_index``: no loss, no
    gradient, and they enter no GEMM. A shard with no real column contributes the identity
    pieces and zero gradients. The loss is the sum of the blocks' sums (divided by the number of
    valid targets for "mean": NaN when there is none, as the other paths). No host sync.

    Memory beyond the inputs: one [rows, nv] block of logits in the inputs' dtype (at most
    EAGER_BLOCK_BYTES, or EAGER_ROWS rows if more: 501 MiB at rows = 2048, nv = 128256, bf16;
    freed on return), the fp32 grad_weight accumulator [nv, H]
    (2.0 GiB at H = 4096) and the fp32 grad_hidden [N, H] (128 MiB at N = 8192); the last two
    are what backward scales and rounds (kept in fp32 until then: rounding them here and scaling
    them again in backward would round twice and read and write grad_weight once more)."""
    n_rows, n_cols = hidden2d.shape[0], weight.shape[0]
    device = hidden2d.device
    acc_dtype = reference.compute_dtype(hidden2d.dtype)
    need_bias_grad = need_bias_grad and bias is not None
    max_width = eager_max_width(n_cols, call.vocab_size, process_group)
    rows, blocks = eager_blocks(n_rows, max_width, hidden2d.element_size())
    # every block's header: the call's rows and exchanges too (ranks that differ raise at the first)
    call = replace(call, call_rows=n_rows, exchanges=len(blocks))
    one = torch.ones((), dtype=acc_dtype, device=device)
    n_valid = (target1d != call.ignore_index).sum() if reduction == "mean" else None
    # the reduction's scale, on the device (inf when no target is valid: every row is ignored then)
    scale = one / n_valid if n_valid is not None else one
    grad_hidden = torch.empty(hidden2d.shape, dtype=acc_dtype, device=device) if need_hidden_grad else None
    grad_weight = grad_bias = None
    shape = ShardShape((rows, n_cols), hidden2d.dtype, device)
    state: dict = {}  # the logits buffer: its width (the layout's real columns) is known in pieces_fn
    total = None
    since = collective.checks_queued(process_group) if process_group is not None else 0
    for i, (r0, r1) in enumerate(blocks):
        if i == 1 and process_group is not None:
            # The first exchange's header check, before the second exchange (the ranks' calls may
            # disagree: those that found out at the first raised and will not exchange again).
            # Here, not right after the first exchange: the GPU has the first block's gradient
            # GEMMs queued while the host waits (on the CPU the check already ran: no wait).
            collective.confirm(process_group, since)
        n = r1 - r0
        h_b = hidden2d[r0:r1]
        t_b = target1d[r0:r1]
        if n < rows:  # the last block: padded with ignored rows (same header as the others)
            t_b = torch.cat([t_b, t_b.new_full((rows - n,), call.ignore_index)])

        def pieces(layout: Layout, h_b=h_b, t_b=t_b, n=n) -> Pieces:
            nv = layout.n_valid_cols
            if nv == 0:  # no real column in this shard: the monoid's identity
                return pack(identity(rows, 0, dtype=acc_dtype, device=device))
            if "buf" not in state:
                state["buf"] = torch.empty(rows * nv, dtype=hidden2d.dtype, device=device)
            logits = state["buf"].view(rows, nv)
            _logits_chunk(h_b, weight, bias, 0, nv, state["buf"])  # rows [0, n) of ``logits``
            if n < rows:
                logits[n:].zero_()
            state["logits"] = logits
            return backend.shard_pieces(logits, t_b, **shard_kwargs(call, layout))

        block_pieces, layout = global_pieces(shape, t_b, call, process_group, pieces_fn=pieces)
        loss_b, lse_bwd = finalize_loss(hidden2d, block_pieces, t_b, call, "sum")
        total = loss_b if total is None else total + loss_b
        nv = layout.n_valid_cols
        if nv == 0:
            continue
        logits = state["logits"]
        g = backend.shard_cross_entropy_backward(
            logits, t_b, lse_bwd, scale, **grad_kwargs(call, layout), out=logits
        )[:n]
        if need_hidden_grad:
            grad_hidden[r0:r1] = _matmul_accumulate(None, g, weight[:nv], acc_dtype)
        if need_weight_grad:
            grad_weight = _matmul_accumulate(grad_weight, g.t(), h_b, acc_dtype)
        if need_bias_grad:
            part = g.sum(dim=0, dtype=acc_dtype)
            grad_bias = part if grad_bias is None else grad_bias.add_(part)
    state.clear()
    if layout.n_valid_cols == 0 and grad_hidden is not None:  # (the same layout for every block)
        grad_hidden.zero_()
    loss = total / n_valid if n_valid is not None else total
    return loss, EagerGrads(grad_hidden, grad_weight, grad_bias)


def _scaled_rows(acc: torch.Tensor | None, grad_out: torch.Tensor, shape, dtype) -> torch.Tensor:
    """``acc * grad_out`` rounded once to ``dtype``, in a new tensor of ``shape`` whose rows past
    ``acc``'s (the padding rows) are 0; all 0 when ``acc`` is None (no real column)."""
    out = torch.empty(shape, dtype=dtype, device=grad_out.device)
    nv = 0 if acc is None else acc.shape[0]
    if nv:
        torch.mul(acc, grad_out, out=out[:nv])
    if nv < out.shape[0]:
        out[nv:].zero_()
    return out


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The reduced cross-entropy of the logit shard ``hidden @ weight^T (+ bias)``.

    Eager (``impl="chunked"``, reduction "mean" or "sum", N > 0): forward is
    ``eager_linear_cross_entropy`` and saves the gradients it computed (fp32, unscaled); backward
    multiplies them by grad_output (out of place, so a retained graph can run backward again) and
    rounds them once to the inputs' dtype. Otherwise (``"recompute"``, ``"fused"``, reduction
    "none"): saves hidden, weight, bias (no copies), the targets and ``lse_bwd`` ([N + 1]: per-row
    lse, then the reduction's scale), no logits, and backward recomputes the logits. Either way
    hidden's gradient is all-reduced over the group in fp32 when ``reduce_hidden_grad``."""

    @staticmethod
    def forward(
        ctx, hidden2d, weight, bias, target1d, call: ShardCall, reduction: str, process_group,
        reduce_hidden_grad, impl,
    ):  # fmt: skip
        ctx.process_group, ctx.reduce_hidden_grad = process_group, reduce_hidden_grad
        ctx.eager = impl == "chunked" and reduction in ("mean", "sum") and hidden2d.shape[0] > 0
        if ctx.eager:
            need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
            loss, grads = eager_linear_cross_entropy(
                hidden2d, weight, bias, target1d, call, reduction, process_group,
                need_hidden_grad=need_hidden, need_weight_grad=need_weight, need_bias_grad=need_bias,
            )  # fmt: skip
            # saved tensors (not attributes): freed after backward unless the graph is retained
            ctx.save_for_backward(*grads)
            ctx.hidden_dtype = hidden2d.dtype
            ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
            return loss
        loss, lse_bwd, layout = linear_cross_entropy_forward(
            hidden2d, weight, bias, target1d, call, reduction, process_group, impl
        )
        ctx.save_for_backward(hidden2d, weight, bias, target1d, lse_bwd)
        ctx.call, ctx.layout, ctx.impl = call, layout, impl
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.eager:
            grad_hidden, acc_weight, acc_bias = ctx.saved_tensors
            hidden_dtype, shape, dtype = ctx.hidden_dtype, ctx.weight_shape, ctx.weight_dtype
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_out  # fp32, a new tensor (the saved one stays)
            grad_weight = _scaled_rows(acc_weight, grad_out, shape, dtype) if need_weight else None
            grad_bias = _scaled_rows(acc_bias, grad_out, shape[:1], dtype) if need_bias else None
        else:
            hidden2d, weight, bias, target1d, lse_bwd = ctx.saved_tensors
            hidden_dtype = hidden2d.dtype
            grad_hidden, grad_weight, grad_bias = chunked_linear_backward(
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
                fused=ctx.impl == "fused",
            )
        if grad_hidden is not None:
            group = ctx.process_group
            if ctx.reduce_hidden_grad and group is not None and dist.get_world_size(group) > 1:
                collective.poll(group)  # a landed check that failed: raise instead of all-reducing
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)  # in fp32
            grad_hidden = grad_hidden.to(hidden_dtype)
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

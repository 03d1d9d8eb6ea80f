"""Finalize: the partials kernel's per-split output -> the public per-row results, in one small
launch. Each kernel merges the S column splits of a row with the monoid's merge (the same math as
``shardsoftmax.partials.merge_stacked``: the max, NaN if any piece's max is NaN, then each
piece's sums rescaled by ``exp(m_i - M)``, 0 for an empty piece) and derives from the merged
partials what ``shardsoftmax.partials`` derives in PyTorch (the reference these kernels are
tested against):

* ``finalize_stats``: lse = M + log s, max, entropy = lse - t / s, log p(target), and the top-k
  (merged over splits when S > 1) as log-probabilities or raw values;
* ``finalize_cross_entropy``: the per-row loss (label smoothing, z-loss, ignored rows, NaN where
  no piece held the target), reduced in-kernel (mean / sum), plus what backward reads.

Input layout: ``stats`` [F, S, N] fp32, the first F of ``kernels.partials.FIELDS`` (at least those
the kernel reads, ``stat_planes``; any field and split strides, rows contiguous), ``topk_vals`` /
``topk_ids`` [S, N, k].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ID32_SENTINEL,
    ID_SENTINEL,
    MIN_KEY16,
    POISON_KEY16,
    cdiv,
    key16_col,
    key16_value,
    key_col,
    key_slots,
    key_value,
    make_key,
    min_key_like,
    next_pow2,
    rescale_factor,
    topk_sorted_runs,
    widen_ids,
)
from .partials import (
    F_COUNT,
    F_MAX,
    F_SUM_X,
    F_SUMEXP,
    F_SUMEXP_X,
    F_TARGET_HITS,
    F_TARGET_LOGIT,
    FIELDS,
    stat_planes,
)

# The largest candidate set (S * k, rounded up to a power of two) merged in-kernel; larger top-k
# merges go through ``merge_stacked`` first.
MAX_MERGE_KEYS = 4096
# Rows from which a top-k merge runs one warp per row (``default_warps``): the GPU is then full of
# one-row programs (4 per SM on a 132-SM H100 / H200 at 512 rows)
MANY_ROWS = 512


@triton.jit
def merge_splits(
    stats_ptr,
    rows,
    mask,
    n_splits,
    stride_field,
    stride_split,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_SUM_X: tl.constexpr,
    NEED_TARGET: tl.constexpr,
):
    """Merged (max, sumexp, sumexp_x, sum_x, count, target_logit, target_hits) of the ``n_splits``
    pieces of each row in ``rows`` (a block of BLOCK_N), BLOCK_S pieces per load. Fields not
    needed come back as 0."""
    # Accumulate [BLOCK_N, BLOCK_S] tiles elementwise and reduce once after each loop.
    m2 = tl.full([BLOCK_N, BLOCK_S], float("-inf"), tl.float32)
    nan2 = tl.zeros([BLOCK_N, BLOCK_S], tl.int32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        tile_mask = mask[:, None] & (sp < n_splits)[None, :]
        mi = tl.load(
            stats_ptr + sp[None, :] * stride_split + rows[:, None], mask=tile_mask, other=float("-inf")
        )
        m2 = tl.maximum(m2, mi)
        nan2 += tl.where(mi != mi, 1, 0)
    m = tl.where(tl.sum(nan2, axis=1) > 0, float("nan"), tl.max(m2, axis=1))
    s2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    t2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    sum_x2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    count2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    tgt_logit2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    tgt_hits2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        tile_mask = mask[:, None] & (sp < n_splits)[None, :]
        piece = stats_ptr + sp[None, :] * stride_split + rows[:, None]
        mi = tl.load(piece + F_MAX * stride_field, mask=tile_mask, other=float("-inf"))
        f = rescale_factor(mi, m[:, None])  # 0 for empty pieces and masked lanes
        s2 += tl.load(piece + F_SUMEXP * stride_field, mask=tile_mask, other=0.0) * f
        if NEED_T:
            t2 += tl.load(piece + F_SUMEXP_X * stride_field, mask=tile_mask, other=0.0) * f
        if NEED_SUM_X:
            sum_x2 += tl.load(piece + F_SUM_X * stride_field, mask=tile_mask, other=0.0)
            count2 += tl.load(piece + F_COUNT * stride_field, mask=tile_mask, other=0.0)
        if NEED_TARGET:
            tgt_logit2 += tl.load(piece + F_TARGET_LOGIT * stride_field, mask=tile_mask, other=0.0)
            tgt_hits2 += tl.load(piece + F_TARGET_HITS * stride_field, mask=tile_mask, other=0.0)
    s = tl.sum(s2, axis=1)
    t = tl.sum(t2, axis=1)
    sum_x = tl.sum(sum_x2, axis=1)
    count = tl.sum(count2, axis=1)
    tgt_logit = tl.sum(tgt_logit2, axis=1)
    tgt_hits = tl.sum(tgt_hits2, axis=1)
    return m, s, t, sum_x, count, tgt_logit, tgt_hits


def split_block(n_splits: int, block_n: int) -> int:
    """Pieces per load in ``merge_splits``: all of them up to a [BLOCK_N, BLOCK_S] tile of 4096."""
    return max(1, min(next_pow2(n_splits), 4096 // block_n))


@triton.jit
def _merge_keys(vals_ptrs, ids_ptrs, mask, vocab_start):
    """The sort keys of the top-k entries at these pointers; the smallest key where ``mask`` is
    off or the entry is missing (id ID_SENTINEL, or ID32_SENTINEL for int32 ids: the ranks' ids
    as they travel, ``shardsoftmax.collective``)."""
    vals = tl.load(vals_ptrs, mask=mask, other=float("-inf"))
    if ids_ptrs.dtype.element_ty == tl.int32:
        ids32 = tl.load(ids_ptrs, mask=mask, other=ID32_SENTINEL)
        real = mask & (ids32 != ID32_SENTINEL)
        ids = ids32.to(tl.int64)
    else:
        ids = tl.load(ids_ptrs, mask=mask, other=ID_SENTINEL)
        real = mask & (ids != ID_SENTINEL)
    return tl.where(real, make_key(vals, ids - vocab_start), min_key_like(vals.shape))


@triton.jit
def _merge_keys16(words_ptrs, base, mask, vocab_start):
    """``_merge_keys`` of entries packed as ``make_key16`` words (``common.pack_key16``) of columns
    from ``base`` (each entry's piece's first global id): MIN_KEY16 is a missing entry, and the
    poison word (-1) reads as (NaN, id -1), as unpacked entries of a poisoned payload do."""
    words = tl.load(words_ptrs, mask=mask, other=MIN_KEY16)
    poison = words == POISON_KEY16
    vals = tl.where(poison, float("nan"), key16_value(words))
    ids = tl.where(poison, -1, base + key16_col(words).to(tl.int64))
    return tl.where(mask & (words != MIN_KEY16), make_key(vals, ids - vocab_start), min_key_like(vals.shape))


@triton.jit
def _finalize_stats_kernel(
    # pointers
    stats_ptr,
    topk_vals_ptr,
    topk_ids_ptr,
    target_ptr,
    rows_out_ptr,  # [4, n_rows]: lse, max, entropy, target_logprob
    topk_out_ptr,  # [n_rows, K] fp32: log-probs (LOGPROBS) or values
    topk_ids_out_ptr,  # [n_rows, K] int64, written when MERGE_TOPK
    # sizes
    n_rows,
    n_splits,
    vocab_start,
    ignore_index,
    # strides
    stride_stats_field,
    stride_stats_split,
    stride_vals_split,
    stride_vals_row,
    stride_ids_split,
    stride_ids_row,
    # meta
    SCALARS: tl.constexpr,  # write lse, max, entropy (and target_logprob with HAS_TARGET)
    HAS_TARGET: tl.constexpr,  # only with SCALARS
    LOGPROBS: tl.constexpr,  # top-k out = value - lse (else the raw value); only with SCALARS
    K: tl.constexpr,  # top-k size (0: none)
    KP: tl.constexpr,  # next power of two >= max(K, 2)
    MERGE_TOPK: tl.constexpr,  # S > 1: merge the S sorted lists (MP >= S * K candidates)
    PACKED: tl.constexpr,  # with MERGE_TOPK: topk_ids_ptr holds make_key16 words, topk_vals_ptr the
    # pieces' first global ids (int64 [S])
    MP: tl.constexpr,  # with MERGE_TOPK: next_pow2(S) * KP (one run of KP keys per list)
    LOG_KP: tl.constexpr,
    LOG_MP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid: (cdiv(n_rows, BLOCK_N),); one program per block of rows (BLOCK_N = 1 with MERGE_TOPK).
    lse = M + log s; entropy = lse - t / s; max = M (NaN where s is NaN); log p(target) = x_t - lse
    (0 where ignored, NaN where no split held it); top-k: the K best (value, id) of the S splits,
    value descending, lower id first among equal values, NaN above every number."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < n_rows
    if SCALARS:
        m, s, t, _sx, _c, tgt_logit, tgt_hits = merge_splits(
            stats_ptr, rows, mask, n_splits, stride_stats_field, stride_stats_split,
            BLOCK_N, BLOCK_S, True, False, HAS_TARGET,
        )  # fmt: skip
        lse = m + tl.log(s)
        tl.store(rows_out_ptr + rows, lse, mask=mask)
        tl.store(rows_out_ptr + n_rows + rows, tl.where(s != s, s, m), mask=mask)
        tl.store(rows_out_ptr + 2 * n_rows + rows, lse - t / s, mask=mask)
        if HAS_TARGET:
            tgt = tl.load(target_ptr + rows, mask=mask, other=ignore_index).to(tl.int64)
            x_t = tl.where(tgt_hits > 0, tgt_logit, float("nan"))
            logprob = tl.where(tgt == ignore_index, 0.0, x_t - lse)
            tl.store(rows_out_ptr + 3 * n_rows + rows, logprob, mask=mask)
    if K > 0:
        kk = tl.arange(0, KP)
        if MERGE_TOPK:
            # BLOCK_N == 1: one row per program. Its S lists come sorted (value desc, lower id
            # first, NaN first: the order of the keys), so they are laid out as runs of KP keys,
            # list j at run j (padded with the smallest key), even runs reversed: the bitonic
            # top-k's halving steps alone merge them. A row with a list out of order (not made
            # by our kernels or merge) takes a full tl.topk instead.
            row = tl.program_id(0)
            c = tl.arange(0, MP)
            split = c // KP
            j = tl.where(split % 2 == 0, KP - 1 - c % KP, c % KP)
            in_set = (split < n_splits) & (j < K)
            offs_i = split * stride_ids_split + row * stride_ids_row + j
            has_next = in_set & (j + 1 < K)
            if PACKED:
                base = tl.load(topk_vals_ptr + split, mask=split < n_splits, other=0)
                keys = _merge_keys16(topk_ids_ptr + offs_i, base, in_set, vocab_start)
                nxt = _merge_keys16(topk_ids_ptr + offs_i + 1, base, has_next, vocab_start)
            else:
                offs_v = split * stride_vals_split + row * stride_vals_row + j
                keys = _merge_keys(topk_vals_ptr + offs_v, topk_ids_ptr + offs_i, in_set, vocab_start)
                nxt = _merge_keys(topk_vals_ptr + offs_v + 1, topk_ids_ptr + offs_i + 1, has_next,
                                  vocab_start)  # fmt: skip
            if tl.max((has_next & (nxt > keys)).to(tl.int32), axis=0) > 0:
                top = tl.topk(keys, KP)
            else:
                top = topk_sorted_runs(keys, LOG_KP, LOG_MP)
            found = top != min_key_like([KP])
            out_vals = tl.where(found, key_value(top), float("-inf"))
            out_ids = tl.where(found, vocab_start + key_col(top).to(tl.int64), ID_SENTINEL)
            tl.store(topk_ids_out_ptr + row * K + kk, out_ids, mask=kk < K)
            if LOGPROBS:
                out_vals = out_vals - tl.sum(lse, axis=0)  # the row's lse ([1] -> scalar)
            tl.store(topk_out_ptr + row * K + kk, out_vals, mask=kk < K)
        else:
            out_mask = mask[:, None] & (kk < K)[None, :]
            out_vals = tl.load(
                topk_vals_ptr + rows[:, None] * stride_vals_row + kk[None, :], mask=out_mask, other=0.0
            )
            if LOGPROBS:
                out_vals = out_vals - lse[:, None]
            tl.store(topk_out_ptr + rows[:, None] * K + kk[None, :], out_vals, mask=out_mask)


REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


@triton.jit
def _finalize_cross_entropy_kernel(
    # pointers
    stats_ptr,
    target_ptr,
    loss_ptr,  # [n_rows] (REDUCTION none) or [] fp32
    lse_ptr,  # [n_rows + 1] fp32: lse per row (NaN where no piece held a valid target), then 1 / n
    # sizes
    n_rows,
    n_splits,
    rows_per_program,
    ignore_index,
    # strides
    stride_stats_field,
    stride_stats_split,
    # loss options
    label_smoothing,
    z_loss,
    # meta
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    REDUCTION: tl.constexpr,  # 0 none, 1 sum, 2 mean (then one program covers every row)
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid: (cdiv(n_rows, rows_per_program),). loss = (1 - eps)(lse - x_t) + eps (lse - sum_x / C)
    + z lse^2 per row (0 where ignored, NaN where no piece held the target), summed (and divided by
    the number of non-ignored rows for mean) in-kernel. Writes, for backward, the lse with NaN on
    rows whose target was found nowhere (their gradient is NaN), and the gradient's scale of the
    reduction at ``lse_ptr[n_rows]`` (1 / non-ignored rows for mean, else 1)."""
    pid = tl.program_id(0)
    row_lo = pid * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, n_rows)
    total = tl.zeros([BLOCK_N], tl.float32)
    n_valid = tl.zeros([BLOCK_N], tl.float32)
    for start in range(row_lo, row_hi, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = rows < row_hi
        m, s, _t, sum_x, count, tgt_logit, tgt_hits = merge_splits(
            stats_ptr, rows, mask, n_splits, stride_stats_field, stride_stats_split,
            BLOCK_N, BLOCK_S, False, HAS_SMOOTHING, True,
        )  # fmt: skip
        lse = m + tl.log(s)
        tgt = tl.load(target_ptr + rows, mask=mask, other=ignore_index).to(tl.int64)
        valid = tgt != ignore_index
        found = tgt_hits > 0
        loss = lse - tl.where(found, tgt_logit, float("nan"))
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / count)
        if HAS_Z_LOSS:
            loss = loss + z_loss * lse * lse
        loss = tl.where(valid, loss, 0.0)
        tl.store(lse_ptr + rows, tl.where(valid & (tgt_hits == 0), float("nan"), lse), mask=mask)
        if REDUCTION == 0:
            tl.store(loss_ptr + rows, loss, mask=mask)
        else:
            total += tl.where(mask, loss, 0.0)
            n_valid += tl.where(mask & valid, 1.0, 0.0)
    if REDUCTION == 0:
        tl.store(lse_ptr + n_rows, tl.full([], 1.0, tl.float32), mask=pid == 0)
    else:
        loss_sum = tl.sum(total, axis=0)
        if REDUCTION == 2:
            n = tl.sum(n_valid, axis=0)
            tl.store(loss_ptr, loss_sum / n)
            tl.store(lse_ptr + n_rows, 1.0 / n)
        else:
            tl.store(loss_ptr, loss_sum)
            tl.store(lse_ptr + n_rows, tl.full([], 1.0, tl.float32))


def can_merge_topk(n_splits: int, k: int) -> bool:
    """Whether ``finalize_stats`` / ``finalize_topk`` merge this many splits' top-k in-kernel."""
    return n_splits == 1 or k == 0 or merge_keys(n_splits, k) <= MAX_MERGE_KEYS


def merge_keys(n_splits: int, k: int) -> int:
    """MP: the key slots of one row's merge, a run of KP per list and a power of two of runs."""
    return next_pow2(n_splits) * key_slots(k)


def _check_stats(stats: torch.Tensor, planes: int) -> None:
    """``stats`` is [F, S, N] fp32 with at least the ``planes`` leading fields the caller reads."""
    if stats.dtype != torch.float32 or stats.dim() != 3 or not planes <= stats.shape[0] <= len(FIELDS):
        raise ValueError(
            f"stats must be [F, S, N] float32 with {planes} <= F <= {len(FIELDS)} (the leading fields of "
            f"{FIELDS}), got {stats.dtype} {tuple(stats.shape)}"
        )
    if stats.shape[2] > 1 and stats.stride(2) != 1:
        raise ValueError("stats rows must be contiguous")


def finalize_stats(
    stats: torch.Tensor | None,
    topk_vals: torch.Tensor | None,
    topk_ids: torch.Tensor,
    target: torch.Tensor | None,
    *,
    vocab_start: int,
    ignore_index: int,
    logprobs: bool = True,
    key_base: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(rows [4, N] fp32 = lse, max, entropy, target_logprob, topk [N, k] fp32, topk_ids [N, k]
    int64)`` from S splits. ``stats=None``: no per-row scalars (``rows`` is None) and the top-k
    are raw values; else ``logprobs`` chooses value - lse or the raw value. ``target`` [N]
    (contiguous) or None (row 3 is then left unwritten). ``topk_vals`` and ``topk_ids`` may have
    any split and row strides (views of a gathered buffer). With S = 1 the ids are ``topk_ids[0]``
    (contiguous); with S > 1 the top-k lists are merged here (``can_merge_topk``), one row per program.
    ``key_base`` (int64 [S], S > 1): the entries come packed as ``make_key16`` words in
    ``topk_ids`` (int32, ``common.pack_key16``), of the columns from ``key_base[s]`` in piece s;
    ``topk_vals`` is then unused. ``num_warps`` overrides ``default_warps`` (tuning)."""
    scalars = stats is not None
    if scalars:
        _check_stats(stats, stat_planes(need_entropy=True, need_sum_x=False))
    else:
        logprobs = False
    n_splits, n_rows, k = topk_ids.shape
    merge = n_splits > 1 and k > 0
    packed = key_base is not None
    if packed:
        if not merge or topk_ids.dtype != torch.int32 or key_base.shape != (n_splits,):
            raise ValueError(
                f"key_base: packed entries need S > 1 splits, int32 words and int64 bases [S], got "
                f"topk_ids {topk_ids.dtype} {tuple(topk_ids.shape)}, key_base {tuple(key_base.shape)}"
            )
        topk_vals = key_base
    if merge and not can_merge_topk(n_splits, k):
        raise ValueError(f"{n_splits} splits of top-{k} are too many to merge in-kernel")
    if k > 1 and ((not packed and topk_vals.stride(2) != 1) or topk_ids.stride(2) != 1):
        raise ValueError("topk_vals and topk_ids must be contiguous along k")
    device = topk_ids.device
    rows_out = torch.empty((4, n_rows), dtype=torch.float32, device=device) if scalars else None
    topk_out = torch.empty((n_rows, k), dtype=torch.float32, device=device)
    if merge or k == 0:
        ids_out = torch.empty((n_rows, k), dtype=torch.int64, device=device)
    else:
        ids_out = widen_ids(topk_ids[0]).contiguous()
    if n_rows == 0 or not (scalars or k > 0):
        return rows_out, topk_out, ids_out
    kp = key_slots(k)
    mp = merge_keys(n_splits, k) if merge else 1
    block_n = 1 if merge else max(1, min(128, 4096 // kp, next_pow2(n_rows)))
    any_ptr = rows_out if scalars else topk_out  # for pointers a switched-off path never reads
    _finalize_stats_kernel[(cdiv(n_rows, block_n),)](
        stats if scalars else any_ptr,
        topk_vals if k > 0 else any_ptr,
        topk_ids if k > 0 else any_ptr,
        target if target is not None else any_ptr,
        rows_out if scalars else any_ptr,
        topk_out if k > 0 else any_ptr,
        ids_out if merge else any_ptr,
        n_rows,
        n_splits,
        vocab_start,
        ignore_index,
        stats.stride(0) if scalars else 0,
        stats.stride(1) if scalars else 0,
        0 if packed else topk_vals.stride(0),
        0 if packed else topk_vals.stride(1),
        topk_ids.stride(0),
        topk_ids.stride(1),
        SCALARS=scalars,
        HAS_TARGET=target is not None,
        LOGPROBS=logprobs,
        K=k,
        KP=kp,
        MERGE_TOPK=merge,
        PACKED=packed,
        MP=mp,
        LOG_KP=kp.bit_length() - 1,
        LOG_MP=mp.bit_length() - 1,
        BLOCK_N=block_n,
        BLOCK_S=split_block(n_splits, block_n),
        num_warps=num_warps or default_warps(merge, mp, n_rows),
    )
    return rows_out, topk_out, ids_out


def default_warps(merge: bool, mp: int, n_rows: int = 1) -> int:
    """Warps of a ``_finalize_stats_kernel`` program. Without a top-k merge: 4 (blocks of rows).
    Merging MP candidates of one row: with many rows (>= MANY_ROWS: each program one row, the
    GPU full of programs) and MP <= 256 (measured up to there), 1 warp: measured on an H200
    (``tune.py --finalize``, N = 8192, the sorted-run merge) 13.4 us at 1 warp against 20.2 at 4
    (S = 2, k = 50: 128 keys), 21.6 us against 31.5 (S = 4, k = 50: 256 keys). With few rows
    (decode-sized batches), about one key per thread, from 1 warp (MP <= 32) to 4 (MP >= 128),
    and 8 beyond 1024."""
    if not merge:
        return 4
    if n_rows >= MANY_ROWS and mp <= 256:
        return 1
    if mp > 1024:
        return 8
    return max(1, min(4, mp // 32))


def finalize_cross_entropy(
    stats: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse_bwd)``: the loss ([N] for reduction "none", else []) fp32 and, for backward,
    ``lse_bwd`` [N + 1] fp32: each row's lse (NaN where its valid target was found in no split),
    then the reduction's gradient scale (1 / non-ignored rows for "mean", else 1)."""
    _check_stats(stats, stat_planes(need_entropy=False, need_sum_x=label_smoothing > 0))
    n_splits, n_rows = stats.shape[1], stats.shape[2]
    red = REDUCTIONS[reduction]
    device = stats.device
    loss = torch.empty((n_rows,) if red == 0 else (), dtype=torch.float32, device=device)
    lse_bwd = torch.empty((n_rows + 1,), dtype=torch.float32, device=device)
    if n_rows == 0:  # no launch on empty tensors: mean over no rows is NaN, as PyTorch
        loss.fill_(float("nan") if red == 2 else 0.0)
        lse_bwd.fill_(1.0)
        return loss, lse_bwd
    # One program loops over every row when the loss is reduced (a deterministic sum); wide blocks
    # and many warps keep that loop to a few memory round trips.
    block_n = max(16, min(4096, next_pow2(n_rows)))
    rows_per_program = n_rows if red else block_n
    _finalize_cross_entropy_kernel[(cdiv(n_rows, rows_per_program),)](
        stats,
        target,
        loss,
        lse_bwd,
        n_rows,
        n_splits,
        rows_per_program,
        ignore_index,
        stats.stride(0),
        stats.stride(1),
        float(label_smoothing),
        float(z_loss),
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_Z_LOSS=z_loss > 0,
        REDUCTION=red,
        BLOCK_N=block_n,
        BLOCK_S=split_block(n_splits, block_n),
        num_warps=16 if block_n >= 4096 else (8 if block_n >= 1024 else 4),
    )
    return loss, lse_bwd


def finalize_topk(topk_vals: torch.Tensor | None, topk_ids: torch.Tensor, *, vocab_start: int,
                  key_base: torch.Tensor | None = None):  # fmt: skip
    """The top-k of S splits merged: ``(values [N, k] fp32, ids [N, k] int64)`` (``key_base``: as
    in ``finalize_stats``)."""
    _, vals, ids = finalize_stats(None, topk_vals, topk_ids, None, vocab_start=vocab_start, ignore_index=0,
                                  key_base=key_base)  # fmt: skip
    return vals, ids

"""One-pass per-shard partials: max, normalizer, entropy and smoothing sums, target logit, top-k.

The kernel reads each logit of a ``[n_rows, n_cols]`` shard exactly once (plus, when ``K > 0``, one
re-read of the ``KP`` candidate chunks of each row, which are still in L2). It writes, per row and
per column split, the monoid partials that ``shardsoftmax.partials`` merges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    key_col,
    key_value,
    make_key,
    min_key_like,
    rescale_factor,
    safe_max,
    transform_logits,
)

# Field order of the fp32 ``stats`` output, shape [N_FIELDS, n_splits, n_rows].
FIELDS = ("max", "sumexp", "sumexp_x", "sum_x", "count", "target_logit", "target_hits")
N_FIELDS = len(FIELDS)
MAX_K = 1024
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _insert_chunks(best, thr, ck, KP: tl.constexpr):
    """Insert the chunk keys ``ck`` that beat ``thr`` = min(best), the smallest key of the unsorted
    top-KP set ``best``, one at a time (few per tile once the set has filled). Returns the new
    set and its new minimum."""
    slot = tl.arange(0, KP)
    cand = tl.where(ck > thr, ck, min_key_like(ck.shape))
    c = tl.max(cand, axis=0)
    while c > thr:
        best = tl.where(slot == tl.argmin(best, axis=0), c, best)
        cand = tl.where(cand == c, min_key_like(ck.shape), cand)
        thr = tl.min(best, axis=0)
        c = tl.max(cand, axis=0)
    return best, thr


@triton.jit
def _threshold_value(thr):
    """The fp32 value of the key ``thr``; -inf while the set is not full (thr is the sentinel)."""
    return tl.where(thr == min_key_like([]), float("-inf"), key_value(thr))


@triton.jit
def _shard_partials_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    stats_ptr,
    topk_vals_ptr,
    topk_ids_ptr,
    # sizes
    n_rows,
    n_valid_cols,  # columns whose global id is < vocab_size; later columns are padding
    cols_per_split,  # a multiple of ROWS * CHUNK
    vocab_start,
    ignore_index,
    # strides
    stride_logits_row,
    # transform
    softcap,
    inv_temperature,
    # meta
    HAS_SOFTCAP: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    K: tl.constexpr,  # top-k size, 0 skips top-k entirely
    KP: tl.constexpr,  # next power of two >= K (>= 2): size of the candidate-chunk set
    ROWS: tl.constexpr,  # chunks per tile
    CHUNK: tl.constexpr,  # columns per chunk
    BITONIC: tl.constexpr,  # merge chunk keys by bitonic top-k (needs ROWS == KP) instead of insertion
    HAS_TEMPERATURE: tl.constexpr,  # temperature != 1
    NEED_ENTROPY: tl.constexpr,  # compute t (else it is written as NaN)
    NEED_SUM_X: tl.constexpr,  # compute sum x (else it is written as NaN)
):
    """Grid: (n_rows, n_splits); one program per (row, column split).

    Each tile of ROWS x CHUNK columns updates ROWS independent online states (m = max x,
    s = sum exp(x - m), t = sum exp(x - m) x, sum x; x the transformed logit), so no tile needs a
    cross-warp reduction; the ROWS states are combined once at the end with the monoid's rescale.
    Top-k: the KP best chunks by (chunk max desc, chunk index asc) hold every top-K element, so
    while streaming only chunk maxima (a by-product of the max) are ranked; the selected chunks are
    re-read once at the end and ranked exactly.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)
    row_ptr = logits_ptr + row * stride_logits_row
    BLOCK_V: tl.constexpr = ROWS * CHUNK
    tile_offs = tl.arange(0, ROWS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]

    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    sum_x = tl.zeros([ROWS], tl.float32)
    if K > 0:
        best = min_key_like([KP])  # keys of the best chunks so far (chunk max, chunk index)
        thr = min_key_like([])  # min(best)
        thr_val = tl.full([], float("-inf"), tl.float32)

    for start in range(col_lo, col_hi, BLOCK_V):
        cols = start + tile_offs
        mask = cols < col_hi
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        if HAS_SOFTCAP:
            x = tl.where(mask, x, float("-inf"))  # softcap maps the -inf fill to -softcap: re-mask
        if K > 0:
            # NaN counts as the largest value for ranking (as torch.topk does).
            chunk_max = tl.max(tl.where(x != x, float("inf"), x), axis=1)
            # Only tiles with a chunk max at or above the set's minimum can change the set.
            if tl.max(chunk_max, axis=0) >= thr_val:
                ck = make_key(chunk_max, (start - col_lo) // CHUNK + tl.arange(0, ROWS))
                if BITONIC:
                    best = tl.topk(tl.reshape(tl.join(best, ck), [2 * KP]), KP)
                    thr = tl.min(best, axis=0)
                elif ROWS >= KP:
                    if start == col_lo:  # the first tile's best chunks fill the set directly
                        best = ck if ROWS == KP else tl.topk(ck, KP)
                        thr = tl.min(best, axis=0)
                    else:
                        best, thr = _insert_chunks(best, thr, ck, KP)
                else:
                    best, thr = _insert_chunks(best, thr, ck, KP)
                thr_val = _threshold_value(thr)
        else:
            chunk_max = tl.max(x, axis=1)
        m_new = tl.maximum(m, chunk_max)
        alpha = rescale_factor(m, m_new)
        # exp(x - m) as exp2(x log2e - m log2e): one FMA and one MUFU op per element.
        e = tl.exp2(x * LOG2E - (safe_max(m_new) * LOG2E)[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if NEED_ENTROPY:
            # max(x, -FLT_MAX) keeps e * x = 0 (not NaN) for -inf columns.
            t = t * alpha + tl.sum(e * tl.maximum(x, -3.4028234663852886e38), axis=1)
        if NEED_SUM_X:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=1)
        m = m_new

    # Combine the ROWS states (the same rescale as the monoid's merge).
    m_all = tl.max(m, axis=0)
    alpha = rescale_factor(m, m_all)
    s_all = tl.sum(s * alpha, axis=0)
    t_all = tl.sum(t * alpha, axis=0) if NEED_ENTROPY else float("nan")
    sum_x_all = tl.sum(sum_x, axis=0) if NEED_SUM_X else float("nan")
    count = tl.maximum(col_hi - col_lo, 0).to(tl.float32)
    tgt_logit = tl.zeros([], tl.float32)
    tgt_hits = tl.zeros([], tl.float32)
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row).to(tl.int64)
        local = tgt - vocab_start
        hit = (tgt != ignore_index) & (local >= col_lo) & (local < col_hi)
        xt = tl.load(row_ptr + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32)
        xt = transform_logits(xt, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        tgt_logit = tl.where(hit, xt, 0.0)
        tgt_hits = tl.where(hit, 1.0, 0.0)

    out = stats_ptr + split * n_rows + row
    plane = n_splits * n_rows
    tl.store(out + 0 * plane, m_all)
    tl.store(out + 1 * plane, s_all)
    tl.store(out + 2 * plane, t_all)
    tl.store(out + 3 * plane, sum_x_all)
    tl.store(out + 4 * plane, count)
    tl.store(out + 5 * plane, tgt_logit)
    tl.store(out + 6 * plane, tgt_hits)

    if K > 0:
        # Re-read the KP selected chunks (KP * CHUNK elements) and rank them exactly.
        chunk_start = col_lo + (key_col(best) * CHUNK)
        cols2 = chunk_start[:, None] + tl.arange(0, CHUNK)[None, :]
        mask2 = (best != min_key_like([KP]))[:, None] & (cols2 < col_hi)
        x2 = tl.load(row_ptr + cols2, mask=mask2, other=0.0).to(tl.float32)
        x2 = transform_logits(x2, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        keys = tl.where(mask2, make_key(x2, cols2), min_key_like([KP, CHUNK]))
        keys = tl.reshape(keys, [KP * CHUNK])
        base = (split * n_rows + row) * K
        if BITONIC:
            top = tl.topk(keys, KP)
            real = top != min_key_like([KP])
            vals = tl.where(real, key_value(top), float("-inf"))
            ids = tl.where(real, vocab_start + key_col(top).to(tl.int64), 9223372036854775807)
            kk = tl.arange(0, KP)
            tl.store(topk_vals_ptr + base + kk, vals, mask=kk < K)
            tl.store(topk_ids_ptr + base + kk, ids, mask=kk < K)
        else:
            # Small k: take out the largest key K times (K reductions, no sort).
            for i in range(K):
                top = tl.max(keys, axis=0)
                keys = tl.where(keys == top, min_key_like([KP * CHUNK]), keys)
                real = top != min_key_like([])
                tl.store(topk_vals_ptr + base + i, tl.where(real, key_value(top), float("-inf")))
                tl.store(
                    topk_ids_ptr + base + i,
                    tl.where(real, vocab_start + key_col(top).to(tl.int64), 9223372036854775807),
                )


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_shape(n_cols: int, k: int) -> tuple[int, int, bool]:
    """(ROWS, CHUNK, BITONIC) for a shard of ``n_cols`` columns and top-``k`` (tuned on an H200,
    docs/performance.md): k = 0: tiles of 64 x 64 columns. k <= 128: chunks of 32 columns (the
    final re-read is KP * 32 elements), insertion merge. Larger k: KP chunks per tile, bitonic."""
    width = _next_pow2(max(n_cols, 1))
    if k == 0:
        chunk = min(64, max(16, width))
        return max(1, min(64, width // chunk)), chunk, False
    kp = max(2, _next_pow2(k))
    if kp <= 128:
        chunk = min(32, max(16, width))
        return max(2, min(64, width // chunk)), chunk, False
    return kp, 8, True


def shard_partials(
    logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    k: int,
    n_valid_cols: int,
    vocab_start: int,
    ignore_index: int,
    softcap: float | None,
    temperature: float,
    n_splits: int | None = None,
    need_entropy: bool = True,
    need_sum_x: bool = True,
    tile: tuple[int, int, bool] | None = None,
    num_warps: int | None = None,
):
    """Launch the partials kernel on a 2-D ``logits`` shard (last dim contiguous).

    Returns ``(stats [N_FIELDS, S, N] fp32, topk_vals [S, N, k] fp32, topk_ids [S, N, k] int64)``,
    one piece per column split S. Shape and dtype checks are the caller's (the math layer
    validates once, before any kernel). ``need_entropy`` / ``need_sum_x`` = False skip those sums
    (written as NaN). ``tile`` and ``num_warps`` override the defaults (tuning).
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    rows, chunk, bitonic = tile or tile_shape(n_cols, k)
    block = rows * chunk
    kp = max(2, _next_pow2(k)) if k > 0 else 2
    n_tiles = max(1, triton.cdiv(max(n_valid_cols, 1), block))
    if n_splits is None:
        n_splits = default_splits(n_rows, n_tiles, device)
    n_splits = max(1, min(n_splits, n_tiles))
    cols_per_split = triton.cdiv(n_tiles, n_splits) * block
    n_splits = max(1, triton.cdiv(max(n_valid_cols, 1), cols_per_split))
    stats = torch.empty((N_FIELDS, n_splits, n_rows), dtype=torch.float32, device=device)
    topk_vals = torch.empty((n_splits, n_rows, k), dtype=torch.float32, device=device)
    topk_ids = torch.empty((n_splits, n_rows, k), dtype=torch.int64, device=device)
    if n_rows == 0:
        return stats, topk_vals, topk_ids
    if num_warps is None:
        num_warps = 8 if (k == 0 and block >= 4096) else 4
    tgt = target if target is not None else stats  # any pointer; unused when HAS_TARGET is False
    _shard_partials_kernel[(n_rows, n_splits)](
        logits,
        tgt,
        stats,
        topk_vals,
        topk_ids,
        n_rows,
        n_valid_cols,
        cols_per_split,
        vocab_start,
        ignore_index,
        logits.stride(0),
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
        HAS_TARGET=target is not None,
        K=k,
        KP=kp,
        ROWS=rows,
        CHUNK=chunk,
        BITONIC=bitonic,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        NEED_ENTROPY=need_entropy,
        NEED_SUM_X=need_sum_x,
        num_warps=num_warps,
    )
    return stats, topk_vals, topk_ids


_SM_COUNT: dict = {}


def default_splits(n_rows: int, n_tiles: int, device: torch.device) -> int:
    """Split rows over columns only when rows alone cannot fill the GPU (decode-sized batches)."""
    if device.type != "cuda":
        return 1
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    target_programs = 4 * _SM_COUNT[device.index]
    if n_rows >= target_programs:
        return 1
    return max(1, min(n_tiles, triton.cdiv(target_programs, max(n_rows, 1))))


__all__ = ["FIELDS", "MAX_K", "N_FIELDS", "shard_partials", "tile_shape"]

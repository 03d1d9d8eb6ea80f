"""One-pass per-shard partials: max, normalizer, entropy and smoothing sums, target logit, top-k.

The kernel reads each logit of a ``[n_rows, n_cols]`` shard exactly once (plus, when ``K > 0``, one
re-read of the ``KP`` candidate chunks of each row, which are still in L2). It writes, per row and
per column split, the monoid partials that ``shardsoftmax.partials`` merges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import key_col, key_value, make_key, min_key_like, ordered_int32, transform_logits

# Field order of the fp32 ``stats`` output, shape [N_FIELDS, n_splits, n_rows].
FIELDS = ("max", "sumexp", "sumexp_x", "sum_x", "count", "target_logit", "target_hits")
N_FIELDS = len(FIELDS)
MAX_K = 1024


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
    cols_per_split,  # a multiple of BLOCK_V
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
    KP: tl.constexpr,  # next power of two >= K (>= 2); also the number of chunks per tile
    BLOCK_V: tl.constexpr,
):
    """Grid: (n_rows, n_splits); one program per (row, column split).

    Online over tiles of BLOCK_V columns: m = max x, s = sum exp(x - m), t = sum exp(x - m) * x,
    sum_x = sum x, with x the transformed logit. Top-k: the tile is cut into KP chunks; the KP best
    chunks by (chunk max desc, chunk index asc) hold every top-K element, so only chunk maxima
    are ranked while streaming and the selected chunks are re-read once at the end.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)
    row_ptr = logits_ptr + row * stride_logits_row
    CHUNK: tl.constexpr = BLOCK_V // KP

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    sum_x = tl.zeros([], tl.float32)
    if K > 0:
        best = min_key_like([KP])  # keys of the best chunks so far (chunk max, chunk index)

    offs = tl.arange(0, BLOCK_V)
    for start in range(col_lo, col_hi, BLOCK_V):
        cols = start + offs
        mask = cols < col_hi
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP)
        x = tl.where(mask, x, float("-inf"))  # softcap maps the -inf fill to -softcap: re-mask
        if K > 0:
            # NaN counts as the largest value for ranking (as torch.topk does).
            xr = tl.reshape(tl.where(x != x, float("inf"), x), [KP, CHUNK])
            chunk_max = tl.max(xr, axis=1)
            tile_max = tl.max(chunk_max, axis=0)
            chunk_idx = (start - col_lo) // CHUNK + tl.arange(0, KP)
            ck = make_key(chunk_max, chunk_idx)
            if tl.max(ck, axis=0) > tl.min(best, axis=0):
                both = tl.reshape(tl.join(best, ck), [2 * KP])
                best = tl.topk(both, KP)
        else:
            tile_max = tl.max(x, axis=0)
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(x - m_safe)
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(tl.where(e > 0.0, e * x, 0.0), axis=0)
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new

    count = tl.maximum(col_hi - col_lo, 0).to(tl.float32)
    tgt_logit = tl.zeros([], tl.float32)
    tgt_hits = tl.zeros([], tl.float32)
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row).to(tl.int64)
        local = tgt - vocab_start
        hit = (tgt != ignore_index) & (local >= col_lo) & (local < col_hi)
        xt = tl.load(row_ptr + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32)
        xt = transform_logits(xt, softcap, inv_temperature, HAS_SOFTCAP)
        tgt_logit = tl.where(hit, xt, 0.0)
        tgt_hits = tl.where(hit, 1.0, 0.0)

    out = stats_ptr + split * n_rows + row
    plane = n_splits * n_rows
    tl.store(out + 0 * plane, m)
    tl.store(out + 1 * plane, s)
    tl.store(out + 2 * plane, t)
    tl.store(out + 3 * plane, sum_x)
    tl.store(out + 4 * plane, count)
    tl.store(out + 5 * plane, tgt_logit)
    tl.store(out + 6 * plane, tgt_hits)

    if K > 0:
        # Re-read the KP selected chunks (KP * CHUNK = BLOCK_V elements) and rank them exactly.
        chunk_start = col_lo + (key_col(best) * CHUNK)
        cols2 = chunk_start[:, None] + tl.arange(0, CHUNK)[None, :]
        mask2 = (best != min_key_like([KP]))[:, None] & (cols2 < col_hi)
        x2 = tl.load(row_ptr + cols2, mask=mask2, other=0.0).to(tl.float32)
        x2 = transform_logits(x2, softcap, inv_temperature, HAS_SOFTCAP)
        keys = tl.where(mask2, make_key(x2, cols2), min_key_like([KP, CHUNK]))
        top = tl.topk(tl.reshape(keys, [BLOCK_V]), KP)
        real = top != min_key_like([KP])
        vals = tl.where(real, key_value(top), float("-inf"))
        ids = tl.where(real, vocab_start + key_col(top).to(tl.int64), 9223372036854775807)
        kk = tl.arange(0, KP)
        base = (split * n_rows + row) * K
        tl.store(topk_vals_ptr + base + kk, vals, mask=kk < K)
        tl.store(topk_ids_ptr + base + kk, ids, mask=kk < K)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_block(n_cols: int, k: int) -> int:
    """Tile width: a power of two, at least the k chunk count, at most 4096 (8192 for large k)."""
    kp = max(2, _next_pow2(k)) if k > 0 else 1
    cap = 8192 if kp >= 512 else 4096
    return max(min(cap, _next_pow2(max(n_cols, 1))), 2 * kp if k > 0 else 16, 16)


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
    block_v: int | None = None,
    num_warps: int | None = None,
):
    """Launch the partials kernel on a 2-D ``logits`` shard (last dim contiguous).

    Returns ``(stats [N_FIELDS, S, N] fp32, topk_vals [S, N, k] fp32, topk_ids [S, N, k] int64)``.
    Shape and dtype checks are the caller's (the math layer validates once, before any kernel).
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    block = block_v or pick_block(n_cols, k)
    kp = max(2, _next_pow2(k)) if k > 0 else 2
    if n_splits is None:
        n_splits = default_splits(n_rows, n_valid_cols, block, device)
    n_tiles = max(1, triton.cdiv(max(n_valid_cols, 1), block))
    n_splits = max(1, min(n_splits, n_tiles))
    cols_per_split = triton.cdiv(n_tiles, n_splits) * block
    n_splits = max(1, triton.cdiv(max(n_valid_cols, 1), cols_per_split))
    stats = torch.empty((N_FIELDS, n_splits, n_rows), dtype=torch.float32, device=device)
    topk_vals = torch.empty((n_splits, n_rows, k), dtype=torch.float32, device=device)
    topk_ids = torch.empty((n_splits, n_rows, k), dtype=torch.int64, device=device)
    if n_rows == 0:
        return stats, topk_vals, topk_ids
    if num_warps is None:
        num_warps = 8 if block >= 2048 else 4
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
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return stats, topk_vals, topk_ids


_SM_COUNT: dict = {}


def default_splits(n_rows: int, n_cols: int, block: int, device: torch.device) -> int:
    """Split rows over columns only when rows alone cannot fill the GPU (decode-sized batches)."""
    if device.type != "cuda":
        return 1
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    target_programs = 4 * _SM_COUNT[device.index]
    if n_rows >= target_programs:
        return 1
    n_tiles = max(1, triton.cdiv(n_cols, block))
    return max(1, min(n_tiles, triton.cdiv(target_programs, max(n_rows, 1))))


__all__ = ["FIELDS", "N_FIELDS", "MAX_K", "shard_partials", "pick_block", "ordered_int32"]

"""One-pass per-shard partials: max, normalizer, entropy and smoothing sums, target logit, top-k.

``_shard_partials_kernel`` reads each logit of a ``[n_rows, n_cols]`` shard exactly once and
writes, per row and per column split, the monoid partials that ``shardsoftmax.partials`` merges.
For top-k (k > 0) it also stores each row's chunk maxima (4 bytes per CHUNK columns), and the
selection (``_select_block``) then finds the exact top-k of each row from them, re-reading only
the few chunks that can hold a top-k element. For k <= SELECT_SMALL_K both run in one program
per row (``_stream_select_kernel``): the chunk maxima and the re-read chunks are still in L2, and
the SM streams other rows while one selects. Larger k selects in a second launch
(``_select_kernel``), whose 8-warp programs would hold the stream back (docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ID32_SENTINEL,
    ID_SENTINEL,
    KEY16_COLS,
    MIN_KEY16,
    cdiv,
    key16_col,
    key16_value,
    key_col,
    key_slots,
    key_value,
    make_key,
    make_key16,
    min_key_like,
    next_pow2,
    online_update,
    ordered_int32,
    rescale_factor,
    transform_logits,
    unordered_fp32,
)

# Field order of the fp32 ``stats`` output, shape [N_FIELDS, n_splits, n_rows]: what the loss
# reads first, then the entropy's sum, then label smoothing's, so that a call's fields are a
# prefix of them (``stat_planes``).
FIELDS = ("max", "sumexp", "target_logit", "target_hits", "sumexp_x", "sum_x", "count")
N_FIELDS = len(FIELDS)
F_MAX, F_SUMEXP, F_TARGET_LOGIT, F_TARGET_HITS, F_SUMEXP_X, F_SUM_X, F_COUNT = (
    tl.constexpr(i) for i in range(N_FIELDS)
)


def stat_planes(need_entropy: bool, need_sum_x: bool) -> int:
    """How many leading ``FIELDS`` a call reads: 4 for the loss (max, sumexp, the target's logit
    and hits), 5 with the entropy's sumexp_x, all 7 with label smoothing's sum_x and count. The
    fused LM head's kernel stores only those (``kernels.linear``); readers take any prefix that
    holds what they read (``partials.Pieces`` fills the rest with NaN)."""
    if need_sum_x:
        return N_FIELDS
    return F_SUMEXP_X.value + 1 if need_entropy else F_SUMEXP_X.value


MAX_K = 1024


# Columns of a tile row in the streaming kernel: one 16-byte load of bf16 per thread, so that a
# row's max and sums never cross lanes (a chunk of CHUNK columns is CHUNK // LANE_COLS rows)
LANE_COLS = tl.constexpr(8)


@triton.jit
def _split_columns(cols_per_split, n_valid_cols, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's column split (grid axis 1): (split, n_splits, col_lo, col_hi), and the
    offsets of a tile of ROWS chunks of CHUNK columns as [ROWS * CHUNK // LANE_COLS, LANE_COLS]
    (each tile row LANE_COLS contiguous columns; tile rows ordered by part of chunk, then chunk)."""
    split = tl.program_id(1)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)
    TILE_ROWS: tl.constexpr = ROWS * CHUNK // LANE_COLS
    r = tl.arange(0, TILE_ROWS)
    # tile row r holds part r // ROWS of chunk r % ROWS: with as many threads as ROWS (the k > 0
    # tiles), a thread's tile rows are the parts of one chunk, so that the chunk maxima need no
    # shuffles and no barrier (v0.20: row-major parts cost two barriers per tile to store them)
    r = (r % ROWS) * (CHUNK // LANE_COLS) + r // ROWS
    tile_offs = r[:, None] * LANE_COLS + tl.arange(0, LANE_COLS)[None, :]
    return split, tl.num_programs(1), col_lo, col_hi, tile_offs


@triton.jit
def _shard_partials_kernel(
    # pointers
    logits_ptr,
    target_ptr,
    stats_ptr,
    cm_ptr,  # fp32 [n_rows, cm_stride]: the chunk maxima of each row (STORE_CM); else unused
    # sizes
    row0,  # the first row of this launch; program p handles row row0 + p
    total_rows,  # rows of the stats output (the plane size)
    n_valid_cols,  # columns whose global id is < vocab_size; later columns are padding
    cols_per_split,  # a multiple of ROWS * CHUNK
    cm_stride,
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
    STORE_CM: tl.constexpr,  # store the chunk maxima for the top-k selection
    ROWS: tl.constexpr,  # chunks per tile
    CHUNK: tl.constexpr,  # columns per chunk
    HAS_TEMPERATURE: tl.constexpr,  # temperature != 1
    NEED_ENTROPY: tl.constexpr,  # compute t (else it is written as NaN)
    NEED_SUM_X: tl.constexpr,  # compute sum x (else it is written as NaN)
):
    """Grid: (rows of this launch, n_splits); each program streams one row's column split once
    (``_stream_split``)."""
    local = tl.program_id(0) + tl.zeros([], tl.int64)  # int64 offsets (a plain int in the interpreter)
    _stream_split(logits_ptr, target_ptr, stats_ptr, cm_ptr + local * cm_stride, row0 + local, total_rows,
                  n_valid_cols, cols_per_split, vocab_start, ignore_index, stride_logits_row, softcap,
                  inv_temperature, HAS_SOFTCAP, HAS_TARGET, STORE_CM, ROWS, CHUNK, HAS_TEMPERATURE,
                  NEED_ENTROPY, NEED_SUM_X)  # fmt: skip


@triton.jit
def _stream_split(logits_ptr, target_ptr, stats_ptr, cm_row, row, total_rows, n_valid_cols, cols_per_split,
                  vocab_start, ignore_index, stride_logits_row, softcap, inv_temperature,
                  HAS_SOFTCAP: tl.constexpr, HAS_TARGET: tl.constexpr, STORE_CM: tl.constexpr,
                  ROWS: tl.constexpr, CHUNK: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                  NEED_ENTROPY: tl.constexpr, NEED_SUM_X: tl.constexpr):  # fmt: skip
    """Stream ``row``'s column split (grid axis 1) once; store its partials in ``stats_ptr`` and,
    with STORE_CM, its chunk maxima at ``cm_row`` (the row's, indexed by chunk from column 0).
    Returns the split's sum of exp (NaN if a NaN or +inf is in it).

    Each tile of ROWS x CHUNK columns, seen as rows of LANE_COLS columns (one thread's load),
    updates one online state per tile row (m = max x, s = sum exp(x - m), t = sum exp(x - m) x,
    sum x; x the transformed logit), so no tile needs a reduction across lanes; the states are
    combined once at the end with the monoid's rescale. With STORE_CM, the ROWS chunk maxima of
    each tile (the max of CHUNK // LANE_COLS rows' maxima) go to ``cm_row`` for the top-k
    selection (``_select_block``), 4 bytes per CHUNK columns.
    """
    split, n_splits, col_lo, col_hi, tile_offs = _split_columns(cols_per_split, n_valid_cols, ROWS, CHUNK)
    BLOCK_V: tl.constexpr = ROWS * CHUNK
    SUB: tl.constexpr = CHUNK // LANE_COLS  # tile rows per chunk
    row_ptr = logits_ptr + row * stride_logits_row
    m = tl.full([ROWS * SUB], float("-inf"), tl.float32)
    s = tl.zeros([ROWS * SUB], tl.float32)
    t = tl.zeros([ROWS * SUB], tl.float32)
    sum_x = tl.zeros([ROWS * SUB], tl.float32)
    for start in range(col_lo, col_hi, BLOCK_V):
        cols = start + tile_offs
        mask = cols < col_hi
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        if HAS_SOFTCAP:
            x = tl.where(mask, x, float("-inf"))  # softcap maps the -inf fill to -softcap
        row_max = tl.max(x, axis=1)  # NaN is skipped here (it makes s NaN instead)
        if STORE_CM:
            if SUB == 1:
                chunk_max = row_max
            else:  # the SUB parts of each chunk (_split_columns' order), in one thread
                chunk_max = tl.max(tl.reshape(row_max, [SUB, ROWS]), axis=0)
            tl.store(cm_row + start // CHUNK + tl.arange(0, ROWS), chunk_max)
        m, s, t, sum_x = online_update(m, s, t, sum_x, x, mask, row_max, NEED_ENTROPY, NEED_SUM_X)

    # Combine the tile rows' states (the same rescale as the monoid's merge).
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
        local_tgt = tgt - vocab_start
        hit = (tgt != ignore_index) & (local_tgt >= col_lo) & (local_tgt < col_hi)
        xt = tl.load(row_ptr + tl.where(hit, local_tgt, 0), mask=hit, other=0.0).to(tl.float32)
        xt = transform_logits(xt, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        tgt_logit = tl.where(hit, xt, 0.0)
        tgt_hits = tl.where(hit, 1.0, 0.0)

    out = stats_ptr + split * total_rows + row
    plane = n_splits * total_rows
    tl.store(out + F_MAX * plane, m_all)
    tl.store(out + F_SUMEXP * plane, s_all)
    tl.store(out + F_TARGET_LOGIT * plane, tgt_logit)
    tl.store(out + F_TARGET_HITS * plane, tgt_hits)
    tl.store(out + F_SUMEXP_X * plane, t_all)
    tl.store(out + F_SUM_X * plane, sum_x_all)
    tl.store(out + F_COUNT * plane, count)
    return s_all


KEY_NEG_INF = tl.constexpr(-2139095041)  # ordered_int32(-inf)
KEY_POS_INF = tl.constexpr(2139095040)  # ordered_int32(+inf); NaN keys lie above it
NO_KEY = tl.constexpr(-2147483648)  # below every key: no value


@triton.jit
def _load_transformed(row_ptr, cols, mask, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr,
                      HAS_TEMPERATURE: tl.constexpr):  # fmt: skip
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    return tl.where(mask, x, float("-inf"))


@triton.jit
def _merge_top(best, new, KP: tl.constexpr):
    """The KP largest keys of two sets of KP keys."""
    return tl.topk(tl.reshape(tl.join(best, new), [2 * KP]), KP)


@triton.jit
def _at_least(x, t):
    """x >= t for fp32 tensors, NaN counting as larger than every threshold."""
    return ~(x < t)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _bit_values(N: tl.constexpr, WIDE: tl.constexpr):
    """[N] int32 (int64 if WIDE) with 1 << i at index i."""
    if WIDE:
        return tl.full([N], 1, tl.int64) << tl.arange(0, N).to(tl.int64)
    else:
        return tl.full([N], 1, tl.int32) << tl.arange(0, N)


@triton.jit
def _bit_index(b):
    """The index of the one set bit of ``b`` (int32 or int64): the exponent of it as a float."""
    e = b.to(tl.float32).to(tl.int32, bitcast=True)
    return ((e >> 23) & 0xFF) - 127


@triton.jit
def _bisect(keys, lo, hi, n_ge, active, K, U):
    """Raise per row the int32-key threshold ``lo`` (int64 [R]; ``n_ge`` [R] of the row's ``keys``
    [R, N] are >= lo, at least K) towards ``hi`` (fewer than K keys >= hi) by bisection, until at
    most U keys are >= lo or lo is the K-th largest key; only rows where ``active``. K and U are
    constants or per-row [R] counts."""
    while tl.max(active.to(tl.int32), axis=0) > 0:
        mid = (lo + hi) >> 1
        c = tl.sum((keys >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        up = active & (c >= K)
        lo = tl.where(up, mid, lo)
        n_ge = tl.where(up, c, n_ge)
        hi = tl.where(active & (c < K), mid, hi)
        active = active & (n_ge > U) & (hi - lo > 1)
    return lo


@triton.jit
def _as_threshold(key):
    """The fp32 threshold that admits the values whose key is >= ``key`` (int64 [R]); NaN values
    (keys above +inf) pass every threshold, and keys below -inf give one that admits everything."""
    t = unordered_fp32(tl.minimum(key, KEY_POS_INF).to(tl.int32))
    return tl.where(key < KEY_NEG_INF, float("-inf"), t)


@triton.jit
def _append(list_ptr, n, cand, values, CAP: tl.constexpr):
    """Append ``values`` [R, N] where ``cand``, in order, to the rows' lists (``list_ptr`` [R]
    pointers, ``n`` [R] lengths); returns the lengths (entries past CAP are dropped)."""
    c = cand.to(tl.int32)
    pos = n[:, None] + tl.cumsum(c, axis=1) - 1
    tl.store(list_ptr[:, None] + pos, values, mask=cand & (pos < CAP))
    return n + tl.sum(c, axis=1)


@triton.jit
def _expand_bits(list_ptr, j, n_first, bits, base, stride, n, CAP: tl.constexpr):
    """For each entry (``j`` [1, N] its index, ``bits`` [R, N] 0 for absent entries) store
    ``base + stride * i`` for every set bit i of its ``bits`` in the rows' lists: the lowest at
    position j (-1 there if there is none; j < n_first [R] <= n), the others appended after ``n``
    [R]; returns the lengths. The loop runs once per bit beyond the first of the busiest entry."""
    low = bits & -bits
    first = tl.where(bits != 0, base + stride * _bit_index(low), -1)
    tl.store(list_ptr[:, None] + j, first, mask=(j < n_first[:, None]) & (j < CAP))
    rest = bits ^ low
    while tl.max(tl.max((rest != 0).to(tl.int32), axis=1), axis=0) > 0:
        low = rest & -rest
        n = _append(list_ptr, n, rest != 0, base + stride * _bit_index(low), CAP)
        rest = rest ^ low
    return n


@triton.jit
def _brute_force_topk(row_ptr, cm_row, chunks_ptr, n_chunks, col_lo, col_hi, softcap,
                      inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr, CB: tl.constexpr,
                      BC: tl.constexpr):  # fmt: skip
    """Exact top-KP keys of one row's split without thresholds: rank every chunk by (chunk max,
    index), then rank the elements of the K best chunks, both by streaming merges (the K best
    chunks hold the top-K elements: a chunk ranked below K others has K better elements). Taken
    only when the lists of ``_select_kernel`` outgrow their capacity (heavy ties)."""
    best = min_key_like([KP])
    for c0 in range(0, n_chunks, CB):
        ci = c0 + tl.arange(0, CB)
        live = ci < n_chunks
        cm = tl.load(cm_row + ci, mask=live, other=float("-inf"))
        best = _merge_top(best, tl.topk(tl.where(live, make_key(cm, ci), min_key_like([CB])), KP), KP)
    kk = tl.arange(0, KP)
    real = (kk < K) & (best != min_key_like([KP]))
    tl.store(chunks_ptr + kk, key_col(best), mask=real)
    n_best = tl.sum(real.to(tl.int32), axis=0)
    tl.debug_barrier()
    top = min_key_like([KP])
    for b in range(0, n_best, BC):
        r = b + tl.arange(0, BC)
        ch = tl.load(chunks_ptr + r, mask=r < n_best, other=0)
        cols = col_lo + ch[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        mask = (r < n_best)[:, None] & (cols < col_hi)
        x = _load_transformed(row_ptr, cols, mask, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        keys = tl.reshape(tl.where(mask, make_key(x, cols), min_key_like([BC, CHUNK])), [BC * CHUNK])
        top = _merge_top(top, tl.topk(keys, KP), KP)
    tl.debug_barrier()  # the caller's lists reuse chunks_ptr
    return top


@triton.jit
def _rescan_nan_row(row_ptr, cm_row, col_lo, col_hi, n_chunks, softcap, inv_temperature,
                    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, CHUNK: tl.constexpr,
                    RB: tl.constexpr):  # fmt: skip
    """Store one row's chunk maxima again with NaN ranked highest (a chunk holding a NaN gets
    NaN), for a row whose sum came out NaN (the streaming loop's maxima skip NaN); RB chunks at
    a time (few registers: they count for the whole kernel)."""
    for c0 in range(0, n_chunks, RB):
        ci = c0 + tl.arange(0, RB)
        cols = col_lo + ci[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        x = _load_transformed(row_ptr, cols, cols < col_hi, softcap, inv_temperature, HAS_SOFTCAP,
                              HAS_TEMPERATURE)  # fmt: skip
        nan = x != x
        chunk_max = tl.max(tl.where(nan, float("-inf"), x), axis=1)
        chunk_max = tl.where(tl.max(nan.to(tl.int32), axis=1) > 0, float("nan"), chunk_max)
        tl.store(cm_row + ci, chunk_max, mask=ci < n_chunks)


@triton.jit
def _rank_candidates(list_e, n_e, row_ptr, col_lo, softcap, inv_temperature,
                     HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, KP: tl.constexpr,
                     KEY16: tl.constexpr):  # fmt: skip
    """The keys (sorted, descending) of the first n_e (<= KP) columns of the rows' lists (-1: no
    column): int64 keys, or with KEY16 (values exactly bfloat16, split columns < 2**16) int32
    keys of the columns from ``col_lo``."""
    e = tl.arange(0, KP)[None, :]
    cols = tl.load(list_e[:, None] + e, mask=e < n_e[:, None], other=-1)
    real = cols >= 0
    x = _load_transformed(row_ptr[:, None], cols, real, softcap, inv_temperature, HAS_SOFTCAP,
                          HAS_TEMPERATURE)  # fmt: skip
    if KEY16:
        keys = tl.where(real, make_key16(x, cols - col_lo), MIN_KEY16)
    else:
        keys = tl.where(real, make_key(x, cols), min_key_like([n_e.shape[0], KP]))
    return tl.sort(keys, dim=1, descending=True)


@triton.jit
def _store_top(topk_vals_ptr, topk_ids_ptr, base, top, vocab_start, col_lo, mask, KP: tl.constexpr,
               PACK16: tl.constexpr):  # fmt: skip
    """Store keys ``top`` (values and global ids) at ``base + [0, KP)`` where ``mask``; a missing
    entry's id is the largest of the ids' type (int64, or int32 in a send buffer). ``top``: int64
    keys, or int32 keys (``make_key16``) of the columns from ``col_lo``. PACK16 (one split,
    col_lo = 0): only the int32 ``make_key16`` words, into ``topk_ids_ptr`` (a send buffer's packed
    entries, ``common.pack_key16``)."""
    kk = tl.arange(0, KP)
    if PACK16:
        if top.dtype == tl.int32:
            words = top
        else:  # the brute-force path's int64 keys: the values are exactly bfloat16 here too
            words = tl.where(top != min_key_like(top.shape), make_key16(key_value(top), key_col(top)),
                             MIN_KEY16)  # fmt: skip
        tl.store(topk_ids_ptr + base + kk, words, mask=mask)
        return
    if top.dtype == tl.int32:
        real = top != MIN_KEY16
        value = key16_value(top)
        col = col_lo + key16_col(top)
    else:
        real = top != min_key_like(top.shape)
        value = key_value(top)
        col = key_col(top)
    tl.store(topk_vals_ptr + base + kk, tl.where(real, value, float("-inf")), mask=mask)
    if topk_ids_ptr.dtype.element_ty == tl.int32:
        ids = tl.where(real, vocab_start + col, ID32_SENTINEL)
    else:
        ids = tl.where(real, vocab_start + col.to(tl.int64), ID_SENTINEL)
    tl.store(topk_ids_ptr + base + kk, ids, mask=mask)


@triton.jit
def _select_block(logits_ptr, cm_ptr, topk_vals_ptr, topk_ids_ptr, list_g, list_c, list_e, local, live,
                  row0, total_rows, split, col_lo, n_cols, n_chunks, chunks_per_split, cm_stride,
                  vocab_start, stride_logits_row, softcap, inv_temperature, ROWS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, K: tl.constexpr,
                  KP: tl.constexpr, R: tl.constexpr, NGP: tl.constexpr, CB: tl.constexpr,
                  ONE_BLOCK: tl.constexpr, UG: tl.constexpr, CAPG: tl.constexpr, CAPC: tl.constexpr,
                  CAPE: tl.constexpr, BC: tl.constexpr, CHUNK: tl.constexpr, KEY16: tl.constexpr,
                  PACK16: tl.constexpr):  # fmt: skip
    """Steps 1-5 of ``_select_kernel`` for the R rows ``local`` ([R] int64, from ``row0``; their
    chunk maxima at ``cm_ptr + local * cm_stride``) of one column split: store the top-K of the
    ``live`` rows whose lists held every candidate, and return which rows' lists overflowed
    ([R] bool; their outputs are not written: the caller ranks them with ``_brute_force_topk``).
    ``list_g`` / ``list_c`` / ``list_e``: [R] pointers to the rows' scratch lists."""
    WIDE: tl.constexpr = CHUNK > 32  # element bit masks in int64
    NB: tl.constexpr = CB // NGP  # members of a group per block of chunk maxima
    n_full = n_cols // CHUNK  # chunks without padding columns (the last one may have some)
    n_stored = tl.cdiv(n_cols, ROWS * CHUNK) * ROWS  # chunk maxima the streaming kernel stored
    gi = tl.arange(0, NGP)
    row = row0 + local
    row_ptr = logits_ptr + row * stride_logits_row  # [R]
    cm_row = cm_ptr + local * cm_stride + split * chunks_per_split  # [R]
    ci = tl.arange(0, CB)

    # 1. Group maxima, and the threshold t (key lo) by bisection.
    if ONE_BLOCK:
        cm = tl.load(cm_row[:, None] + ci[None, :], mask=(ci < n_stored)[None, :],
                     other=float("-inf"))  # fmt: skip
        gmax = tl.max(tl.reshape(cm, [R, NB, NGP]), axis=1)
    else:
        gmax = tl.full([R, NGP], float("-inf"), tl.float32)
        for c0 in range(0, n_chunks, CB):
            cm = tl.load(cm_row[:, None] + (c0 + ci)[None, :],
                         mask=(c0 + ci < n_stored)[None, :], other=float("-inf"))  # fmt: skip
            gmax = tl.maximum(gmax, tl.max(tl.reshape(cm, [R, NB, NGP]), axis=1))
    gkey = tl.where((gi < n_chunks)[None, :], ordered_int32(gmax), NO_KEY)
    lo = tl.min(tl.where(gkey == NO_KEY, 2147483647, gkey), axis=1).to(tl.int64)
    hi = tl.max(gkey, axis=1).to(tl.int64) + 1
    if K == 1:  # the largest group maximum is the answer
        lo = tl.where(hi > KEY_NEG_INF, hi - 1, lo)
    n_g = tl.sum((gkey >= lo.to(tl.int32)[:, None]).to(tl.int32), axis=1)
    ok = n_g >= K  # else fewer than K chunks: every chunk is a candidate
    lo = _bisect(gkey, lo, hi, n_g, ok & (n_g > UG) & (hi - lo > 1), K, UG)
    lo = tl.where(ok, lo, KEY_NEG_INF)
    t = _as_threshold(lo)

    # 2. Each group's members that reach t (bit i: chunk g + i * NGP); list the groups.
    # (Chunks past the split's end hold -inf or are not loaded: they only reach t = -inf,
    # and are dropped by each group's mask of real members below.)
    if ONE_BLOCK:
        member = tl.reshape(_at_least(cm, t[:, None]), [R, NB, NGP])
        bits = tl.reduce(tl.where(member, _bit_values(NB, False)[None, :, None], 0), 1, _or)
    else:
        bits = tl.zeros([R, NGP], tl.int32)
        for c0 in range(0, n_chunks, CB):
            cm = tl.load(cm_row[:, None] + (c0 + ci)[None, :],
                         mask=(c0 + ci < n_stored)[None, :], other=float("-inf"))  # fmt: skip
            member = tl.reshape(_at_least(cm, t[:, None]), [R, NB, NGP])
            bit = _bit_values(NB, False) << (c0 // NGP)
            bits = bits | tl.reduce(tl.where(member, bit[None, :, None], 0), 1, _or)
    n_members = tl.maximum(n_chunks - gi + NGP - 1, 0) // NGP  # chunks g, g + NGP, ... < n_chunks
    bits = bits & ((1 << n_members) - 1)[None, :]
    listed = bits != 0
    c = listed.to(tl.int32)
    pos = tl.cumsum(c, axis=1) - 1
    n_a = tl.sum(c, axis=1)
    tl.store(list_g[:, None] + pos, gi[None, :] | (bits << 16), mask=listed & (pos < CAPG))
    tl.debug_barrier()

    # 3. Their chunks.
    ja = tl.arange(0, CAPG)[None, :]
    n_a = tl.minimum(n_a, CAPG + 1)  # CAPG + 1: overflowed
    in_a = ja < n_a[:, None]
    gm = tl.load(list_g[:, None] + ja, mask=in_a, other=0)
    g = gm & 0xFFFF
    m = (gm >> 16) & 0xFFFF
    n_b = _expand_bits(list_c, ja, tl.minimum(n_a, CAPG), m, g, NGP, tl.minimum(n_a, CAPG), CAPC)
    tl.debug_barrier()
    over = (n_a > CAPG) | (n_b > CAPC)

    # 4. Their elements >= t, as the list of candidate columns.
    n_b = tl.where(over, 0, n_b)
    te = t
    if HAS_SOFTCAP:  # one key lower: the recomputed softcap may differ from the stream's by an ulp
        te = _as_threshold(lo - 1)
    jj = tl.arange(0, CHUNK)
    # the split's last chunk, when it has padding columns (its loads need per-column masks)
    tail = jj[None, :] < n_cols - n_full * CHUNK
    x_tail = _load_transformed(row_ptr[:, None], col_lo + n_full * CHUNK + jj[None, :], tail,
                               softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)  # fmt: skip
    bit = _bit_values(CHUNK, WIDE)
    tail_bits = tl.reduce(tl.where(tail & _at_least(x_tail, te[:, None]), bit[None, :], 0), 1, _or)
    # their bit masks first (the reduction's layout repeats each mask over the lanes that
    # reduced it), then the columns of their bits from compact [R, CAPC] tensors
    if WIDE:
        bits_list = (list_c + CAPC).to(tl.pointer_type(tl.int64))
    else:
        bits_list = list_c + CAPC
    for b in range(0, tl.max(n_b, axis=0), BC):
        j = b + tl.arange(0, BC)[None, :]
        in_b = j < n_b[:, None]
        ch = tl.load(list_c[:, None] + j, mask=in_b, other=0)
        full = in_b & (ch < n_full)
        x = tl.load(row_ptr[:, None, None] + col_lo + ch[:, :, None] * CHUNK + jj[None, None, :],
                    mask=full[:, :, None], other=float("-inf")).to(tl.float32)  # fmt: skip
        x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        # padding and absent chunks get their bits below (per chunk, not per element)
        ebits = tl.reduce(tl.where(_at_least(x, te[:, None, None]), bit[None, None, :], 0), 2, _or)
        ebits = tl.where(full, ebits, tl.where(ch == n_full, tail_bits[:, None], 0))
        tl.store(bits_list[:, None] + j, ebits, mask=in_b)
    tl.debug_barrier()
    jc = tl.arange(0, CAPC)[None, :]
    in_c = jc < n_b[:, None]
    ch = tl.load(list_c[:, None] + jc, mask=in_c, other=0)
    ebits = tl.load(bits_list[:, None] + jc, mask=in_c, other=0)
    n_e = _expand_bits(list_e, jc, n_b, ebits, col_lo + ch * CHUNK, 1, n_b, CAPE)
    tl.debug_barrier()
    over = over | (n_e > CAPE)

    # 5. Rank the candidates. More than KP of them (2-20% of rows at k = 50): raise the
    # threshold over their own keys until at most KP are left (ties at it: by column), listed
    # anew in the chunk list's room (a tl.topk of CAPE keys would cost twice the sort, and registers).
    n_e = tl.where(over, 0, n_e)
    ranked = list_e
    if tl.max(n_e, axis=0) > KP:
        e = tl.arange(0, CAPE)[None, :]
        cols = tl.load(list_e[:, None] + e, mask=e < n_e[:, None], other=-1)
        real = cols >= 0
        x = _load_transformed(row_ptr[:, None], cols, real, softcap, inv_temperature,
                              HAS_SOFTCAP, HAS_TEMPERATURE)  # fmt: skip
        ekey = tl.where(real, ordered_int32(x), NO_KEY)
        many = n_e > KP
        lo_e = tl.min(tl.where(real, ekey, 2147483647), axis=1).to(tl.int64)
        hi_e = tl.max(ekey, axis=1).to(tl.int64) + 1
        n_real = tl.sum(real.to(tl.int32), axis=1)
        lo_e = _bisect(ekey, lo_e, hi_e, n_real, many & (n_real > KP) & (hi_e - lo_e > 1), K, KP)
        at = lo_e.to(tl.int32)[:, None]
        # ties at the K-th value can leave more than KP (bf16 logits repeat values: k = 64
        # rows would all overflow): keep those above it and, of those at it, the lowest
        # columns (tie-break) until K, the column bound bisected like the threshold
        eq = real & (ekey == at)
        n_gt = tl.sum((real & (ekey > at)).to(tl.int32), axis=1)
        n_eq = tl.sum(eq.to(tl.int32), axis=1)
        tied = many & (n_gt + n_eq > KP)
        need = K - n_gt  # >= 1 where tied: the bisection stopped at the K-th value
        # the need largest of the keys -column (distinct) over the ties
        ckey = tl.where(eq, -cols, NO_KEY)
        c_lo = tl.min(tl.where(eq, -cols, 2147483647), axis=1).to(tl.int64)  # every tie
        c_hi = tl.max(ckey, axis=1).to(tl.int64) + 1
        c_lo = _bisect(ckey, c_lo, c_hi, n_eq, tied & (n_eq > need) & (c_hi - c_lo > 1), need, need)
        eq = eq & (~tied[:, None] | (ckey >= c_lo.to(tl.int32)[:, None]))
        keep = real & (~many[:, None] | (ekey > at) | eq)
        n_e = _append(list_c, tl.zeros([R], tl.int32), keep, cols, CAPC)
        over = over | (n_e > CAPC)  # (a chunk list shorter than KP: tuning)
        ranked = list_c
        tl.debug_barrier()
    over = over | (n_e > KP)
    n_e = tl.where(over, 0, n_e)
    top = _rank_candidates(ranked, n_e, row_ptr, col_lo, softcap, inv_temperature, HAS_SOFTCAP,
                           HAS_TEMPERATURE, KP, KEY16)  # fmt: skip
    kk = tl.arange(0, KP)[None, :]
    base = ((split * total_rows + row) * K)[:, None]
    _store_top(topk_vals_ptr, topk_ids_ptr, base, top, vocab_start, col_lo,
               live[:, None] & ~over[:, None] & (kk < K), KP, PACK16)  # fmt: skip
    return over


@triton.jit
def _select_kernel(
    logits_ptr,
    stats_ptr,
    cm_ptr,  # fp32 [n_rows, cm_stride], written by _shard_partials_kernel (STORE_CM)
    topk_vals_ptr,
    topk_ids_ptr,
    scratch_ptr,  # int32 [programs * n_splits, R * (CAPG + 3 * CAPC + CAPE)]: per program,
    # split and row, the listed groups' indices and member bits, their chunks, the chunks' element
    # bits (int64 if CHUNK > 32) and the candidate columns
    n_rows,  # rows of this launch
    row0,
    total_rows,
    n_valid_cols,
    cols_per_split,
    chunks_per_split,  # cols_per_split // CHUNK
    cm_stride,
    vocab_start,
    stride_logits_row,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    K: tl.constexpr,  # top-k size, >= 1
    KP: tl.constexpr,  # next power of two >= K (>= 2)
    ROWS: tl.constexpr,  # chunks per tile of the streaming kernel
    CHUNK: tl.constexpr,  # columns per chunk (as in _shard_partials_kernel)
    R: tl.constexpr,  # rows per program at once (every step works on [R, ...] tensors)
    NGP: tl.constexpr,  # groups of chunks for the threshold (power of two, >= chunks per split / 16)
    CB: tl.constexpr,  # chunk maxima handled at once (a multiple of NGP)
    ONE_BLOCK: tl.constexpr,  # CB >= chunks_per_split: the chunk maxima are read once
    UG: tl.constexpr,  # the threshold admits at most UG groups (unless ties; >= K)
    CAPG: tl.constexpr,  # capacity of the group list
    CAPC: tl.constexpr,  # capacity of the chunk list
    CAPE: tl.constexpr,  # capacity of the candidate-column list (a power of two >= KP)
    BC: tl.constexpr,  # listed chunks re-read at once
    # the brute-force path, in small blocks (its registers count for the whole kernel):
    BF: tl.constexpr,  # chunk maxima ranked at once (>= KP)
    BE: tl.constexpr,  # chunks re-read at once (BE * CHUNK >= KP)
    KEY16: tl.constexpr,  # rank by int32 keys (make_key16): bf16 values, split columns < 2**16
    PACK16: tl.constexpr,  # store the top-K as make_key16 words in topk_ids_ptr (one split; KEY16)
):
    """Grid: (programs, n_splits); each program selects the exact top-K of blocks of R rows
    (rows pid * R.., (pid + programs) * R.., ...) of one column split from the chunk maxima the
    streaming kernel stored, re-reading only the chunks that can hold a top-K element.

    Per row, with "keys" the order-preserving int32 of fp32 values (NaN highest):
    1. the maxima of NGP strided groups of chunks (group g: chunks g, g + NGP, ...); bisect their
       keys for a threshold t that at least K groups reach and at most UG (unless ties): at
       least K elements are >= t, so every top-K element is >= t, in a chunk whose max is;
    2. bit masks of the members of each group that reach t; list the groups that have any
       (a prefix sum places each: ~K..UG of them);
    3. expand them into the list of their chunks (each set bit; ~K..1.2 UG);
    4. re-read those chunks: bit masks of their elements >= t, expanded into the list of
       candidate columns (~K..KP);
    5. sort the candidates' (value, column) keys: the first K are the top-K (lower column first
       among equal values); int32 keys with KEY16 (values exactly bfloat16), else int64.
    The bit masks keep every step on small tensors: a prefix sum or a store per element would
    cost more than the rest. A list that outgrows its capacity sends its row to
    ``_brute_force_topk`` (same result). A split whose sum came out NaN (a NaN or +inf in it) is
    re-scanned first so that NaN ranks highest, as in ``torch.topk``."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    split, n_splits, col_lo, col_hi, _ = _split_columns(cols_per_split, n_valid_cols, ROWS, CHUNK)
    n_cols = col_hi - col_lo
    n_chunks = tl.cdiv(n_cols, CHUNK)
    rr = tl.arange(0, R)
    SLOT: tl.constexpr = CAPG + 3 * CAPC + CAPE
    slot0 = scratch_ptr + (pid * n_splits + split) * (R * SLOT)
    list_g = slot0 + rr * SLOT  # [R] pointers; entries: group | member bits << 16
    list_c = list_g + CAPG  # then 2 * CAPC words: the chunks' element bit masks
    list_e = list_c + 3 * CAPC
    # Rare paths stay out of the row loop (their registers would count in it): first, rows whose
    # sum came out NaN, 32 blocks of rows at a time; flags from reductions over the warp are
    # uniform (a flag from a plain load is not, and the compiler would emulate every shuffle of
    # the branch it guards).
    stride = n_programs * R
    blocks = tl.arange(0, 32)[:, None] * stride + rr[None, :]  # rows, from the first one's
    which = tl.arange(0, 32)[:, None] * R + rr[None, :]
    for b0 in range(pid * R, n_rows, 32 * stride):
        here = b0 + blocks < n_rows
        s_all = tl.load(stats_ptr + (n_splits + split) * total_rows + row0 + b0 + blocks, mask=here,
                        other=0.0)  # fmt: skip
        nan_row = (s_all != s_all).to(tl.int32)
        if tl.max(tl.max(nan_row, axis=1), axis=0) > 0:
            for j in range(32 * R):
                if tl.max(tl.max(tl.where(which == j, nan_row, 0), axis=1), axis=0) > 0:
                    one = b0 + (j // R) * stride + j % R + tl.zeros([], tl.int64)
                    _rescan_nan_row(logits_ptr + (row0 + one) * stride_logits_row,
                                    cm_ptr + one * cm_stride + split * chunks_per_split, col_lo,
                                    col_hi, n_chunks, softcap, inv_temperature, HAS_SOFTCAP,
                                    HAS_TEMPERATURE, CHUNK, 512 // CHUNK)  # fmt: skip
    tl.debug_barrier()  # the chunk maxima stored above are read by other threads

    for r0 in range(pid * R, n_rows, n_programs * R):
        local = r0 + rr
        live = local < n_rows
        local = tl.where(live, local, n_rows - 1).to(tl.int64)  # dead rows redo the last row
        over = _select_block(logits_ptr, cm_ptr, topk_vals_ptr, topk_ids_ptr, list_g, list_c, list_e,
                             local, live, row0, total_rows, split, col_lo, n_cols, n_chunks,
                             chunks_per_split, cm_stride, vocab_start, stride_logits_row, softcap,
                             inv_temperature, ROWS, HAS_SOFTCAP, HAS_TEMPERATURE, K, KP, R, NGP, CB,
                             ONE_BLOCK, UG, CAPG, CAPC, CAPE, BC, CHUNK, KEY16, PACK16)  # fmt: skip
        kk = tl.arange(0, KP)[None, :]
        base = ((split * total_rows + row0 + local) * K)[:, None]
        # a row whose lists overflowed is marked (id -2) and ranked after the loop
        tl.store(topk_ids_ptr + base + kk, tl.full([R, KP], -2, tl.int64),
                 mask=live[:, None] & over[:, None] & (kk == 0))  # fmt: skip

    tl.debug_barrier()  # the marks above are read by other threads
    lanes = tl.arange(0, 32)
    for r0 in range(pid * R, n_rows, n_programs * R):
        for r in range(R):
            one = r0 + r + tl.zeros([], tl.int64)  # int64 offsets (a plain int in the interpreter)
            if one < n_rows:
                base1 = (split * total_rows + row0 + one) * K
                # the mark loaded by one thread, seen by all through a reduction (uniform)
                mark = tl.load(topk_ids_ptr + base1 + lanes, mask=lanes == 0, other=0)
                if tl.max((mark == -2).to(tl.int32), axis=0) > 0:
                    top1 = _brute_force_topk(logits_ptr + (row0 + one) * stride_logits_row,
                                             cm_ptr + one * cm_stride + split * chunks_per_split,
                                             slot0, n_chunks, col_lo, col_hi, softcap,
                                             inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE, K, KP,
                                             CHUNK, BF, BE)  # fmt: skip
                    k1 = tl.arange(0, KP)
                    _store_top(topk_vals_ptr, topk_ids_ptr, base1, top1, vocab_start, col_lo, k1 < K, KP,
                               PACK16)  # fmt: skip


@triton.jit
def _stream_select_kernel(
    logits_ptr,
    target_ptr,
    stats_ptr,
    cm_ptr,  # fp32 [n_rows, cm_stride]: the chunk maxima of each row
    topk_vals_ptr,
    topk_ids_ptr,
    scratch_ptr,  # int32 [n_rows * n_splits, CAPG + 3 * CAPC + CAPE]: a row's lists (_select_kernel)
    row0,
    total_rows,
    n_valid_cols,
    cols_per_split,
    chunks_per_split,
    cm_stride,
    vocab_start,
    ignore_index,
    stride_logits_row,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM_X: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    R: tl.constexpr,  # 1
    NGP: tl.constexpr,
    CB: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    UG: tl.constexpr,
    CAPG: tl.constexpr,
    CAPC: tl.constexpr,
    CAPE: tl.constexpr,
    BC: tl.constexpr,
    BF: tl.constexpr,
    BE: tl.constexpr,
    KEY16: tl.constexpr,
    PACK16: tl.constexpr,
):
    """The streaming kernel and the selection in one launch (k <= SELECT_SMALL_K): grid (rows of
    this launch, n_splits); each program streams one row's split (``_stream_split``, storing its
    chunk maxima), then selects its top-K from them with the same steps as ``_select_kernel``
    (``_select_block``, one row), its rare paths (a NaN re-scan, the brute force) inline. The
    chunk maxima and the candidate chunks are re-read while they are still in L2, and one
    program's selection overlaps the other programs' streams on the same SM."""
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    one = tl.program_id(0) + tl.zeros([], tl.int64)  # the row from row0; int64 offsets
    local = one + tl.zeros([1], tl.int64)  # the same as the [R = 1] rows of _select_block
    row_ptr = logits_ptr + (row0 + one) * stride_logits_row
    s_all = _stream_split(logits_ptr, target_ptr, stats_ptr, cm_ptr + one * cm_stride, row0 + one,
                          total_rows, n_valid_cols, cols_per_split, vocab_start, ignore_index,
                          stride_logits_row, softcap, inv_temperature, HAS_SOFTCAP, HAS_TARGET, True,
                          ROWS, CHUNK, HAS_TEMPERATURE, NEED_ENTROPY, NEED_SUM_X)  # fmt: skip
    _, _, col_lo, col_hi, _ = _split_columns(cols_per_split, n_valid_cols, ROWS, CHUNK)
    n_cols = col_hi - col_lo
    n_chunks = tl.cdiv(n_cols, CHUNK)
    cm_row = cm_ptr + one * cm_stride + split * chunks_per_split
    tl.debug_barrier()  # the chunk maxima stored above are read by other threads
    if s_all != s_all:  # a NaN or +inf: NaN must rank highest (the stream's maxima skip it)
        _rescan_nan_row(row_ptr, cm_row, col_lo, col_hi, n_chunks, softcap, inv_temperature,
                        HAS_SOFTCAP, HAS_TEMPERATURE, CHUNK, 512 // CHUNK)  # fmt: skip
        tl.debug_barrier()
    SLOT: tl.constexpr = CAPG + 3 * CAPC + CAPE
    slot = scratch_ptr + (one * n_splits + split) * SLOT
    list_g = slot + tl.zeros([1], tl.int32)  # [R = 1] pointers
    list_c = list_g + CAPG
    list_e = list_c + 3 * CAPC
    every = local >= 0  # the program's one row is live
    over = _select_block(logits_ptr, cm_ptr, topk_vals_ptr, topk_ids_ptr, list_g, list_c, list_e, local,
                         every, row0, total_rows, split, col_lo, n_cols, n_chunks, chunks_per_split,
                         cm_stride, vocab_start, stride_logits_row, softcap, inv_temperature, ROWS,
                         HAS_SOFTCAP, HAS_TEMPERATURE, K, KP, R, NGP, CB, ONE_BLOCK, UG, CAPG, CAPC, CAPE,
                         BC, CHUNK, KEY16, PACK16)  # fmt: skip
    if tl.max(over.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()  # the lists are reused as the brute force's scratch
        top1 = _brute_force_topk(row_ptr, cm_row, slot, n_chunks, col_lo, col_hi, softcap,
                                 inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE, K, KP, CHUNK, BF,
                                 BE)  # fmt: skip
        k1 = tl.arange(0, KP)
        _store_top(topk_vals_ptr, topk_ids_ptr, (split * total_rows + row0 + one) * K, top1, vocab_start,
                   col_lo, k1 < K, KP, PACK16)  # fmt: skip


# k <= SELECT_SMALL_K: chunks of 32 columns, selected inside the streaming kernel (FUSED_* below;
# with fused=False or several rows per program, a one-warp selection launch: the SELECT_* defaults);
# larger k: chunks of 8 and an 8-warp selection launch sorting KP keys (tile_shape, topk_params)
SELECT_SMALL_K = 128
# k <= SELECT_SMALL_K: the stream and the selection in one kernel (_stream_select_kernel). Each
# program's selection holds its SM slot without streaming, so narrow rows want many programs per
# SM: up to FUSED_NARROW_COLS columns, tiles of 64 x 32 in 2 warps (FUSED_WARPS); wider, 128 x 32
# in 4. On an H200 at N = 8192, k = 50 (docs/performance.md v0.19), GPU time with the host ahead
# against the two launches: 0.190 / 0.220 ms at V_shard = 32064, 0.328 / 0.380 at 64128, 0.610 /
# 0.721 at 128256 (2 warps, 64 x 32), 1.244 / 1.422 at 256000 (4 warps, 128 x 32); with 4 warps,
# 128 x 32 at 32064: 0.250 ms
FUSED_SELECT = True
FUSED_NARROW_COLS = 131072
FUSED_WARPS = 2


def tile_shape(n_cols: int, k: int, fused: bool | None = None) -> tuple[int, int]:
    """(ROWS, CHUNK) of the streaming kernel for a shard of ``n_cols`` columns and top-``k``
    (tuned on an H200 with ``benchmarks/tune.py``, docs/performance.md). k = 0: 256 chunks of 8
    columns, so that each thread holds whole chunks (one 16-byte load of bf16) and the per-chunk
    max and sums need no shuffles between lanes (v0.10, ``bench_ops`` on an H200: 92% / 100% of
    the copy bandwidth at V_shard = 32064 / 128256, against 87% / 90% for the 64 x 32 tile).
    k <= 128: chunks of 32 columns (one chunk maximum stored per 64 bytes of bf16 read); 64 of
    them per tile in the fused kernel (``fused``, 2 warps: FUSED_WARPS) up to FUSED_NARROW_COLS
    columns, else 128 (``fused`` None: FUSED_SELECT). Larger k: chunks of 8 columns, so that the K
    best chunks hold few elements besides the top-K."""
    fused = FUSED_SELECT if fused is None else fused
    width = next_pow2(max(n_cols, 1))
    if k == 0:
        return max(1, min(256, width // 8)), 8
    if k <= SELECT_SMALL_K:
        chunk = min(32, max(16, width))
        rows = 64 if fused and n_cols <= FUSED_NARROW_COLS else 128
        return max(2, min(rows, width // chunk)), chunk
    return max(2, min(256, width // 8)), 8


MAX_CHUNKS_PER_SPLIT = 8192  # bounds the selection's group maxima per split
# decode-sized batches with k <= SELECT_SMALL_K: at most MAX_SPLIT_KEYS // KP column splits (N = 1,
# k = 50, V = 128256 had 32 splits, 2048 keys for finalize to sort per row; now 8, 512 keys)
MAX_SPLIT_KEYS = 512
CM_MAX_BYTES = 256 * 1024**2  # the chunk-maxima buffer of k > 0; more rows go in several launches
# The selection launch (k > 128, or k <= 128 not fused). k <= 128: one warp per program (each row's
# steps are warp-wide reductions, scans and a sort of KP keys, no barriers); larger k sorts KP =
# 1024 keys, which one warp holds only by spilling
SELECT_WARPS = 1
SELECT_WARPS_LARGE_K = 8
# programs of the top-k selection per SM (each loops over blocks of rows): one-warp programs of
# 80 registers fit 25 per SM at once; k > 128 (8 warps of 128 registers) 2. k <= 128: 64 per SM,
# i.e. one row per program at N = 8192 on 132 SMs, the hardware handing rows to free slots:
# 3-4% faster than 32 at V_shard = 32064 in four runs on H200s (docs/performance.md v0.10)
PROGRAMS_PER_SM = 64
PROGRAMS_PER_SM_LARGE_K = 8
# k <= 128: a register cap for the selection (sm_90, Triton 3.8: its main path needs 72-80, the
# brute-force and NaN paths raise the whole kernel to 120-165 uncapped; at 80 they spill ~100
# bytes, the main path ~20 loads and stores per row): 25 one-warp programs per SM instead of 12
SELECT_MAXNREG = 80
# k > 128: uncapped, the KP = 1024 selection takes 255 registers at 4 and 8 warps (8 warps per SM);
# at 128, 16 warps per SM with ~112 bytes of stack at 8 warps. On an H200 (tune.py, V_shard =
# 32064, k = 1024, Triton 3.6), 8 warps capped at 128 took 2.02 ms against 2.29 ms for 4 warps
# uncapped, and admitting 1.25 k threshold groups (UG) 1.93 ms; a later A/B on another H200,
# 2.24 against 2.28 ms (docs/performance.md v0.8)
SELECT_MAXNREG_LARGE_K = 128


def default_select_warps(k: int) -> int:
    return SELECT_WARPS if k <= SELECT_SMALL_K else SELECT_WARPS_LARGE_K


def topk_params(k: int, chunks_per_split: int, chunk: int, *, rows: int | None = None,
                ngp: int | None = None, cb: int | None = None, ug: int | None = None,
                capg: int | None = None, capc: int | None = None, cape: int | None = None,
                bc: int | None = None, bf: int | None = None) -> dict:  # fmt: skip
    """The constexprs of the top-k selection for ``k`` > 0 (see ``_select_kernel``) for splits of
    ``chunks_per_split`` chunks of ``chunk`` columns; the keywords override the defaults (tuning:
    ``rows`` rows per program at once, ``ngp`` threshold groups, ``cb`` chunk maxima read at once,
    ``ug`` groups the threshold admits, ``capg`` / ``capc`` / ``cape`` list capacities, ``bc``
    chunks re-read at once, ``bf`` brute-force block; sizes are powers of two)."""
    kp = key_slots(k)
    r = rows or 1
    ncp = next_pow2(chunks_per_split)
    # 4 KP groups for k <= 128 (fewer ties between group maxima near the threshold)
    ngp = ngp or max(8, (4 if k <= SELECT_SMALL_K else 2) * kp)
    # blocks of 512 chunk maxima per row: 72 registers, where all 1002 of V = 32064 at once
    # (kept for the second step) take 114 (sm_90, Triton 3.8)
    cb = cb or min(ncp, max(ngp, 512 // r))
    # a group's members fit 16 bits (a list entry: group | member bits << 16)
    ngp = max(ngp, ncp // 16, cb // 16)
    cb = max(cb, ngp)
    bc = bc or max(1, min(kp, 2048 // (chunk * r)))
    cape = cape or max(16, 2 * kp)
    return dict(
        KP=kp,
        R=r,
        NGP=ngp,
        CB=cb,
        ONE_BLOCK=cb >= chunks_per_split,
        # k <= 128: halfway between k and KP (a few more bisection steps, fewer candidates than
        # KP); larger k: at least 1.125 k. At 1.25 k (v0.8) the candidates of k = 1024 came to
        # ~1670 of CAPE = 2048 on average and up to 2044 in a simulation of 1024 rows at V_shard =
        # 128256 (a row past CAPE takes the brute-force path); at 1.125 k, ~1520 and 1700, and
        # the selection took 15-18% less time at V_shard = 32064 and 128256 (H200, v0.14)
        UG=max(k, ug or k + max((kp - k) // 2, 0 if k <= SELECT_SMALL_K else k // 8)),
        CAPG=capg or max(8, 2 * kp),
        CAPC=capc or max(8, 2 * kp),
        CAPE=max(cape, kp),
        BC=bc,
        # the brute-force path's blocks: KP keys
        BF=bf or kp,
        BE=max(1, kp // chunk),
    )


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
    tile: tuple[int, int] | None = None,
    num_warps: int | None = None,
    select_warps: int | None = None,
    select_programs_per_sm: int | None = None,
    select_params: dict | None = None,
    select_launch: bool = True,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """Launch the partials kernels on a 2-D ``logits`` shard (last dim contiguous).

    Returns ``(stats [N_FIELDS, S, N] fp32, topk_vals [S, N, k] fp32, topk_ids [S, N, k] int64)``,
    one piece per column split S. Shape and dtype checks are the caller's (the math layer
    validates once, before any kernel). ``need_entropy`` / ``need_sum_x`` = False skip those sums
    (written as NaN). ``tile`` and ``num_warps`` (the streaming kernel), ``select_warps``,
    ``select_programs_per_sm`` and ``select_params`` (keywords of ``topk_params``, and
    ``maxnreg``: the selection's register cap on CUDA, 0 for none; ``key16=False``: int64 sort
    keys even where 32-bit ones are exact; ``fused=False``: the selection in its own launch for
    k <= SELECT_SMALL_K; the top-k selection) override
    the defaults (tuning); ``select_launch=False`` skips the selection (timing
    the streaming kernel alone: the top-k outputs are left unwritten). ``out``:
    (stats, topk_vals, topk_ids) to write into when the launch has one column split and their
    shapes and dtypes match (the process-group path passes views of its send buffer); otherwise
    new tensors. ``out`` with ``topk_vals`` None asks for the top-k as int32 ``make_key16`` words
    in ``topk_ids`` (``common.pack_key16``), written when they are exact (bf16 logits, no
    temperature or softcap, one split of at most KEY16_COLS columns); otherwise the outputs are
    new tensors of the usual kind, for the caller to pack.

    For k > 0 the streaming kernel also stores each row's chunk maxima (4 bytes per CHUNK
    columns, in a buffer of at most ``CM_MAX_BYTES`` with, when fused, the rows' lists), and the
    selection finds the exact top-k of each row from them: in the same program for k <=
    SELECT_SMALL_K (``_stream_select_kernel``, one launch per block of rows), else in a second
    launch (``_select_kernel``).
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    sp = dict(select_params or {})
    # k <= SELECT_SMALL_K: one fused launch; several rows per program (tuning) need the selection's own
    fused = bool(sp.pop("fused", FUSED_SELECT and sp.get("rows", 1) == 1)) and 0 < k <= SELECT_SMALL_K
    if fused and sp.setdefault("rows", 1) != 1:
        raise ValueError(f"select_params={select_params}: the fused selection takes one row per program")
    rows, chunk = tile or tile_shape(n_cols, k, fused)
    if chunk % LANE_COLS.value:
        raise ValueError(f"tile={tile}: the chunk (columns) must be a multiple of {LANE_COLS.value}")
    block = rows * chunk
    n_tiles = max(1, cdiv(max(n_valid_cols, 1), block))
    if n_splits is None:
        n_splits = default_splits(n_rows, n_tiles, device, k)
    if k > 0:  # bound the chunks per split (the selection's threshold groups)
        n_splits = max(n_splits, cdiv(n_tiles * rows, MAX_CHUNKS_PER_SPLIT))
    n_splits = max(1, min(n_splits, n_tiles))
    cols_per_split = cdiv(n_tiles, n_splits) * block
    n_splits = max(1, cdiv(max(n_valid_cols, 1), cols_per_split))
    transform_flags = dict(HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=float(temperature) != 1.0)
    key16_ok = logits.dtype == torch.bfloat16 and not any(transform_flags.values())  # values exactly bf16
    pack16 = out is not None and out[1] is None  # a send buffer that takes make_key16 words
    if pack16 and not (k > 0 and key16_ok and n_splits == 1 and cols_per_split <= KEY16_COLS):
        out = None  # not exact here: the caller packs what the kernels wrote (common.pack_key16)
    if out is not None and _fits(out, n_splits, n_rows, k, device):
        stats, topk_vals, topk_ids = out
    else:
        pack16 = False
        stats = torch.empty((N_FIELDS, n_splits, n_rows), dtype=torch.float32, device=device)
        topk_vals = torch.empty((n_splits, n_rows, k), dtype=torch.float32, device=device)
        topk_ids = torch.empty((n_splits, n_rows, k), dtype=torch.int64, device=device)
    if n_rows == 0:
        return stats, topk_vals, topk_ids
    if num_warps is None:
        num_warps = 8 if (k == 0 and block >= 4096) else FUSED_WARPS if (fused and block <= 2048) else 4
    cm_stride = n_tiles * rows
    step = n_rows
    if k > 0:
        small_k = k <= SELECT_SMALL_K
        maxnreg = sp.pop("maxnreg", None if fused else SELECT_MAXNREG if small_k else SELECT_MAXNREG_LARGE_K)
        # 32-bit sort keys when every value is exactly a bfloat16 and a split's columns fit 16 bits
        key16 = (sp.pop("key16", True) or pack16) and key16_ok and cols_per_split <= KEY16_COLS
        select_launch_opts = {"maxnreg": maxnreg} if maxnreg and device.type == "cuda" else {}
        tk = topk_params(k, cols_per_split // chunk, chunk, **sp)
        slot_words = tk["R"] * (tk["CAPG"] + 3 * tk["CAPC"] + tk["CAPE"])
        # fused: the lists of every row of a launch (one program per row and split)
        row_bytes = 4 * (cm_stride + (n_splits * slot_words if fused else 0))
        step = max(1, min(n_rows, CM_MAX_BYTES // row_bytes))
        cm = torch.empty((step, cm_stride), dtype=torch.float32, device=device)
        per_sm = select_programs_per_sm or (PROGRAMS_PER_SM if small_k else PROGRAMS_PER_SM_LARGE_K)
        programs = step if fused else min(cdiv(step, tk["R"]), max_resident_programs(device, per_sm))
        scratch = torch.empty(programs * n_splits * slot_words, dtype=torch.int32, device=device)
    else:
        cm = stats  # never touched when STORE_CM is False
    tgt = target if target is not None else stats  # any pointer; unused when HAS_TARGET is False
    transform = (
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
    )
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        if fused and select_launch:
            _stream_select_kernel[(r1 - r0, n_splits)](
                logits, tgt, stats, cm, topk_ids if pack16 else topk_vals, topk_ids, scratch,
                r0, n_rows, n_valid_cols, cols_per_split, cols_per_split // chunk, cm_stride, vocab_start,
                ignore_index, logits.stride(0), *transform,
                HAS_TARGET=target is not None, **transform_flags, NEED_ENTROPY=need_entropy,
                NEED_SUM_X=need_sum_x, ROWS=rows, CHUNK=chunk, K=k, KEY16=key16, PACK16=pack16,
                num_warps=num_warps, **tk, **select_launch_opts,
            )  # fmt: skip
            continue
        _shard_partials_kernel[(r1 - r0, n_splits)](
            logits, tgt, stats, cm,
            r0, n_rows, n_valid_cols, cols_per_split, cm_stride, vocab_start, ignore_index,
            logits.stride(0), *transform,
            HAS_TARGET=target is not None, STORE_CM=k > 0, ROWS=rows, CHUNK=chunk, **transform_flags,
            NEED_ENTROPY=need_entropy, NEED_SUM_X=need_sum_x, num_warps=num_warps,
        )  # fmt: skip
        if k > 0 and select_launch:
            _select_kernel[(min(programs, cdiv(r1 - r0, tk["R"])), n_splits)](
                logits, stats, cm, topk_ids if pack16 else topk_vals, topk_ids, scratch,
                r1 - r0, r0, n_rows, n_valid_cols, cols_per_split, cols_per_split // chunk,
                cm_stride, vocab_start, logits.stride(0), *transform,
                **transform_flags, K=k, ROWS=rows, CHUNK=chunk, KEY16=key16, PACK16=pack16,
                num_warps=select_warps or default_select_warps(k), **tk,
                **select_launch_opts,
            )  # fmt: skip
    return stats, topk_vals, topk_ids


def _fits(out, n_splits: int, n_rows: int, k: int, device: torch.device) -> bool:
    """``out`` can take the partials of this launch (contiguous, the launch's shapes; ids int64,
    or int32 as they travel between ranks; no values where the ids take make_key16 words)."""
    shapes = ((N_FIELDS, n_splits, n_rows), (n_splits, n_rows, k), (n_splits, n_rows, k))
    dtypes = ((torch.float32,), (torch.float32,), (torch.int64, torch.int32))
    if out[1] is None:
        out, shapes, dtypes = (out[0], out[2]), shapes[::2], ((torch.float32,), (torch.int32,))
    return all(
        t.shape == shape and t.dtype in dt and t.device == device and t.is_contiguous()
        for t, shape, dt in zip(out, shapes, dtypes)
    )


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def max_resident_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs of the top-k selection (each loops over rows and owns one scratch slot): enough to
    fill every SM several times over; unbounded off CUDA (the interpreter runs programs one by
    one)."""
    if device.type != "cuda":
        return 1 << 62
    return (per_sm or PROGRAMS_PER_SM) * _sm_count(device)


def default_splits(n_rows: int, n_tiles: int, device: torch.device, k: int = 0) -> int:
    """Column splits of a launch (1 off CUDA): see ``splits_for``."""
    if device.type != "cuda":
        return 1
    return splits_for(n_rows, n_tiles, _sm_count(device), k)


def splits_for(n_rows: int, n_tiles: int, sm_count: int, k: int = 0) -> int:
    """Split rows over columns only when rows alone cannot fill the GPU (decode-sized batches).
    With a top-k of at most SELECT_SMALL_K, at most MAX_SPLIT_KEYS // KP splits: the finalize
    kernel sorts each row's n_splits * k candidates, which costs more than the splits save."""
    target_programs = 4 * sm_count
    if n_rows >= target_programs:
        return 1
    splits = max(1, min(n_tiles, triton.cdiv(target_programs, max(n_rows, 1))))
    if 0 < k <= SELECT_SMALL_K:
        splits = min(splits, max(1, MAX_SPLIT_KEYS // key_slots(k)))
    return splits


__all__ = ["FIELDS", "MAX_K", "N_FIELDS", "shard_partials", "stat_planes", "tile_shape", "topk_params"]

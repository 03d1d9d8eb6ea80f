"""One-pass per-shard partials: max, normalizer, entropy and smoothing sums, target logit, top-k.

``_shard_partials_kernel`` reads each logit of a ``[n_rows, n_cols]`` shard exactly once and
writes, per row and per column split, the monoid partials that ``shardsoftmax.partials`` merges.
For top-k (k > 0) it also stores each row's chunk maxima (4 bytes per CHUNK columns), and
``_select_kernel`` then finds the exact top-k of each row from them, re-reading only the few
chunks that can hold a top-k element. Two launches keep the streaming kernel as lean as the
k = 0 one (the selection's registers and barriers never slow the stream; docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    cdiv,
    key_col,
    key_value,
    make_key,
    min_key_like,
    online_update,
    rescale_factor,
    transform_logits,
)

# Field order of the fp32 ``stats`` output, shape [N_FIELDS, n_splits, n_rows].
FIELDS = ("max", "sumexp", "sumexp_x", "sum_x", "count", "target_logit", "target_hits")
N_FIELDS = len(FIELDS)
MAX_K = 1024


@triton.jit
def _append_positions(cand, count_ptr):
    """Positions in a list for the elements where ``cand`` is true: one atomic increment of the
    list's length (the int32 at ``count_ptr``) per candidate, so their order is arbitrary (every
    list is ranked afterwards). Far cheaper than a prefix sum when few elements are candidates."""
    return tl.atomic_add(count_ptr + tl.zeros(cand.shape, tl.int32), 1, mask=cand, sem="relaxed",
                         scope="cta")  # fmt: skip


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
def _chunk_tile(row_ptr, chunks, valid, col_lo, col_hi, softcap, inv_temperature,
                HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                CHUNK: tl.constexpr):  # fmt: skip
    """The transformed values, columns and validity of the elements of ``chunks`` ([BC] indices
    relative to the split, those not ``valid`` masked), as [BC, CHUNK] tiles."""
    cols = col_lo + chunks[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    mask = valid[:, None] & (cols < col_hi)
    x = _load_transformed(row_ptr, cols, mask, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    return x, cols, mask


@triton.jit
def _brute_force_topk(row_ptr, cm_ptr, chunks_ptr, n_chunks, col_lo, col_hi, softcap,
                      inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr, CB: tl.constexpr,
                      BC: tl.constexpr):  # fmt: skip
    """Exact top-KP keys of a split without thresholds: rank every chunk by (chunk max, index),
    then rank the elements of the K best chunks, both by streaming merges. Taken only when the
    thresholds of ``_select_topk`` admit too many candidates (heavy ties)."""
    best = min_key_like([KP])
    for c0 in range(0, n_chunks, CB):
        ci = c0 + tl.arange(0, CB)
        live = ci < n_chunks
        cm = tl.load(cm_ptr + ci, mask=live, other=float("-inf"))
        best = _merge_top(best, tl.topk(tl.where(live, make_key(cm, ci), min_key_like([CB])), KP), KP)
    kk = tl.arange(0, KP)
    tl.store(chunks_ptr + kk, key_col(best), mask=(kk < K) & (best != min_key_like([KP])))
    n_best = tl.sum(((kk < K) & (best != min_key_like([KP]))).to(tl.int32), axis=0)
    tl.debug_barrier()
    top = min_key_like([KP])
    for b in range(0, n_best, BC):
        r = b + tl.arange(0, BC)
        ch = tl.load(chunks_ptr + r, mask=r < n_best, other=0)
        x, cols, mask = _chunk_tile(row_ptr, ch, r < n_best, col_lo, col_hi, softcap,
                                    inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE, CHUNK)  # fmt: skip
        keys = tl.reshape(tl.where(mask, make_key(x, cols), min_key_like([BC, CHUNK])), [BC * CHUNK])
        top = _merge_top(top, tl.topk(keys, KP), KP)
    return top


@triton.jit
def _select_topk(row_ptr, cm_ptr, gmax_ptr, chunks_ptr, vals_ptr, cols_ptr, count_ptr, col_lo,
                 col_hi, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr,
                 HAS_TEMPERATURE: tl.constexpr,
                 K: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr, NGP: tl.constexpr,
                 C2: tl.constexpr, CB: tl.constexpr, GB: tl.constexpr, CAPC: tl.constexpr,
                 CAPE: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """The exact top-KP keys (sorted, descending) of one split, from its chunk maxima ``cm_ptr``.

    Every top-K element lies in a top-K chunk (ranked by (chunk max, index)). With tau the K-th
    largest maximum over NGP groups of C2 consecutive chunks, at least K elements are >= tau, so
    every top-K element is >= tau and lies in a chunk whose max is >= tau. Step 1 finds tau;
    step 2 lists the chunks with max >= tau (about K of them unless values tie); step 3 re-reads
    those chunks and lists their elements >= tau (again about K) as (value, column); step 4 ranks
    that small set exactly. The lists are built by ``_append_positions`` in scratch (``vals_ptr``,
    ``cols_ptr``, ``chunks_ptr``; lengths at ``count_ptr``). If a list outgrows its capacity,
    ``_brute_force_topk`` gives the same result. Every step works on blocks of at most CB values,
    so registers stay few.
    """
    n_chunks = tl.cdiv(col_hi - col_lo, CHUNK)
    tl.store(count_ptr + tl.arange(0, 2), tl.zeros([2], tl.int32))
    for g0 in range(0, tl.cdiv(n_chunks, C2), GB):
        ci = (g0 + tl.arange(0, GB))[:, None] * C2 + tl.arange(0, C2)[None, :]
        cm = tl.load(cm_ptr + ci, mask=ci < n_chunks, other=float("-inf"))
        tl.store(gmax_ptr + g0 + tl.arange(0, GB), tl.max(cm, axis=1))
    tl.debug_barrier()
    gi = tl.arange(0, NGP)
    gmax = tl.load(gmax_ptr + gi, mask=gi < tl.cdiv(n_chunks, C2), other=float("-inf"))
    group_top = tl.topk(gmax, KP)
    tau = tl.max(tl.where(tl.arange(0, KP) == K - 1, group_top, float("-inf")), axis=0)
    for c0 in range(0, n_chunks, CB):
        ci = c0 + tl.arange(0, CB)
        live = ci < n_chunks
        cand = live & (tl.load(cm_ptr + ci, mask=live, other=float("-inf")) >= tau)
        pos = _append_positions(cand, count_ptr)
        tl.store(chunks_ptr + pos, ci, mask=cand & (pos < CAPC))
    tl.debug_barrier()
    n_c = tl.load(count_ptr)
    if n_c <= CAPC:
        for b in range(0, n_c, BC):
            r = b + tl.arange(0, BC)
            ch = tl.load(chunks_ptr + r, mask=r < n_c, other=0)
            x, cols, mask = _chunk_tile(row_ptr, ch, r < n_c, col_lo, col_hi, softcap,
                                        inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE, CHUNK)  # fmt: skip
            cand = mask & (tl.where(x != x, float("inf"), x) >= tau)  # NaN ranks highest
            pos = _append_positions(cand, count_ptr + 1)
            tl.store(vals_ptr + pos, x, mask=cand & (pos < CAPE))
            tl.store(cols_ptr + pos, cols, mask=cand & (pos < CAPE))
        tl.debug_barrier()
    n_e = tl.load(count_ptr + 1)
    if (n_c <= CAPC) & (n_e <= CAPE):
        idx = tl.arange(0, CAPE)
        live = idx < n_e
        v = tl.load(vals_ptr + idx, mask=live, other=0.0)
        c = tl.load(cols_ptr + idx, mask=live, other=0)
        top = tl.topk(tl.where(live, make_key(v, c), min_key_like([CAPE])), KP)
    else:
        top = _brute_force_topk(row_ptr, cm_ptr, chunks_ptr, n_chunks, col_lo, col_hi, softcap,
                                inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE, K, KP, CHUNK, CB,
                                BC)  # fmt: skip
    return top


@triton.jit
def _split_columns(cols_per_split, n_valid_cols, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's column split (grid axis 1): (split, n_splits, col_lo, col_hi), and the
    offsets of a ROWS x CHUNK tile."""
    split = tl.program_id(1)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)
    tile_offs = tl.arange(0, ROWS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
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
    """Grid: (rows of this launch, n_splits); each program streams one row's column split once.

    Each tile of ROWS x CHUNK columns updates ROWS independent online states (m = max x,
    s = sum exp(x - m), t = sum exp(x - m) x, sum x; x the transformed logit), so no tile needs a
    cross-warp reduction; the ROWS states are combined once at the end with the monoid's rescale.
    With STORE_CM, the ROWS chunk maxima of each tile (a by-product of the max) go to ``cm_ptr``
    for ``_select_kernel``, 4 bytes per CHUNK columns.
    """
    pid = tl.program_id(0)
    split, n_splits, col_lo, col_hi, tile_offs = _split_columns(cols_per_split, n_valid_cols, ROWS, CHUNK)
    BLOCK_V: tl.constexpr = ROWS * CHUNK
    local = pid + tl.zeros([], tl.int64)  # int64 offsets (pid is a plain int in the interpreter)
    row = row0 + local
    row_ptr = logits_ptr + row * stride_logits_row
    cm_row = cm_ptr + local * cm_stride
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    sum_x = tl.zeros([ROWS], tl.float32)
    for start in range(col_lo, col_hi, BLOCK_V):
        cols = start + tile_offs
        mask = cols < col_hi
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        if HAS_SOFTCAP:
            x = tl.where(mask, x, float("-inf"))  # softcap maps the -inf fill to -softcap
        chunk_max = tl.max(x, axis=1)  # NaN is skipped here (it makes s NaN instead)
        if STORE_CM:
            tl.store(cm_row + start // CHUNK + tl.arange(0, ROWS), chunk_max)
        m, s, t, sum_x = online_update(m, s, t, sum_x, x, mask, chunk_max, NEED_ENTROPY, NEED_SUM_X)

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
        local_tgt = tgt - vocab_start
        hit = (tgt != ignore_index) & (local_tgt >= col_lo) & (local_tgt < col_hi)
        xt = tl.load(row_ptr + tl.where(hit, local_tgt, 0), mask=hit, other=0.0).to(tl.float32)
        xt = transform_logits(xt, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        tgt_logit = tl.where(hit, xt, 0.0)
        tgt_hits = tl.where(hit, 1.0, 0.0)

    out = stats_ptr + split * total_rows + row
    plane = n_splits * total_rows
    tl.store(out + 0 * plane, m_all)
    tl.store(out + 1 * plane, s_all)
    tl.store(out + 2 * plane, t_all)
    tl.store(out + 3 * plane, sum_x_all)
    tl.store(out + 4 * plane, count)
    tl.store(out + 5 * plane, tgt_logit)
    tl.store(out + 6 * plane, tgt_hits)


@triton.jit
def _select_kernel(
    logits_ptr,
    stats_ptr,
    cm_ptr,  # fp32 [n_rows, cm_stride], written by _shard_partials_kernel (STORE_CM)
    topk_vals_ptr,
    topk_ids_ptr,
    scratch_ptr,  # int64 [programs * n_splits, SLOT_WORDS]: per slot, CAPE fp32 values and CAPE
    # int32 columns of the candidate elements, CAPC int32 candidate chunks, NGP fp32 group maxima
    # and the two lists' int32 lengths
    n_rows,  # rows of this launch
    row0,
    total_rows,
    n_valid_cols,
    cols_per_split,
    cm_stride,
    vocab_start,
    stride_logits_row,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    K: tl.constexpr,  # top-k size, >= 1
    KP: tl.constexpr,  # next power of two >= K (>= 2)
    ROWS: tl.constexpr,  # chunks per tile of the NaN re-scan
    CHUNK: tl.constexpr,  # columns per chunk (as in _shard_partials_kernel)
    NGP: tl.constexpr,  # groups of chunks for the top-k threshold (power of two >= 2 * KP)
    C2: tl.constexpr,  # chunks per group; NGP * C2 >= chunks per split
    CB: tl.constexpr,  # chunk maxima handled at once (a multiple of C2)
    GB: tl.constexpr,  # groups handled at once: min(CB / C2, NGP)
    CAPC: tl.constexpr,  # capacity of the candidate-chunk list
    CAPE: tl.constexpr,  # capacity of the candidate-element list
    BC: tl.constexpr,  # candidate chunks re-read at once
):
    """Grid: (programs, n_splits); each program selects the exact top-K of rows pid,
    pid + programs, ... of one column split from the chunk maxima the streaming kernel stored,
    re-reading only the few candidate chunks (see ``_select_topk``). A split whose sum came out
    NaN (a NaN or +inf in it) is re-read once to rank NaN highest, as ``torch.topk`` does."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    split, n_splits, col_lo, col_hi, tile_offs = _split_columns(cols_per_split, n_valid_cols, ROWS, CHUNK)
    BLOCK_V: tl.constexpr = ROWS * CHUNK
    SLOT_WORDS: tl.constexpr = CAPE + CAPC // 2 + NGP // 2 + 1
    slot = scratch_ptr + (pid * n_splits + split) * SLOT_WORDS
    vals_ptr = slot.to(tl.pointer_type(tl.float32))
    cols_ptr = (vals_ptr + CAPE).to(tl.pointer_type(tl.int32))
    chunks_ptr = cols_ptr + CAPE
    gmax_ptr = (chunks_ptr + CAPC).to(tl.pointer_type(tl.float32))
    count_ptr = (gmax_ptr + NGP).to(tl.pointer_type(tl.int32))
    for r in range(pid, n_rows, n_programs):
        local = r + tl.zeros([], tl.int64)  # int64 offsets (r is a plain int in the interpreter)
        row = row0 + local
        row_ptr = logits_ptr + row * stride_logits_row
        cm_split = cm_ptr + local * cm_stride + col_lo // CHUNK
        s_all = tl.load(stats_ptr + (n_splits + split) * total_rows + row)
        if s_all != s_all:
            for start in range(col_lo, col_hi, BLOCK_V):
                cols = start + tile_offs
                x = _load_transformed(row_ptr, cols, cols < col_hi, softcap, inv_temperature,
                                      HAS_SOFTCAP, HAS_TEMPERATURE)  # fmt: skip
                chunk_max = tl.max(tl.where(x != x, float("inf"), x), axis=1)
                tl.store(cm_split + (start - col_lo) // CHUNK + tl.arange(0, ROWS), chunk_max)
            tl.debug_barrier()  # the chunk maxima stored above are read by other threads
        top = _select_topk(row_ptr, cm_split, gmax_ptr, chunks_ptr, vals_ptr, cols_ptr, count_ptr,
                           col_lo, col_hi, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE,
                           K, KP, CHUNK, NGP, C2, CB, GB, CAPC, CAPE, BC)  # fmt: skip
        real = top != min_key_like([KP])
        kk = tl.arange(0, KP)
        base = (split * total_rows + row) * K
        tl.store(topk_vals_ptr + base + kk, tl.where(real, key_value(top), float("-inf")),
                 mask=kk < K)  # fmt: skip
        ids = tl.where(real, vocab_start + key_col(top).to(tl.int64), 9223372036854775807)
        tl.store(topk_ids_ptr + base + kk, ids, mask=kk < K)
        tl.debug_barrier()  # the next row overwrites the scratch


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_shape(n_cols: int, k: int) -> tuple[int, int]:
    """(ROWS, CHUNK) of the streaming kernel for a shard of ``n_cols`` columns and top-``k``
    (tuned on an H200 with ``benchmarks/tune.py``, docs/performance.md). k = 0: tiles of 64 x 64
    columns, 64 x 32 up to 32768 columns (80.0% vs 75.5% of the copy bandwidth at 32064).
    k <= 128: 128 chunks of 32 columns (one chunk maximum stored per 64 bytes of bf16 read).
    Larger k: chunks of 8 columns, so that the K best chunks hold few elements besides the
    top-K."""
    width = _next_pow2(max(n_cols, 1))
    if k == 0:
        chunk = min(32 if n_cols <= 32768 else 64, max(16, width))
        return max(1, min(64, width // chunk)), chunk
    if k <= 128:
        chunk = min(32, max(16, width))
        return max(2, min(128, width // chunk)), chunk
    return max(2, min(256, width // 8)), 8


MAX_CHUNKS_PER_SPLIT = 8192  # bounds the selection's threshold groups (NGP * C2) per split
CM_MAX_BYTES = 256 * 1024**2  # the chunk-maxima buffer of k > 0; more rows go in several launches
SELECT_WARPS = 4  # and PROGRAMS_PER_SM = 32: 27.6% vs 25.5% (2 warps, 8 per SM) at V = 32064


def topk_params(k: int, chunks_per_split: int, chunk: int, *, ngp: int | None = None,
                capc: int | None = None, cape: int | None = None, cb: int | None = None,
                bc: int | None = None) -> dict:  # fmt: skip
    """The top-k constexprs of the selection for ``k`` > 0 (see ``_select_topk``); the keywords
    override the defaults (powers of two; tuning)."""
    kp = max(2, _next_pow2(k))
    # k <= 128: 4 KP groups give a higher threshold than 2 KP (28.2% vs 27.6% at V = 32064, k = 50)
    ngp = ngp or max(8, (4 if kp <= 128 else 2) * kp)
    c2 = max(1, _next_pow2(chunks_per_split) // ngp)
    cb = max(c2, kp, cb or 512)
    return dict(
        KP=kp,
        NGP=ngp,
        C2=c2,
        CB=cb,
        GB=min(cb // c2, ngp),
        CAPC=capc or max(8, 2 * kp),
        CAPE=cape or max(8, 2 * kp),
        BC=bc or max(1, max(kp, 1024) // chunk),
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
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """Launch the partials kernels on a 2-D ``logits`` shard (last dim contiguous).

    Returns ``(stats [N_FIELDS, S, N] fp32, topk_vals [S, N, k] fp32, topk_ids [S, N, k] int64)``,
    one piece per column split S. Shape and dtype checks are the caller's (the math layer
    validates once, before any kernel). ``need_entropy`` / ``need_sum_x`` = False skip those sums
    (written as NaN). ``tile`` and ``num_warps`` (the streaming kernel), ``select_warps``,
    ``select_programs_per_sm`` and ``select_params`` (keywords of ``topk_params``; the top-k
    selection) override the defaults (tuning). ``out``:
    (stats, topk_vals, topk_ids) to write into when the launch has one column split and their
    shapes and dtypes match (the process-group path passes views of its send buffer); otherwise
    new tensors.

    k > 0 takes two launches per block of rows: the streaming kernel also stores each row's chunk
    maxima (4 bytes per CHUNK columns, in a buffer of at most ``CM_MAX_BYTES``), then
    ``_select_kernel`` finds the exact top-k of each row from them.
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    rows, chunk = tile or tile_shape(n_cols, k)
    block = rows * chunk
    n_tiles = max(1, cdiv(max(n_valid_cols, 1), block))
    if n_splits is None:
        n_splits = default_splits(n_rows, n_tiles, device)
    if k > 0:  # bound the chunks per split (the selection's threshold groups)
        n_splits = max(n_splits, cdiv(n_tiles * rows, MAX_CHUNKS_PER_SPLIT))
    n_splits = max(1, min(n_splits, n_tiles))
    cols_per_split = cdiv(n_tiles, n_splits) * block
    n_splits = max(1, cdiv(max(n_valid_cols, 1), cols_per_split))
    if out is not None and _fits(out, n_splits, n_rows, k, device):
        stats, topk_vals, topk_ids = out
    else:
        stats = torch.empty((N_FIELDS, n_splits, n_rows), dtype=torch.float32, device=device)
        topk_vals = torch.empty((n_splits, n_rows, k), dtype=torch.float32, device=device)
        topk_ids = torch.empty((n_splits, n_rows, k), dtype=torch.int64, device=device)
    if n_rows == 0:
        return stats, topk_vals, topk_ids
    if num_warps is None:
        num_warps = 8 if (k == 0 and block >= 4096) else 4
    cm_stride = n_tiles * rows
    step = n_rows
    if k > 0:
        step = max(1, min(n_rows, CM_MAX_BYTES // (4 * cm_stride)))
        cm = torch.empty((step, cm_stride), dtype=torch.float32, device=device)
        tk = topk_params(k, cols_per_split // chunk, chunk, **(select_params or {}))
        programs = min(step, max_resident_programs(device, select_programs_per_sm))
        slot_words = tk["CAPE"] + tk["CAPC"] // 2 + tk["NGP"] // 2 + 1
        scratch = torch.empty(programs * n_splits * slot_words, dtype=torch.int64, device=device)
    else:
        cm = stats  # never touched when STORE_CM is False
    tgt = target if target is not None else stats  # any pointer; unused when HAS_TARGET is False
    transform = (
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
    )
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        _shard_partials_kernel[(r1 - r0, n_splits)](
            logits, tgt, stats, cm,
            r0, n_rows, n_valid_cols, cols_per_split, cm_stride, vocab_start, ignore_index,
            logits.stride(0), *transform,
            HAS_SOFTCAP=softcap is not None, HAS_TARGET=target is not None, STORE_CM=k > 0,
            ROWS=rows, CHUNK=chunk, HAS_TEMPERATURE=float(temperature) != 1.0,
            NEED_ENTROPY=need_entropy, NEED_SUM_X=need_sum_x, num_warps=num_warps,
        )  # fmt: skip
        if k > 0:
            _select_kernel[(min(programs, r1 - r0), n_splits)](
                logits, stats, cm, topk_vals, topk_ids, scratch,
                r1 - r0, r0, n_rows, n_valid_cols, cols_per_split, cm_stride, vocab_start,
                logits.stride(0), *transform,
                HAS_SOFTCAP=softcap is not None, HAS_TEMPERATURE=float(temperature) != 1.0,
                K=k, ROWS=rows, CHUNK=chunk, num_warps=select_warps or SELECT_WARPS, **tk,
            )  # fmt: skip
    return stats, topk_vals, topk_ids


def _fits(out, n_splits: int, n_rows: int, k: int, device: torch.device) -> bool:
    """``out`` can take the partials of this launch (contiguous, the launch's shapes)."""
    shapes = ((N_FIELDS, n_splits, n_rows), (n_splits, n_rows, k), (n_splits, n_rows, k))
    dtypes = (torch.float32, torch.float32, torch.int64)
    return all(
        t.shape == shape and t.dtype == dt and t.device == device and t.is_contiguous()
        for t, shape, dt in zip(out, shapes, dtypes)
    )


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


PROGRAMS_PER_SM = 32  # programs of the top-k selection per SM (each loops over rows)


def max_resident_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs of the top-k selection (each loops over rows and owns one scratch slot): enough to
    fill every SM several times over; unbounded off CUDA (the interpreter runs programs one by
    one)."""
    if device.type != "cuda":
        return 1 << 62
    return (per_sm or PROGRAMS_PER_SM) * _sm_count(device)


def default_splits(n_rows: int, n_tiles: int, device: torch.device) -> int:
    """Split rows over columns only when rows alone cannot fill the GPU (decode-sized batches)."""
    if device.type != "cuda":
        return 1
    target_programs = 4 * _sm_count(device)
    if n_rows >= target_programs:
        return 1
    return max(1, min(n_tiles, triton.cdiv(target_programs, max(n_rows, 1))))


__all__ = ["FIELDS", "MAX_K", "N_FIELDS", "shard_partials", "tile_shape", "topk_params"]

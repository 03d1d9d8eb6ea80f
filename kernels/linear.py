"""The fused LM head: ``hidden [N, H] @ weight[V_shard, H]^T (+ bias)`` straight into per-row partials
(forward) and into the gradients of hidden, weight and bias (cross-entropy backward), without ever
writing the ``[N, V_shard]`` logits.

Kernels (each a tiled ``tl.dot`` loop over H with fp32 accumulation, sharing ``_logit_tile``):

* ``_linear_partials_kernel``: one program per (block of BLOCK_N rows, vocabulary split); it loops
  over the split's BLOCK_V-column tiles and runs the online partials update of
  ``partials._shard_partials_kernel`` on each logit tile in registers (max, sum exp, and when
  needed sum exp*x, sum x, the target logit). The splits of a row block then fold their partials,
  in split order, into MERGE_SLOTS pieces (default one). Output: ``[F, pieces, N]`` stats, the
  first F = ``stat_planes`` of the fields ``shard_partials`` returns (the loss without label
  smoothing stores 4 of the 7), so the merge over pieces and ranks is the one in
  ``shardsoftmax.partials``.
* ``_linear_tile_kernel``: one program per [BLOCK_N, BLOCK_V] tile; writes either the raw fp32
  logit tile (top-k path, below) or the cross-entropy gradient tile dloss/dlogit (backward).

Operand loads of the logit tiles: on Hopper (and in the interpreter), 16-bit hidden and weight with
16-byte aligned rows go through TMA descriptors (``use_tma``), with tiles of 128 x 256 or 256 x 128
as cuBLAS uses there: the k = 0 forward then runs at the cuBLAS matmul's speed (0.99-1.06x of it,
N = 8192, H = 4096, one H200) where pointer loads took 1.31-1.39x. Other operands, and GPUs before
Hopper, use pointer loads. Both are the same kernels, switched by the ``TMA`` constexpr.

Top-k (``k > 0``), by default: the fp32 logits of a chunk of rows (at most ``TOPK_CHUNK_BYTES``)
are written by cuBLAS with an fp32 output on CUDA, else by ``_linear_tile_kernel``
(``CUBLAS_LOGITS``), and handed to the existing ``shard_partials`` kernel; every field then comes
from those fp32 logits. With ``FUSED_TOPK`` (off by default: slower, see
there), ``_linear_partials_kernel`` also takes each tile's few largest logits above a running
per-row threshold as candidates, and the exact top-k is taken from those
(``_linear_partials_fused_topk``, which says why it is exact). ``k = 0`` is fully fused.

Backward: ``linear_grad_logits`` gives G = dloss/dlogits of a chunk of the shard's columns,
[N, C] in the inputs' dtype: ``_linear_tile_kernel`` recomputes the logit tiles in fp32 from
hidden and weight and forms the gradient from them and the saved per-row lse (the unfused path's
gradient, from logits never rounded). The math layer (``shardsoftmax.linear``) takes the GEMMs
``grad_hidden += G @ W[chunk]`` and ``grad_weight[chunk] = G^T @ hidden`` (cuBLAS on CUDA), chunk
by chunk, as its ``"recompute"`` impl does with cuBLAS logits. A scheme that never stores G needs
either atomics or, for each of the H/BLOCK output columns, a recomputation of the logits
(H = 4096: 16-64x the matmul FLOPs). Until v0.17 the GEMMs were Triton kernels with pointer
loads here: forward + backward took 10.9-11.4x of three matmuls on an H200.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4: host-side tensor descriptors, for TMA loads on Hopper and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

from .common import (
    ID_SENTINEL,
    cross_entropy_grad,
    next_pow2,
    online_update,
    rescale_factor,
    topk_select,
    transform_logits,
)
from .partials import (
    F_COUNT,
    F_MAX,
    F_SUM_X,
    F_SUMEXP,
    F_SUMEXP_X,
    F_TARGET_HITS,
    F_TARGET_LOGIT,
    N_FIELDS,
    default_splits,
    shard_partials,
    stat_planes,
    tile_shape,
)

# The top-k path (k > 0, without FUSED_TOPK): fp32 logits of a chunk of rows at a time, at most
# TOPK_CHUNK_BYTES (the rows of the chunked path's 512 MiB bf16 blocks: 2048 at V_shard = 128256),
# from cuBLAS with an fp32 output (``torch.mm`` with ``out_dtype``) on CUDA for fp16/bf16 inputs
# where torch has it (CUBLAS_LOGITS), else from ``_linear_tile_kernel``. Both sum the same fp32
# products of the same inputs; the order may differ. One H200, N = 8192, H = 4096, top-50 against
# this impl's k = 0, turn by turn (docs/performance.md v0.16): 1.05 / 1.06x at V_shard = 32064 /
# 128256 (cuBLAS, 1 GiB chunks), 1.09-1.11x (the tile kernel, 1 GiB), 1.16-1.23x (the tile kernel,
# 256 MiB chunks: 512 rows at 128256, too few for the selection's one-warp programs).
TOPK_CHUNK_BYTES = 1 << 30
CUBLAS_LOGITS = True
_MM_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype_out")  # torch >= 2.8: mm with an fp32 output
GROUP_N = 16  # row blocks that run side by side (their hidden rows stay in L2)
# On CUDA the kernels are autotuned over a few configs (one tuning per key, at the first call);
# SHARDSOFTMAX_AUTOTUNE=0 (or setting this to False) runs the first config of each list instead.
AUTOTUNE = os.environ.get("SHARDSOFTMAX_AUTOTUNE", "1") != "0"
# The logit tiles load hidden and weight through TMA descriptors where they can (``use_tma``);
# SHARDSOFTMAX_TMA=0 (or setting this to False) keeps the pointer loads everywhere.
TMA = os.environ.get("SHARDSOFTMAX_TMA", "1") != "0"
# The k = 0 forward folds its vocabulary splits' partials in-kernel into MERGE_SLOTS pieces
# (``_linear_partials_kernel``, SLOTS): [N_FIELDS, MERGE_SLOTS, N] whatever the splits, where one
# piece per split was [N_FIELDS, S, N] (S of 60-170 at N = 8192 on an H200: 14-37 MiB, and a longer
# merge in ``finalize``). 0: one piece per split. On an H200 (v0.12), 1, 4 and 8 pieces took the
# same time within the runs' noise (+-2%), so one piece: the least memory (0.25 MiB at N = 8192).
MERGE_SLOTS = 1
# Top-k in the fused kernel (``_linear_partials_fused_topk``): exact, but slower than the fp32-logits
# path on an H200 (v0.13: the whole k = 50 call 1.9-2.2x of k = 0, against 1.2-1.6x; the epilogue
# runs between tiles while the tensor cores wait), so off by default. SHARDSOFTMAX_FUSED_TOPK=1 (or
# setting this to True) turns it on for k up to FUSED_TOPK_MAX_K. LEVELS value levels per row raise
# the candidates' threshold, on a grid set from SAMPLE_COLS columns' logits; the candidate lists
# take at most CAND_BYTES per launch.
FUSED_TOPK = os.environ.get("SHARDSOFTMAX_FUSED_TOPK", "0") == "1"
FUSED_TOPK_MAX_K = 128
MAX_ROUNDS = 8  # and when ``candidate_rounds`` is at most this (V_shard well above k)
LEVELS = 32
SAMPLE_COLS = 256
CAND_BYTES = 64 << 20

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Configurations: autotuned on CUDA (a few configs, key (H, V)), one fixed small one in the interpreter
# ------------------------------------------------------------------------------------------------


def _configs(names: tuple[str, str, str], shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """Autotune configs from (block sizes for ``names``, warps, stages) tuples."""
    return [triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=st) for *blocks, w, st in shapes]


def _tile_configs() -> list[triton.Config]:
    """Tiles of the logit matmul (forward partials and the backward tile kernel), for H100/H200."""
    return _configs(
        ("BLOCK_N", "BLOCK_V", "BLOCK_H"),
        [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    )


def _tma_blocks(nargs: dict) -> None:
    """Pre-hook of every TMA config: the descriptors' blocks follow the config's tile."""
    nargs["hidden_ptr"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_H"]]
    nargs["weight_ptr"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_H"]]


def _tma_tile_configs() -> list[triton.Config]:
    """Tiles of the logit matmul with TMA loads (H100/H200): 128 x 256 or 256 x 128, as cuBLAS uses
    on Hopper. Measured at N = 8192, H = 4096 on an H200 (v0.12): 0.99-1.06x of the cuBLAS matmul
    for the cross-entropy forward, where the pointer loads' best (128 x 128) took 1.31-1.39x."""
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4)]
    names = ("BLOCK_N", "BLOCK_V", "BLOCK_H")
    return [
        triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=st, pre_hook=_tma_blocks)
        for *blocks, w, st in shapes
    ]


def _tma_topk_configs() -> list[triton.Config]:
    """The TMA tiles for the kernel that also takes top-k candidates: 128 x 256 tiles spill
    registers there (compiled for sm_90 with Triton 3.6: over 1 KB of stack per thread; 2.3-2.4x of
    the k = 0 kernel on an H200, v0.13), 128 x 128 with 8 warps does not (under 100 bytes)."""
    return [c for c in _tma_tile_configs() if c.kwargs["BLOCK_V"] == 128 and c.kwargs["BLOCK_N"] == 128] + [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3, pre_hook=_tma_blocks)
    ]


# The interpreter runs each program in Python: few, small tiles (still several per test shape).
INTERPRETER_TILE = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}
_EVEN_H = {"EVEN_H": lambda a: a["hidden_size"] % a["BLOCK_H"] == 0}


def _interpreted() -> bool:
    from . import interpreted

    return interpreted()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def use_tma(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the logit tiles load ``hidden`` and ``weight`` through TMA descriptors: 16-bit
    operands (fp32 ones multiply in full precision, off the tensor cores' fast path), each a
    row-major matrix whose rows start on 16-byte boundaries (TMA's alignment), on a GPU of compute
    capability >= 9 (Hopper) or in the interpreter (which runs the same kernel code on the CPU)."""
    if TensorDescriptor is None or not TMA or hidden.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not _interpreted() and (hidden.device.type != "cuda" or _capability(hidden.device.index or 0)[0] < 9):
        return False
    return all(
        t.dim() == 2
        and t.numel() > 0
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in (hidden, weight)
    )


def _operands(hidden: torch.Tensor, weight: torch.Tensor, tma: bool):
    """The kernels' hidden / weight arguments: the tensors, or with TMA their descriptors (the
    blocks are set per config by ``_tma_blocks``)."""
    if not tma:
        return hidden, weight
    return TensorDescriptor.from_tensor(hidden, [16, 16]), TensorDescriptor.from_tensor(weight, [16, 16])


def _dot_meta(dtype: torch.dtype) -> dict:
    """fp32 inputs are multiplied in full fp32 (as torch.matmul by default), not TF32. In the
    interpreter, 16-bit operands are widened to fp32 first (exact products; its bf16 dot is wrong)."""
    upcast = dtype != torch.float32 and _interpreted()
    return {"INPUT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dot_loop(
    acc,
    a_ptrs,  # [M, BLOCK_K] pointers to A's first K block
    b_ptrs,  # [BLOCK_K, N] pointers to B's first K block
    offs_k,  # arange(0, BLOCK_K)
    K,
    step_a,  # BLOCK_K times A's K stride
    step_b,  # BLOCK_K times B's K stride
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no masks
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """acc + A @ B with fp32 accumulation over K, BLOCK_K at a time, through pointer loads (the
    columns past K load as 0)."""
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def _logit_tile(
    hidden_ptr,  # a pointer, or with TMA a descriptor of hidden [N, H] (block [BLOCK_N, BLOCK_H])
    weight_ptr,  # a pointer, or with TMA a descriptor of weight [V, H] (block [BLOCK_V, BLOCK_H])
    bias_ptr,
    rows,  # [BLOCK_N] row ids, already clamped into [0, n_rows)
    cols,  # [BLOCK_V] weight rows, already clamped into [0, n_cols)
    row0,  # the tile's first row and weight row (TMA: out-of-range rows load as zeros)
    col0,
    hidden_size,
    stride_h_row,
    stride_h_col,
    stride_w_row,
    stride_w_col,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """Raw fp32 logits hidden[rows] @ weight[cols]^T (+ bias[cols]): a [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if TMA:
        # Tensor-memory-accelerator loads (Hopper): the H tail and rows past the end load as 0.
        for k0 in range(0, hidden_size, BLOCK_H):
            a = hidden_ptr.load([row0, k0])
            b = weight_ptr.load([col0, k0])
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    else:
        offs_h = tl.arange(0, BLOCK_H)
        h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_h_row + offs_h[None, :] * stride_h_col
        w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_w_row + offs_h[:, None] * stride_w_col
        acc = _dot_loop(
            acc, h_ptrs, w_ptrs, offs_h, hidden_size, BLOCK_H * stride_h_col, BLOCK_H * stride_w_col,
            BLOCK_H, EVEN_H, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def _level_threshold(levels_ptr, rows, origin, width, k, LEVELS: tl.constexpr):
    """A lower bound on each row's k-th largest logit from the candidates counted so far: level j
    counts candidates x with floor((x - origin) / width) = j (clamped into [0, LEVELS)), so at least
    ``above_j`` (the counts of levels >= j) logits are >= origin + j * width (less a rounding error
    far below one level). The bound is origin + (j - 1) * width for the highest j >= 1 with
    above_j >= k (one level of margin); -inf if none. The counts are read while other programs add
    to them; a count read early (or not yet seen in L2) is smaller, and the bound only lower: still
    valid. (One [rows] vector per level: a [rows, LEVELS] block made the kernel spill registers.)"""
    base = levels_ptr + rows.to(tl.int64) * LEVELS
    above = tl.zeros_like(rows)
    top = tl.zeros_like(rows)
    for i in tl.static_range(LEVELS - 1):
        above += tl.load(base + (LEVELS - 1 - i), cache_modifier=".cg")  # (from L2: not this SM's L1)
        top = tl.where((top == 0) & (above >= k), LEVELS - 1 - i, top)
    return tl.where(top >= 1, origin + (top - 1).to(tl.float32) * width, float("-inf"))


@triton.jit
def _value_level(v, origin, width, LEVELS: tl.constexpr):
    """The level of each row's value: floor((v - origin) / width) clamped into [0, LEVELS)."""
    level = tl.floor((v - origin) / width)
    level = tl.where(level < LEVELS - 1, level, LEVELS - 1)  # (NaN: the top level)
    return tl.where(level >= 0, level, 0).to(tl.int32)


@triton.jit
def _take_candidates(xm, rows, col0, origin, width, dropped, cand_vals_ptr, cand_cols_ptr, cand_count_ptr,
                     levels_ptr, cand_cap, LEVELS: tl.constexpr, ROUNDS: tl.constexpr):  # fmt: skip
    """Each row's ROUNDS largest marked logits of this tile (``xm``: -inf where not marked; the
    tile's first column is ``col0``), largest first, ties to the lower column: appended to the
    row's list (one atomic per row reserves their slots; slots past ``cand_cap`` are counted, not
    stored) and counted in their value levels. Returns ``dropped`` raised to the largest marked
    logit left behind (the caller's exactness check)."""
    v, j = tl.max(xm, axis=1, return_indices=True, return_indices_tie_break_left=True)
    if tl.max(v, axis=0) > float("-inf"):  # some row has a marked logit
        rows64 = rows.to(tl.int64)
        n_take = tl.minimum(tl.sum((xm > float("-inf")).to(tl.int32), axis=1), ROUNDS)
        base = tl.atomic_add(cand_count_ptr + rows64, n_take, mask=n_take > 0, sem="relaxed")
        for r in tl.static_range(ROUNDS):
            take = n_take > r
            level = _value_level(v, origin, width, LEVELS)
            tl.atomic_add(levels_ptr + rows64 * LEVELS + level, 1, mask=take, sem="relaxed")
            stored = take & (base + r < cand_cap)
            tl.store(cand_vals_ptr + rows64 * cand_cap + base + r, v, mask=stored)
            tl.store(cand_cols_ptr + rows64 * cand_cap + base + r, col0 + j, mask=stored)
            xm = tl.where(tl.arange(0, xm.shape[1])[None, :] == j[:, None], float("-inf"), xm)
            v, j = tl.max(xm, axis=1, return_indices=True, return_indices_tie_break_left=True)
        dropped = tl.maximum(dropped, v)
    return dropped


@triton.jit
def _grouped_tile(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """(row block, column block) of program ``pid`` when GROUP row blocks run side by side over
    every column block (the rows' operand tiles stay in L2 while the columns stream)."""
    per_group = GROUP * n_col_blocks
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_row_blocks - first, GROUP)
    return first + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.heuristics(_EVEN_H)
@triton.jit
def _linear_partials_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    target_ptr,
    stats_ptr,  # [PLANES, n_splits, N], or with SLOTS > 0 [PLANES, min(SLOTS, n_splits), N]
    locks_ptr,  # with SLOTS > 0: int32 [cdiv(N, BLOCK_N) * SLOTS], all 0 (and left so)
    cand_vals_ptr,  # TOPK: fp32 [N, cand_cap], the candidates' transformed logits
    cand_cols_ptr,  # TOPK: int32 [N, cand_cap], their columns in this shard
    cand_count_ptr,  # TOPK: int32 [N], 0 at launch: candidates found per row (may pass cand_cap)
    levels_ptr,  # TOPK: int32 [N, LEVELS], 0 at launch: candidates counted per value level
    bounds_ptr,  # TOPK: fp32 [3, N]: the levels' origin and width, and the dropped bound (-inf at launch)
    # sizes
    n_rows,
    n_cols,  # weight rows of this shard (padding included)
    n_valid_cols,  # columns whose global id is < vocab_size; later columns are padding
    hidden_size,
    n_splits,
    vocab_start,
    ignore_index,
    topk_k,
    cand_cap,
    # strides
    stride_h_row,
    stride_h_col,
    stride_w_row,
    stride_w_col,
    # transform
    softcap,
    inv_temperature,
    # meta
    HAS_BIAS: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM_X: tl.constexpr,
    PLANES: tl.constexpr,  # the leading FIELDS stored (``stat_planes``)
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 operands for tl.dot (Triton 3.8's interpreter gets bf16 dots wrong)
    TMA: tl.constexpr,  # hidden_ptr / weight_ptr are tensor descriptors
    TOPK: tl.constexpr,  # also collect the top-k candidates (see ``_take_candidates``)
    LEVELS: tl.constexpr,
    ROUNDS: tl.constexpr,
    SLOTS: tl.constexpr,  # > 0: fold the splits' partials in-kernel into SLOTS pieces
    GROUP: tl.constexpr,  # row blocks per group of programs (L2 reuse of hidden)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Grid: (cdiv(n_rows, BLOCK_N) * n_splits,); one program per (row block, vocabulary split),
    ordered so that the programs running side by side share GROUP row blocks (kept in L2) and
    stream the weight tiles of consecutive splits.

    For each BLOCK_V-column tile of the split: x = transform(hidden @ W^T + b) in fp32, then the
    online update m' = max(m, max_j x), s' = s exp(m - m') + sum_j exp(x - m') (t and sum x alike).
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    row_block, split = _grouped_tile(pid, n_row_blocks, n_splits, GROUP)

    n_tiles = tl.cdiv(n_valid_cols, BLOCK_V)
    cols_per_split = tl.cdiv(n_tiles, n_splits) * BLOCK_V
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows_in = tl.where(row_ok, rows, 0)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    sum_x = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows_in).to(tl.int64)
        local = tgt - vocab_start
        tgt_here = (tgt != ignore_index) & (local >= col_lo) & (local < col_hi)
        local = tl.where(tgt_here, local, -1)

    if TOPK:
        thr = tl.full([BLOCK_N], float("-inf"), tl.float32)
        dropped = tl.full([BLOCK_N], float("-inf"), tl.float32)
        origin = tl.load(bounds_ptr + rows_in)
        width = tl.load(bounds_ptr + n_rows + rows_in)
    for start in range(col_lo, col_hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < col_hi
        raw = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows_in, tl.where(col_ok, cols, 0), row_block * BLOCK_N, start,
            hidden_size, stride_h_row, stride_h_col, stride_w_row, stride_w_col,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, INPUT_PRECISION, UPCAST, TMA,
        )  # fmt: skip
        x = transform_logits(raw, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        if TOPK:
            thr = tl.maximum(thr, _level_threshold(levels_ptr, rows_in, origin, width, topk_k, LEVELS))
            xm = tl.where((x >= thr[:, None]) & col_ok[None, :] & row_ok[:, None], x, float("-inf"))
            dropped = _take_candidates(
                xm, rows_in, start, origin, width, dropped, cand_vals_ptr, cand_cols_ptr, cand_count_ptr,
                levels_ptr, cand_cap, LEVELS, ROUNDS,
            )  # fmt: skip
        m, s, t, sum_x = online_update(
            m, s, t, sum_x, x, col_ok[None, :], tl.max(x, axis=1), NEED_ENTROPY, NEED_SUM_X
        )
        if HAS_TARGET:
            tgt_logit += tl.sum(tl.where(cols[None, :] == local[:, None], x, 0.0), axis=1)

    count = tl.zeros([BLOCK_N], tl.float32) + tl.maximum(col_hi - col_lo, 0).to(tl.float32)
    if HAS_TARGET:
        tgt_hits = tl.where(tgt_here, 1.0, 0.0)
    else:
        tgt_hits = tl.zeros([BLOCK_N], tl.float32)
    if TOPK:
        tl.atomic_max(bounds_ptr + 2 * n_rows + rows_in, dropped, mask=row_ok, sem="relaxed")
    if not NEED_ENTROPY:
        t = t + float("nan")
    if not NEED_SUM_X:
        sum_x = sum_x + float("nan")
    if SLOTS > 0:
        # The splits of a row block fold their partials into SLOTS pieces: split s into piece
        # s % SLOTS, in split order (deterministic). Split s waits until the piece's counter reads
        # s // SLOTS, folds in what the piece holds, stores, and passes the counter on; the piece's
        # last split sets it back to 0 for the next launch. Programs start in program-id order and
        # split s of a row block has a smaller id than split s + SLOTS (``_grouped_tile``): the
        # split waited for is running or done, so the wait ends. The splits running side by side
        # (~8 of a row block on an H200) go to different pieces and seldom wait.
        slot = split % SLOTS
        lock = locks_ptr + row_block * SLOTS + slot
        turn = tl.atomic_add(lock, 0, sem="acquire")
        while turn != split // SLOTS:
            turn = tl.atomic_add(lock, 0, sem="acquire")
        out = stats_ptr + slot * n_rows + rows
        plane = tl.minimum(n_splits, SLOTS) * n_rows
        if split >= SLOTS:  # volatile: another SM wrote them, this SM's L1 may hold older values
            m_old = tl.load(out + F_MAX * plane, mask=row_ok, other=float("-inf"), volatile=True)
            m_new = tl.maximum(m_old, m, propagate_nan=tl.PropagateNan.ALL)
            f_old = rescale_factor(m_old, m_new)
            f_new = rescale_factor(m, m_new)
            s = tl.load(out + F_SUMEXP * plane, mask=row_ok, other=0.0, volatile=True) * f_old + s * f_new
            tgt_logit += tl.load(out + F_TARGET_LOGIT * plane, mask=row_ok, other=0.0, volatile=True)
            tgt_hits += tl.load(out + F_TARGET_HITS * plane, mask=row_ok, other=0.0, volatile=True)
            if PLANES > F_SUMEXP_X:
                t_old = tl.load(out + F_SUMEXP_X * plane, mask=row_ok, other=0.0, volatile=True)
                t = t_old * f_old + t * f_new
            if PLANES > F_SUM_X:
                sum_x += tl.load(out + F_SUM_X * plane, mask=row_ok, other=0.0, volatile=True)
                count += tl.load(out + F_COUNT * plane, mask=row_ok, other=0.0, volatile=True)
            m = m_new
    else:
        out = stats_ptr + split * n_rows + rows
        plane = n_splits * n_rows
    tl.store(out + F_MAX * plane, m, mask=row_ok)
    tl.store(out + F_SUMEXP * plane, s, mask=row_ok)
    tl.store(out + F_TARGET_LOGIT * plane, tgt_logit, mask=row_ok)
    tl.store(out + F_TARGET_HITS * plane, tgt_hits, mask=row_ok)
    if PLANES > F_SUMEXP_X:
        tl.store(out + F_SUMEXP_X * plane, t, mask=row_ok)
    if PLANES > F_SUM_X:
        tl.store(out + F_SUM_X * plane, sum_x, mask=row_ok)
        tl.store(out + F_COUNT * plane, count, mask=row_ok)
    if SLOTS > 0:
        tl.debug_barrier()  # every thread's stores issued before the counter moves on (release)
        last = split + SLOTS >= n_splits
        tl.atomic_xchg(lock, tl.where(last, 0, split // SLOTS + 1), sem="release")


@triton.heuristics(_EVEN_H)
@triton.jit
def _linear_tile_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    target_ptr,
    lse_ptr,  # [n_rows + 1]: lse per row (NaN: target found nowhere), then the reduction's scale
    grad_out_ptr,  # the loss's gradient: one per row (stride_grad_out) or one value (stride 0)
    out_ptr,
    # sizes
    n_rows,
    n_cols,  # weight rows given to this launch (= out columns)
    n_valid_cols,
    hidden_size,
    vocab_start,  # global id of column 0 of this launch
    ignore_index,
    # strides
    stride_h_row,
    stride_h_col,
    stride_w_row,
    stride_w_col,
    stride_out_row,
    stride_grad_out,
    # loss options
    smooth_per_class,  # label_smoothing / vocab_size
    target_weight,  # 1 - label_smoothing
    two_z_loss,  # 2 * z_loss
    # transform
    softcap,
    inv_temperature,
    # meta
    GRAD: tl.constexpr,  # write dloss/dlogit (else the raw logits)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 operands for tl.dot (Triton 3.8's interpreter gets bf16 dots wrong)
    TMA: tl.constexpr,  # hidden_ptr / weight_ptr are tensor descriptors
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Grid: (cdiv(n_rows, BLOCK_N) * cdiv(n_cols, BLOCK_V),); one program per output tile, GROUP
    row blocks side by side. GRAD: out = row_scale (p (1 + 2 z lse) - eps/C - (1 - eps) [j = t])
    dx'/dx with p = exp(x' - lse) (``common.cross_entropy_grad``), row_scale = grad_out * (the
    reduction's scale), read in-kernel as ``elementwise._cross_entropy_backward_kernel`` does; 0 on
    padding columns and on rows with row_scale 0 (ignored rows). Else: out = hidden @ W^T + b (raw,
    untransformed)."""
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_V)
    row_block, col_block = _grouped_tile(pid, n_row_blocks, n_col_blocks, GROUP)

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows_in = tl.where(row_ok, rows, 0)
    raw = _logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows_in, tl.where(col_ok, cols, 0), row_block * BLOCK_N,
        col_block * BLOCK_V, hidden_size, stride_h_row, stride_h_col, stride_w_row, stride_w_col,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, INPUT_PRECISION, UPCAST, TMA,
    )  # fmt: skip
    if GRAD:
        lse = tl.load(lse_ptr + rows_in)
        target = tl.load(target_ptr + rows_in).to(tl.int64)
        scale = tl.load(grad_out_ptr + rows_in * stride_grad_out).to(tl.float32) * tl.load(lse_ptr + n_rows)
        scale = tl.where(target == ignore_index, 0.0, scale)
        g = cross_entropy_grad(
            raw, cols[None, :], (target - vocab_start)[:, None], lse[:, None], scale[:, None],
            smooth_per_class, target_weight, two_z_loss, softcap, inv_temperature,
            HAS_SOFTCAP, HAS_TEMPERATURE,
        )  # fmt: skip
        g = tl.where(cols[None, :] < n_valid_cols, g, 0.0)
        out = tl.where(scale[:, None] != 0.0, g, 0.0)
    else:
        out = raw
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out_row + cols[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Keys: (H, V_shard) for the forward. The backward's gradient tiles see chunks of varying width,
# so they are keyed on H (and what they compute) only: one tuning per model, not per chunk width.
_partials_tuned = triton.autotune(_tile_configs(), key=["hidden_size", "n_cols"])(_linear_partials_kernel)
_tile_tuned = triton.autotune(_tile_configs(), key=["hidden_size", "GRAD"])(_linear_tile_kernel)
_partials_tma_tuned = triton.autotune(_tma_tile_configs(), key=["hidden_size", "n_cols"])(
    _linear_partials_kernel
)
# The top-k variant's autotuning reruns the kernel: the candidate and level counts are restored
# after each run, so the launch that counts starts from zeros.
_partials_topk_tuned = triton.autotune(
    _tile_configs(), key=["hidden_size", "n_cols"], restore_value=["cand_count_ptr", "levels_ptr"]
)(_linear_partials_kernel)
_partials_topk_tma_tuned = triton.autotune(
    _tma_topk_configs(), key=["hidden_size", "n_cols"], restore_value=["cand_count_ptr", "levels_ptr"]
)(_linear_partials_kernel)
_tile_tma_tuned = triton.autotune(_tma_tile_configs(), key=["hidden_size", "GRAD"])(_linear_tile_kernel)


def _config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _launch(kernel, tuned, grid, args, meta, config, default):
    """Run ``tuned`` (autotuned) on CUDA, else ``kernel`` with ``config``, or without one the
    interpreter's fixed small ``default`` / the first config of ``tuned`` (AUTOTUNE off).
    ``grid(meta) -> tuple``."""
    if config is None and not _interpreted():
        if AUTOTUNE:
            tuned[grid](*args, **meta)
            return
        config = _config_dict(tuned.configs[0])
    cfg = dict(default if config is None else config)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    if meta.get("TMA"):
        _tma_blocks({"hidden_ptr": args[0], "weight_ptr": args[1], **cfg})
    kernel[grid({**meta, **cfg})](*args, **meta, **cfg, **launch)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=256)
def _choose_splits(n_row_blocks: int, n_tiles: int, sms: int) -> int:
    """Vocabulary splits S for the partials kernel: at least ceil(sms / GROUP_N) (so that the
    programs running side by side share few row blocks), then the S minimizing waves x tiles per
    program (the tail of the last wave), ties to the smaller S."""
    lo = min(n_tiles, triton.cdiv(sms, GROUP_N))
    best, best_cost = lo, None
    for s in range(lo, min(n_tiles, 1024) + 1):
        cost = triton.cdiv(n_row_blocks * s, sms) * triton.cdiv(n_tiles, s)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def default_linear_splits(n_rows: int, n_valid_cols: int, device: torch.device, tma: bool = False) -> int:
    """Splits of the vocabulary for the fused forward (1 off CUDA)."""
    if device.type != "cuda" or n_rows == 0:
        return 1
    block_n, block_v = (128, 256) if tma else (128, 128)  # the tile of most configs
    n_tiles = max(1, triton.cdiv(n_valid_cols, block_v))
    return _choose_splits(triton.cdiv(n_rows, block_n), n_tiles, _sm_count(device.index or 0))


def _transform_args(softcap, temperature):
    return float(softcap) if softcap is not None else 1.0, 1.0 / float(temperature)


def linear_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
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
    config: dict | None = None,
    slots: int | None = None,
    fused_topk: bool | None = None,
):
    """Partials of the logits ``hidden [N, H] @ weight [V_shard, H]^T (+ bias [V_shard])``, as
    ``shard_partials`` returns them for those logits: ``(stats [F, S, N] fp32, topk_vals
    [S, N, k] fp32, topk_ids [S, N, k] int64)``. One fused kernel; with ``k > 0`` it also collects
    top-k candidates (``fused_topk``; default: FUSED_TOPK and k <= FUSED_TOPK_MAX_K and
    ``candidate_rounds`` <= MAX_ROUNDS), else fp32 logits of a chunk of rows at a time go to
    ``shard_partials`` (see the module docstring). Checks are the caller's.
    ``config``: fixed kernel config (tuning), else autotuned on CUDA. ``slots`` (k = 0; default
    ``MERGE_SLOTS``): the S splits' partials folded in-kernel into min(slots, S) pieces; 0: one
    piece per split (k > 0 always folds into one)."""
    n_rows = hidden.shape[0]
    device = hidden.device
    fold = dict(n_splits=n_splits, need_entropy=need_entropy, need_sum_x=need_sum_x, config=config)
    shard = dict(n_valid_cols=n_valid_cols, vocab_start=vocab_start, ignore_index=ignore_index,
                 softcap=softcap, temperature=temperature)  # fmt: skip
    if fused_topk is None:
        fused_topk = FUSED_TOPK and k <= FUSED_TOPK_MAX_K and candidate_rounds(k, n_valid_cols) <= MAX_ROUNDS
    if k > 0 and not fused_topk:
        return _linear_partials_topk(hidden, weight, bias, target, k=k, **shard, **fold)
    if k > 0:
        return _linear_partials_fused_topk(hidden, weight, bias, target, k=k, **shard, **fold)
    slots = MERGE_SLOTS if slots is None else slots
    stats, _ = _partials_launch(hidden, weight, bias, target, slots=slots, **shard, **fold)
    empty = (stats.shape[1], n_rows, 0)
    return stats, torch.empty(empty, dtype=torch.float32, device=device), torch.empty(empty, dtype=torch.int64, device=device)


def _partials_launch(hidden, weight, bias, target, *, slots, n_valid_cols, vocab_start, ignore_index,
                     softcap, temperature, n_splits, need_entropy, need_sum_x, config, topk=None):  # fmt: skip
    """One launch of ``_linear_partials_kernel``: ``(stats [F, pieces, N], counters)``, with
    min(slots, S) pieces for S splits (S with ``slots`` 0).
    ``topk``: (k, cand_cap, bounds [3, N], rounds) to also collect candidates; then the second
    result is (candidate values, columns, counts [N], level counts [N, LEVELS]), else None."""
    n_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    tma = use_tma(hidden, weight)
    if n_splits is None:
        n_splits = default_linear_splits(n_rows, n_valid_cols, device, tma)
    n_splits = max(1, n_splits)
    n_out = min(slots, n_splits) if slots else n_splits
    planes = stat_planes(need_entropy, need_sum_x)
    stats = torch.empty((planes, n_out, n_rows), dtype=torch.float32, device=device)
    if n_rows == 0:
        return stats, None
    softcap_v, inv_t = _transform_args(softcap, temperature)
    # counters, zeroed by one memset: the candidate counts and level counts (top-k), then the
    # pieces' locks, SLOTS per row block of the smallest BLOCK_N of any config (none without
    # folding: the kernel does not read them)
    n_count = n_rows * (1 + LEVELS) if topk else 0
    n_locks = triton.cdiv(n_rows, 16) * slots if slots else 0
    counters = torch.zeros((max(1, n_count + n_locks),), dtype=torch.int32, device=device)
    locks = counters[n_count:] if slots else stats
    k, cand_cap, bounds, rounds = topk if topk else (0, 0, stats, 0)
    if topk:
        cand_vals = torch.empty((n_rows, cand_cap), dtype=torch.float32, device=device)
        cand_cols = torch.empty((n_rows, cand_cap), dtype=torch.int32, device=device)
        cand_count, levels = counters[:n_rows], counters[n_rows:n_count]
    else:
        cand_vals = cand_cols = cand_count = levels = stats
    args = (
        *_operands(hidden, weight, tma), bias if bias is not None else stats,
        target if target is not None else stats, stats, locks, cand_vals, cand_cols, cand_count, levels,
        bounds, n_rows, n_cols, n_valid_cols, hidden_size, n_splits, vocab_start, ignore_index, k, cand_cap,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), softcap_v, inv_t,
    )  # fmt: skip
    meta = dict(
        HAS_BIAS=bias is not None,
        HAS_TARGET=target is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        NEED_ENTROPY=need_entropy,
        NEED_SUM_X=need_sum_x,
        PLANES=planes,
        **_dot_meta(hidden.dtype),
        TMA=tma,
        TOPK=bool(topk),
        LEVELS=LEVELS,
        ROUNDS=rounds,
        SLOTS=slots,
        GROUP=GROUP_N,
    )

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_N"]) * n_splits,)

    if topk:
        tuned = _partials_topk_tma_tuned if tma else _partials_topk_tuned
    else:
        tuned = _partials_tma_tuned if tma else _partials_tuned
    _launch(_linear_partials_kernel, tuned, grid, args, meta, config, INTERPRETER_TILE)
    if topk:
        return stats, (cand_vals, cand_cols, cand_count, levels)
    return stats, None


def candidate_cap(k: int) -> int:
    """Candidate slots per row of the fused top-k: 16 per wanted entry, at least 1024."""
    return max(1024, 16 * next_pow2(k))


def candidate_rounds(k: int, n_valid_cols: int) -> int:
    """Candidates a logit tile may give each row (``_take_candidates``). A row's tile holds about
    lam = k * 256 / V_shard of its top k (256-column tiles, logits in no order along the
    vocabulary); rounds = lam + 4 sqrt(lam) + 2 leave a tile with more of them, which sends the row
    to the exact recomputation, rare (lam = 0.1, 4 rounds: P(>= 5) ~ 1e-7 per tile). The fused
    top-k takes k when this is at most MAX_ROUNDS (k <= 128 at V_shard >= 32064)."""
    lam = k * 256 / max(1, n_valid_cols)
    return max(2, math.ceil(lam + 4 * math.sqrt(lam) + 2))


def _level_grid(hidden, weight, bias, *, n_valid_cols, softcap, temperature) -> torch.Tensor:
    """[3, N] fp32 for the fused top-k: each row's value levels (origin, width), and -inf (the
    dropped bound the kernel raises). From the logits of SAMPLE_COLS evenly spaced columns: origin
    = mean + std, width = (max - origin) / 12 (at least std / 12), so the levels reach well past
    the sample's maximum (Gaussian logits: from 1 to ~5 standard deviations). They only steer the
    threshold: any grid gives exact results. A row whose sample is not finite gets no levels
    (origin -inf, width 0): its threshold stays -inf."""
    n_s = min(SAMPLE_COLS, n_valid_cols)
    step = n_valid_cols // n_s
    cols = slice(0, n_s * step, step)
    # (contiguous copies: the kernels read the bias with stride 1)
    x = linear_logits(hidden, weight[cols].contiguous(), None if bias is None else bias[cols].contiguous())
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x / temperature
    std, mean = torch.std_mean(x, dim=1, correction=0)
    origin = mean + std
    width = torch.maximum(x.amax(dim=1) - origin, std) / 12.0
    ok = torch.isfinite(origin) & torch.isfinite(width) & (width > 0)
    return torch.stack((torch.where(ok, origin, float("-inf")), torch.where(ok, width, 0.0),
                        torch.full_like(origin, float("-inf"))))  # fmt: skip


def _levels_threshold(levels: torch.Tensor, origin: torch.Tensor, width: torch.Tensor, k: int) -> torch.Tensor:
    """``_level_threshold`` from the final level counts: a lower bound on each row's k-th largest."""
    above = levels.flip(1).cumsum(1).flip(1)
    j = torch.arange(levels.shape[1], device=levels.device)
    top = torch.where(above >= k, j, 0).amax(dim=1)
    return torch.where(top >= 1, origin + (top - 1).to(origin.dtype) * width, float("-inf"))


def _top_candidates(cand_vals, cand_cols, take, width: int, k: int, vocab_start: int):
    """The exact top-k (values descending, ties to the lower id: ``topk_select``) of the
    candidates ``take`` marks (at most ``width`` per row), moved to the front of a [N, width] block
    first: ``(vals [N, k] fp32, ids [N, k] int64)``, missing entries as -inf / ``ID_SENTINEL``."""
    n_rows = cand_vals.shape[0]
    width = max(width, k)
    pos = torch.where(take, take.cumsum(dim=1, dtype=torch.int32) - 1, width).to(torch.int64)  # width: the rest
    vals = torch.full((n_rows, width + 1), float("-inf"), dtype=torch.float32, device=cand_vals.device)
    cols = torch.full((n_rows, width + 1), -1, dtype=torch.int32, device=cand_vals.device)
    vals.scatter_(1, pos, cand_vals)
    cols.scatter_(1, pos, cand_cols)
    vals, cols = topk_select(vals[:, :width], cols[:, :width].to(torch.int64), k)
    real = cols >= 0  # (no candidate is -inf: an empty slot sorts after every real one)
    return torch.where(real, vals, float("-inf")), torch.where(real, vocab_start + cols, ID_SENTINEL.value)


def _linear_partials_fused_topk(hidden, weight, bias, target, *, k, n_valid_cols, vocab_start, ignore_index,
                                softcap, temperature, n_splits, need_entropy, need_sum_x, config):  # fmt: skip
    """k > 0 in the fused kernel. Each logit tile gives each row its few largest logits at or above
    the row's running threshold as candidates (``_take_candidates``); the exact top-k of those
    is taken after the launch. The threshold rises with the candidates' level counts
    (``_level_threshold``), which every program of the row adds to and reads; the levels' grid
    comes from a sample of the logits (``_level_grid``).

    Exactness: every logit below the threshold is below the row's k-th largest. A row's result
    is exact when (1) its candidate list did not overflow, (2) it has at least min(k, columns)
    candidates (-inf logits are no candidates), (3) its k-th value is above every marked logit
    that a tile left behind for lack of rounds (``dropped``), and (4) it has no NaN or +inf logit
    (its sum of exponentials is then not finite). The rows that fail (one host sync for all) get
    their top-k from fp32 logits through ``shard_partials``, as ``k > FUSED_TOPK_MAX_K`` does.
    Extra memory: ``candidate_cap(k)`` x 8 bytes per row, for at most ``CAND_BYTES`` at a time,
    and the [N, width] block of the candidates above the final threshold. Output: one piece."""
    n_rows = hidden.shape[0]
    device = hidden.device
    cap = candidate_cap(k)
    planes = stat_planes(need_entropy, need_sum_x)
    stats = torch.empty((planes, 1, n_rows), dtype=torch.float32, device=device)
    vals = torch.empty((1, n_rows, k), dtype=torch.float32, device=device)
    ids = torch.empty((1, n_rows, k), dtype=torch.int64, device=device)
    shard = dict(n_valid_cols=n_valid_cols, vocab_start=vocab_start, ignore_index=ignore_index,
                 softcap=softcap, temperature=temperature)  # fmt: skip
    fold = dict(slots=1, n_splits=n_splits, need_entropy=need_entropy, need_sum_x=need_sum_x, config=config)
    if n_rows == 0:
        return stats, vals, ids
    if n_valid_cols == 0:  # no column: the k = 0 partials, no entry
        stats, _ = _partials_launch(hidden, weight, bias, target, **shard, **fold)
        return stats, vals.fill_(float("-inf")), ids.fill_(ID_SENTINEL.value)
    rows_per = max(1, CAND_BYTES // (8 * cap))
    rounds = min(MAX_ROUNDS, candidate_rounds(k, n_valid_cols))
    need = min(k, n_valid_cols)
    for r0 in range(0, n_rows, rows_per):
        r1 = min(n_rows, r0 + rows_per)
        h = hidden[r0:r1]
        grid = _level_grid(h, weight, bias, n_valid_cols=n_valid_cols, softcap=softcap, temperature=temperature)
        st, (cand_vals, cand_cols, count, levels) = _partials_launch(
            h, weight, bias, None if target is None else target[r0:r1], topk=(k, cap, grid, rounds), **shard, **fold
        )  # fmt: skip
        stats[:, :, r0:r1] = st
        # the candidates at or above the final threshold (at least k of them, unless checks fail)
        stored = torch.arange(cap, device=device)[None, :] < count[:, None]
        take = stored & (cand_vals >= _levels_threshold(levels.view(-1, LEVELS), grid[0], grid[1], need)[:, None])
        redo = (count > cap) | (count < need) | ~torch.isfinite(st[F_SUMEXP.value, 0])
        redo |= (stored & (cand_vals > grid[2][:, None])).sum(dim=1) < need  # (3): k-th > dropped
        width, n_redo = (int(x) for x in torch.stack((take.sum(dim=1).max(), redo.sum())).tolist())  # one sync
        vals[0, r0:r1], ids[0, r0:r1] = _top_candidates(cand_vals, cand_cols, take, width, k, vocab_start)
        if n_redo:
            _exact_topk_rows(h, weight, bias, redo.nonzero()[:, 0], vals[0, r0:r1], ids[0, r0:r1], k=k, **shard)
    return stats, vals, ids


def _exact_topk_rows(hidden, weight, bias, rows, vals, ids, *, k, **shard):
    """vals[rows], ids[rows] = the top-k of those rows' fp32 logits (``_linear_partials_topk``, one
    split)."""
    _, tv, ti = _linear_partials_topk(hidden[rows], weight, bias, None, k=k, n_splits=1, need_entropy=False,
                                      need_sum_x=False, config=None, **shard)  # fmt: skip
    vals[rows], ids[rows] = tv[0], ti[0]


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """fp32 ``hidden @ weight^T (+ bias)``, [N, V_shard], from the same tiles as the fused kernels."""
    n_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=hidden.device)
    _tile_launch(hidden, weight, bias, None, None, None, out, grad=False, n_valid_cols=n_cols,
                 vocab_start=0, ignore_index=0, config=config)  # fmt: skip
    return out


def _tile_launch(hidden, weight, bias, target, lse_bwd, grad_out, out, *, grad, n_valid_cols, vocab_start,
                 ignore_index, label_smoothing=0.0, vocab_size=1, z_loss=0.0, softcap=None, temperature=1.0,
                 config=None):  # fmt: skip
    n_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    if n_rows == 0 or n_cols == 0:
        return
    softcap_v, inv_t = _transform_args(softcap, temperature)
    dummy = out
    tma = use_tma(hidden, weight)
    args = (
        *_operands(hidden, weight, tma), bias if bias is not None else dummy,
        target if target is not None else dummy,
        lse_bwd if lse_bwd is not None else dummy, grad_out if grad_out is not None else dummy, out,
        n_rows, n_cols, n_valid_cols, hidden_size, vocab_start, ignore_index,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        grad_out.stride(0) if grad_out is not None and grad_out.dim() == 1 else 0,
        float(label_smoothing) / float(vocab_size), 1.0 - float(label_smoothing), 2.0 * float(z_loss),
        softcap_v, inv_t,
    )  # fmt: skip
    meta = dict(
        GRAD=grad,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        **_dot_meta(hidden.dtype),
        TMA=tma,
        GROUP=GROUP_N,
    )

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(n_cols, meta["BLOCK_V"]),)

    tuned = _tile_tma_tuned if tma else _tile_tuned
    _launch(_linear_tile_kernel, tuned, grid, args, meta, config, INTERPRETER_TILE)


def _chunk_logits(hidden, weight, bias, *, out, config) -> None:
    """``out`` = fp32 ``hidden @ weight^T (+ bias)`` for the top-k path: cuBLAS where
    ``CUBLAS_LOGITS`` allows (see there; not with a fixed tile ``config``), else ``linear_logits``."""
    cublas = (
        CUBLAS_LOGITS
        and config is None
        and hidden.is_cuda
        and hidden.dtype in (torch.float16, torch.bfloat16)
        and _MM_FP32_OUT
    )
    if not cublas:
        linear_logits(hidden, weight, bias, out=out, config=config)
        return
    torch.ops.aten.mm.dtype_out(hidden, weight.T, torch.float32, out=out)
    if bias is not None:
        out += bias.float()


def _linear_partials_topk(hidden, weight, bias, target, *, k, n_valid_cols, vocab_start, ignore_index,
                          softcap, temperature, n_splits, need_entropy, need_sum_x, config):  # fmt: skip
    """k > 0: fp32 logits of chunks of rows, each handed to ``shard_partials`` (same split count)."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    device = hidden.device
    chunk = max(1, min(n_rows, TOPK_CHUNK_BYTES // max(1, 4 * n_cols)))
    chunk = max(1, chunk // 64 * 64) if chunk >= 64 else chunk
    buf = torch.empty((min(chunk, n_rows), n_cols), dtype=torch.float32, device=device)
    stats = vals = ids = None
    if n_splits is None:
        rows_, chunk_ = tile_shape(n_cols, k)
        n_tiles = max(1, triton.cdiv(max(n_valid_cols, 1), rows_ * chunk_))
        n_splits = default_splits(min(chunk, n_rows), n_tiles, device, k)
    for r0 in range(0, max(n_rows, 1), chunk):
        r1 = min(n_rows, r0 + chunk)
        logits = buf[: r1 - r0]
        if r1 > r0:
            _chunk_logits(hidden[r0:r1], weight, bias, out=logits, config=config)
        st, tv, ti = shard_partials(
            logits, None if target is None else target[r0:r1], k=k, n_valid_cols=n_valid_cols,
            vocab_start=vocab_start, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
            n_splits=n_splits, need_entropy=need_entropy, need_sum_x=need_sum_x,
        )  # fmt: skip
        if stats is None:
            s = st.shape[1]
            stats = torch.empty((N_FIELDS, s, n_rows), dtype=torch.float32, device=device)
            vals = torch.empty((s, n_rows, k), dtype=torch.float32, device=device)
            ids = torch.empty((s, n_rows, k), dtype=torch.int64, device=device)
        stats[:, :, r0:r1] = st
        vals[:, r0:r1] = tv
        ids[:, r0:r1] = ti
    return stats, vals, ids


def linear_grad_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse_bwd: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    out: torch.Tensor,
    ignore_index: int,
    n_valid_cols: int,
    vocab_start: int,
    label_smoothing: float,
    vocab_size: int,
    z_loss: float,
    softcap: float | None,
    temperature: float,
    config: dict | None = None,
) -> torch.Tensor:
    """G = dloss/dlogits of the logits ``hidden [N, H] @ weight [C, H]^T (+ bias [C])``, written
    into ``out`` ([N, C] in the inputs' dtype, columns contiguous) and returned. ``weight`` may be
    a chunk of the shard's rows: ``vocab_start`` is its first column's global id, and columns at or
    past ``n_valid_cols`` (padding) get 0. The logit tiles are recomputed in fp32 and the gradient
    formed from them, the saved per-row lse (``lse_bwd`` [N + 1] fp32 as ``finalize_cross_entropy``
    wrote it) and ``grad_out`` ([N], any stride, or []) as ``elementwise.cross_entropy_backward``
    forms it, rounded once to out's dtype. Checks are the caller's."""
    _tile_launch(
        hidden, weight, bias, target, lse_bwd, grad_out, out, grad=True, n_valid_cols=n_valid_cols,
        vocab_start=vocab_start, ignore_index=ignore_index, label_smoothing=label_smoothing,
        vocab_size=vocab_size, z_loss=z_loss, softcap=softcap, temperature=temperature, config=config,
    )  # fmt: skip
    return out


__all__ = [
    "default_linear_splits",
    "use_tma",
    "linear_grad_logits",
    "linear_logits",
    "linear_partials",
]

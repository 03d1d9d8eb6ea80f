"""Gumbel-max sampling over a vocabulary shard with counter-based noise.

The noise of (seed, offset, row, global id) is a pure function of those four numbers, so the
argmax of x' + g over the whole vocabulary is the same token however the vocabulary is split.
``shardsoftmax.reference.gumbel_noise`` computes the same noise in PyTorch (same hash, same
formula) for the top-k-restricted path and for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ID_SENTINEL, key_col, key_value, make_key, transform_logits

# 2^-32 and 2^-33 for turning a 32-bit hash into a uniform in (0, 1).
_INV_2_32 = tl.constexpr(2.3283064365386963e-10)  # constexpr: compiled kernels read no plain globals
_INV_2_33 = tl.constexpr(1.1641532182693481e-10)  # 2**-33


@triton.jit
def lowbias32(x):
    """A 32-bit integer mixer (uint32 in, uint32 out)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def row_hash(seed_lo, seed_hi, counter_lo, counter_hi):
    """Hash of (seed, offset + row): computed once per row. All arguments uint32."""
    h = lowbias32(seed_lo ^ 0x9E3779B9)
    h = lowbias32(h ^ seed_hi)
    h = lowbias32(h ^ counter_lo)
    return lowbias32(h ^ counter_hi)


@triton.jit
def gumbel(h_row, ids):
    """Standard Gumbel noise for global ids (uint32) of a row whose hash is h_row."""
    h = lowbias32(h_row ^ ids)
    u = h.to(tl.float32) * _INV_2_32 + _INV_2_33
    v = (h ^ 0xFFFFFFFF).to(tl.float32) * _INV_2_32 + _INV_2_33  # 1 - u, without cancellation
    e = tl.where(v < 0.00390625, v * (1.0 + v * (0.5 + v * 0.3333333333333333)), -tl.log(u))  # -log(u)
    return -tl.log(e)


# the seed's halves are never specialized: an argument equal to 1 would compile as a constant,
# which has no .to(), and a hash of constants would run in Python's unbounded ints
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_argmax_kernel(
    # pointers
    logits_ptr,
    out_vals_ptr,
    out_ids_ptr,
    # sizes
    n_rows,
    n_valid_cols,
    cols_per_split,
    vocab_start,
    row_offset,  # offset + index of this launch's first row
    seed_lo,
    seed_hi,
    # strides
    stride_logits_row,
    # transform
    softcap,
    inv_temperature,
    # meta
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid: (n_rows, n_splits). Per (row, split): the best (x' + g, lower id on ties) over the
    split's columns, as a top-1 partial (value, global id)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)
    row_ptr = logits_ptr + row * stride_logits_row
    counter = row_offset + row
    h_row = row_hash(
        seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), counter.to(tl.uint32), (counter >> 32).to(tl.uint32)
    )
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.full([BLOCK], 2147483647, tl.int32)
    offs = tl.arange(0, BLOCK)
    for start in range(col_lo, col_hi, BLOCK):
        cols = start + offs
        mask = cols < col_hi
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        y = x + gumbel(h_row, (vocab_start + cols).to(tl.uint32))
        y = tl.where(mask, y, float("-inf"))
        y = tl.where(y != y, float("inf"), y)  # NaN logits win, as in torch.argmax
        better = y > best_val  # strict: an earlier (lower) column keeps ties
        best_val = tl.where(better, y, best_val)
        best_col = tl.where(better, cols, best_col)
    key = tl.max(make_key(best_val, best_col), axis=0)
    col = key_col(key)
    found = col < col_hi
    out = split * n_rows + row
    tl.store(out_vals_ptr + out, tl.where(found, key_value(key), float("-inf")))
    tl.store(out_ids_ptr + out, tl.where(found, vocab_start + col.to(tl.int64), ID_SENTINEL))


def gumbel_argmax(
    logits: torch.Tensor,
    *,
    seed: int,
    row_offset: int,
    n_valid_cols: int,
    vocab_start: int,
    softcap: float | None,
    temperature: float,
    n_splits: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column split, the perturbed max and its global id: ([S, N] fp32, [S, N] int64)."""
    n_rows, _ = logits.shape
    block = max(16, min(2048, triton.next_power_of_2(max(n_valid_cols, 1))))
    n_tiles = max(1, triton.cdiv(max(n_valid_cols, 1), block))
    n_splits = max(1, min(n_splits, n_tiles))
    cols_per_split = triton.cdiv(n_tiles, n_splits) * block
    n_splits = max(1, triton.cdiv(max(n_valid_cols, 1), cols_per_split))
    vals = torch.empty((n_splits, n_rows), dtype=torch.float32, device=logits.device)
    ids = torch.empty((n_splits, n_rows), dtype=torch.int64, device=logits.device)
    if n_rows == 0:
        return vals, ids
    seed &= (1 << 64) - 1
    _gumbel_argmax_kernel[(n_rows, n_splits)](
        logits,
        vals,
        ids,
        n_rows,
        n_valid_cols,
        cols_per_split,
        vocab_start,
        row_offset,
        seed & 0xFFFFFFFF,
        seed >> 32,
        logits.stride(0),
        float(softcap) if softcap is not None else 1.0,
        1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
        HAS_TEMPERATURE=float(temperature) != 1.0,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return vals, ids

"""The steady-state header check of the group exchange, in one launch (see
``shardsoftmax.collective``): compare every rank's gathered header words with the agreed ones,
copy them (and a mismatch flag) to one small contiguous buffer for the host to read later, and
fill the gathered payload with -1 words when any header differs (NaN values, id -1: a call whose
ranks disagreed never returns plausible numbers). Replaces five torch ops (a contiguous copy of the
strided header words, ``ne``, ``any``, ``masked_fill_``) on the host's path of every group call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2

BLOCK = 4096


@triton.jit
def _check_headers_kernel(
    gathered_ptr,  # [n_ranks, row_words] int32: each rank's header words, then its payload
    agreed_ptr,  # [n_ranks, head_words] int32, contiguous
    out_ptr,  # [>= n_ranks * head_words + 1] int32: the gathered header words, then the flag
    n_ranks,
    row_words,
    head_words,
    HEAD_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, HEAD_BLOCK)
    in_head = offs < n_ranks * head_words
    rank = offs // head_words
    got = tl.load(gathered_ptr + rank * row_words + (offs - rank * head_words), mask=in_head, other=0)
    want = tl.load(agreed_ptr + offs, mask=in_head, other=0)
    bad = tl.max((got != want).to(tl.int32), axis=0)
    if pid == 0:
        tl.store(out_ptr + offs, got, mask=in_head)
        tl.store(out_ptr + n_ranks * head_words, bad)
    if bad != 0:
        payload = row_words - head_words
        p = pid * BLOCK + tl.arange(0, BLOCK)
        r = p // payload
        dst = gathered_ptr + r * row_words + head_words + (p - r * payload)
        tl.store(dst, tl.full([BLOCK], -1, tl.int32), mask=p < n_ranks * payload)


def check_headers(gathered: torch.Tensor, agreed: torch.Tensor, out: torch.Tensor) -> None:
    """``gathered`` [G, row] int32 (contiguous rows), ``agreed`` [G, head] int32 contiguous, ``out``
    [>= G * head + 1] int32 (the flag at G * head): see the module docstring. One launch, no host sync."""
    n_ranks, row_words = gathered.shape
    head_words = agreed.shape[1]
    if not gathered.is_contiguous() or not agreed.is_contiguous():
        raise ValueError("check_headers: gathered and agreed must be contiguous")
    if out.numel() <= n_ranks * head_words or not out.is_contiguous():
        raise ValueError(f"check_headers: out must hold {n_ranks * head_words + 1} contiguous words")
    grid = (max(1, cdiv(n_ranks * (row_words - head_words), BLOCK)),)
    _check_headers_kernel[grid](
        gathered, agreed, out, n_ranks, row_words, head_words,
        HEAD_BLOCK=next_pow2(n_ranks * head_words), BLOCK=BLOCK,
    )  # fmt: skip

"""The partials as they travel between ranks (``shardsoftmax.collective``): one int32 buffer per
rank, header then stats, top-k values and top-k ids as int32 global ids (2**31 - 1 marks a missing
entry). Packing and the shard kernel's in-place slots give the same buffer; unpacking gives views
that finalize merges as it merges int64 ids; the host-side merge sees int64 ids again; a group of
more than 2**31 - 1 columns is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from shardsoftmax import collective, kernels
from shardsoftmax.partials import ID_SENTINEL, Pieces

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_devices import TRITON_DEVICES  # noqa: E402

H = collective.H


def random_pieces(n_rows: int, k: int, dtype: torch.dtype, seed: int) -> Pieces:
    """One piece (S = 1): random stats, sorted top-k values, distinct ids, and the last entry of
    row 0 missing (-inf, ID_SENTINEL), as for a shard narrower than k."""
    g = torch.Generator().manual_seed(seed)
    stats = torch.randn(7, 1, n_rows, generator=g, dtype=torch.float64).to(dtype)
    vals = torch.randn(1, n_rows, k, generator=g, dtype=torch.float64).to(dtype)
    vals = vals.sort(-1, descending=True).values
    ids = torch.stack([torch.randperm(1000, generator=g)[:k] + 70_000 * seed for _ in range(n_rows)])[None]
    if k:
        vals[0, 0, -1] = float("-inf")
        ids[0, 0, -1] = ID_SENTINEL
    return Pieces(stats, vals, ids)


def head_words(rank: int) -> torch.Tensor:
    return torch.arange(2 * H, dtype=torch.int32) + 100 * rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_rows,k", [(3, 0), (3, 1), (5, 3), (4, 50)])
def test_pack_unpack_round_trip(dtype, n_rows, k):
    ranks = [random_pieces(n_rows, k, dtype, seed) for seed in range(3)]
    sends = [collective.pack(p, head_words(r)) for r, p in enumerate(ranks)]
    words = collective.payload_words(dtype, n_rows, k)
    exact = (7 + k) * n_rows * (dtype.itemsize // 4) + n_rows * k  # 4-byte ids: 8 bytes per fp32 entry
    assert words == exact + exact % 2  # even: fp64 partials are viewed in place
    assert all(s.numel() == 2 * H + words for s in sends)
    gathered = torch.stack(sends)
    got = collective.unpack(gathered, dtype, n_rows, k)
    assert got.topk_ids.dtype == torch.int32
    torch.testing.assert_close(got.stats, torch.cat([p.stats for p in ranks], 1), rtol=0, atol=0)
    torch.testing.assert_close(got.topk_vals, torch.cat([p.topk_vals for p in ranks]), rtol=0, atol=0)
    want_ids = torch.cat([p.topk_ids for p in ranks])
    if k:
        assert got.topk_ids[0, 0, -1] == torch.iinfo(torch.int32).max  # the missing mark
    assert torch.equal(got.unpacked().topk_ids, want_ids)  # int64 again, ID_SENTINEL restored
    assert torch.equal(gathered[:, : 2 * H], torch.stack([head_words(r) for r in range(3)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_send_buffer_slots_are_where_unpack_reads(dtype):
    """The shard kernel writes into the send buffer's slots (no pack): the same bytes as ``pack``."""
    n_rows, k = 5, 3
    p = random_pieces(n_rows, k, dtype, seed=4)
    buf, slots = collective._send_buffer(head_words(0), dtype, n_rows, k)
    assert slots.topk_ids.dtype == torch.int32
    slots.stats.copy_(p.stats)
    slots.topk_vals.copy_(p.topk_vals)
    slots.topk_ids.copy_(kernels.narrow_ids(p.topk_ids))
    packed = collective.pack(p, head_words(0))
    assert buf.numel() == packed.numel()
    n_payload = 2 * H + collective._offsets(dtype, n_rows, k)[1] + n_rows * k
    assert torch.equal(buf[:n_payload], packed[:n_payload])  # the pad word, if any, is unused


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_finalize_merges_int32_ids_as_int64(device):
    """``kernels.finalize_topk`` / ``finalize_stats`` over the ranks' int32 ids (strided views of
    the gathered buffer, a missing entry among them) give the int64 ids of the same merge; with
    one rank (S = 1) the ids come back widened."""
    n_rows, k = 6, 4
    ranks = [random_pieces(n_rows, k, torch.float32, seed) for seed in range(3)]
    for r, p in enumerate(ranks):  # row 1: two real entries over the ranks, two missing
        p.topk_vals[0, 1, 2 if r == 0 else 0 :] = float("-inf")
        p.topk_ids[0, 1, 2 if r == 0 else 0 :] = ID_SENTINEL
    gathered = torch.stack([collective.pack(p, head_words(r)) for r, p in enumerate(ranks)]).to(device)
    wire = collective.unpack(gathered, torch.float32, n_rows, k)
    wide = Pieces(wire.stats, wire.topk_vals.contiguous(), wire.unpacked().topk_ids.contiguous())
    for vals, ids in (wire.topk_vals, wire.topk_ids), (wire.topk_vals[:1], wire.topk_ids[:1]):
        v32, i32 = kernels.finalize_topk(vals, ids, vocab_start=0)
        s = len(vals)
        v64, i64 = kernels.finalize_topk(wide.topk_vals[:s], wide.topk_ids[:s], vocab_start=0)
        assert i32.dtype == torch.int64
        assert torch.equal(i32, i64) and torch.equal(v32, v64)
        assert (i32[1, 2:] == ID_SENTINEL).all() and (i32[1, :2] != ID_SENTINEL).all()
    _, _, ids1 = kernels.finalize_stats(wire.stats[:, :1], wire.topk_vals[:1], wire.topk_ids[:1], None,
                                        vocab_start=0, ignore_index=-100)  # fmt: skip
    assert ids1.dtype == torch.int64 and ids1[0, -1] == ID_SENTINEL


def test_group_wider_than_int32_ids_is_refused():
    def header(width: int) -> collective.Header:
        return collective.Header.make("stats", 4, 2, torch.float32, False, width, None, None, -100, 1.0,
                                      None, 0.0, 0.0)  # fmt: skip

    collective._check_consistent([header(2**30), header(2**30 - 1)])  # 2**31 - 1 columns: fine
    with pytest.raises(ValueError, match=r"2\*\*31 - 1 are supported"):
        collective._check_consistent([header(2**30), header(2**30)])

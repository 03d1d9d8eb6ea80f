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


def bf16_pieces(n_rows: int, k: int, seed: int, width: int, start: int) -> Pieces:
    """One rank's piece of bf16 logits: sorted top-k values (ties between ranks, a NaN, -inf and a
    missing entry) and ids in [start, start + width)."""
    g = torch.Generator().manual_seed(seed)
    vals = (torch.randn(1, n_rows, k, generator=g) * 2).round().to(torch.bfloat16).float()
    vals[0, 1, -2:] = float("-inf")
    vals = vals.sort(dim=-1, descending=True).values
    if seed == 1:
        vals[0, 0, 0] = float("nan")  # NaN ranks first
    ids = torch.stack([torch.randperm(width, generator=g)[:k] + start for _ in range(n_rows)])[None]
    vals[0, 2, -1], ids[0, 2, -1] = float("-inf"), ID_SENTINEL
    stats = torch.randn(7, 1, n_rows, generator=g)
    return Pieces(stats, vals, ids)


def packed_header(width: int, k: int = 4, **kw) -> collective.Header:
    args = dict(op="stats", n_rows=3, k=k, dtype=torch.bfloat16, has_target=False, width=width, start=None,
                vocab_size=None, ignore_index=-100, temperature=1.0, softcap=None, label_smoothing=0.0,
                z_loss=0.0)  # fmt: skip
    return collective.Header.make(**{**args, **kw})


def test_packs_topk_only_where_16_bits_are_exact(monkeypatch):
    """Packed entries need: several ranks that all may pack, the stats or topk op with k > 0,
    bf16 logits, no temperature or softcap, every shard at most 2**16 columns."""
    two = [packed_header(65536), packed_header(100)]
    assert collective.packs_topk(two)
    assert not collective.packs_topk(two[:1])
    for kw in ({"k": 0}, {"op": "sample"}, {"op": "linear_stats"}, {"dtype": torch.float32},
               {"temperature": 0.5}, {"softcap": 30.0}, {"width": 65537}):  # fmt: skip
        width = kw.pop("width", 100)
        assert not collective.packs_topk([packed_header(65536, **kw), packed_header(width, **kw)]), kw
    assert collective.packs_topk([packed_header(100, op="topk"), packed_header(100, op="topk")])
    monkeypatch.setattr(collective, "PACK_TOPK", False)
    assert not collective.packs_topk([two[0], packed_header(100)])  # one rank may not: none packs


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_packed_entries_merge_as_unpacked_ones(device):
    """Three ranks' bf16 top-k (uneven shards, ties across ranks, NaN, -inf, a missing entry)
    travel as one int32 per entry: the payload is 4 bytes per entry smaller; ``pack`` then
    ``unpack`` and ``Pieces.unpacked`` restore the values and int64 ids exactly; finalize (the
    kernel, over the words in place) merges them as it merges the unpacked entries; a poisoned
    payload (every word -1) reads as NaN / id -1."""
    n_rows, k = 4, 5
    widths, starts = [9, 65536, 40], [0, 9, 65545]
    ranks = [bf16_pieces(n_rows, k, r, w, s) for r, (w, s) in enumerate(zip(widths, starts))]
    words = collective.payload_words(torch.float32, n_rows, k, packed=True)
    assert words == 7 * n_rows + n_rows * k  # plus the pad word where odd: 20 + 28 is even
    assert words == collective.payload_words(torch.float32, n_rows, k) - n_rows * k
    sends = [collective.pack(p, head_words(r), key_base=s) for r, (p, s) in enumerate(zip(ranks, starts))]
    gathered = torch.stack(sends).to(device)
    base = torch.tensor(starts, device=device)
    wire = collective.unpack(gathered, torch.float32, n_rows, k, key_base=base)
    assert wire.topk_vals is None and wire.topk_ids.dtype == torch.int32 and wire.key_base is base
    plain = Pieces(wire.stats, torch.cat([p.topk_vals for p in ranks]).to(device),
                   torch.cat([p.topk_ids for p in ranks]).to(device))  # fmt: skip
    got = wire.unpacked()
    assert torch.equal(got.topk_ids, plain.topk_ids)
    assert torch.equal(got.topk_vals.nan_to_num(7.0), plain.topk_vals.nan_to_num(7.0))
    for vocab_start in (0, 9):
        v_p, i_p = kernels.finalize_topk(None, wire.topk_ids, vocab_start=vocab_start, key_base=base)
        v_u, i_u = kernels.finalize_topk(plain.topk_vals, plain.topk_ids, vocab_start=vocab_start)
        assert torch.equal(i_p, i_u) and torch.equal(v_p.nan_to_num(7.0), v_u.nan_to_num(7.0))
        rows_p, lp_p, _ = kernels.finalize_stats(wire.stats, None, wire.topk_ids, None,
                                                 vocab_start=vocab_start, ignore_index=-100,
                                                 key_base=base)  # fmt: skip
        rows_u, lp_u, _ = kernels.finalize_stats(wire.stats, plain.topk_vals, plain.topk_ids, None,
                                                 vocab_start=vocab_start, ignore_index=-100)  # fmt: skip
        assert torch.equal(lp_p.nan_to_num(7.0), lp_u.nan_to_num(7.0))
    assert i_p[0, 0] == ranks[1].topk_ids[0, 0, 0] and v_p[0, 0].isnan()  # rank 1's NaN ranks first
    gathered[:, 2 * H :] = -1  # the poison of a failed deferred header check
    v, i = kernels.finalize_topk(None, wire.topk_ids, vocab_start=0, key_base=base)
    assert v.isnan().all() and (i == -1).all()
    v, i = wire.unpacked().topk_vals, wire.unpacked().topk_ids
    assert v.isnan().all() and (i == -1).all()


def test_packed_send_buffer_slots_are_where_unpack_reads():
    """The packed send buffer's slots: no values, the words where ``pack`` puts them."""
    n_rows, k = 3, 4
    p = bf16_pieces(n_rows, k, 0, 100, 7)
    buf, slots = collective._send_buffer(head_words(0), torch.float32, n_rows, k, packed=True)
    assert slots.topk_vals is None and slots.topk_ids.dtype == torch.int32
    slots.stats.copy_(p.stats)
    slots.topk_ids.copy_(kernels.pack_key16(p.topk_vals, p.topk_ids, 7))
    packed = collective.pack(p, head_words(0), key_base=7)
    n_payload = 2 * H + (7 + k) * n_rows  # 33 words: a pad word follows, unused
    assert buf.numel() == packed.numel() == n_payload + 1
    assert torch.equal(buf[:n_payload], packed[:n_payload])

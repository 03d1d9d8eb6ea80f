"""The top-k selection (``kernels.partials._select_block``: inside ``_stream_select_kernel`` for
k <= 128 by default, or in ``_select_kernel``) against the reference, over its knobs and the
data its steps treat apart: several rows per program (with a last block that is partly past the
rows), chunk maxima read in one block or several, candidates in the split's last
chunk (padding columns), several candidate chunks per group and several candidate elements per
chunk (the bit masks' extra rounds), 64-column chunks (int64 masks), fewer chunks than k, NaN and
+inf rows (re-scanned), ties, softcap and temperature, and lists too small (the brute-force
path). Ids are compared exactly (ties: lower id first; NaN first)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from shardsoftmax import kernels
from shardsoftmax import reference as R
from shardsoftmax.partials import Partials, merge_stacked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_devices import TRITON_DEVICES  # noqa: E402

DEVICES = TRITON_DEVICES  # the CPU under the interpreter, or CUDA


def rows_for_selection(n: int, v: int, seed: int) -> torch.Tensor:
    """Random rows plus: one whose best values sit in the last (partial) chunk, one with a cluster
    of large values (several candidates per chunk and per group), a NaN, a +inf, an all -inf
    row and a row of ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    x[0, -9:] = 20.0 + torch.arange(9.0)  # the top in the last chunk, padding cut into it
    x[1, 100:160] = 15.0 + torch.rand(60, generator=g)  # a run of candidates
    x[1, 1000::512] = 14.0  # members of the same strided groups
    x[2, v // 3] = float("nan")
    x[3, 11] = float("inf")
    x[4] = float("-inf")
    x[5] = torch.round(x[5] * 2) / 2  # ties
    return x


def check(x, k, *, device, n_valid=None, softcap=None, temperature=1.0, tile=None, n_splits=None, **sp):
    n_valid = n_valid or x.shape[1]
    kw = dict(k=k, n_valid_cols=n_valid, vocab_start=5, ignore_index=-100, softcap=softcap,
              temperature=temperature)  # fmt: skip
    stats, vals, ids = kernels.shard_partials(
        x.to(device), None, tile=tile, n_splits=n_splits, select_params=sp or None, **kw
    )
    got = merge_stacked(Partials(*(f.cpu() for f in stats.unbind(0)), vals.cpu(), ids.cpu()))
    want = R.shard_partials(x.double(), None, **kw)
    bad = (got.topk_ids != want.topk_ids).any(1).nonzero().flatten().tolist()
    assert not bad, f"rows {bad}: {got.topk_ids[bad[0]].tolist()} != {want.topk_ids[bad[0]].tolist()}"
    finite = want.topk_vals.isfinite()
    torch.testing.assert_close(got.topk_vals[finite], want.topk_vals[finite].float())


CASES = {
    "defaults": dict(),
    "2-rows": dict(rows=2),
    "4-rows": dict(rows=4),
    "blocks-of-64": dict(cb=64),  # the chunk maxima in several reads
    "small-tiles": dict(bc=4, ngp=64),  # several re-read blocks; more members per group
    "exact-threshold": dict(ug=33),
    "loose-threshold": dict(ug=64),  # more than KP candidates: a second threshold over them
    "two-launches": dict(fused=False),  # the stream, then _select_kernel (the fused kernel's steps)
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_selection_knobs(device, params):
    x = rows_for_selection(7, 4103, seed=len(params))
    check(x, 33, device=device, n_valid=4101, tile=(16, 32), **params)


OVERFLOWS = {  # each case overflows one list only (the others hold every candidate)
    "groups": dict(capg=8, cape=1024),  # 33 or more groups reach the threshold
    "chunks": dict(capc=16, cape=1024),  # 33 or more chunks
    "columns": dict(cape=64),  # 128 columns and more (see below)
    # the two launches: the marked rows ranked after _select_kernel's row loop
    "chunks-two-launches": dict(capc=16, cape=1024, fused=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", OVERFLOWS.values(), ids=OVERFLOWS.keys())
def test_selection_brute_force(device, params):
    """A list too small for the candidates: every row takes the brute-force path. Four chunks of
    each row hold 128 large values, so the threshold that 33 groups reach admits them all. Two
    rows (the first two of a seeded draw of four)."""
    x = torch.randn(4, 4103, generator=torch.Generator().manual_seed(5))[:2] * 3
    x[:, 3904:4032] += 20.0  # listed last (lists go by group and chunk index)
    check(x, 33, device=device, n_valid=4101, tile=(16, 32), **params)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_ties_past_kp(device):
    """k = KP = 32 with the k-th value repeated so that more than KP candidates reach it (bf16
    logits do this at every power-of-two k): the lowest columns of the ties fill the top-k in
    the main path (the lists hold them all); one row of NaN ties, one without ties."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 4103, generator=g) * 3
    cols = torch.randperm(4000, generator=g)[:60] + 50
    x[0, cols[:31]] = 20.0 + torch.rand(31, generator=g)
    x[0, cols[31:51]] = 19.0  # 20 ties, 1 of them in the top-32
    x[1, cols[:25]] = 20.0 + torch.rand(25, generator=g)
    x[1, cols[25:55]] = 19.0  # 30 ties, 7 of them in
    x[2, cols[:40]] = float("nan")  # the 32 lowest columns of 40 NaNs
    x[3, cols[:50]] = 20.0 + torch.rand(50, generator=g)  # no ties, 50 candidates
    check(x, 32, device=device, n_valid=4101, tile=(16, 32))


@pytest.mark.parametrize("device", DEVICES)
def test_selection_wide_chunks_transforms_and_splits(device):
    """64-column chunks (int64 bit masks), softcap and temperature, two column splits."""
    x = rows_for_selection(6, 5000, seed=3)
    check(x, 20, device=device, n_valid=4990, tile=(8, 64), softcap=12.0, temperature=0.7, n_splits=2)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_fewer_chunks_than_k(device):
    """k above the number of chunks: every chunk (no padding column) is a candidate, and every
    column fits the candidate list."""
    x = rows_for_selection(6, 300, seed=4)
    check(x, 50, device=device, n_valid=297, tile=(4, 8), cape=512)


class KeySpy:
    """Records the ``KEY16`` of every launch of a selection kernel (the fused one or
    ``_select_kernel``), and which kernels ran."""

    SELECTIONS = ("_stream_select_kernel", "_select_kernel")

    def __init__(self, monkeypatch):
        self.key16 = []
        self.kernels = []
        for name in self.SELECTIONS:
            monkeypatch.setattr(kernels.partials, name, self.spy(name, getattr(kernels.partials, name)))

    def spy(self, name, kernel):
        spy = self

        class Spy:
            def __getitem__(_, grid):
                launch = kernel[grid]

                def call(*args, **kw):
                    spy.key16.append(kw["KEY16"])
                    spy.kernels.append(name)
                    return launch(*args, **kw)

                return call

        return Spy()


BF16_KEYS = {  # (k, rows, knobs): bf16 rows (ties from the rounding; from row 2 on NaN, +inf,
    # -inf), the top in the padded last chunk; 32-bit sort keys (the interpreter: seconds per row)
    "defaults": (33, 7, dict()),
    "second-threshold": (33, 2, dict(ug=64)),  # more than KP candidates first
    "two-splits": (33, 3, dict(n_splits=2)),  # columns counted from the second split's start
    "brute-force": (33, 2, dict(capc=16)),  # int64 keys there, stored with the 32-bit ones' code
    "large-k": (200, 3, dict(tile=None)),  # KP = 256: chunks of 8 columns, 8 warps on CUDA
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("k", "n", "params"), BF16_KEYS.values(), ids=BF16_KEYS.keys())
def test_selection_bf16_keys(device, monkeypatch, k, n, params):
    """Values that are exactly bfloat16 rank by int32 keys (value, then the lower column); the
    ids and values equal the reference's, as with int64 keys."""
    spy = KeySpy(monkeypatch)
    x = rows_for_selection(7, 4103, seed=k)[:n].to(torch.bfloat16)
    check(x, k, device=device, n_valid=4101, **{"tile": (16, 32), **params})
    assert spy.key16 and all(spy.key16)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_keys_stay_int64_where_16_bits_are_not_exact(device, monkeypatch):
    """int64 keys for fp32 or fp16 values, a temperature, a softcap, or a split of more than
    2**16 columns; and when asked for (``key16=False``)."""
    spy = KeySpy(monkeypatch)
    x = rows_for_selection(6, 300, seed=9)
    check(x, 5, device=device, tile=(4, 32))
    check(x.half(), 5, device=device, tile=(4, 32))
    xb = x.to(torch.bfloat16)
    check(xb, 5, device=device, tile=(4, 32), temperature=0.5)
    check(xb, 5, device=device, tile=(4, 32), softcap=10.0)
    check(xb, 5, device=device, tile=(4, 32), key16=False)
    wide = torch.randn(1, 70000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    wide[0, 69990] = 50.0  # a winner past column 2**16
    check(wide, 3, device=device, n_splits=1)
    check(xb, 5, device=device, tile=(4, 32))  # the one 32-bit launch
    assert spy.key16 == [False] * 6 + [True]


@pytest.mark.parametrize("device", DEVICES)
def test_small_k_streams_and_selects_in_one_launch(device, monkeypatch):
    """k <= 128 runs the stream and the selection in one kernel; several rows per program, k > 128
    and ``fused=False`` take the selection's own launch; the fused kernel takes one row per
    program. (Every path is checked against the reference.)"""
    spy = KeySpy(monkeypatch)
    x = rows_for_selection(6, 300, seed=9)[:3]
    for k, sp in ((5, {}), (5, dict(rows=2)), (5, dict(fused=False)), (130, {})):
        check(x, k, device=device, **sp)
    assert spy.kernels == ["_stream_select_kernel"] + ["_select_kernel"] * 3
    with pytest.raises(ValueError, match="select_params=.*one row per program"):
        check(x, 5, device=device, rows=2, fused=True)


def test_decode_splits_keep_the_merge_short():
    """Decode-sized batches split each row's columns over programs (a GPU of 132 SMs wants 528
    programs); with a top-k of at most 128, only as many splits as keep the finalize kernel's
    merge at 512 keys per row. Large batches and k = 0 are unchanged."""
    splits_for = kernels.partials.splits_for
    assert splits_for(1, 32, 132) == 32  # k = 0: every tile its own program
    assert splits_for(1, 32, 132, 50) == 8  # 8 * KP (64) = 512 keys
    assert splits_for(1, 32, 132, 1) == 32
    assert splits_for(64, 32, 132, 8) == 9  # 528 / 64 rows
    assert splits_for(1, 4, 132, 50) == 4  # never more than the tiles
    assert splits_for(8192, 16, 132, 50) == 1
    assert splits_for(1, 63, 132, 1024) == 63  # k > 128 keeps the tiles' splits


def test_tile_chunk_must_hold_whole_thread_rows():
    """The streaming kernel reads a tile as rows of 8 columns (one thread's load): a tuning tile
    whose chunk is not a multiple of 8 is refused before any launch."""
    x = torch.zeros(2, 64)
    kw = dict(k=0, n_valid_cols=64, vocab_start=0, ignore_index=-100, softcap=None, temperature=1.0)
    with pytest.raises(ValueError, match="tile=\\(4, 4\\).*multiple of 8"):
        kernels.shard_partials(x, None, tile=(4, 4), **kw)
    assert kernels.partials.tile_shape(32064, 0) == (256, 8)
    assert kernels.partials.tile_shape(100, 0) == (16, 8)


PACKED = {  # (k, rows, knobs) as in BF16_KEYS, one split (the send buffer's one piece); k > 128
    # stores its int32 keys with the same code as "defaults" (left out: its interpreter run is slow)
    "defaults": (33, 7, dict()),
    "brute-force": (33, 2, dict(capc=16)),  # int64 keys, stored as packed words
    "narrow": (33, 2, dict(n_valid=20)),  # fewer real columns than k: missing entries
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("k", "n", "params"), PACKED.values(), ids=PACKED.keys())
def test_selection_writes_packed_words(device, k, n, params):
    """Asked for packed entries (``out`` without values, as a group's send buffer on the wire of
    bf16 logits), the selection writes ``pack_key16`` of the reference's top-k (ties: the lower
    id; NaN first); ``unpack_key16`` gives back its values and ids, missing entries (k > the real
    columns) included; the stats are written too."""
    params = dict(params)
    x = rows_for_selection(7, 4103, seed=k)[:n].to(torch.bfloat16)
    n_valid = params.pop("n_valid", 4101)
    kw = dict(k=k, n_valid_cols=n_valid, vocab_start=5, ignore_index=-100, softcap=None, temperature=1.0)
    want = R.shard_partials(x.double(), None, **kw)
    kw.update(n_splits=1, tile=(16, 32), select_params=params or None)
    stats = torch.empty((kernels.N_FIELDS, 1, n), device=device)
    out = (stats, None, torch.full((1, n, k), 7, dtype=torch.int32, device=device))
    got = kernels.shard_partials(x.to(device), None, out=out, **kw)
    assert got[0] is out[0] and got[1] is None and got[2] is out[2]
    real = ~want.max.isnan()  # (the kernel's max skips NaN; finalize reads NaN from the sum)
    assert torch.equal(stats.cpu()[0, 0][real], want.max.float()[real])
    words = out[2].cpu()[0]
    assert torch.equal(words, kernels.pack_key16(want.topk_vals.float(), want.topk_ids, 5))
    v, i = kernels.unpack_key16(words[None], torch.tensor([5]))
    assert torch.equal(i[0], want.topk_ids)
    assert torch.equal(v[0].nan_to_num(7.0), want.topk_vals.float().nan_to_num(7.0))
    assert bool((i == kernels.common.ID_SENTINEL.value).any()) == (k > n_valid)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_packs_only_where_exact(device):
    """Packed entries asked for where 16 bits are not exact (fp32 logits, a temperature, a split of
    more than 2**16 columns, several splits): new tensors of the usual kind, for the caller to
    pack; the slot is left alone."""
    x = rows_for_selection(6, 300, seed=9)[:2]
    wide = torch.randn(1, 70000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for logits, kw in (
        (x, {}),
        (x.to(torch.bfloat16), {"temperature": 0.5}),
        (x.to(torch.bfloat16), {"n_splits": 2}),
        (wide, {"n_splits": 1}),
    ):
        kw = {**dict(k=5, n_valid_cols=logits.shape[1], vocab_start=0, ignore_index=-100, softcap=None,
                     temperature=1.0, tile=(4, 32), n_splits=1), **kw}  # fmt: skip
        s = max(1, kw["n_splits"])
        stats = torch.empty((kernels.N_FIELDS, s, logits.shape[0]), device=device)
        words = torch.full((s, logits.shape[0], 5), 7, dtype=torch.int32, device=device)
        got = kernels.shard_partials(logits.to(device), None, out=(stats, None, words), **kw)
        assert got[1] is not None and got[2].dtype == torch.int64 and got[0] is not stats
        assert (words == 7).all()

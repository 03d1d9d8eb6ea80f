"""The finalize kernels (``shardsoftmax.kernels.finalize``) against their PyTorch reference
(``shardsoftmax.partials``: ``merge_stacked`` over the pieces, then ``stats_rows`` /
``cross_entropy_rows``), and the kernels that read what finalize writes (the softmax shard with
its in-kernel lse, the cross-entropy backward with its gradient scale).

Pieces are the reference partials of contiguous column ranges of each row (empty ranges, ties
across ranges, -inf and NaN rows, targets inside, ignored and outside the vocabulary), packed as
the partials kernel packs its column splits. Small sizes: the CPU tier runs in the interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from shardsoftmax import kernels
from shardsoftmax import partials as P
from shardsoftmax import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_devices import TRITON_DEVICES  # noqa: E402

INF = float("inf")
NAN = float("nan")
IGNORE = -100
EPS32 = torch.finfo(torch.float32).eps
START = 40  # vocab_start of the shard

DEVICES = TRITON_DEVICES  # the CPU under the interpreter, or CUDA


def make_rows(v: int = 60, seed: int = 0):
    """Logits [6, v] on a 1/4 grid (ties), row 2 all -inf, row 4 with a NaN, and targets: in the
    shard, ignored, outside the vocabulary (found in no piece), in the shard, in the shard, first
    column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(6, v, generator=g) * 8) / 4
    x[1, 5::7] = x[1].max()  # ties for the top
    x[2] = -INF
    x[4, 11] = NAN
    target = torch.tensor([START + 3, IGNORE, START + v + 5, START + v - 1, START + 9, START])
    return x, target


def pieces_of(x: torch.Tensor, target: torch.Tensor, k: int, cuts: list[int]) -> P.Pieces:
    """The reference partials of the column ranges between ``cuts``, packed [7, S, N] / [S, N, k]."""
    bounds = [0, *cuts, x.shape[1]]
    parts = [
        R.shard_partials(
            x[:, a:b].contiguous(),
            target,
            k=k,
            n_valid_cols=b - a,
            vocab_start=START + a,
            ignore_index=IGNORE,
            softcap=None,
            temperature=1.0,
        )  # fmt: skip
        for a, b in zip(bounds, bounds[1:])
    ]
    st = P.stack(parts)
    return P.Pieces(torch.stack(list(st[:7])), st.topk_vals, st.topk_ids)


def to(pieces: P.Pieces, device) -> P.Pieces:
    return P.Pieces(*(t if t is None else t.to(device) for t in pieces))


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """NaN and infinities where the reference has them; finite values within a few fp32 roundings
    of the row's size ``scale`` (sums over pieces may be added in another order)."""
    got = got.cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.tolist()} vs {want.tolist()}"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities {got.tolist()} vs {want.tolist()}"
    fin = want.isfinite()
    assert torch.equal(got.isfinite(), fin), f"{what}: {got.tolist()} vs {want.tolist()}"
    err = (got - want).abs()[fin]
    bound = (16 * EPS32 * scale.expand_as(want))[fin]
    assert (err <= bound).all(), f"{what}: {got.tolist()} vs {want.tolist()}"


CUTS = {"1 piece": [], "3 pieces": [17, 40], "5 pieces, one empty": [8, 8, 30, 52]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cuts", CUTS.values(), ids=CUTS.keys())
@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_finalize_stats_matches_merge_then_stats_rows(device, cuts, k, with_target):
    x, target = make_rows()
    pieces = pieces_of(x, target, k, cuts)
    want = P.stats_rows(P.merge_stacked(pieces.unpacked()), target if with_target else None, IGNORE)
    d = to(pieces, device)
    rows, topk, ids = kernels.finalize_stats(
        d.stats, d.topk_vals, d.topk_ids, target.to(device) if with_target else None,
        vocab_start=START, ignore_index=IGNORE,
    )  # fmt: skip
    scale = (want.lse.abs() + want.max.abs() + 1).nan_to_num(1.0, 1.0, 1.0)
    torch.testing.assert_close(rows[1].cpu(), want.max, rtol=0, atol=0, equal_nan=True, msg="max is exact")
    assert_rows_close(rows[0], want.lse, scale, "lse")
    assert_rows_close(rows[2], want.entropy, scale * (x.abs().nan_to_num(0, 0, 0).amax() + 1), "entropy")
    if with_target:
        assert_rows_close(rows[3], want.target_logprob, scale, "target_logprob")
        assert rows[3][1].item() == 0.0, "ignored row"
        assert rows[3][2].isnan(), "target found in no piece"
    assert torch.equal(ids.cpu(), want.topk_ids), "top-k ids are exact (ties: lower id first)"
    assert_rows_close(topk, want.topk_logprobs, scale[:, None], "topk_logprobs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 33])
def test_finalize_topk_merges_splits_exactly(device, k):
    x, target = make_rows(v=80, seed=1)
    pieces = pieces_of(x, target, k, [10, 11, 45, 70])
    merged = P.merge_stacked(pieces.unpacked())
    d = to(pieces, device)
    vals, ids = kernels.finalize_topk(d.topk_vals, d.topk_ids, vocab_start=START)
    torch.testing.assert_close(vals.cpu(), merged.topk_vals, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ids.cpu(), merged.topk_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_warps", [1, 2, 8])
def test_finalize_merge_is_the_same_for_any_warps(device, num_warps):
    """The merge of S sorted lists (here 2 splits of k = 50: 128 candidates, and 5 splits of
    k = 33: 256; 4 warps by default for both) gives the same ids and values whatever the
    program's warps."""
    x, target = make_rows(v=200, seed=2)
    for k, cuts in ((50, [90]), (33, [10, 11, 45, 70])):
        pieces = pieces_of(x, target, k, cuts)
        merged = P.merge_stacked(pieces.unpacked())
        d = to(pieces, device)
        _, vals, ids = kernels.finalize_stats(
            None, d.topk_vals, d.topk_ids, None, vocab_start=START, ignore_index=0, num_warps=num_warps
        )
        torch.testing.assert_close(vals.cpu(), merged.topk_vals, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(ids.cpu(), merged.topk_ids), f"k={k}, {len(cuts) + 1} pieces"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k, cuts", [(1, [3]), (2, [3, 9, 30]), (7, [5, 6, 20, 33, 34, 50]), (50, [40, 41, 90])]
)
@pytest.mark.parametrize("layout", ["sorted", "one list shuffled", "strided views"])
def test_finalize_merge_of_sorted_lists_any_layout(device, k, cuts, layout):
    """The merge takes each split's list as a sorted run (the bitonic top-k's halving steps only),
    for 2, 4, 7 and 8 lists (with empty and short ones, ties, -inf and NaN rows). A list out of
    order (one row's list of one split shuffled) must still give the exact top-k (that row takes a
    full sort), and so must lists given as strided views of a larger buffer, as the gathered
    buffer of a process group is."""
    x, target = make_rows(v=120, seed=3)
    pieces = pieces_of(x, target, k, cuts)
    merged = P.merge_stacked(pieces.unpacked())
    vals, ids = pieces.topk_vals.clone(), pieces.topk_ids.clone()
    if layout == "one list shuffled":
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
        if k > 1:
            perm = perm.roll(1) if torch.equal(perm, torch.arange(k)) else perm
        vals[1, 0], ids[1, 0] = vals[1, 0, perm], ids[1, 0, perm]
        vals[0, 3], ids[0, 3] = vals[0, 3].flip(0), ids[0, 3].flip(0)
    vals, ids = vals.to(device), ids.to(device)
    if layout == "strided views":  # rows and splits apart in one buffer, ids after the values
        s_, n_ = vals.shape[:2]
        buf = torch.zeros(s_, n_ + 1, 3 * k + 2, dtype=torch.float64, device=device)
        vals_v = buf.view(torch.float32)[:, 1:, 1 : k + 1]
        ids_v = buf.view(torch.int64)[:, 1:, k + 2 : 2 * k + 2]
        vals_v.copy_(vals), ids_v.copy_(ids)
        vals, ids = vals_v, ids_v
        assert not vals.is_contiguous() and not ids.is_contiguous()
    got_vals, got_ids = kernels.finalize_topk(vals, ids, vocab_start=START)
    torch.testing.assert_close(got_vals.cpu(), merged.topk_vals, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_ids.cpu(), merged.topk_ids)


def test_can_merge_topk_limits_the_candidate_set():
    assert kernels.can_merge_topk(1, 1024) and kernels.can_merge_topk(500, 0)
    assert kernels.can_merge_topk(64, 64) and not kernels.can_merge_topk(65, 64)


LOSS_OPTIONS = {"plain": (0.0, 0.0), "smooth": (0.1, 0.0), "zloss+smooth": (0.2, 1e-3)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cuts", CUTS.values(), ids=CUTS.keys())
@pytest.mark.parametrize("options", LOSS_OPTIONS.values(), ids=LOSS_OPTIONS.keys())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_finalize_cross_entropy_matches_merge_then_cross_entropy_rows(device, cuts, options, reduction):
    label_smoothing, z_loss = options
    x, target = make_rows(seed=2)
    x[4, 11] = 1.0  # no NaN row: one NaN would make sum and mean NaN and hide the rest
    pieces = pieces_of(x, target, 0, cuts)
    kw = dict(ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    want_loss, want_lse = P.cross_entropy_rows(P.merge_stacked(pieces.unpacked()), target, **kw)
    d = to(pieces, device)
    loss, lse_bwd = kernels.finalize_cross_entropy(d.stats, target.to(device), **kw)
    assert loss.shape == want_loss.shape and lse_bwd.shape == (7,)
    lse = P.log_normalizer(P.merge_stacked(pieces.unpacked()))
    scale = (lse.abs() + 1).nan_to_num(1.0, 1.0, 1.0)
    assert_rows_close(lse_bwd[:6], want_lse[:6], scale, "lse_bwd")
    assert lse_bwd[2].isnan(), "a target found in no piece: NaN, so its gradient row is NaN"
    torch.testing.assert_close(lse_bwd[6].cpu(), want_lse[6], rtol=EPS32, atol=0)
    if reduction == "none":
        assert_rows_close(loss, want_loss, scale * (1 + z_loss * scale), "loss")
        assert loss[1].item() == 0.0, "ignored row"
    else:
        assert loss.isnan().item(), "the out-of-range target makes the reduced loss NaN"
        kept = target.clone()
        kept[2] = IGNORE  # without the NaN row, the reduction itself is checked
        pieces = pieces_of(x, kept, 0, cuts)
        want_loss, _ = P.cross_entropy_rows(P.merge_stacked(pieces.unpacked()), kept, **kw)
        loss, _ = kernels.finalize_cross_entropy(to(pieces, device).stats, kept.to(device), **kw)
        torch.testing.assert_close(loss.cpu(), want_loss, rtol=16 * EPS32, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_over_all_ignored_rows_is_nan_and_empty_batches_work(device):
    x, target = make_rows()
    ignored = torch.full_like(target, IGNORE)
    pieces = to(pieces_of(x, ignored, 0, [20]), device)
    kw = dict(ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)
    loss, _ = kernels.finalize_cross_entropy(pieces.stats, ignored.to(device), reduction="mean", **kw)
    assert loss.isnan().item()
    empty = to(pieces_of(x[:0], target[:0], 3, [20]), device)
    for reduction, value in (("mean", NAN), ("sum", 0.0)):
        loss, lse_bwd = kernels.finalize_cross_entropy(
            empty.stats, target[:0].to(device), reduction=reduction, **kw
        )
        torch.testing.assert_close(loss.cpu(), torch.tensor(value), equal_nan=True)
        assert lse_bwd.shape == (1,)
    rows, topk, ids = kernels.finalize_stats(
        empty.stats, empty.topk_vals, empty.topk_ids, None, vocab_start=START, ignore_index=IGNORE
    )
    assert rows.shape == (4, 0) and topk.shape == (0, 3) and ids.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_write_merges_the_pieces_lse(device, log):
    x, target = make_rows(v=50, seed=3)
    x[4, 11] = 0.5
    pieces = pieces_of(x, None, 0, [12, 12, 33])
    lse = P.log_normalizer(P.merge_stacked(pieces.unpacked()))
    kw = dict(log=log, n_valid_cols=47, softcap=None, temperature=1.0)
    want = R.shard_softmax(x, lse, **kw)
    got = kernels.softmax_write(x.to(device), to(pieces, device).stats, **kw).cpu()
    torch.testing.assert_close(got, want, rtol=8 * EPS32, atol=8 * EPS32, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_kind", ["scalar", "rows", "strided", "expanded"])
def test_backward_reads_the_gradient_in_any_layout(device, grad_kind):
    """The backward kernel against the reference for a reduced loss (0-d gradient) and per-row
    gradients that are contiguous, strided or expanded from one value (stride 0)."""
    x, target = make_rows(v=40, seed=4)
    x[4, 11] = 0.5
    target[2] = START + 7  # every target in the vocabulary
    reduction = "mean" if grad_kind == "scalar" else "none"
    pieces = pieces_of(x, target, 0, [15])
    kw = dict(ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    _, lse_bwd = P.cross_entropy_rows(P.merge_stacked(pieces.unpacked()), target, **kw)
    grad_out = {
        "scalar": torch.tensor(0.7),
        "rows": torch.linspace(0.5, 1.5, 6),
        "strided": torch.linspace(0.5, 1.5, 12)[::2],
        "expanded": torch.tensor(1.3).expand(6),
    }[grad_kind]
    bkw = dict(n_valid_cols=38, vocab_start=START, label_smoothing=0.1, vocab_size=38, z_loss=0.01)
    bkw |= dict(softcap=None, temperature=1.0)
    row_scale = P.backward_row_scale(lse_bwd, grad_out, target != IGNORE)
    want = R.shard_cross_entropy_backward(x, target, lse_bwd[:-1], row_scale, **bkw)
    got = kernels.cross_entropy_backward(
        x.to(device), target.to(device), lse_bwd.to(device), grad_out.to(device), ignore_index=IGNORE, **bkw
    ).cpu()
    assert torch.all(got[1] == 0), "ignored row"
    torch.testing.assert_close(got, want, rtol=8 * EPS32, atol=8 * EPS32, equal_nan=True)  # row 2: all -inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, 5])
def test_partials_kernel_splits_then_finalize_equals_one_split(device, k):
    """The public one-process path on a GPU: the partials kernel's column splits, merged by the
    finalize kernel, give the one-split result."""
    x, target = make_rows(v=300, seed=5)
    x, target = x.to(device), target.to(device)
    kw = dict(k=k, n_valid_cols=297, vocab_start=START, ignore_index=IGNORE, softcap=None, temperature=1.0)
    kw["tile"] = (2, 16)
    out = {}
    for splits in (1, 4):
        stats, vals, ids = kernels.shard_partials(x, target, n_splits=splits, **kw)
        assert stats.shape[1] == splits
        out[splits] = kernels.finalize_stats(stats, vals, ids, target, vocab_start=START, ignore_index=IGNORE)
    (rows1, topk1, ids1), (rows4, topk4, ids4) = out[1], out[4]
    scale = (rows1[0].abs() + rows1[1].abs() + 1).nan_to_num(1.0, 1.0, 1.0).cpu()
    for i, name in enumerate(("lse", "max", "entropy", "target_logprob")):
        assert_rows_close(rows4[i], rows1[i].cpu(), scale * 10, name)
    assert torch.equal(ids4, ids1)
    assert_rows_close(topk4, topk1.cpu(), scale[:, None], "topk_logprobs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_ranks, payload", [(1, 5), (3, 4101), (4, 9000)])
@pytest.mark.parametrize("differ", [None, (0, 0), (2, 29)], ids=["agree", "first-word", "last-word"])
def test_check_headers_kernel(device, n_ranks, payload, differ):
    """The group exchange's header check in one launch (``kernels.check_headers``) against the
    torch ops it replaces (``backend.check_headers`` with the torch backend): the copied header
    words, the flag, and the payload filled with -1 words exactly when a header word differs
    (payloads wider than one program's block, several ranks)."""
    from shardsoftmax import backend

    if differ is not None and differ[0] >= n_ranks:
        pytest.skip("no such rank")
    head = 30
    g = torch.Generator().manual_seed(n_ranks * 7 + payload)
    words = torch.randint(-(2**31), 2**31 - 1, (n_ranks, 2 * head + payload), generator=g, dtype=torch.int64)
    agreed, gathered = (
        words[:, :head].to(torch.int32).contiguous(),
        words[:, head:].to(torch.int32).contiguous(),
    )
    gathered[:, :head] = agreed
    if differ is not None:
        gathered[differ] += 1
    want_gathered, want_out = gathered.clone(), torch.full((n_ranks * head + 2,), 7, dtype=torch.int32)
    with backend.use_backend("torch"):
        backend.check_headers(want_gathered, agreed, want_out)
    assert int(want_out[n_ranks * head]) == (differ is not None)
    assert bool((want_gathered[:, head:] == -1).all()) == (differ is not None)
    got_gathered, got_out = gathered.to(device), torch.full_like(want_out, 7, device=device)
    kernels.check_headers(got_gathered, agreed.to(device), got_out)
    assert torch.equal(got_gathered.cpu(), want_gathered)
    assert torch.equal(got_out.cpu()[:-1], want_out[:-1])

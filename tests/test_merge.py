"""The partials monoid (``shardsoftmax.partials``): splitting a row's columns into contiguous
pieces, in any number (empty pieces included), and merging the pieces' partials in any order and
grouping gives the whole row's partials; ``identity`` is neutral; ``topk_select`` follows the
documented order; the Triton kernel's column splits merge to its unsplit result."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsoftmax import kernels
from shardsoftmax import reference as R
from shardsoftmax.backend import triton_interpreted
from shardsoftmax.partials import (
    ID_SENTINEL,
    Partials,
    finalize,
    identity,
    merge,
    merge_stacked,
    stack,
    topk_select,
)

INF = float("inf")
NAN = float("nan")
IGNORE = -100
EPS32 = torch.finfo(torch.float32).eps
PROPERTY = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Logit values: few distinct ones (ties), -inf, and arbitrary fp32 numbers.
logit = st.one_of(
    st.sampled_from([-INF, -2.0, -0.5, 0.0, 0.5, 1.0, 3.0]),
    st.floats(-30, 30, width=32),
)


@st.composite
def split_rows(draw, *, with_nan: bool = False):
    """(logits [N, V], target [N], k, cut points, vocab_start, rng for merge order)."""
    n = draw(st.integers(1, 3))
    v = draw(st.integers(0, 24))
    values = draw(st.lists(logit, min_size=n * v, max_size=n * v))
    x = torch.tensor(values, dtype=torch.float32).reshape(n, v)
    if draw(st.booleans()) and v > 0:
        x[draw(st.integers(0, n - 1))] = -INF  # a fully masked row
    if with_nan and v > 0:
        x[0, draw(st.integers(0, v - 1))] = NAN
    start = draw(st.sampled_from([0, 7, 1000]))
    # in the row, ignored, or just outside it
    one_target = st.integers(start, start + max(v - 1, 0)) | st.sampled_from([IGNORE, start - 1, start + v])
    target = torch.tensor(draw(st.lists(one_target, min_size=n, max_size=n)))
    k = draw(st.integers(0, 8))
    cuts = sorted(draw(st.lists(st.integers(0, v), max_size=6)))
    rng = draw(st.randoms(use_true_random=False))
    return x, target, k, cuts, start, rng


def partials_of(x, target, *, k, start, lo=0, hi=None):
    hi = x.shape[1] if hi is None else hi
    return R.shard_partials(
        x[:, lo:hi].contiguous(), target, k=k, n_valid_cols=hi - lo, vocab_start=start + lo,
        ignore_index=IGNORE, softcap=None, temperature=1.0,
    )  # fmt: skip


def pieces_of(x, target, *, k, start, cuts):
    bounds = [0, *cuts, x.shape[1]]
    return [partials_of(x, target, k=k, start=start, lo=a, hi=b) for a, b in zip(bounds, bounds[1:])]


def random_tree_merge(parts: list[Partials], rng: random.Random) -> Partials:
    """Merge in a random order and a random tree shape (merge is commutative and associative)."""
    parts = list(parts)
    rng.shuffle(parts)
    while len(parts) > 1:
        i = rng.randrange(len(parts) - 1)
        parts[i : i + 2] = [merge(parts[i], parts[i + 1])]
    return parts[0]


def assert_same_partials(got: Partials, want: Partials, what: str, *, xmax: float = 30.0) -> None:
    """Exact for max, counts, target and top-k; fp32 rounding for the sums and the finalized lse
    and entropy (``xmax`` bounds the finite |logits|, which sets the sums' rounding)."""
    for name in ("max", "count", "target_logit", "target_hits", "topk_vals", "topk_ids"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True, msg=f"{what}: {name}"
        )
    tol = 64 * EPS32
    s = want.sumexp
    bounds = {  # a bound on each sum's fp32 rounding error, per row
        "sumexp": tol * (s.abs() + 1),
        "sumexp_x": tol * (s.abs() + 1) * (xmax + 1),
        "sum_x": tol * (want.count + 1) * (xmax + 1),
    }
    fin_got, fin_want = finalize(got), finalize(want)
    row = (fin_want.lse.abs() + want.max.abs() + 1).nan_to_num(1.0, 1.0, 1.0)
    bounds["lse"] = bounds["entropy"] = tol * row
    pairs = {n: (getattr(got, n), getattr(want, n)) for n in ("sumexp", "sumexp_x", "sum_x")}
    pairs |= {n: (getattr(fin_got, n), getattr(fin_want, n)) for n in ("lse", "entropy")}
    # Rows holding a NaN (max is NaN): the raw sums mean nothing; lse and entropy must be NaN.
    nan_rows = want.max.isnan()
    assert fin_got.lse[nan_rows].isnan().all() and fin_got.entropy[nan_rows].isnan().all(), what
    for name, (a, b) in pairs.items():
        a, b = a[~nan_rows], b[~nan_rows]
        assert torch.equal(a.isnan(), b.isnan()), (
            f"{what}: {name} NaN at {a.isnan().tolist()} vs {b.isnan().tolist()}"
        )
        assert torch.equal(a[b.isinf()], b[b.isinf()]), f"{what}: {name} infinities"
        fin = b.isfinite()
        err = (a - b).abs()[fin]
        assert (err <= bounds[name][~nan_rows][fin]).all(), f"{what}: {name} {a.tolist()} vs {b.tolist()}"


@PROPERTY
@given(split_rows())
def test_any_split_and_merge_order_gives_the_whole(case):
    x, target, k, cuts, start, rng = case
    whole = partials_of(x, target, k=k, start=start)
    parts = pieces_of(x, target, k=k, start=start, cuts=cuts)
    assert_same_partials(random_tree_merge(parts, rng), whole, "tree merge")
    order = list(range(len(parts)))
    rng.shuffle(order)
    assert_same_partials(merge_stacked(stack([parts[i] for i in order])), whole, "merge_stacked")


@PROPERTY
@given(split_rows())
def test_identity_is_neutral(case):
    x, target, k, cuts, start, _ = case
    for p in pieces_of(x, target, k=k, start=start, cuts=cuts):
        e = identity(x.shape[0], k)
        for merged in (merge(e, p), merge(p, e), merge_stacked(stack([e, p, e]))):
            for name, field in merged._asdict().items():
                torch.testing.assert_close(field, getattr(p, name), rtol=0, atol=0, equal_nan=True, msg=name)


@PROPERTY
@given(split_rows())
def test_masked_rows_and_empty_pieces_make_no_nan(case):
    """-inf columns, fully -inf rows and empty pieces: max and sumexp never become NaN."""
    x, target, k, cuts, start, rng = case
    merged = random_tree_merge(pieces_of(x, target, k=k, start=start, cuts=cuts), rng)
    assert not merged.max.isnan().any() and not merged.sumexp.isnan().any()
    assert not merged.sumexp_x.isnan().any()
    masked = (x == -INF).all(dim=1)
    assert (merged.max[masked] == -INF).all() and (merged.sumexp[masked] == 0).all()
    assert (finalize(merged).lse[masked] == -INF).all()


@PROPERTY
@given(split_rows(with_nan=True))
def test_nan_propagates_through_any_merge(case):
    x, target, k, cuts, start, rng = case
    if x.shape[1] == 0:
        return
    merged = random_tree_merge(pieces_of(x, target, k=k, start=start, cuts=cuts), rng)
    fin = finalize(merged)
    assert fin.lse[0].isnan() and fin.max[0].isnan() and fin.entropy[0].isnan(), "row 0 holds a NaN"
    if k > 0:
        assert merged.topk_vals[0, 0].isnan(), "NaN ranks first"
    whole = partials_of(x, target, k=k, start=start)
    assert_same_partials(merged, whole, "with NaN")


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("pieces", [1, 2, 5])
def test_merge_of_pieces_without_rows(pieces, k):
    """N = 0 (an empty batch) with several pieces: column splits on a GPU, or ranks of a group."""
    merged = merge_stacked(stack([identity(0, k) for _ in range(pieces)]))
    assert merged.max.shape == (0,) and merged.topk_ids.shape == (0, k)
    assert finalize(merged).lse.shape == (0,)


# ------------------------------------------------------------------------------------------------
# topk_select against a brute-force sort
# ------------------------------------------------------------------------------------------------


def brute_topk(vals: list[float], ids: list[int], k: int):
    """Value descending with NaN above everything; equal values: the lower id first."""

    def key(pair):
        v, i = pair
        return (0, 0.0, i) if math.isnan(v) else (1, -v, i)

    best = sorted(zip(vals, ids), key=key)[:k]
    return [v for v, _ in best], [i for _, i in best]


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.sampled_from([NAN, INF, -INF, -1.0, 0.0, 0.5, 2.0]) | st.floats(-5, 5, width=32),
                     min_size=n, max_size=n),
            st.lists(st.integers(0, 10**6) | st.just(ID_SENTINEL), min_size=n, max_size=n, unique=True),
            st.integers(0, n),
        )
    )
)  # fmt: skip
def test_topk_select_matches_brute_force(case):
    vals, ids, k = case
    got_v, got_i = topk_select(torch.tensor([vals], dtype=torch.float32), torch.tensor([ids]), k)
    want_v, want_i = brute_topk(torch.tensor(vals, dtype=torch.float32).tolist(), ids, k)
    assert got_i[0].tolist() == want_i
    torch.testing.assert_close(
        got_v[0], torch.tensor(want_v, dtype=torch.float32), rtol=0, atol=0, equal_nan=True
    )


def test_topk_select_negative_zero_ties_with_zero():
    vals = torch.tensor([[-0.0, 0.0, -0.0, 1.0]])
    _, ids = topk_select(vals, torch.tensor([[5, 3, 1, 9]]), 4)
    assert ids.tolist() == [[9, 1, 3, 5]]


# ------------------------------------------------------------------------------------------------
# The Triton kernel's column splits
# ------------------------------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(
    not triton_interpreted(), reason="CPU Triton needs TRITON_INTERPRET=1 (unset because CUDA is present)"
)
KERNEL_DEVICES = [
    pytest.param("cpu", marks=needs_interpreter, id="cpu-triton"),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or triton_interpreted(), reason="needs a CUDA GPU"
        ),
        id="cuda-triton",
    ),
]
# (k, tile (ROWS, CHUNK), V): tiles small enough that V spans at least 6 of them, and chunks
# small enough that some splits have more groups of chunks than 2k (the threshold path) and
# others fewer (every chunk is a candidate).
SPLIT_CASES = [
    (0, (2, 64), 1000),
    (5, (2, 32), 1000),
    (5, (4, 16), 1000),
    (33, (4, 16), 1000),
    (200, (4, 8), 1000),
]
SPLIT_IDS = [f"k{k}-{tile[0]}x{tile[1]}" for k, tile, _ in SPLIT_CASES]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(("k", "tile", "v"), SPLIT_CASES, ids=SPLIT_IDS)
@pytest.mark.parametrize("n_splits", [2, 3])
def test_kernel_column_splits_merge_to_one_split(device, k, tile, v, n_splits):
    vocab_start = 40
    g = torch.Generator().manual_seed(k)
    x = (torch.round(torch.randn(2, v, generator=g) * 48) / 16).to(device)  # ties across splits
    x[1, v // 2 :] = -INF
    target = torch.tensor([vocab_start + v - 1, vocab_start + 3], device=device)
    kw = dict(
        k=k, n_valid_cols=v - 3, vocab_start=vocab_start, ignore_index=IGNORE, softcap=None, temperature=1.0,
        tile=tile,
    )  # fmt: skip

    def run(splits):
        stats, vals, ids = kernels.shard_partials(x, target, n_splits=splits, **kw)
        return Partials(*stats.unbind(0), vals, ids)

    pieces = Partials(*(f.cpu() for f in run(n_splits)))
    assert pieces.max.shape[0] == n_splits, "the tile is small enough for the requested splits"
    whole = Partials(*(f.cpu() for f in merge_stacked(run(1))))
    assert_same_partials(merge_stacked(pieces), whole, f"{n_splits} splits")
    ref_kw = {a: b for a, b in kw.items() if a not in ("tile", "n_valid_cols", "vocab_start")}
    assert_same_partials(
        whole, partials_of(x.cpu(), target.cpu(), k=k, start=vocab_start, hi=v - 3), "kernel vs reference"
    )
    # Each split is the reference's partials of its own columns (its count says how many).
    bounds = [0, *pieces.count[:, 0].cumsum(0).long().tolist()]
    assert bounds[-1] == v - 3
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        ref = R.shard_partials(
            x.cpu()[:, lo:hi], target.cpu(), n_valid_cols=hi - lo, vocab_start=vocab_start + lo, **ref_kw
        )
        assert_same_partials(Partials(*(f[i] for f in pieces)), ref, f"split {i} [{lo}, {hi})")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("k", [5, 33])
def test_kernel_topk_nan_row_and_ties(device, k):
    """The streaming loop skips NaN in the chunk maxima (it only makes the row's sum NaN); a row
    holding a NaN is re-scanned so that NaN ranks first, as in torch.topk. Ties by id."""
    v, vocab_start = 1000, 7
    g = torch.Generator().manual_seed(k)
    x = torch.round(torch.randn(3, v, generator=g) * 48) / 16  # many ties
    x[1, 500] = float("nan")
    x = x.to(device)
    kw = dict(
        k=k, n_valid_cols=v, vocab_start=vocab_start, ignore_index=IGNORE, softcap=None, temperature=1.0
    )
    stats, vals, ids = kernels.shard_partials(x, None, tile=(4, 16), n_splits=1, **kw)
    got = Partials(*(f.cpu() for f in merge_stacked(Partials(*stats.unbind(0), vals, ids))))
    want = partials_of(x.cpu(), None, k=k, start=vocab_start, hi=v)
    torch.testing.assert_close(got.topk_vals, want.topk_vals, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.topk_ids, want.topk_ids), "NaN ranks first, then ties by id"
    assert got.topk_ids[1, 0] == vocab_start + 500
    # The NaN row's raw max is the kernels' own business (finalize makes the row NaN).
    rows = [0, 2]
    assert_same_partials(Partials(*(f[rows] for f in got)), Partials(*(f[rows] for f in want)), "rows 0, 2")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_topk_rows_in_several_launches(device, monkeypatch):
    """When the chunk maxima of all rows would outgrow CM_MAX_BYTES, the rows go through the two
    top-k kernels in blocks; every block writes its own rows of the outputs (here 2 rows, then 1)."""
    v, k, tile = 1000, 5, (4, 16)
    cm_bytes_per_row = 4 * math.ceil(v / (tile[0] * tile[1])) * tile[0]
    monkeypatch.setattr(kernels.partials, "CM_MAX_BYTES", 2 * cm_bytes_per_row)
    x = torch.round(torch.randn(3, v, generator=torch.Generator().manual_seed(3)) * 48) / 16
    x[2, 10] = float("nan")
    target = torch.tensor([4, 999, IGNORE])
    kw = dict(k=k, n_valid_cols=v, vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0)
    stats, vals, ids = kernels.shard_partials(x.to(device), target.to(device), tile=tile, n_splits=1, **kw)
    got = Partials(*(f.cpu() for f in merge_stacked(Partials(*stats.unbind(0), vals, ids))))
    want = partials_of(x, target, k=k, start=0, hi=v)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert got.topk_ids[2, 0] == 10, "NaN ranks first in the second block too"
    assert_same_partials(Partials(*(f[:2] for f in got)), Partials(*(f[:2] for f in want)), "rows 0, 1")

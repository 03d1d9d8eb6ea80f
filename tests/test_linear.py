"""The LM head: ``linear_softmax_stats`` / ``linear_cross_entropy`` against the float64 oracle
(``hidden.double() @ weight.double().T (+ bias)`` then the existing oracles), on every core tier,
for both implementations: ``impl="chunked"`` (torch.mm per block of rows in forward and per
vocabulary chunk in "recompute"'s backward + the shard kernels; the oracle tests force several
blocks and chunks per shard, the last one smaller) and ``impl="fused"`` (the Triton kernels of
kernels/linear.py).

Accuracy rule (as in test_core / test_grad): our error against float64 is at most 4x the error of
PyTorch's own computation of the same thing in the inputs' precision, plus a few fp32 epsilons.
PyTorch's computation here is the unfused path: ``F.linear`` in the inputs' dtype (so bf16/fp16
logits are rounded, as they would be in a model), then the oracle formulas in fp32, and autograd
back through that matmul. Top-k ids are compared exactly on inputs whose top logits are well
separated (the test checks the gap) where the logits are not rounded (the fused path, fp32, fp64);
the chunked path rounds bf16/fp16 logits as F.linear does, so there the values at its ids must be
the oracle's top-k values within that rounding (near-ties may order either way).

Also: vocabulary splits and chunking inside the kernels, what backward saves, the nn head's fused
and unfused paths, argument errors, and gloo process groups of 2 and 3 ranks (uneven, padded).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
import triton
from shardsoftmax.kernels import linear as KL

import shardsoftmax as ss
from shardsoftmax import kernels
from shardsoftmax import linear as L
from shardsoftmax import reference as R
from shardsoftmax.nn import VocabParallelLMHead
from shardsoftmax.partials import Partials, Pieces, merge_stacked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import count_collectives, run_ranks  # noqa: E402
from test_core import assert_ids_equal, assert_like_torch, row_scale  # noqa: E402
from test_grad import assert_grad_like_torch  # noqa: E402

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class Case(NamedTuple):
    name: str
    n: int
    h: int
    v: int  # weight rows (V_shard), padding included
    dtype: str
    bias: bool
    opts: dict  # transform / loss options
    vocab_size: int | None = None  # real columns (global), None: all
    vocab_start: int = 0
    k: int = 0


def make_inputs(case: Case, seed: int = 0):
    """hidden [n, h], weight [v, h], bias [v] or None, targets (every 4th ignored) in the case's
    real vocabulary. Logits ~ N(0, 2^2); padding rows of weight and bias are 0, as in a model."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    hidden = torch.randn(case.n, case.h, generator=g, dtype=torch.float64).to(dt)
    weight = (torch.randn(case.v, case.h, generator=g, dtype=torch.float64) * 2 / case.h**0.5).to(dt)
    bias = (torch.randn(case.v, generator=g, dtype=torch.float64) * 0.5).to(dt) if case.bias else None
    real = (case.vocab_size or case.vocab_start + case.v) - case.vocab_start
    weight[real:] = 0
    if bias is not None:
        bias[real:] = 0
    target = torch.randint(0, real, (case.n,), generator=g) + case.vocab_start
    target[3::4] = case.opts.get("ignore_index", IGNORE)
    return hidden, weight, bias, target


def layout(case: Case) -> dict:
    kw = {}
    if case.vocab_size is not None:
        kw["vocab_size"] = case.vocab_size
    if case.vocab_start:
        kw["vocab_start"] = case.vocab_start
    return kw


def oracle_logits(case: Case, hidden, weight, bias, dtype=torch.float64):
    """The real columns of the logits: float64 truth, or PyTorch's F.linear in ``dtype``."""
    real = (case.vocab_size or case.vocab_start + case.v) - case.vocab_start
    if dtype == torch.float64:
        x = R.oracle_linear_logits(hidden, weight, bias)
    else:
        x = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return x[..., :real]


def local_target(case: Case, target: torch.Tensor) -> torch.Tensor:
    ignore = case.opts.get("ignore_index", IGNORE)
    return torch.where(target == ignore, target, target - case.vocab_start)


def on(tier, *tensors):
    return tuple(None if t is None else t.to(tier.device) for t in tensors)


IMPLS = ["chunked", "fused"]


def three_chunks(case: Case) -> int:
    """Columns per chunk that cut the case's real columns into 3 chunks, the last one narrower."""
    real = (case.vocab_size or case.vocab_start + case.v) - case.vocab_start
    return -(-real // 3) + 1


def use_impl(monkeypatch, impl: str, n_rows: int, dtype: torch.dtype, cols: int) -> dict:
    """The keyword that selects ``impl``; for "chunked" and "recompute", forward blocks of
    n_rows x cols logits of ``dtype`` (n_rows x cols / real columns rows each), backward chunks of
    ``cols`` columns (CHUNK_BYTES), and, for the eager forward of "chunked", blocks of
    ceil(n_rows / 3) rows (3 blocks for n_rows > 3, the last one padded when shorter)."""
    if impl in ("chunked", "recompute"):
        itemsize = torch.empty((), dtype=dtype).element_size()
        monkeypatch.setattr(L, "CHUNK_BYTES", n_rows * cols * itemsize)
        monkeypatch.setattr(L, "FORWARD_BLOCK_BYTES", n_rows * cols * itemsize)
        assert L.chunk_cols(n_rows, itemsize) == cols
        monkeypatch.setattr(L, "EAGER_ROWS", max(1, -(-n_rows // 3)))
        monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    return {"impl": impl}


def assert_topk_within_rounding(ids, x64, k: int, dtype: torch.dtype, what: str) -> None:
    """``ids`` (local, [N, k]) hold the float64 logits' top-k values, each within the rounding of
    the logits to ``dtype`` (2 ulps), in descending order of those values up to the same slack."""
    ids = ids.cpu()
    assert ids.shape == (x64.shape[0], k) and ids.dtype == torch.int64, what
    assert ((ids >= 0) & (ids < x64.shape[1])).all(), f"{what}: id out of range"
    assert (torch.sort(ids, dim=-1).values.diff(dim=-1) != 0).all(), f"{what}: repeated id"
    vals = x64.gather(1, ids)
    top = torch.topk(x64, k, dim=-1).values
    slack = 2 * torch.finfo(dtype).eps * top.abs().amax(dim=-1, keepdim=True)
    assert ((vals - top).abs() <= slack).all(), f"{what}: values at our ids {vals} vs top-k {top}"


# ------------------------------------------------------------------------------------------------
# linear_softmax_stats
# ------------------------------------------------------------------------------------------------

STATS_CASES = [
    Case("tiny", 1, 16, 7, "fp32", True, {}),
    Case(
        "bf16-padded-softcap", 5, 40, 100, "bf16", False, {"softcap": 5.0, "temperature": 0.8}, vocab_size=97
    ),
    Case("fp16-offset-ignore5", 33, 16, 257, "fp16", True, {"ignore_index": 5}, vocab_start=11),
    Case("fp32-topk", 5, 40, 257, "fp32", True, {"temperature": 1.3}, k=5),
    Case("bf16-topk-padded", 5, 16, 100, "bf16", False, {}, vocab_size=90, k=3),
    Case("fp64", 5, 40, 100, "fp64", True, {"softcap": 3.0}, k=2),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: c.name)
def test_linear_stats_match_oracle(core_tier, case, impl, monkeypatch):
    hidden, weight, bias, target = make_inputs(case, seed=len(case.name))
    tf = {k: v for k, v in case.opts.items() if k in ("softcap", "temperature")}
    ignore = case.opts.get("ignore_index", IGNORE)
    h, w, b, t = on(core_tier, hidden, weight, bias, target)
    opts = {**tf, **layout(case), **use_impl(monkeypatch, impl, case.n, hidden.dtype, three_chunks(case))}
    got = ss.linear_softmax_stats(h, w, t, bias=b, k=case.k, ignore_index=ignore, **opts)
    assert got.lse.device.type == core_tier.device and got.topk_ids.shape == (case.n, case.k)
    want_dtype = torch.float64 if case.dtype == "fp64" else torch.float32
    assert got.lse.dtype == want_dtype

    tl = local_target(case, target)
    x64 = oracle_logits(case, hidden, weight, bias)
    ref = R.oracle_stats(x64, tl, k=case.k, ignore_index=ignore, **tf)
    if case.dtype == "fp64":
        for f in ("lse", "max", "entropy", "target_logprob", "topk_logprobs"):
            torch.testing.assert_close(getattr(got, f).cpu(), ref[f], rtol=1e-12, atol=1e-12, msg=f)
        assert_ids_equal(got.topk_ids - case.vocab_start, ref["topk_ids"], f"{impl} topk_ids")
        return
    base = R.oracle_stats(oracle_logits(case, hidden, weight, bias, DTYPES[case.dtype]), tl, k=case.k,
                          ignore_index=ignore, **tf)  # fmt: skip
    rs = row_scale(ref)
    for f in ("lse", "max", "entropy"):
        assert_like_torch(getattr(got, f), ref[f], base[f], rs, what=f"{case.name} {f}")
    tl_scale = ref["target_logprob"].abs() + rs
    assert_like_torch(got.target_logprob, ref["target_logprob"], base["target_logprob"], tl_scale,
                      what=f"{case.name} target_logprob")  # fmt: skip
    assert torch.all(got.target_logprob.cpu()[target == ignore] == 0)
    if case.k:
        local_ids = got.topk_ids.cpu() - case.vocab_start
        if impl == "chunked" and case.dtype != "fp32":  # logits rounded to bf16 / fp16
            assert_topk_within_rounding(local_ids, x64, case.k, hidden.dtype, f"{case.name} topk_ids")
        else:
            top = torch.sort(x64, dim=-1, descending=True).values[:, : case.k + 1]
            assert (top[:, :-1] - top[:, 1:]).min() > 1e-3, "test inputs: top logits not well separated"
            assert_ids_equal(local_ids, ref["topk_ids"], f"{case.name} {impl} topk_ids")
        lp_scale = ref["topk_logprobs"].abs() + rs[:, None]
        assert_like_torch(got.topk_logprobs, ref["topk_logprobs"], base["topk_logprobs"], lp_scale,
                          what=f"{case.name} topk_logprobs")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy: loss and the gradients of hidden, weight and bias
# ------------------------------------------------------------------------------------------------

CE_CASES = [
    Case("plain-bias", 5, 40, 100, "fp32", True, {}),
    Case("tiny", 1, 16, 7, "fp32", True, {"label_smoothing": 0.1}),
    Case("bf16-smooth-z", 33, 16, 257, "bf16", False, {"label_smoothing": 0.1, "z_loss": 1e-3}),
    Case("fp16-softcap-temp-padded-offset", 5, 40, 100, "fp16", True,
         {"softcap": 4.0, "temperature": 0.7, "z_loss": 1e-2}, vocab_size=107, vocab_start=10),
    Case("bf16-all-padded", 5, 40, 100, "bf16", True,
         {"label_smoothing": 0.2, "softcap": 3.0, "temperature": 1.5, "ignore_index": 2}, vocab_size=96),
]  # fmt: skip


def assert_like_oracle(case: Case, inputs, target, reduction: str, up, loss, got: dict, what: str) -> None:
    """``loss`` and the gradients ``got`` ({"hidden", "weight", "bias"}: tensor or None) of the
    case's ``inputs`` (hidden, weight, bias) against the float64 oracle, within 4x the error of
    PyTorch's unfused path in the inputs' dtype (see the module docstring), for the gradient
    ``up`` of the loss."""
    tl = local_target(case, target)
    results = {}
    for dt in (torch.float64, DTYPES[case.dtype]):  # the truth, and PyTorch's unfused path
        leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in inputs]
        x = oracle_logits(case, *leaves, dtype=dt)
        ref_loss = R.oracle_cross_entropy(x, tl, reduction=reduction, **case.opts)
        ref_loss.backward(up.to(ref_loss.dtype))
        results[dt] = (
            ref_loss.detach(),
            dict(zip(("hidden", "weight", "bias"), [None if v is None else v.grad for v in leaves])),
        )
    (loss64, g64), (loss_low, g_low) = results[torch.float64], results[DTYPES[case.dtype]]
    assert_like_torch(loss.detach(), loss64, loss_low, loss64.abs() + 1, what=f"{case.name} {what} loss")
    for name in ("hidden", "weight", "bias"):
        if got[name] is None:
            assert inputs[2] is None and name == "bias"
            continue
        mine, ref, base = got[name].cpu(), g64[name], g_low[name]
        assert_grad_like_torch(mine, ref, base, f"{case.name} {what} grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: c.name)
def test_linear_cross_entropy_and_grads_match_oracle(core_tier, case, reduction, impl, monkeypatch):
    hidden, weight, bias, target = make_inputs(case, seed=len(case.name) + 1)
    real = (case.vocab_size or case.vocab_start + case.v) - case.vocab_start
    h, w, b, t = on(core_tier, hidden, weight, bias, target)
    h.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    opts = {
        **case.opts,
        **layout(case),
        **use_impl(monkeypatch, impl, case.n, hidden.dtype, three_chunks(case)),
    }
    loss = ss.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, **opts)
    up = torch.linspace(0.5, 1.5, case.n, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    loss.backward(up.to(loss.dtype).to(loss.device))
    got = {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}
    assert got["hidden"].dtype == hidden.dtype and got["weight"].dtype == weight.dtype

    assert_like_oracle(case, (hidden, weight, bias), target, reduction, up, loss, got, f"{reduction} {impl}")
    assert torch.all(got["weight"].cpu()[real:] == 0), "padding rows of weight get no gradient"
    if case.bias:
        assert torch.all(got["bias"].cpu()[real:] == 0), "padding entries of bias get no gradient"
    ignored = target == case.opts.get("ignore_index", IGNORE)
    assert torch.all(got["hidden"].cpu()[ignored] == 0), "ignored rows get no gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_matches_unfused_api(core_tier, impl):
    """fp32: the LM head functions (one chunk by default) and F.linear + the unfused API agree
    (loss, stats, gradients)."""
    case = Case("unfused", 6, 40, 100, "fp32", True, {"label_smoothing": 0.1, "z_loss": 1e-3})
    hidden, weight, bias, target = on(core_tier, *make_inputs(case, seed=9))
    opts = {**case.opts, "softcap": 6.0, "vocab_size": 98}
    grads = []
    for fused in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        if fused:
            loss = ss.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], impl=impl, **opts)
        else:
            loss = ss.cross_entropy(F.linear(*leaves), target, **opts)
        loss.backward()
        grads.append((loss.detach(), *(x.grad for x in leaves)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    st = ss.linear_softmax_stats(
        hidden, weight, target, bias=bias, k=4, softcap=6.0, vocab_size=98, impl=impl
    )
    ref = ss.softmax_stats(F.linear(hidden, weight, bias), target, k=4, softcap=6.0, vocab_size=98)
    for f in ("lse", "max", "entropy", "target_logprob", "topk_logprobs"):
        torch.testing.assert_close(getattr(st, f), getattr(ref, f), rtol=1e-5, atol=1e-6, msg=f)
    assert torch.equal(st.topk_ids, ref.topk_ids)


def test_frozen_parameters(core_tier):
    """Only hidden (or only weight) needs a gradient, the bias is frozen: the bias still enters the
    recomputed logits, and the frozen tensors get no gradient."""
    case = Case("frozen", 6, 16, 60, "fp32", True, {"z_loss": 1e-2})
    hidden, weight, bias, target = make_inputs(case, seed=10)
    for trained in ("hidden", "weight"):
        h, w, b, t = on(core_tier, hidden.clone(), weight.clone(), bias, target)  # leaves on the device
        leaves = {"hidden": h, "weight": w}
        leaves[trained].requires_grad_(True)
        ss.linear_cross_entropy(h, w, t, bias=b, z_loss=1e-2).backward()
        ref = {k: v.detach().cpu().double().requires_grad_(k == trained) for k, v in leaves.items()}
        loss64 = R.oracle_linear_cross_entropy(ref["hidden"], ref["weight"], target, bias=bias, z_loss=1e-2)
        (g64,) = torch.autograd.grad(loss64, ref[trained])
        got = (h if trained == "hidden" else w).grad
        torch.testing.assert_close(got.cpu().double(), g64, rtol=1e-5, atol=1e-6)
        assert (w if trained == "hidden" else h).grad is None and b.grad is None


@pytest.mark.parametrize("impl", ["recompute", "chunked"])
def test_backward_saves_no_logits(core_tier, impl):
    """Nothing of size N x V is saved. "recompute": hidden, weight and bias themselves and per-row
    tensors. "chunked" (eager): only the gradients its forward computed, in fp32 ([N, H], and the
    real rows [V - 2, H] and [V - 2] of weight and bias), none of the inputs."""
    case = Case("saved", 8, 16, 300, "fp32", True, {})
    hidden, weight, bias, target = on(core_tier, *make_inputs(case))
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = ss.linear_cross_entropy(
            leaves[0], leaves[1], target, bias=leaves[2], impl=impl, vocab_size=298
        )
    inputs = {x.data_ptr() for x in leaves}
    others = [s for s in saved if s.data_ptr() not in inputs]
    if impl == "recompute":
        assert sum(s.numel() for s in others) <= 8 * case.n, [tuple(s.shape) for s in others]
    else:
        assert len(others) == len(saved) == 3, [tuple(s.shape) for s in saved]
        assert [tuple(s.shape) for s in saved] == [(8, 16), (298, 16), (298,)]
        assert all(s.dtype == torch.float32 for s in saved)
    loss.backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def test_out_of_range_target_gives_nan_in_its_row(core_tier):
    case = Case("oor", 4, 16, 50, "fp32", False, {})
    hidden, weight, _, target = make_inputs(case, seed=3)
    target[1] = 50  # outside [0, 50) and not ignore_index
    h, w, t = on(core_tier, hidden, weight, target)
    h.requires_grad_(True)
    rows = ss.linear_cross_entropy(h, w, t, reduction="none")
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2]]).all()
    rows.sum().backward()
    assert h.grad[1].isnan().all() and torch.isfinite(h.grad[[0, 2, 3]]).all()
    h.grad = None
    loss = ss.linear_cross_entropy(h, w, t, reduction="sum")  # the eager forward
    assert loss.isnan()
    loss.backward()
    assert h.grad[1].isnan().all() and torch.isfinite(h.grad[[0, 2, 3]]).all()


# ------------------------------------------------------------------------------------------------
# The chunked path: chunk boundaries, narrow chunks, a shard of padding only
# ------------------------------------------------------------------------------------------------


@pytest.mark.core_tiers("cpu-torch", "cuda-triton")  # k > a chunk's 32-column blocks: slow interpreted
def test_chunked_narrow_chunks_cover_the_shard_once(core_tier, monkeypatch):
    """Chunks of 3 columns (fewer than k = 5) over 40 columns, 37 real, at vocab_start 5: the
    gradients (``impl="recompute"``'s backward) go by vocabulary chunks at most 3 wide, the top-k
    stats and the loss's forward by blocks of rows (here one row each) over every real column;
    each covers the real columns once (padding: none), and the results (top-k ids exact) equal
    the float64 oracle and the one-block path."""
    case = Case("narrow", 6, 16, 40, "fp32", True, {"z_loss": 1e-3}, vocab_size=42, vocab_start=5, k=5)
    hidden, weight, bias, target = make_inputs(case, seed=12)
    h, w, b, t = on(core_tier, hidden, weight, bias, target)
    seen = []
    original = L._logits_chunk

    def spy(hidden2d, weight_, bias_, c0, c1, buf):
        seen.append((c0, c1))
        return original(hidden2d, weight_, bias_, c0, c1, buf)

    out = {}
    for cols in (3, None):
        if cols:
            use_impl(monkeypatch, "chunked", case.n, hidden.dtype, cols)
            monkeypatch.setattr(L, "_logits_chunk", spy)
        else:
            monkeypatch.undo()
        st = ss.linear_softmax_stats(h, w, t, bias=b, k=case.k, **layout(case))
        leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
        loss = ss.linear_cross_entropy(
            leaves[0], leaves[1], t, bias=leaves[2], z_loss=1e-3, impl="recompute", **layout(case)
        )
        loss.backward()
        out[cols] = [st.lse, st.entropy, st.target_logprob, st.topk_logprobs, loss.detach()]
        out[cols] += [x.grad for x in leaves]
        if cols:
            ids = st.topk_ids
    spans = [(c0, min(c0 + 3, 37)) for c0 in range(0, 37, 3)]
    # forward stats and forward loss: blocks of rows, here one row each, over all 37 real columns;
    # backward: 13 vocabulary chunks, the last of 1
    assert seen == [(0, 37)] * case.n * 2 + spans, seen
    x64 = oracle_logits(case, hidden, weight, bias)
    top = torch.sort(x64, dim=-1, descending=True).values[:, : case.k + 1]
    assert (top[:, :-1] - top[:, 1:]).min() > 1e-3, "test inputs: top logits not well separated"
    ref = R.oracle_stats(x64, local_target(case, target), k=case.k)
    assert_ids_equal(ids.cpu() - case.vocab_start, ref["topk_ids"], "narrow chunks topk_ids")
    torch.testing.assert_close(out[3][0].cpu().double(), ref["lse"], rtol=1e-5, atol=1e-5)
    for a, b_ in zip(out[3], out[None]):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
@pytest.mark.parametrize("splits", [1, 2])
def test_chunked_topk_by_row_blocks(core_tier, monkeypatch, splits):
    """Top-k stats of the chunked path go by blocks of rows (here 3, 3 and 1 of 7 rows) over every
    real column, each block's column splits merged first (``splits`` = 2 forces them): the same
    results as one chunk of everything, top-k ids exact."""
    from shardsoftmax.kernels import partials as KP

    case = Case("rows", 7, 16, 90, "fp32", True, {}, vocab_size=88, vocab_start=3, k=4)
    hidden, weight, bias, target = on(core_tier, *make_inputs(case, seed=21))
    whole = ss.linear_softmax_stats(hidden, weight, target, bias=bias, k=case.k, **layout(case))
    monkeypatch.setattr(L, "FORWARD_BLOCK_BYTES", 3 * 85 * 4)  # 3 rows of the 85 real fp32 columns (88 - 3)
    monkeypatch.setattr(KP, "default_splits", lambda n_rows, n_tiles, device, k=0: splits)
    monkeypatch.setattr(KP, "tile_shape", lambda n_cols, k, fused=None: (2, 16))  # 3 tiles of 32 columns
    seen = []
    original = L._logits_chunk

    def spy(hidden2d, weight_, bias_, c0, c1, buf):
        seen.append((hidden2d.shape[0], c0, c1))
        return original(hidden2d, weight_, bias_, c0, c1, buf)

    monkeypatch.setattr(L, "_logits_chunk", spy)
    pieces = []
    original_pieces = L.backend.shard_pieces

    def spy_pieces(*a, **kw):
        p = original_pieces(*a, **kw)
        pieces.append(p.n_splits)
        return p

    monkeypatch.setattr(L.backend, "shard_pieces", spy_pieces)
    got = ss.linear_softmax_stats(hidden, weight, target, bias=bias, k=case.k, **layout(case))
    assert seen == [(3, 0, 85), (3, 0, 85), (1, 0, 85)], seen
    assert pieces == [splits] * 3, pieces  # the kernel's column splits, merged per block
    assert torch.equal(got.topk_ids, whole.topk_ids)
    for f in ("lse", "max", "entropy", "target_logprob", "topk_logprobs"):
        torch.testing.assert_close(getattr(got, f), getattr(whole, f), rtol=1e-6, atol=1e-6, msg=f)


@pytest.mark.parametrize("impl", ["chunked", "recompute", "fused"])
def test_shard_of_padding_only(core_tier, impl):
    """vocab_start past vocab_size: no real column. Stats and loss as the unfused API gives them
    (lse -inf), every gradient 0 (every impl, the eager forward of "chunked" included; the
    unfused ``cross_entropy`` too)."""
    case = Case("padding", 4, 16, 9, "fp32", True, {})
    hidden, weight, bias, _ = on(core_tier, *make_inputs(case, seed=4))
    target = torch.full((case.n,), IGNORE, device=core_tier.device)
    lay = {"vocab_start": 20, "vocab_size": 20}
    st = ss.linear_softmax_stats(hidden, weight, target, bias=bias, impl=impl, **lay)
    ref = ss.softmax_stats(F.linear(hidden, weight, bias), target, **lay)
    for f in ("lse", "max", "entropy", "target_logprob"):
        torch.testing.assert_close(getattr(st, f), getattr(ref, f), equal_nan=True, msg=f)
    assert (st.lse == float("-inf")).all()
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = ss.linear_cross_entropy(
        leaves[0], leaves[1], target, bias=leaves[2], reduction="sum", impl=impl, **lay
    )
    assert loss.item() == 0
    loss.backward()
    assert all(torch.all(x.grad == 0) for x in leaves)
    logits = F.linear(hidden, weight, bias).detach().requires_grad_(True)
    ss.cross_entropy(logits, target, reduction="sum", label_smoothing=0.1, **lay).backward()
    assert torch.all(logits.grad == 0)


# ------------------------------------------------------------------------------------------------
# The eager-gradient forward: impl="chunked" with gradients and a reduced loss
# ------------------------------------------------------------------------------------------------

EAGER_N, EAGER_ROWS = 13, 5  # 3 blocks of 5 rows, the last with 3 real rows and 2 of padding
EAGER_CASES = [  # (case, reduction, rows set to ignore_index besides make_inputs' every 4th)
    (Case("fp32-bias-mean", EAGER_N, 24, 60, "fp32", True, {}), "mean", []),
    (Case("fp32-block-ignored-sum", EAGER_N, 24, 60, "fp32", False, {"z_loss": 1e-3}), "sum", [5, 6, 8, 9]),
    (Case("bf16-smooth-softcap-padded-offset", EAGER_N, 24, 70, "bf16", True,
          {"label_smoothing": 0.1, "softcap": 4.0, "temperature": 0.8}, vocab_size=70, vocab_start=4),
     "sum", []),
    # ignore_index = 2, a real class: padding rows that did not carry it would count (or be NaN)
    (Case("fp16-ignore-real-class-z", EAGER_N, 24, 60, "fp16", False, {"ignore_index": 2, "z_loss": 1e-2}),
     "mean", [10, 12]),
]  # fmt: skip


def spy(fn, seen: list):
    """``fn``, appending its positional arguments to ``seen`` at each call."""

    def wrapped(*a, **kw):
        seen.append(a)
        return fn(*a, **kw)

    return wrapped


def leaves_like(inputs) -> list:
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]


def grads_of(leaves) -> dict:
    return dict(zip(("hidden", "weight", "bias"), (None if x is None else x.grad for x in leaves)))


def loss_and_grads(impl: str, inputs, target, up: float = 3.0, **kw):
    """The loss of ``impl`` on fresh leaves of ``inputs`` and their gradients after
    ``(up * loss).backward()``."""
    leaves = leaves_like(inputs)
    loss = ss.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], impl=impl, **kw)
    (up * loss).backward()
    return loss.detach(), grads_of(leaves)


@pytest.mark.parametrize(("case", "reduction", "ignored"), EAGER_CASES, ids=[c[0].name for c in EAGER_CASES])
def test_eager_matches_oracle_and_recompute(core_tier, case, reduction, ignored, monkeypatch):
    """13 rows in 3 blocks of 5 (the last padded) and grad_output 3 (``(3 * loss).backward()``,
    applied in backward): loss and gradients against the float64 oracle (as every impl), equal to
    the recomputing backward's in fp32; padding rows of weight and bias and ignored rows of hidden
    get 0 (a whole block ignored included)."""
    monkeypatch.setattr(L, "EAGER_ROWS", EAGER_ROWS)
    monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    assert L.eager_blocks(EAGER_N) == (5, [(0, 5), (5, 10), (10, 13)])
    hidden, weight, bias, target = make_inputs(case, seed=len(case.name))
    ignore = case.opts.get("ignore_index", IGNORE)
    target[ignored] = ignore
    inputs, t = on(core_tier, hidden, weight, bias), target.to(core_tier.device)
    kw = {**case.opts, **layout(case), "reduction": reduction}
    seen = []
    monkeypatch.setattr(L, "eager_linear_cross_entropy", spy(L.eager_linear_cross_entropy, seen))
    loss, got = loss_and_grads("chunked", inputs, t, **kw)
    assert len(seen) == 1, "the eager forward ran"
    assert got["hidden"].dtype == hidden.dtype and got["weight"].dtype == weight.dtype
    assert_like_oracle(case, (hidden, weight, bias), target, reduction, torch.tensor(3.0), loss, got, "eager")
    real = (case.vocab_size or case.vocab_start + case.v) - case.vocab_start
    assert torch.all(got["weight"].cpu()[real:] == 0), "padding rows of weight get no gradient"
    if case.bias:
        assert torch.all(got["bias"].cpu()[real:] == 0), "padding entries of bias get no gradient"
    assert torch.all(got["hidden"].cpu()[target == ignore] == 0), "ignored rows get no gradient"
    if case.dtype == "fp32":
        loss_r, got_r = loss_and_grads("recompute", inputs, t, **kw)
        torch.testing.assert_close(loss, loss_r, rtol=1e-6, atol=1e-6)
        for name, g in got.items():
            if g is not None:
                torch.testing.assert_close(g, got_r[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eager_every_target_ignored(core_tier, monkeypatch):
    """Every target ignored: "mean" is NaN (0 / 0, as the recomputing path and PyTorch), "sum" 0;
    every gradient 0 either way."""
    monkeypatch.setattr(L, "EAGER_ROWS", EAGER_ROWS)
    monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    case = Case("ignored", EAGER_N, 16, 40, "fp32", True, {})
    hidden, weight, bias, _ = make_inputs(case, seed=3)
    inputs = on(core_tier, hidden, weight, bias)
    target = torch.full((EAGER_N,), IGNORE, device=core_tier.device)
    for reduction in ("mean", "sum"):
        for impl in ("chunked", "recompute"):
            loss, got = loss_and_grads(impl, inputs, target, reduction=reduction)
            assert loss.isnan() if reduction == "mean" else loss == 0, (impl, reduction, loss)
            assert all(torch.all(g == 0) for g in got.values()), (impl, reduction)


def test_eager_backward_twice(core_tier, monkeypatch):
    """``retain_graph=True``: a second backward (another grad_output) adds the same gradients
    again (the saved ones are scaled out of place), as with the recomputing backward."""
    monkeypatch.setattr(L, "EAGER_ROWS", EAGER_ROWS)
    monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    case = Case("twice", EAGER_N, 16, 40, "fp32", True, {"label_smoothing": 0.1})
    hidden, weight, bias, target = on(core_tier, *make_inputs(case, seed=4))
    out = {}
    for impl in ("chunked", "recompute"):
        leaves = leaves_like((hidden, weight, bias))
        loss = ss.linear_cross_entropy(
            leaves[0], leaves[1], target, bias=leaves[2], impl=impl, label_smoothing=0.1
        )
        (3 * loss).backward(retain_graph=True)
        first = [x.grad.clone() for x in leaves]
        (0.5 * loss).backward()
        out[impl] = [x.grad for x in leaves]
        for a, b in zip(out[impl], first):
            torch.testing.assert_close(a, b * (3.5 / 3), rtol=1e-5, atol=1e-6, msg=impl)
    for a, b in zip(out["chunked"], out["recompute"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trained", ["hidden", "weight", "bias", "all"])
def test_eager_computes_only_what_is_needed(trained, monkeypatch):
    """The eager forward makes the logits GEMM of each of the 3 blocks and, per block, one GEMM for
    each of hidden and weight that needs a gradient; a frozen input gets none. Gradients as the
    recomputing path's."""
    monkeypatch.setattr(L, "EAGER_ROWS", EAGER_ROWS)
    monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    case = Case("needed", EAGER_N, 16, 40, "fp32", True, {"z_loss": 1e-3})
    inputs, target = make_inputs(case, seed=5)[:3], make_inputs(case, seed=5)[3]
    names = ("hidden", "weight", "bias") if trained == "all" else (trained,)
    logits, gemms = [], []
    monkeypatch.setattr(L, "_logits_chunk", spy(L._logits_chunk, logits))
    monkeypatch.setattr(L, "_matmul_accumulate", spy(L._matmul_accumulate, gemms))
    out = {}
    with ss.use_backend("torch"):
        for impl in ("recompute", "chunked"):
            logits.clear(), gemms.clear()
            leaves = [
                x.clone().requires_grad_(name in names)
                for name, x in zip(("hidden", "weight", "bias"), inputs)
            ]
            ss.linear_cross_entropy(
                leaves[0], leaves[1], target, bias=leaves[2], impl=impl, z_loss=1e-3
            ).backward()
            out[impl] = grads_of(leaves)
    assert len(logits) == 3, logits
    assert len(gemms) == 3 * (("hidden" in names) + ("weight" in names)), len(gemms)
    for name, g in out["chunked"].items():
        if name not in names:
            assert g is None and out["recompute"][name] is None, name
        else:
            torch.testing.assert_close(g, out["recompute"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_eager_only_where_it_applies(monkeypatch):
    """The eager forward runs for impl="chunked" with gradients enabled, an input that requires
    one and reduction "mean" / "sum" over N > 0 rows; otherwise the forward is the chunked one and
    backward (if any) recomputes."""
    case = Case("where", 6, 16, 40, "fp32", False, {})
    hidden, weight, _, target = make_inputs(case, seed=6)
    eager, recomputed = [], []
    monkeypatch.setattr(L, "eager_linear_cross_entropy", spy(L.eager_linear_cross_entropy, eager))
    monkeypatch.setattr(L, "chunked_linear_backward", spy(L.chunked_linear_backward, recomputed))

    def call(impl="chunked", reduction="mean", grad=True, n=6, backward=True):
        eager.clear(), recomputed.clear()
        h = hidden[:n].clone().requires_grad_(grad)
        with ss.use_backend("torch"):
            loss = ss.linear_cross_entropy(h, weight, target[:n], reduction=reduction, impl=impl)
            if backward and loss.requires_grad:
                loss.sum().backward()
        return len(eager), len(recomputed)

    assert call() == (1, 0)
    assert call(reduction="sum") == (1, 0)
    assert call(reduction="none") == (0, 1)
    assert call(impl="recompute") == (0, 1)
    assert call(grad=False) == (0, 0)
    assert call(n=0) == (0, 1)
    with torch.no_grad():
        assert call() == (0, 0)


# ------------------------------------------------------------------------------------------------
# Inside the kernels and the PyTorch path: vocabulary splits, chunks of columns / rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
def test_kernel_splits_and_chunks_agree(core_tier, monkeypatch):
    """Several vocabulary splits in the fused forward, several column chunks in backward and
    several row chunks on the top-k path give the results of one split / chunk."""
    case = Case("chunks", 7, 40, 150, "bf16", True, {})
    hidden, weight, bias, target = on(core_tier, *make_inputs(case, seed=5))
    kw = dict(n_valid_cols=140, vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0)
    merged = {}
    for splits in (1, 3, 4):  # 4 splits of 5 tiles: one is empty
        # the splits folded in-kernel into 1 or 2 pieces, or each split's own piece (slots 0)
        for slots in (1, 2, 0):
            st, vals, ids = kernels.linear_partials(
                hidden, weight, bias, target, k=0, n_splits=splits, slots=slots, **kw
            )
            assert st.shape == (kernels.N_FIELDS, min(slots, splits) if slots else splits, case.n)
            merged[splits, slots] = merge_stacked(Partials(*st.unbind(0), vals, ids))
    for key, got in merged.items():
        for f in Partials._fields[:7]:
            want = getattr(merged[1, 1], f)
            torch.testing.assert_close(getattr(got, f), want, rtol=1e-6, atol=1e-6, msg=f"{key} {f}")

    lse = merged[1, 1].max + merged[1, 1].sumexp.log()
    lse_bwd = torch.cat([lse, lse.new_full((1,), 0.25)])  # per-row lse, then the reduction's scale
    grad_out = torch.linspace(0.5, 2.0, 2 * case.n, device=lse.device)[::2]  # per row, strided
    gkw = dict(ignore_index=IGNORE, label_smoothing=0.1, vocab_size=140, z_loss=0.0, softcap=None,
               temperature=1.0)  # fmt: skip
    # the fused gradient tiles of the whole shard (10 padding columns get 0) and of column chunks
    g_all = torch.empty((case.n, case.v), dtype=hidden.dtype, device=hidden.device)
    kernels.linear_grad_logits(hidden, weight, bias, target, lse_bwd, grad_out, out=g_all, n_valid_cols=140,
                               vocab_start=0, **gkw)  # fmt: skip
    assert not g_all[:, 140:].any()
    for c0, c1 in [(0, 64), (64, 128), (128, 140)]:
        g = torch.empty_like(g_all)[:, : c1 - c0]  # rows wider than the chunk: any row stride
        kernels.linear_grad_logits(hidden, weight[c0:c1], bias[c0:c1], target, lse_bwd, grad_out, out=g,
                                   n_valid_cols=c1 - c0, vocab_start=c0, **gkw)  # fmt: skip
        torch.testing.assert_close(g, g_all[:, c0:c1], rtol=1e-2, atol=1e-6, msg=f"[{c0}, {c1})")
    # ... and the GEMMs of the math layer over one chunk or chunks of 64 columns
    bkw = dict(n_valid_cols=140, vocab_start=0, fused=True, **gkw)
    one = L.chunked_linear_backward(hidden, weight, bias, target, lse_bwd, grad_out, **bkw)
    monkeypatch.setattr(L, "CHUNK_BYTES", case.n * hidden.element_size() * 64)
    many = L.chunked_linear_backward(hidden, weight, bias, target, lse_bwd, grad_out, **bkw)
    torch.testing.assert_close(many[0], one[0], rtol=1e-6, atol=1e-6)  # summed over chunks in fp32
    assert torch.equal(many[1], one[1]) and torch.equal(many[2], one[2])  # one chunk's own rows
    assert not one[1][140:].any() and not one[2][140:].any()  # padding rows: no gradient

    # the fp32-logits top-k path, a chunk of rows at a time: bit for bit with the tile kernel's
    # logits; on CUDA cuBLAS's (the default there) within fp32 summation order, ids consistent
    monkeypatch.setattr(KL, "CUBLAS_LOGITS", False)
    full = kernels.linear_partials(hidden, weight, bias, target, k=3, fused_topk=False, **kw)
    monkeypatch.setattr(KL, "TOPK_CHUNK_BYTES", 3 * 4 * case.v)  # 3 rows per chunk
    chunked = kernels.linear_partials(hidden, weight, bias, target, k=3, fused_topk=False, **kw)
    for a, b in zip(full, chunked):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    monkeypatch.setattr(KL, "CUBLAS_LOGITS", True)
    st, vals, ids = kernels.linear_partials(hidden, weight, bias, target, k=3, fused_topk=False, **kw)
    torch.testing.assert_close(st, full[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(vals, full[1], rtol=1e-5, atol=1e-5)
    x64 = R.oracle_linear_logits(hidden.double(), weight.double(), bias.double())
    torch.testing.assert_close(x64.gather(1, ids[0]), vals[0].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
def test_kernel_stores_only_the_fields_its_call_reads(core_tier):
    """The fused forward's stats hold the leading fields its call reads (``stat_planes``): 4 for the
    loss, 5 with the entropy, 7 with label smoothing, equal to the fields of a full run, folded
    into pieces or not; the fields not stored read as NaN, and finalize refuses too few."""
    case = Case("planes", 7, 40, 150, "bf16", True, {})
    hidden, weight, bias, target = on(core_tier, *make_inputs(case, seed=6))
    kw = dict(k=0, n_valid_cols=140, vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0,
              n_splits=3)  # fmt: skip
    for slots in (2, 0):  # 3 splits folded in-kernel into 2 pieces, or one piece per split
        full, _, _ = kernels.linear_partials(hidden, weight, bias, target, slots=slots, **kw)
        assert full.shape[0] == len(kernels.FIELDS)
        for need, planes in [((False, False), 4), ((True, False), 5), ((False, True), 7)]:
            st, vals, ids = kernels.linear_partials(
                hidden, weight, bias, target, slots=slots, need_entropy=need[0], need_sum_x=need[1], **kw
            )
            what = f"slots {slots}, need_entropy / need_sum_x {need}"
            assert st.shape == (planes, *full.shape[1:]), what
            stored = [f for f in range(planes) if kernels.FIELDS[f] != "sumexp_x" or need[0]]
            torch.testing.assert_close(st[stored], full[stored], rtol=1e-6, atol=0.0, msg=what)
            got = Pieces(st, vals, ids).unpacked()
            assert all(getattr(got, f).isnan().all() for f in kernels.FIELDS[planes:]), what
    loss = {}
    for planes in (4, 7):
        loss[planes] = kernels.finalize_cross_entropy(
            full[:planes], target, ignore_index=IGNORE, reduction="none", label_smoothing=0.0, z_loss=0.0
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(loss[4], loss[7]))
    with pytest.raises(ValueError, match=r"stats must be \[F, S, N\] float32 with 5 <= F <= 7"):
        kernels.finalize_stats(full[:4], vals, ids, target, vocab_start=0, ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"stats must be \[F, S, N\] float32 with 7 <= F <= 7"):
        kernels.finalize_cross_entropy(
            full[:5], target, ignore_index=IGNORE, reduction="mean", label_smoothing=0.1, z_loss=0.0
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Top-k inside the fused kernel: candidate lists, their checks and the exact fallback
# ------------------------------------------------------------------------------------------------


def fused_and_fp32_topk(hidden, weight, bias, *, k, splits=(1, 3), **kw):
    """The top-k of the fused kernel's candidates and of the fp32-logits path, for each number of
    vocabulary splits: they must be equal (the same fp32 logits, the same order), and the fused
    path's stats those of k = 0 (up to the summation order)."""
    fused = kw.pop("fused_topk", None)
    with pytest.MonkeyPatch.context() as mp:  # the tile kernel's fp32 logits, not cuBLAS's (CUDA)
        mp.setattr(KL, "CUBLAS_LOGITS", False)
        want = kernels.linear_partials(hidden, weight, bias, None, k=k, n_splits=1, fused_topk=False, **kw)
    for n_splits in splits:
        got = kernels.linear_partials(
            hidden, weight, bias, None, k=k, n_splits=n_splits, fused_topk=fused, **kw
        )
        stats = kernels.linear_partials(hidden, weight, bias, None, k=0, n_splits=n_splits, **kw)[0]
        assert got[1].shape == got[2].shape == (1, hidden.shape[0], k)
        torch.testing.assert_close(
            got[1], want[1][0:1], rtol=0, atol=0, equal_nan=True, msg=f"{n_splits} splits"
        )
        assert torch.equal(got[2], want[2][0:1]), f"ids, {n_splits} splits"
        # (on CUDA the two launches may be tuned to different tiles: other fp32 summation orders)
        torch.testing.assert_close(
            got[0], stats, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{n_splits} splits"
        )


class FallbackSpy:
    """Records the rows that the fused top-k recomputes from fp32 logits."""

    def __init__(self, monkeypatch):
        self.rows = []
        exact = KL._exact_topk_rows

        def spy(hidden, weight, bias, rows, *a, **kw):
            self.rows.append(rows.cpu().tolist())
            return exact(hidden, weight, bias, rows, *a, **kw)

        monkeypatch.setattr(KL, "_exact_topk_rows", spy)


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
@pytest.mark.parametrize("k", [1, 7, 50])
def test_fused_topk_matches_fp32_path(core_tier, monkeypatch, k):
    """Gaussian logits, bias, padding columns, an offset shard, softcap and temperature: the
    candidates' top-k is the fp32 path's, for 1 and 3 splits, with no row recomputed; the
    threshold does filter (far fewer candidates than columns). k = 50 (the fp32 path's selection
    takes minutes in the interpreter): against a stable sort of the fp32 logits, no transform.
    The fused top-k is forced (``fused_topk=True``; it is off by default, and even when on takes
    only shards wider than about 240 x k columns)."""
    case = Case("topk", 19, 32, 1500, "bf16", True, {})
    hidden, weight, bias, _ = on(core_tier, *make_inputs(case, seed=11))
    spy = FallbackSpy(monkeypatch)
    counts = []
    launch = KL._partials_launch

    def count(*a, **kw):
        out = launch(*a, **kw)
        if out[1] is not None:  # a top-k launch (not the k = 0 stats)
            counts.append(out[1][2].clone())
        return out

    monkeypatch.setattr(KL, "_partials_launch", count)
    kw = dict(n_valid_cols=1490, vocab_start=3000, ignore_index=IGNORE, fused_topk=True)
    if k < 50:
        transforms = [{"softcap": None, "temperature": 1.0}, {"softcap": 4.0, "temperature": 0.7}]
        if core_tier.interpreted:  # ~20-25 s each in the interpreter: k = 1 the transform, k = 7 none
            transforms = transforms[1:] if k == 1 else transforms[:1]
        for opts in transforms:
            fused_and_fp32_topk(hidden, weight, bias, k=k, **kw, **opts)
    else:
        x = KL.linear_logits(hidden, weight, bias)[:, :1490]
        want = torch.sort(x, dim=1, descending=True, stable=True)  # ties: the lower id first
        for n_splits in (1, 3):
            _, vals, ids = kernels.linear_partials(hidden, weight, bias, None, k=k, n_splits=n_splits,
                                                   softcap=None, temperature=1.0, **kw)  # fmt: skip
            assert torch.equal(vals[0], want.values[:, :k]) and torch.equal(
                ids[0], want.indices[:, :k] + 3000
            )
        assert KL.candidate_rounds(k, 1490) > KL.MAX_ROUNDS  # (so by default the fp32 path takes it)
    if k < 50 or hidden.device.type == "cpu":  # (CUDA's 128-column tiles hold ~4 of a row's top 50
        assert spy.rows == []  # of 1490 here: tiles left with more than 8 send their rows back)
    found = torch.stack(counts)
    assert (found >= k).all() and found.float().mean() < 0.5 * 1490, found


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
def test_fused_topk_ties_go_to_the_lower_id(core_tier, monkeypatch):
    """Logits that are small integers: most of a row's top-k are ties, across tiles and splits;
    the lower id must win, as in the fp32 path (most rows from their candidates, not recomputed)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-2, 3, (11, 16), generator=g).float()
    weight = torch.randint(-1, 2, (700, 16), generator=g).float()
    spy = FallbackSpy(monkeypatch)
    fused_and_fp32_topk(on(core_tier, hidden)[0], on(core_tier, weight)[0], None, k=20, n_valid_cols=700,
                        vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0, fused_topk=True)  # fmt: skip
    assert all(len(rows) <= 5 for rows in spy.rows), spy.rows


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
def test_fused_topk_recomputes_the_rows_it_cannot_prove(core_tier, monkeypatch):
    """Each of the fused top-k's checks sends a row to the fp32 path, with results equal to the
    fp32 path's: (1) a candidate list that overflows (logits rising along the vocabulary, a list
    of 8), (2) a tile that holds more of the row's top k than its rounds take (the row's 5 largest
    logits in one tile, 1 round), (3) a row with NaN, (4) k above the shard's columns (the missing
    entries are -inf and the sentinel id). The fused top-k is forced (these shards are narrow)."""
    kw = dict(vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0, fused_topk=True)
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(400, 16, generator=g) * 0.3
    weight[:, 0] = torch.arange(400) / 100.0  # row 0 = hidden[0, 0] x column / 100: rising
    hidden[0] = 0.0
    hidden[0, 0] = 1.0
    weight[7:12, 1] = 50.0  # row 1: its 5 largest logits are columns 7-11, in one tile
    hidden[1, 1] = 1.0
    hidden, weight = on(core_tier, hidden, weight)
    spy = FallbackSpy(monkeypatch)
    monkeypatch.setattr(KL, "candidate_cap", lambda k: 8)  # (1)
    fused_and_fp32_topk(hidden, weight, None, k=5, splits=(1,), n_valid_cols=400, **kw)
    assert len(spy.rows) == 1 and 0 in spy.rows[0], spy.rows  # (other rows may overflow 8 too)
    monkeypatch.undo()

    spy = FallbackSpy(monkeypatch)
    monkeypatch.setattr(KL, "candidate_rounds", lambda k, v: 1)  # (2)
    fused_and_fp32_topk(hidden, weight, None, k=5, splits=(1, 2), n_valid_cols=400, **kw)
    assert len(spy.rows) == 2 and all(1 in rows for rows in spy.rows), spy.rows
    monkeypatch.undo()

    spy = FallbackSpy(monkeypatch)
    nan = hidden.clone()
    nan[4, 3] = float("nan")  # (3): row 4's logits all NaN
    fused_and_fp32_topk(nan, weight, None, k=5, splits=(1, 2), n_valid_cols=400, **kw)
    assert spy.rows == [[4], [4]], spy.rows

    # (4): 9 real columns, k = 12 (by default the fp32 path takes such narrow shards)
    assert KL.candidate_rounds(12, 9) > KL.MAX_ROUNDS
    fused_and_fp32_topk(hidden, weight, None, k=12, splits=(1, 2), n_valid_cols=9, **kw)
    got = kernels.linear_partials(hidden, weight, None, None, k=12, n_valid_cols=9, n_splits=2, **kw)
    assert (got[2][0, :, 9:] == KL.ID_SENTINEL.value).all() and (got[1][0, :, 9:] == float("-inf")).all()


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
def test_fused_topk_row_chunks(core_tier, monkeypatch):
    """The candidate lists take at most CAND_BYTES at a time: rows in several launches give the
    same results as one launch (the same ids; values within an ulp or two: the interpreter of
    Triton 3.9 computes a row's dot products in a different order when the launch has fewer
    rows, and CUDA may tune the launches differently)."""
    case = Case("rows", 13, 16, 300, "fp32", True, {})
    hidden, weight, bias, _ = on(core_tier, *make_inputs(case, seed=8))
    kw = dict(k=4, n_valid_cols=300, vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0,
              fused_topk=True)  # fmt: skip
    one = kernels.linear_partials(hidden, weight, bias, None, **kw)
    monkeypatch.setattr(KL, "CAND_BYTES", 5 * 8 * KL.candidate_cap(4))  # 5 rows per launch
    chunked = kernels.linear_partials(hidden, weight, bias, None, **kw)
    (stats, vals, ids), (stats_c, vals_c, ids_c) = one, chunked
    assert torch.equal(ids, ids_c)
    torch.testing.assert_close(vals_c, vals, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats_c, stats, rtol=1e-5, atol=1e-5, equal_nan=True)  # sums of 300


@pytest.mark.core_tiers("cpu-triton")
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("autotune", [True, False])
def test_cuda_launch_path_in_interpreter(core_tier, monkeypatch, autotune, tma):
    """The launch path CUDA takes (autotuned kernels, or their first configs with AUTOTUNE off),
    run in the interpreter with small configs and a CPU timer: tuning runs must not leave their
    top-k candidates counted (restore_value), and with TMA each config's
    pre-hook must give the descriptors its blocks. fp32 (pointers) or bf16 widened to fp32 (TMA):
    without the interpreter's upcast, its bf16 dot is wrong."""

    def cpu_bench(fn, quantiles=None, **kw):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    tune = functools.partial(triton.autotune, do_bench=cpu_bench)
    for suffix, hook in (("_tuned", None), ("_tma_tuned", KL._tma_blocks)):
        tile = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}, pre_hook=hook),
                triton.Config({"BLOCK_N": 32, "BLOCK_V": 16, "BLOCK_H": 32}, pre_hook=hook)]  # fmt: skip
        monkeypatch.setattr(
            KL, "_partials" + suffix, tune(tile, key=["hidden_size", "n_cols"])(KL._linear_partials_kernel)
        )
        # the top-k variant: tuning runs must not leave their candidates counted (restore_value)
        topk_tuned = tune(tile, key=["hidden_size", "n_cols"], restore_value=["cand_count_ptr", "levels_ptr"])
        monkeypatch.setattr(KL, "_partials_topk" + suffix, topk_tuned(KL._linear_partials_kernel))
        tile_tuned = tune(tile, key=["hidden_size", "GRAD"])(KL._linear_tile_kernel)
        monkeypatch.setattr(KL, "_tile" + suffix, tile_tuned)
    if tma:  # as on a Hopper GPU: descriptors (allowed in the interpreter), operands widened as in it
        assert KL.use_tma(torch.zeros(4, 48, dtype=torch.bfloat16), torch.zeros(8, 48, dtype=torch.bfloat16))
        monkeypatch.setattr(KL, "use_tma", lambda hidden, weight: True)
        monkeypatch.setattr(KL, "_dot_meta", lambda dtype: {"INPUT_PRECISION": "ieee", "UPCAST": True})
    monkeypatch.setattr(KL, "_interpreted", lambda: False)
    monkeypatch.setattr(KL, "AUTOTUNE", autotune)

    case = Case("launch", 21, 48, 150, "bf16" if tma else "fp32", True, {})
    hidden, weight, bias, target = make_inputs(case, seed=8)
    fwd = dict(n_valid_cols=150, vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0)
    st, _, _ = kernels.linear_partials(hidden, weight, bias, target, k=0, n_splits=2, **fwd)
    x64 = R.oracle_linear_logits(hidden.double(), weight.double(), bias.double())
    lse = (st[0] + st[1].log()).double()  # per split: max + log sum exp
    lse = torch.logsumexp(lse, dim=0)
    torch.testing.assert_close(lse, torch.logsumexp(x64, -1), rtol=1e-6, atol=1e-6)
    _, vals, ids = kernels.linear_partials(
        hidden, weight, bias, None, k=3, n_splits=2, fused_topk=True, **fwd
    )
    want = kernels.linear_partials(hidden, weight, bias, None, k=3, n_splits=1, fused_topk=False, **fwd)
    torch.testing.assert_close(vals, want[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(ids, want[2])
    # the reduced loss's gradient (one value) times the reduction's scale 0.5, 0 on ignored rows
    lse_bwd = torch.cat([lse.float(), torch.tensor([0.5])])
    scale = torch.where(target != IGNORE, 0.5, 0.0).double()
    kw = dict(n_valid_cols=150, vocab_start=0, label_smoothing=0.0, vocab_size=150, z_loss=0.0, softcap=None,
              temperature=1.0)  # fmt: skip
    monkeypatch.setattr(L, "CHUNK_BYTES", case.n * hidden.element_size() * 64)  # chunks of 64 columns

    def backward():
        return L.chunked_linear_backward(
            hidden, weight, bias, target, lse_bwd, torch.tensor(1.0), ignore_index=IGNORE, fused=True, **kw
        )

    got = backward()
    if tma:  # the gradient chunks are rounded to bf16: against the pointer loads on the same inputs
        monkeypatch.setattr(KL, "use_tma", lambda hidden, weight: False)
        want = [w.double() for w in backward()]
    else:
        want = R.shard_linear_cross_entropy_backward(hidden.double(), weight.double(), bias.double(), target,
                                                     lse, scale, **kw)  # fmt: skip
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.core_tiers("cpu-triton", "cuda-triton")
def test_tma_and_pointer_loads_agree(core_tier, monkeypatch):
    """The logit tiles load hidden and weight through TMA descriptors (16-bit operands with
    16-byte aligned rows, on Hopper and in the interpreter) or through pointers: both give the same
    forward partials, top-k and gradients. Rows that are not 16-byte aligned take the pointers."""
    case = Case("tma", 9, 48, 150, "bf16", True, {})
    hidden, weight, bias, target = on(core_tier, *make_inputs(case, seed=6))
    if not KL.use_tma(hidden, weight):
        pytest.skip("no TMA loads here (a GPU before Hopper, or Triton without tensor descriptors)")
    odd = torch.zeros(4, 44, dtype=torch.bfloat16, device=hidden.device)  # 88-byte rows
    assert not KL.use_tma(odd, odd) and not KL.use_tma(hidden.float(), weight.float())
    assert not KL.use_tma(hidden[:, 1:], weight[:, 1:])  # rows start 2 bytes past an aligned address
    fwd = dict(n_valid_cols=140, vocab_start=0, ignore_index=IGNORE, softcap=None, temperature=1.0)
    bwd = dict(ignore_index=IGNORE, n_valid_cols=140, vocab_start=0, label_smoothing=0.1, vocab_size=140,
               z_loss=0.0, softcap=None, temperature=1.0)  # fmt: skip

    def run():
        st, _, _ = kernels.linear_partials(hidden, weight, bias, target, k=0, n_splits=2, **fwd)
        _, vals, ids = kernels.linear_partials(hidden, weight, bias, target, k=3, **fwd)
        lse = torch.logsumexp(st[0] + st[1].log(), dim=0)
        lse_bwd = torch.cat([lse, lse.new_full((1,), 0.25)])
        grads = L.chunked_linear_backward(
            hidden, weight, bias, target, lse_bwd, torch.ones((), device=lse.device), fused=True, **bwd
        )
        return st, vals, ids, grads

    st, vals, ids, grads = run()
    monkeypatch.setattr(KL, "TMA", False)
    assert not KL.use_tma(hidden, weight)
    st_p, vals_p, ids_p, grads_p = run()
    torch.testing.assert_close(st.nan_to_num(7.0), st_p.nan_to_num(7.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals, vals_p, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ids_p)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, grads_p):
        # the gradient chunk is rounded to bf16: a logit 1 fp32 ulp apart may round the other way
        assert (a.double() - b.double()).norm() <= 1e-3 * b.double().norm(), name


def test_torch_path_chunks_rows(monkeypatch):
    """The PyTorch path computes LINEAR_CHUNK_ELEMENTS logits at a time; chunking changes nothing."""
    case = Case("rows", 9, 16, 50, "fp32", True, {"label_smoothing": 0.1})
    hidden, weight, bias, target = make_inputs(case, seed=6)
    out = []
    for chunk in (R.LINEAR_CHUNK_ELEMENTS, 2 * case.v):
        monkeypatch.setattr(R, "LINEAR_CHUNK_ELEMENTS", chunk)
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        with ss.use_backend("torch"):
            loss = ss.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], label_smoothing=0.1)
            loss.backward()
            st = ss.linear_softmax_stats(hidden, weight, target, bias=bias, k=2)
        out.append([loss.detach(), *(x.grad for x in leaves), st.lse, st.entropy, st.topk_ids])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# nn.VocabParallelLMHead: fused and unfused paths
# ------------------------------------------------------------------------------------------------


def test_lm_head_fused_and_unfused_agree(core_tier):
    torch.manual_seed(0)
    kw = dict(vocab_size_padded=70, bias=True, label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    heads = {f: VocabParallelLMHead(24, 67, fused=f, device=core_tier.device, **kw) for f in (True, False)}
    heads[False].load_state_dict(heads[True].state_dict())
    hidden = torch.randn(2, 5, 24, device=core_tier.device)
    target = torch.randint(0, 67, (2, 5), device=core_tier.device)
    target[0, 1] = IGNORE
    out = {}
    for fused, head in heads.items():
        h = hidden.clone().requires_grad_(True)
        loss = head(h, target)
        loss.backward()
        st = head(hidden, target, k=3, return_stats=True)
        out[fused] = [loss.detach(), h.grad, head.weight.grad, head.bias.grad, st.lse, st.target_logprob]
        ids = st.topk_ids
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, heads[False](hidden, k=3).topk_ids)
    assert torch.all(heads[True].weight.grad[67:] == 0)
    # the default: unfused (the chunked path is not measured on a GPU yet; see the class docstring)
    auto = VocabParallelLMHead(24, 67, device=core_tier.device)
    assert auto.fused is False and auto.impl == "chunked"
    assert "fused=True" in repr(heads[True]) and "impl" not in repr(heads[True])
    with pytest.raises(TypeError, match="fused must be"):
        VocabParallelLMHead(24, 67, fused="yes")
    with pytest.raises(ValueError, match="impl must be one of"):
        VocabParallelLMHead(24, 67, fused=True, impl="cublas")
    with pytest.raises(ValueError, match="impl='fused' chooses the LM head path's .*: it needs fused=True"):
        VocabParallelLMHead(24, 67, impl="fused")


@pytest.mark.parametrize("impl", ["recompute", "fused"])
def test_lm_head_impl(core_tier, impl):
    """``impl`` reaches the LM head path: the loss, the three gradients and the statistics as the
    unfused head gives them (fp32: the fused kernels' unrounded logits equal the rounded ones)."""
    torch.manual_seed(1)
    kw = dict(vocab_size_padded=70, bias=True, label_smoothing=0.1, softcap=8.0, device=core_tier.device)
    head = VocabParallelLMHead(24, 67, fused=True, impl=impl, **kw)
    ref = VocabParallelLMHead(24, 67, **kw)
    ref.load_state_dict(head.state_dict())
    assert f"impl={impl!r}" in repr(head)
    hidden = torch.randn(9, 24, device=core_tier.device)
    target = torch.randint(0, 67, (9,), device=core_tier.device)
    out, ids = [], []
    for h_ in (head, ref):
        h = hidden.clone().requires_grad_(True)
        loss = h_(h, target)
        loss.backward()
        st = h_(hidden, target, k=3, return_stats=True)
        grads = [h.grad, h_.weight.grad, h_.bias.grad]
        out.append([loss.detach(), *grads, st.lse, st.entropy, st.target_logprob])
        ids.append(st.topk_ids)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(*ids)


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------

H, V = 8, 10


def _good():
    return torch.randn(3, H), torch.randn(V, H), torch.randn(V), torch.tensor([1, 2, 3])


BAD = [
    # (id, replacements, extra kwargs, exception, text in the message)
    ("H-mismatch", {"weight": torch.randn(V, H + 1)}, {}, ValueError, "weight must have shape [V_shard, 8]"),
    ("weight-1d", {"weight": torch.randn(V)}, {}, ValueError, "weight must have shape"),
    ("weight-dtype", {"weight": torch.randn(V, H).double()}, {}, TypeError, "weight must have hidden's"),
    ("weight-not-tensor", {"weight": [[1.0] * H] * V}, {}, TypeError, "weight must be a torch.Tensor"),
    ("hidden-int", {"hidden": torch.ones(3, H, dtype=torch.int64)}, {}, TypeError, "hidden must be float16"),
    ("hidden-empty-H", {"hidden": torch.randn(3, 0), "weight": torch.randn(V, 0)}, {}, ValueError,
     "hidden must have a non-empty last dimension"),
    ("bias-shape", {"bias": torch.randn(V + 1)}, {}, ValueError, "bias must have shape (10,)"),
    ("bias-dtype", {"bias": torch.randn(V).half()}, {}, TypeError, "bias must have weight's dtype"),
    ("target-shape", {"target": torch.tensor([1, 2])}, {}, ValueError, "must have shape (3,) (hidden'"),
    ("target-float", {"target": torch.tensor([1.0, 2.0, 3.0])}, {}, TypeError, "target must have an integer"),
    ("k-negative", {}, {"k": -1}, ValueError, "k must be >= 0"),
    ("k-over-vocab", {}, {"k": V + 1}, ValueError, "k=11 is larger than the vocabulary"),
    ("reduce_hidden_grad", {}, {"reduce_hidden_grad": 1}, TypeError, "reduce_hidden_grad must be a bool"),
    ("label_smoothing", {}, {"label_smoothing": 1.0}, ValueError, "label_smoothing must be in [0, 1)"),
    ("temperature", {}, {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ("vocab_size", {}, {"vocab_size": V + 1}, ValueError, "vocab_size=11 is larger"),
    ("impl", {}, {"impl": "cublas"}, ValueError,
     "impl must be one of ('chunked', 'recompute', 'fused'), got 'cublas'"),
]  # fmt: skip
ONLY = {"k": "stats", "reduce_hidden_grad": "loss", "label_smoothing": "loss"}  # options of one function
BAD_CALLS = [(fn, b) for b in BAD for fn in ("stats", "loss") if ONLY.get(next(iter(b[2]), fn), fn) == fn]


@pytest.mark.parametrize(("fn", "bad"), BAD_CALLS, ids=[f"{fn}-{b[0]}" for fn, b in BAD_CALLS])
def test_bad_arguments_raise(fn, bad):
    _, repl, extra, exc, text = bad
    hidden, weight, bias, target = _good()
    args = {"hidden": hidden, "weight": weight, "bias": bias, "target": target, **repl}
    call = ss.linear_softmax_stats if fn == "stats" else ss.linear_cross_entropy
    with ss.use_backend("torch"), pytest.raises(exc) as err:
        call(args["hidden"], args["weight"], args["target"], bias=args["bias"], **extra)
    assert text in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------
# Process groups (gloo): 2 and 3 ranks, uneven and padded shards, both backends in each rank
# ------------------------------------------------------------------------------------------------

DIST_N, DIST_H, DIST_V_PADDED, DIST_VOCAB = 6, 16, 101, 99
DIST_OPTS = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0}
# backward: 51 + 50 columns, 3 chunks each, the last of 3 and 2; 34 + 34 + 33 (31 real): 2 each;
# forward: blocks of floor(6 x 24 / real columns) rows (2-4 rows, so 2-3 blocks)
DIST_CHUNK_COLS = 24


def _dist_inputs(n: int = DIST_N):
    g = torch.Generator().manual_seed(77)
    hidden = torch.randn(n, DIST_H, generator=g, dtype=torch.float64)
    weight = torch.randn(DIST_V_PADDED, DIST_H, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(DIST_V_PADDED, generator=g, dtype=torch.float64) * 0.5
    weight[DIST_VOCAB:] = 0
    bias[DIST_VOCAB:] = 0
    target = torch.randint(0, DIST_VOCAB, (n,), generator=g)
    target[1] = IGNORE
    return hidden, weight, bias, target


def _dist_oracle():
    """The unsplit model in float64: loss, the three gradients, and d loss / d logits."""
    hidden, weight, bias, target = _dist_inputs()
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    logits = R.oracle_linear_logits(h, w, b)
    logits.retain_grad()
    loss = R.oracle_cross_entropy(logits, target, vocab_size=DIST_VOCAB, **DIST_OPTS)
    loss.backward()
    st = R.oracle_stats(logits.detach(), target, k=3, vocab_size=DIST_VOCAB, softcap=DIST_OPTS["softcap"])
    return loss.detach(), h.grad, w.grad, b.grad, logits.grad, st


def dist_rank(ctx, widths):
    from shardsoftmax.nn import shard_sizes

    assert list(widths) == shard_sizes(DIST_V_PADDED, ctx.world_size)
    hidden, weight, bias, target = (x.float() if x.is_floating_point() else x for x in _dist_inputs())
    start = sum(widths[: ctx.rank])
    cols = slice(start, start + widths[ctx.rank])
    L.CHUNK_BYTES = DIST_N * DIST_CHUNK_COLS * 4  # fp32: several chunks per shard on the chunked path
    L.FORWARD_BLOCK_BYTES = L.CHUNK_BYTES
    out = {}
    for backend, impl in [(b, i) for b in ("torch", "triton") for i in IMPLS]:
        ss.set_backend(backend)
        res = {}
        kw = dict(bias=bias[cols], vocab_size=DIST_VOCAB, process_group=ctx.group, impl=impl, **DIST_OPTS)
        for reduce in (True, False):
            h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight[cols], bias[cols]))
            kw_grad = {**kw, "bias": b, "reduce_hidden_grad": reduce}
            # agrees the layout (the header holds the gradients a call computes: a change is one
            # more exchange); its graph is dropped
            ss.linear_cross_entropy(h, w, target, **kw_grad)
            with count_collectives() as calls:
                loss = ss.linear_cross_entropy(h, w, target, **kw_grad)
                forward = sum(calls.values())
                calls.clear()
                loss.backward()
                backward = dict(calls)
            res[reduce] = (loss.detach(), h.grad, w.grad, b.grad, forward, backward)
        st = ss.linear_softmax_stats(
            hidden, weight[cols], target, k=3, bias=bias[cols], vocab_size=DIST_VOCAB,
            softcap=DIST_OPTS["softcap"], process_group=ctx.group, impl=impl,
        )  # fmt: skip
        out[f"{backend} {impl}"] = {"ce": res, "stats": st}
    # the fused kernel's stats without the fields nobody reads (4 for the loss without label
    # smoothing, 5 for k = 0 stats), padded with NaN fields on the wire
    ss.set_backend("triton")
    plain = dict(bias=bias[cols], vocab_size=DIST_VOCAB, process_group=ctx.group, impl="fused",
                 softcap=DIST_OPTS["softcap"])  # fmt: skip
    out["fused, fewer fields"] = (
        ss.linear_cross_entropy(hidden, weight[cols], target, z_loss=DIST_OPTS["z_loss"], **plain),
        ss.linear_softmax_stats(hidden, weight[cols], target, **plain),
    )
    return {"start": start, "width": widths[ctx.rank], **out}


@pytest.mark.parametrize("world_size", [2, 3])
def test_process_group_matches_unsplit_model(world_size):
    """Vocabulary 99 padded to 101 over 2 (51 + 50) or 3 (34 + 34 + 33) gloo ranks, each impl
    (chunked: chunks of 24 columns, uneven): the loss and every gradient equal the unsplit float64
    model (hidden's after the all-reduce; without it, this rank's share dL/dlogits[:, shard] @
    W[shard]); one collective forward, one all-reduce backward (none with
    reduce_hidden_grad=False); stats and top-k ids equal the oracle on every rank."""
    from shardsoftmax.nn import shard_sizes

    widths = shard_sizes(DIST_V_PADDED, world_size)
    out = run_ranks(dist_rank, world_size, widths, timeout=150)
    loss64, gh64, gw64, gb64, glogits64, st64 = _dist_oracle()
    _, weight, _, _ = _dist_inputs()
    tol = {"rtol": 2e-5, "atol": 2e-6}
    partial_sum = torch.zeros_like(gh64)
    for r in out:
        cols = slice(r["start"], r["start"] + r["width"])
        share = glogits64[:, cols] @ weight[cols]
        partial_sum += share
        for backend in [f"{b} {i}" for b in ("torch", "triton") for i in IMPLS]:
            what = f"rank {out.index(r)} {backend}"
            for reduce, (loss, gh, gw, gb, fwd_calls, bwd_calls) in r[backend]["ce"].items():
                torch.testing.assert_close(loss.double(), loss64, **tol, msg=f"{what} loss")
                torch.testing.assert_close(
                    gh.double(), gh64 if reduce else share, **tol, msg=f"{what} hidden"
                )
                torch.testing.assert_close(gw.double(), gw64[cols], **tol, msg=f"{what} weight")
                torch.testing.assert_close(gb.double(), gb64[cols], **tol, msg=f"{what} bias")
                assert fwd_calls == 1, f"{what}: forward made {fwd_calls} collectives"
                assert bwd_calls == ({"all_reduce": 1} if reduce else {}), f"{what}: backward {bwd_calls}"
            st = r[backend]["stats"]
            assert torch.equal(st.topk_ids, st64["topk_ids"]), what
            torch.testing.assert_close(st.lse.double(), st64["lse"], **tol, msg=f"{what} lse")
            torch.testing.assert_close(st.entropy.double(), st64["entropy"], **tol, msg=f"{what} entropy")
    torch.testing.assert_close(partial_sum, gh64, rtol=1e-10, atol=1e-12)  # the shares sum to the whole
    hidden, weight, bias, target = _dist_inputs()
    logits = R.oracle_linear_logits(hidden, weight, bias)
    opts = dict(vocab_size=DIST_VOCAB, softcap=DIST_OPTS["softcap"])
    loss64 = R.oracle_cross_entropy(logits, target, z_loss=DIST_OPTS["z_loss"], **opts)
    st64 = R.oracle_stats(logits, target, k=0, **opts)
    for rank, r in enumerate(out):
        loss, st = r["fused, fewer fields"]
        torch.testing.assert_close(loss.double(), loss64, **tol, msg=f"rank {rank} loss")
        for f in ("lse", "entropy", "target_logprob"):
            torch.testing.assert_close(getattr(st, f).double(), st64[f], **tol, msg=f"rank {rank} {f}")


def test_eager_block_sizes():
    """Blocks of at least EAGER_ROWS rows, more while the widest shard's logits block fits
    EAGER_BLOCK_BYTES (bf16, N = 8192: 4 blocks at V_shard = 128256, 2 at 64128, 1 at 32064),
    balanced, and the block width is the same on every rank: from vocab_size in a group."""
    assert (L.EAGER_ROWS, L.EAGER_BLOCK_BYTES) == (2048, 512 << 20)
    assert L.eager_blocks(8192, None) == (2048, [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192)])
    assert L.eager_blocks(8192, 128256, 2)[0] == 2048
    assert L.eager_blocks(8192, 64128, 2) == (4096, [(0, 4096), (4096, 8192)])
    assert L.eager_blocks(8192, 32064, 2) == (8192, [(0, 8192)])
    assert L.eager_blocks(8191, 64128, 2) == (4096, [(0, 4096), (4096, 8191)])
    assert L.eager_blocks(10000, 256000, 4)[1][-1] == (8000, 10000)  # cap 524 -> 2048 rows: 5 of 2000
    assert L.eager_blocks(0, 128256) == (0, [])
    assert L.eager_max_width(64128, None, None) == 64128
    assert L.eager_max_width(64128, 128256, None) == 64128  # one process: its own shard


# Process groups: every block is one exchange of the same size; the results equal one process's.
DIST_EAGER_N = 13  # with EAGER_ROWS = 5: 3 blocks, the last padded; rows 5-9 (one block) ignored


def _dist_eager_inputs():
    hidden, weight, bias, target = (
        x.float() if x.is_floating_point() else x for x in _dist_inputs(DIST_EAGER_N)
    )
    target[5:10] = IGNORE
    return hidden, weight, bias, target


def _dist_eager_rank(ctx, widths, block_bytes=0):
    hidden, weight, bias, target = _dist_eager_inputs()
    start = sum(widths[: ctx.rank])
    cols = slice(start, start + widths[ctx.rank])
    L.EAGER_ROWS, L.EAGER_BLOCK_BYTES = EAGER_ROWS, block_bytes
    out = {}
    for backend in ("torch", "triton"):
        ss.set_backend(backend)
        kw = dict(vocab_size=DIST_VOCAB, process_group=ctx.group, **DIST_OPTS)
        with torch.no_grad():  # agrees a layout of 13 rows: the first eager call changes it once
            ss.linear_cross_entropy(hidden, weight[cols], target, bias=bias[cols], **kw)
        steps = []
        for _ in range(2):
            h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight[cols], bias[cols]))
            with count_collectives() as calls:
                loss = ss.linear_cross_entropy(h, w, target, bias=b, **kw)
                forward = dict(calls)
                calls.clear()
                (3 * loss).backward()
                backward = dict(calls)
            steps.append((forward, backward))
        out[backend] = (loss.detach(), h.grad, w.grad, b.grad, steps)
    return {"start": start, "width": widths[ctx.rank], **out}


# (world size, byte budget of a block): 0 keeps blocks of EAGER_ROWS rows (3 blocks); 7 rows of
# the widest shard's real columns (ceil(99 / 2) = 50 fp32 columns) give 2 blocks of 7 rows.
@pytest.mark.parametrize(
    "world_size, block_bytes", [(2, 0), (3, 0), (2, 7 * 50 * 4)], ids=["tp2", "tp3", "tp2-wide"]
)
def test_eager_process_group_matches_one_process(world_size, block_bytes, monkeypatch):
    """Vocabulary 99 padded to 101 over 2 or 3 gloo ranks, 13 rows in 3 blocks (the last padded,
    one block all ignored), or 2 blocks when the byte budget of a block allows 7 rows of the
    widest shard (the same on every rank: from vocab_size, not the uneven widths), grad_output 3:
    loss and gradients equal one process's eager forward on the whole weight and the unsplit
    float64 model; forward makes one all-gather per block (after the first step, which changes
    the agreed row count once: one more), backward one all-reduce."""
    from shardsoftmax.nn import shard_sizes

    widths = shard_sizes(DIST_V_PADDED, world_size)
    out = run_ranks(_dist_eager_rank, world_size, widths, block_bytes, timeout=150)
    n_blocks = 2 if block_bytes else 3
    monkeypatch.setattr(L, "EAGER_ROWS", EAGER_ROWS)
    monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    monkeypatch.setattr(L, "EAGER_BLOCK_BYTES", 0)
    hidden, weight, bias, target = _dist_eager_inputs()
    with ss.use_backend("torch"):
        one = loss_and_grads("chunked", (hidden, weight, bias), target, vocab_size=DIST_VOCAB, **DIST_OPTS)
    leaves = [x.double().requires_grad_(True) for x in (hidden, weight, bias)]
    loss64 = R.oracle_linear_cross_entropy(
        leaves[0], leaves[1], target, bias=leaves[2], vocab_size=DIST_VOCAB, **DIST_OPTS
    )
    (3 * loss64).backward()
    tol = {"rtol": 2e-5, "atol": 2e-6}
    torch.testing.assert_close(one[0].double(), loss64.detach(), **tol)
    for r, res in enumerate(out):
        cols = slice(res["start"], res["start"] + res["width"])
        for backend in ("torch", "triton"):
            loss, gh, gw, gb, steps = res[backend]
            what = f"rank {r} {backend}"
            torch.testing.assert_close(loss, one[0], **tol, msg=f"{what} loss")
            torch.testing.assert_close(gh, one[1]["hidden"], **tol, msg=f"{what} hidden")
            torch.testing.assert_close(gw, one[1]["weight"][cols], **tol, msg=f"{what} weight")
            torch.testing.assert_close(gb, one[1]["bias"][cols], **tol, msg=f"{what} bias")
            torch.testing.assert_close(gw.double(), leaves[1].grad[cols], **tol, msg=f"{what} weight64")
            for step, n_gathers in zip(steps, (n_blocks + 1, n_blocks)):
                assert all("gather" in name for name in step[0]), f"{what}: forward {step[0]}"
                assert sum(step[0].values()) == n_gathers, f"{what}: forward {step[0]}"
            assert steps[1][1] == {"all_reduce": 1}, f"{what}: backward {steps[1][1]}"

"""Gradients of ``cross_entropy``: float64 gradcheck of the PyTorch path, every tier's gradient
against autograd through the float64 oracle, the in-place backward, and what the forward saves."""

from __future__ import annotations

import pytest
import torch

import shardsoftmax as ss
from shardsoftmax import reference as R

IGNORE = -100
INF = float("inf")
EPS32 = torch.finfo(torch.float32).eps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_case(n: int, v: int, dtype: torch.dtype, *, seed: int, real: int | None = None, start: int = 0):
    """Logits [n, v] and global targets in [start, start + real), every 4th row ignored."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randint(0, real or v, (n,), generator=g) + start
    t[3::4] = IGNORE
    return x, t


# name -> (cross_entropy options, padded columns, vocab_start)
GRAD_CASES = {
    "plain": ({}, 0, 0),
    "smooth": ({"label_smoothing": 0.2}, 0, 0),
    "zloss": ({"z_loss": 0.05}, 0, 0),
    "softcap": ({"softcap": 2.5}, 0, 0),
    "temperature": ({"temperature": 0.6}, 0, 0),
    "padded": ({}, 2, 0),
    "padded-smooth": ({"label_smoothing": 0.1}, 3, 0),
    "offset": ({}, 0, 5),
    "offset-padded-smooth": ({"label_smoothing": 0.1}, 2, 5),
    "all": ({"label_smoothing": 0.1, "z_loss": 0.01, "softcap": 4.0, "temperature": 1.5}, 1, 3),
}


def layout_kw(pad: int, start: int, v: int) -> dict:
    kw = {}
    if pad:
        kw["vocab_size"] = start + v - pad
    if start:
        kw["vocab_start"] = start
    return kw


def oracle_loss(x, t, *, reduction, options, pad, start):
    """The oracle on the real columns, with local targets; padding columns get no gradient."""
    v = x.shape[-1]
    local = torch.where(t == IGNORE, t, t - start)
    return R.oracle_cross_entropy(x[:, : v - pad], local, reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_float64(case, reduction):
    options, pad, start = GRAD_CASES[case]
    n, v = 5, 7
    x, t = make_case(n, v, torch.float64, seed=1, real=v - pad, start=start)
    x.requires_grad_(True)
    kw = layout_kw(pad, start, v)
    with ss.use_backend("torch"):
        fn = lambda logits: ss.cross_entropy(logits, t, reduction=reduction, **options, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
        # and it is the oracle's gradient (not merely a consistent one)
        (g,) = torch.autograd.grad(fn(x).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(
        oracle_loss(x2, t, reduction=reduction, options=options, pad=pad, start=start).sum(), x2
    )
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.all(g[:, v - pad :] == 0), "padding columns get no gradient"
    assert torch.all(g[t == IGNORE] == 0), "ignored rows get no gradient"


def round_like_tier(t32: torch.Tensor, dtype: torch.dtype, tier) -> torch.Tensor:
    """PyTorch's fp32 result in ``dtype``, converted as the tier's kernels convert: Triton 3.8's
    interpreter turns fp32 into bf16 by truncation (its cast passes no rounding mode), CUDA and
    PyTorch round to nearest."""
    if dtype == torch.bfloat16 and tier.interpreted:
        return (t32.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact
    return t32.to(dtype)


def assert_grad_like_torch(ours, ref, baseline, what, factor: float = 4.0):
    """Per element: |ours - ref| <= factor * max|baseline - ref| + 4 eps32, both measured relative to
    |ref| + the row's largest |ref| (the size of a row's rounding error)."""
    ours, ref, baseline = ours.double(), ref.double(), baseline.double()
    scale = ref.abs() + ref.abs().amax(dim=-1, keepdim=True) + 1e-30
    err = (ours - ref).abs() / scale
    base = (baseline - ref).abs() / scale
    bound = factor * base.max().item() + 4 * EPS32
    assert err.max().item() <= bound, f"{what}: normalized error {err.max().item():.3g} > {bound:.3g}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ["plain", "smooth", "zloss", "softcap", "offset-padded-smooth", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_matches_oracle(core_tier, dtype, case, reduction):
    options, pad, start = GRAD_CASES[case]
    n, v = 6, 300
    x, t = make_case(n, v, DTYPES[dtype], seed=2, real=v - pad, start=start)
    kw = layout_kw(pad, start, v)
    xd = x.clone().to(core_tier.device).requires_grad_(True)
    loss = ss.cross_entropy(xd, t.to(core_tier.device), reduction=reduction, **options, **kw)
    w = (
        torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(1.0)
    )  # a non-uniform upstream grad
    loss.backward(w.to(loss.device))
    assert xd.grad.dtype == x.dtype and xd.grad.shape == x.shape
    got = xd.grad.cpu()
    grads = {}
    for dt in (torch.float64, torch.float32):  # the truth, and PyTorch's own fp32 computation
        xx = x.to(dt).requires_grad_(True)
        oracle_loss(xx, t, reduction=reduction, options=options, pad=pad, start=start).backward(w.to(dt))
        grads[dt] = xx.grad
    assert torch.all(got[:, v - pad :] == 0), "padding columns"
    assert torch.all(got[t == IGNORE] == 0), "ignored rows"
    baseline = round_like_tier(grads[torch.float32], x.dtype, core_tier)
    assert_grad_like_torch(got, grads[torch.float64], baseline, f"{dtype} {case} {reduction}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_out_of_range_target_nan_stays_in_its_row(core_tier, dtype):
    x, t = make_case(4, 50, DTYPES[dtype], seed=3)
    t[1] = 50  # out of range and not ignore_index
    xd = x.clone().to(core_tier.device).requires_grad_(True)
    ss.cross_entropy(xd, t.to(core_tier.device), reduction="sum").backward()
    g = xd.grad.cpu()
    assert g[1].isnan().all()
    assert torch.isfinite(g[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(core_tier, dtype):
    n, d, v = 6, 16, 200
    g = torch.Generator().manual_seed(4)
    h = torch.randn(n, d, generator=g).to(DTYPES[dtype]).to(core_tier.device)
    w0 = torch.randn(d, v, generator=g).to(DTYPES[dtype]).to(core_tier.device)
    t = torch.randint(0, v, (n,), generator=g).to(core_tier.device)
    t[3] = IGNORE
    kw = dict(label_smoothing=0.1, z_loss=1e-3, vocab_size=v - 3)

    results = {}
    for inplace in (False, True):
        w = w0.clone().requires_grad_(True)
        logits = h @ w
        logits.retain_grad()
        ptr = logits.data_ptr()
        ss.cross_entropy(logits, t, inplace_backward=inplace, **kw).backward()
        results[inplace] = (w.grad, logits.detach(), logits.grad)
        if inplace:
            assert logits.data_ptr() == ptr
    w_grad, _, dlogits = results[False]
    w_grad_inplace, logits_after, _ = results[True]
    assert torch.equal(logits_after, dlogits), "the gradient is written into the logits' memory"
    assert torch.equal(w_grad_inplace, w_grad), "downstream gradients are unchanged"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_saves_no_full_size_buffer(core_tier, dtype):
    """Backward recomputes the softmax from the logits: the only saved [N, V] tensor is the logits."""
    n, v = 8, 300
    x, t = make_case(n, v, DTYPES[dtype], seed=5)
    xd = x.clone().to(core_tier.device).requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ss.cross_entropy(xd, t.to(core_tier.device), label_smoothing=0.1, z_loss=1e-4)
    big = [s for s in saved if s.numel() >= n * v]
    assert big, "the logits are saved (no copy)"
    for s in big:
        assert s.dtype == xd.dtype and s.data_ptr() == xd.data_ptr(), (
            f"saved a {s.dtype} {tuple(s.shape)} buffer besides the logits"
        )
    assert sum(s.numel() for s in saved if s.data_ptr() != xd.data_ptr()) <= 8 * n, "only per-row tensors"
    loss.backward()
    assert torch.isfinite(xd.grad).all()

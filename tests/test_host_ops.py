"""Host cost of one-process calls (``process_group=None``).

* Op counts (CPU tensors, or CUDA tensors where there is a GPU): each public call makes at most
  a budgeted number of torch dispatcher ops and Triton launches on the Triton path (launches
  stubbed out, see ``host_ops.py``), and nothing that syncs with or copies from the device.
  The budgets are the counts measured when the finalize kernel went in, plus a margin of 2, so
  that a regression (a torch op per call creeping back) fails here.
* GPU: every call can be captured in a CUDA graph; replays on new data copied into the static
  inputs equal eager calls bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import shardsoftmax as ss
from shardsoftmax import kernels
from shardsoftmax.backend import triton_interpreted

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_ops import N, cases, count, stub_launches  # noqa: E402

MARGIN = 2
# case -> (dispatcher ops, Triton launches) measured per call (tests/host_ops.py, N=8, V=64).
BUDGETS = {
    "softmax_stats k=0": (7, 2),
    "softmax_stats k=50": (9, 2),  # k > 0: + the chunk maxima and the selection's scratch (k <= 128:
    # selected in the partials kernel)
    "cross_entropy fwd": (5, 2),
    "cross_entropy fwd (grad)": (5, 2),
    "cross_entropy bwd": (3, 1),  # ones_like and detach are autograd's own
    "softmax": (4, 2),
    "log_softmax": (4, 2),
    "topk k=8": (7, 1),  # the same two buffers; one split: no finalize launch
}
# Ops that read a device value on the host or move data between host and device.
SYNCING = {"_local_scalar_dense", "item", "_to_copy", "copy_", "to", "cpu", "nonzero", "equal"}


def counted(name: str, **sizes):
    setup, call = cases(**sizes)[name]
    with ss.use_backend("triton"), stub_launches():
        setup()
        with count() as counts:
            call()
    return counts


@pytest.mark.parametrize("name", BUDGETS)
def test_one_process_call_makes_few_torch_ops(name):
    counts = counted(name)
    ops, launches = BUDGETS[name]
    assert counts.n_ops <= ops + MARGIN, f"{name}: {counts.n_ops} ops ({dict(counts.ops)}), budget {ops}"
    assert len(counts.launches) <= launches, f"{name}: launches {counts.launches}"
    assert not SYNCING & set(counts.ops), f"{name}: host sync or copy {dict(counts.ops)}"


@pytest.mark.parametrize(
    "name", ["softmax_stats k=0", "softmax_stats k=50", "cross_entropy fwd", "topk k=8", "softmax"]
)
def test_decode_path_with_column_splits_stays_lean(name, monkeypatch):
    """On a GPU, small batches split columns over programs (S > 1); finalize merges the splits
    in-kernel, so the count does not grow."""
    v = 20000
    k = {"softmax_stats k=50": 50, "topk k=8": 8}.get(name, 0)
    rows, chunk = kernels.partials.tile_shape(v, k)
    assert v >= 4 * rows * chunk, "wide enough for 4 column splits"
    monkeypatch.setattr(kernels.partials, "default_splits", lambda n_rows, n_tiles, device, k=0: 4)
    counts = counted(name, v=v)
    ops, launches = BUDGETS[name]
    assert counts.n_ops <= ops + MARGIN, f"{name}: {counts.n_ops} ops ({dict(counts.ops)}), budget {ops}"
    # topk merges one piece without a launch; over splits it takes the finalize kernel too (the
    # partials kernel selects k <= 128 itself: two launches in all)
    assert len(counts.launches) <= max(launches, 2), f"{name}: launches {counts.launches}"


def test_counter_sees_torch_ops():
    """The counter is not blind: the PyTorch backend's reference math is dozens of ops."""
    _, call = cases()["softmax_stats k=0"]
    with ss.use_backend("torch"), count() as counts:
        call()
    assert counts.n_ops > 20 and N == 8


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_interpreted(),
    reason="CUDA graphs need a CUDA GPU (and compiled Triton kernels: TRITON_INTERPRET unset)",
)


def _calls(x: torch.Tensor, t: torch.Tensor) -> dict:
    """Every public one-process call, as name -> tensors it returns."""
    st = ss.softmax_stats(x, t, k=8)
    return {
        "softmax_stats": (st.lse, st.max, st.entropy, st.target_logprob, st.topk_ids, st.topk_logprobs),
        "cross_entropy": (ss.cross_entropy(x, t),),
        "cross_entropy none": (ss.cross_entropy(x, t, reduction="none", label_smoothing=0.1),),
        "softmax": (ss.softmax(x),),
        "log_softmax": (ss.log_softmax(x),),
        "topk": ss.topk(x, 5),
        "sample": (ss.sample(x, seed=3, top_k=4), ss.sample(x, seed=3)),
    }


def _inputs(n: int, v: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, v, device="cuda", generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[1::5] = -100  # some ignored targets, but never row 0 (a one-row batch's mean is then NaN)
    return x, t


@needs_cuda
@pytest.mark.parametrize("n", [1, 64, 1024])  # 1 and 64: column splits merged in finalize
def test_calls_capture_in_a_cuda_graph_and_replay_on_new_data(n):
    v = 32064
    static_x, static_t = _inputs(n, v, seed=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile) outside the capture
        _calls(static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _calls(static_x, static_t)
    for seed in (1, 2):
        x, t = _inputs(n, v, seed)
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        eager = _calls(x, t)
        torch.cuda.synchronize()
        for name, outs in eager.items():
            for got, want in zip(captured[name], outs):
                assert torch.equal(got.nan_to_num(), want.nan_to_num()), f"{name} (n={n}, seed {seed})"


@needs_cuda
@pytest.mark.parametrize("n", [1, 1024])
def test_cross_entropy_forward_and_backward_capture_in_a_cuda_graph(n):
    v = 32064
    x0, static_t = _inputs(n, v, seed=0)
    static_x = x0.clone().requires_grad_(True)

    def step():
        loss = ss.cross_entropy(static_x, static_t, z_loss=1e-4)
        (grad,) = torch.autograd.grad(loss, static_x)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    x, t = _inputs(n, v, seed=1)
    with torch.no_grad():
        static_x.copy_(x)
    static_t.copy_(t)
    graph.replay()
    xe = x.clone().requires_grad_(True)
    loss_e = ss.cross_entropy(xe, t, z_loss=1e-4)
    loss_e.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss_e)
    assert torch.equal(loss, loss_e.detach())
    assert torch.equal(grad, xe.grad)


# A call over a process group (2 gloo ranks): the shard kernel writes into the kept send buffer
# (header written once), one all-gather, views of the gathered partials; the ranks' pieces are
# merged by the finalize kernel, not by torch ops (measured: 14, 19 and 12 ops; before the send
# buffer and the strided views: 34-38, 47, 32-36; before the merge moved into finalize: 81, 90
# and 79).
GROUP_BUDGETS = {"softmax_stats k=0": 14, "softmax_stats k=8": 19, "cross_entropy fwd": 12}
MERGE_OPS = {"amax", "exp", "sub", "mul", "sort", "gather", "where", "isnan"}


def _group_counts(ctx):
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(N, 64, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 128, (N,), generator=g)
    calls = {
        "softmax_stats k=0": lambda: ss.softmax_stats(x, t, process_group=ctx.group),
        "softmax_stats k=8": lambda: ss.softmax_stats(x, t, k=8, process_group=ctx.group),
        "cross_entropy fwd": lambda: ss.cross_entropy(x, t, process_group=ctx.group),
    }
    out = {}
    with ss.use_backend("triton"):
        for name, call in calls.items():
            call()  # the first call agrees on the layout (an extra exchange)
            with stub_launches(), count() as counts:
                call()
            out[name] = dict(counts.ops)
    return out


def test_group_call_merges_ranks_in_the_finalize_kernel():
    from dist_utils import run_ranks

    for rank_counts in run_ranks(_group_counts, 2):
        for name, ops in rank_counts.items():
            n_ops = sum(ops.values())
            assert n_ops <= GROUP_BUDGETS[name] + MARGIN, f"{name}: {n_ops} ops ({ops})"
            assert not MERGE_OPS & set(ops), f"{name}: torch merge ops {ops}"

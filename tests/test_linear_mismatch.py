"""Ranks of a group that disagree on what the LM head's call does (grad mode, which inputs require
grad, reduction, reduce_hidden_grad, impl, rows) must all raise a clear error at the call's FIRST
exchange, before any rank enters a second collective, and the group must keep working.

The default ``impl="chunked"`` takes the eager-gradient forward (one all-gather per block of rows)
only with gradients and a reduced loss; other calls make one all-gather. Every such choice travels
in the header of the call's first exchange. Two ranks on gloo, 13 rows in blocks of 5 (3
exchanges for the eager forward), each case after a correct call that sets the group's agreed
layout (so that ranks repeating it take the steady-state path). ``deferred``: the header check runs
as on a CUDA device whose GPU is behind the host (forced on the CPU; a check lands only when
waited for): a rank whose own call matched the agreed layout learns of the mismatch from that
check, which the eager forward waits for before its second exchange, backward polls before its
all-reduce (without waiting), and ``ss.synchronize`` resolves otherwise. A regression that lets one
rank enter a collective the others skip fails on the group's short timeout (20 s)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import shardsoftmax as ss
from shardsoftmax import linear as L
from shardsoftmax import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import calls_that_sync, count_collectives, run_ranks  # noqa: E402

N, H, V_PADDED, VOCAB, BLOCK_ROWS = 13, 8, 21, 20, 5
GRADS = "ranks disagree on grad mode / requires_grad"
DISAGREE = "ranks disagree on {}: rank 0 has {}, rank 1 has {}"

# name: (the agreed call every rank makes first, rank 0's call, rank 1's call, expected message).
# A call is the keyword arguments of ``_loss`` below; {} is a training step (eager, 3 blocks).
TRAIN, EVAL, FROZEN, RECOMPUTE = {}, {"grad": False}, {"hidden_grad": False}, {"impl": "recompute"}
CASES = {
    "no_grad on rank 0 while training": (TRAIN, EVAL, TRAIN, GRADS),
    "grad on rank 1 while evaluating": (EVAL, EVAL, TRAIN, GRADS),
    "weight requires_grad, hidden frozen": (FROZEN, {**FROZEN, "weight_grad": False}, FROZEN, GRADS),
    "weight requires_grad, both eager": (TRAIN, {"weight_grad": False}, TRAIN, GRADS),
    "reduce_hidden_grad": (TRAIN, TRAIN, {"reduce_hidden_grad": False}, GRADS),
    "reduction": (TRAIN, {"reduction": "none"}, TRAIN, DISAGREE.format("reduction", "none", "mean")),
    "reduction sum": (TRAIN, TRAIN, {"reduction": "sum"}, DISAGREE.format("reduction", "mean", "sum")),
    "impl": (TRAIN, RECOMPUTE, TRAIN, DISAGREE.format("impl", "recompute", "chunked")),
    # the same blocks (3 of 5 rows) on both ranks: only the call's row count tells them apart
    "rows": (TRAIN, {"n": N + 1}, TRAIN, DISAGREE.format("number of rows (tokens)", N + 1, N)),
    # one exchange forward, then backward's all-reduce on the rank with gradients only; deferred,
    # that rank's forward check has landed by backward (see ``_loss``)
    "no_grad on rank 0, recompute": (RECOMPUTE, {**RECOMPUTE, **EVAL}, {**RECOMPUTE, "landed": True}, GRADS),
}


# Cases whose deferred error reaches a rank after its forward returned (at ``ss.synchronize`` or at
# backward's poll), so it says an earlier call's check found it; elsewhere every rank raises
# within the call that disagreed, and says nothing of an earlier call.
AFTER_THE_CALL = {"grad on rank 1 while evaluating", "no_grad on rank 0, recompute"}


def _inputs(n: int = N):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V_PADDED, H, generator=g, dtype=torch.float64) * 0.5
    weight[VOCAB:] = 0
    target = torch.randint(0, VOCAB, (n,), generator=g)
    return hidden, weight, target


def _setup(ctx, backend: str):
    """This rank's hidden states, weight shard and targets (N + 1 rows) on its device, and the
    float64 loss of the first N rows; eager blocks of BLOCK_ROWS rows."""
    from shardsoftmax.nn import shard_sizes

    ss.set_backend(backend)
    L.EAGER_ROWS, L.EAGER_BLOCK_BYTES = BLOCK_ROWS, 0
    assert L.eager_blocks(N)[0] == L.eager_blocks(N + 1)[0] == BLOCK_ROWS
    hidden, weight, target = _inputs(N + 1)
    loss64 = R.oracle_cross_entropy(hidden[:N] @ weight.T, target[:N], vocab_size=VOCAB)
    widths = shard_sizes(V_PADDED, ctx.world_size)
    start = sum(widths[: ctx.rank])
    w_shard = weight[start : start + widths[ctx.rank]]
    hidden, w_shard, target = (x.float() if x.is_floating_point() else x for x in (hidden, w_shard, target))
    return hidden.to(ctx.device), w_shard.to(ctx.device), target.to(ctx.device), loss64


def mismatch_rank(ctx, defer: bool, backend: str = "torch") -> dict:
    """Each case: the agreed call, then the ranks' disagreeing calls (each rank records its
    exception, the seconds it took and the collectives it made), then a correct training step
    whose loss must equal the float64 oracle."""
    from shardsoftmax import collective

    collective.DEFER_ON_CPU = defer
    hidden, w_shard, target, loss64 = _setup(ctx, backend)

    def _loss(*, grad=True, hidden_grad=True, weight_grad=True, n=N, landed=False, **kw):
        """``landed``: before backward, the deferred checks land (a GPU that has caught up), so
        backward's poll sees them (one not landed by then is not waited for: no host sync)."""
        h = hidden[:n].clone().requires_grad_(hidden_grad)
        w = w_shard.clone().requires_grad_(weight_grad)
        with torch.set_grad_enabled(grad):
            loss = ss.linear_cross_entropy(h, w, target[:n], vocab_size=VOCAB, process_group=ctx.group, **kw)
        if landed:
            for check in collective._pending.get(id(ctx.group), ()):
                check.event.synchronize()
        if loss.requires_grad:
            loss.sum().backward()
        return loss.detach()

    out, failures = {}, []
    for name, (agreed, call0, call1, _) in CASES.items():
        _loss(**agreed)
        t0 = time.monotonic()
        with count_collectives() as calls:
            try:
                _loss(**(call0 if ctx.rank == 0 else call1))
                ss.synchronize(ctx.group)
                err = None
            except Exception as e:  # noqa: BLE001 - the test inspects the type and message
                err = (type(e).__name__, str(e))
        out[name] = (err, time.monotonic() - t0, dict(calls))
        got = _loss().cpu()  # the group still works
        if not torch.allclose(got.double(), loss64, rtol=1e-5, atol=1e-6):
            failures.append(f"rank {ctx.rank} after '{name}': loss {got.item()} != {loss64.item()}")
    return {"cases": out, "failures": failures}


def check_mismatch_results(out: list[dict], seconds_limit: float) -> None:
    failures = [f for r in out for f in r["failures"]]
    assert not failures, "\n".join(failures)
    for name, (*_, expected) in CASES.items():
        for rank, r in enumerate(out):
            err, seconds, calls = r["cases"][name]
            assert err is not None, f"'{name}': rank {rank} did not raise"
            assert expected in err[1], (
                f"'{name}': rank {rank} raised {err[0]}: {err[1]!r}; expected {expected!r}"
            )
            assert seconds < seconds_limit, f"'{name}': rank {rank} took {seconds:.1f} s to raise"
            if name not in AFTER_THE_CALL:
                assert "earlier call" not in err[1], f"'{name}': rank {rank} blamed an earlier call: {err[1]}"
            assert sum(calls.values()) == 1, f"'{name}': rank {rank} made {calls} (one exchange expected)"


def test_header_words_of_the_path():
    """String options travel as codes (0: the op has none, -2: anything else), the gradients as
    bits; both read back as the user wrote them in the error message."""
    from shardsoftmax import collective as C

    def make(**kw):
        return C.Header.make("linear_cross_entropy", 13, 0, torch.float32, True, 11, None, 20, -100, 1.0,
                             None, 0.0, 0.0, **kw)  # fmt: skip

    assert [make(reduction=r).reduction for r in (None, "mean", "sum", "none", "avg", 3)] == [
        0,
        1,
        2,
        3,
        -2,
        -2,
    ]
    assert [make(impl=i).impl for i in (None, "chunked", "recompute", "fused", ["fused"])] == [0, 1, 2, 3, -2]
    assert [C._shown("impl", v) for v in (0, 1, 3, -2)] == [None, "chunked", "fused", "invalid"]
    assert make().call_rows == 13 and make(call_rows=26, exchanges=2).call_rows == 26
    assert C.grad_bits(True, False, True, True) == 0b1101 and C.grad_bits(False, True, False, True) == 0b10
    assert C._shown("grads", 0) == "no gradients"
    assert C._shown("grads", 0b1011) == "gradients of hidden, weight, hidden's all-reduced"
    words = C._header_words([make(reduction="sum", impl="fused", grads=5, call_rows=26, exchanges=2)])
    assert C._read_headers(words)[0] == make(
        reduction="sum", impl="fused", grads=5, call_rows=26, exchanges=2
    )


@pytest.mark.parametrize("defer", [False, True], ids=["in-call", "deferred"])
def test_path_mismatch_raises_on_every_rank_at_the_first_exchange(defer):
    """Every case: every rank raises the error naming the argument, within 5 s, after one
    exchange (none enters a second collective); the next training step gives the exact loss."""
    check_mismatch_results(run_ranks(mismatch_rank, 2, defer, timeout=30), seconds_limit=5)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.multigpu
def test_nccl_path_mismatch_raises_on_every_rank_at_the_first_exchange():
    """The same on 2 GPUs with NCCL and the Triton kernels: the header check is the device-side
    one with real events (the first call of a case may compile kernels: 20 s per call)."""
    if _gpus() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {_gpus()}")
    out = run_ranks(mismatch_rank, 2, False, "auto", backend="nccl", timeout=180)
    check_mismatch_results(out, seconds_limit=20)


def steady_no_sync_rank(ctx) -> list[str]:
    """Training steps of the LM head that make one exchange in forward (impl "recompute"; the eager
    forward with one block) and backward's all-reduce, repeated on the agreed layout under
    ``torch.cuda.set_sync_debug_mode("error")``: backward's poll of the header check must not
    wait for the GPU. Returns the steps that synced."""
    hidden, w_shard, target, _ = _setup(ctx, "auto")
    steps = {"recompute": {"impl": "recompute"}, "eager, one block": {"n": BLOCK_ROWS}}
    calls = {}
    for name, opts in steps.items():
        n = opts.get("n", N)
        kw = {"impl": opts.get("impl", "chunked"), "vocab_size": VOCAB, "process_group": ctx.group}

        def step(n=n, kw=kw):
            h, w = hidden[:n].clone().requires_grad_(True), w_shard.clone().requires_grad_(True)
            ss.linear_cross_entropy(h, w, target[:n], **kw).backward()

        calls[name] = step
    return calls_that_sync(calls, ctx.group)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_nccl_one_exchange_training_step_does_not_sync():
    if _gpus() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {_gpus()}")
    synced = [s for r in run_ranks(steady_no_sync_rank, 2, backend="nccl", timeout=180) for s in r]
    assert not synced, "\n".join(synced)

"""Counts what one public call costs on the host: torch dispatcher ops, Triton launches and
Python time, on the CPU, in a way that predicts the host cost of the same call on a GPU.

The Triton path is measured with every launch replaced by a no-op (``stub_launches``): what is
left is the Python and the torch ops around the kernels, which is what a GPU call spends on the
host besides the launches themselves. The outputs are then garbage (``torch.empty``), which
nothing here reads. Dispatcher ops are counted below autograd with a ``TorchDispatchMode``
(``aten`` ops only, views included: each costs a dispatch on the GPU too).

    python tests/host_ops.py            # the table: ops, launches, µs per call, per case

``tests/test_host_ops.py`` asserts the op and launch counts stay at most the measured ones.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

import shardsoftmax as ss  # noqa: E402


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stub_launches():
    """Every ``kernel[grid](...)`` becomes a no-op that returns None (counted by ``count``)."""
    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: lambda *a, **kw: None
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


class Counts:
    def __init__(self):
        self.ops: Counter = Counter()
        self.launches: list[str] = []

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def count():
    """Counts aten ops and Triton launches inside the block. Ops that a launch itself makes (the
    interpreter copies its arguments) are not counted: on a GPU they do not exist."""
    counts = Counts()
    mode = _OpCounter()
    getitem = KernelInterface.__getitem__

    def counted_getitem(kernel, grid):
        launch = getitem(kernel, grid)

        def run(*args, **kwargs):
            counts.launches.append(getattr(kernel, "__name__", "?"))
            mode.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                mode.paused = False

        return run

    KernelInterface.__getitem__ = counted_getitem
    try:
        with mode:
            yield counts
    finally:
        KernelInterface.__getitem__ = getitem
        counts.ops = mode.ops


# ------------------------------------------------------------------------------------------------
# The calls measured: one public call each, process_group=None, on tiny CPU inputs.
# ------------------------------------------------------------------------------------------------

N, V = 8, 64
# CUDA tensors where there is a GPU (compiled Triton: the launches are stubbed, nothing runs),
# else CPU tensors with Triton in interpreter mode.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def inputs(requires_grad: bool = False, n: int = N, v: int = V):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    t[3 % n] = -100
    return x.to(DEVICE).requires_grad_(requires_grad), t.to(DEVICE)


def _ce_backward_case(n: int, v: int):
    """cross_entropy backward alone: the forward runs outside the counted block."""
    x, t = inputs(requires_grad=True, n=n, v=v)
    state = {}

    def setup():
        state["loss"] = ss.cross_entropy(x, t)

    def call():
        state["loss"].backward()
        x.grad = None

    return setup, call


def _plain(fn: Callable):
    return (lambda: None), fn


def cases(n: int = N, v: int = V) -> dict[str, tuple[Callable, Callable]]:
    """name -> (setup, call); ``call`` is what is measured, ``setup`` runs before each call."""
    x, t = inputs(n=n, v=v)
    xg, _ = inputs(requires_grad=True, n=n, v=v)
    return {
        "softmax_stats k=0": _plain(lambda: ss.softmax_stats(x, t)),
        "softmax_stats k=50": _plain(lambda: ss.softmax_stats(x, t, k=50)),
        "cross_entropy fwd": _plain(lambda: ss.cross_entropy(x, t)),
        "cross_entropy fwd (grad)": _plain(lambda: ss.cross_entropy(xg, t)),
        "cross_entropy bwd": _ce_backward_case(n, v),
        "softmax": _plain(lambda: ss.softmax(x)),
        "log_softmax": _plain(lambda: ss.log_softmax(x)),
        "topk k=8": _plain(lambda: ss.topk(x, 8)),
    }


def measure(backend: str, name: str, *, reps: int = 40, batches: int = 10) -> tuple[Counts, float]:
    """(counts of one call, µs of host time per call) for the case ``name`` on ``backend``
    ('triton' with stubbed launches, or 'torch'). The time is the best of ``batches`` batch means
    (the machine is shared: the minimum is the least disturbed)."""
    setup, call = cases()[name]
    stub = stub_launches() if backend == "triton" else contextlib.nullcontext()
    with ss.use_backend(backend), stub:
        for _ in range(3):  # warm caches
            setup()
            call()
        setup()
        with count() as counts:
            call()
        best = float("inf")
        for _ in range(batches):
            total = 0.0
            for _ in range(reps):
                setup()
                t0 = time.perf_counter()
                call()
                total += time.perf_counter() - t0
            best = min(best, total / reps)
    return counts, best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    print(f"N={N} V={V} bf16 on {DEVICE}; triton = Triton path with launches stubbed out")
    print(f"{'case':26s} {'ops':>5s} {'launches':>9s} {'triton µs':>10s} {'torch µs':>9s}  ops by name")
    for name in cases():
        counts, us = measure("triton", name)
        _, us_torch = measure("torch", name)
        top = ", ".join(f"{k}:{v}" for k, v in counts.ops.most_common())
        print(f"{name:26s} {counts.n_ops:5d} {len(counts.launches):9d} {us:10.1f} {us_torch:9.1f}  {top}")


if __name__ == "__main__":
    main()

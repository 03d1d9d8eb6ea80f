"""Shared pieces of the benchmarks: timers, the copy-bandwidth and matmul baselines of the run,
input generation, a float64 reference with per-dtype checks, the baselines both scripts use
(Megatron-style cross-entropy, Liger-Kernel), CSV rows, the tables, the bars and the time budget.

Everything that needs CUDA sits behind ``device.type == "cuda"``; on the CPU (``--dry-run``)
timers fall back to ``time.perf_counter`` and memory measurements return None.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------------------------
# Printing and environment
# ----------------------------------------------------------------------------------------------


def log(*args, **kw) -> None:
    """print(..., flush=True): partial output stays useful if a run is cut off."""
    print(*args, **kw, flush=True)


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    """Free device memory (driver's view plus what PyTorch caches), None on the CPU."""
    if not is_cuda(device):
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``SHARDSOFTMAX_COMMIT``
    when set: a copy of the working tree on another machine may carry a stale ``.git`` (the GPU
    machine's copies reported the session's first commit, +dirty), so pass the real one there."""
    if os.environ.get("SHARDSOFTMAX_COMMIT"):
        return os.environ["SHARDSOFTMAX_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run_meta(device: torch.device, *, bench: str, world_size: int, preset: str) -> dict:
    """The columns shared by every CSV row of one run."""
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "bench": bench,
        "preset": preset,
        "world_size": world_size,
    }


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def short_error(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:limit]


# ----------------------------------------------------------------------------------------------
# Time budget
# ----------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget of a run (``--max-seconds``): a task starts only if the time it is
    expected to take still fits. None = no limit."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds = max_seconds if max_seconds and max_seconds > 0 else None
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, expected_s: float) -> bool:
        return self.max_seconds is None or self.elapsed() + expected_s <= self.max_seconds


# ----------------------------------------------------------------------------------------------
# Timers
# ----------------------------------------------------------------------------------------------


def cpu_bench(
    fn: Callable[[], object], *, min_reps: int = 1, max_reps: int = 10, budget_s: float = 0.02
) -> float:
    """Median wall time in ms of ``fn`` (CPU dry run: one warm-up call, then a few timed calls)."""
    fn()
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> float:
    """Median time in ms of one call of ``fn``: ``triton.testing.do_bench`` on CUDA (it clears
    the L2 cache before every timed call), a perf_counter loop on the CPU. Only for code without
    collectives: do_bench picks its repeat count per process, so ranks would deadlock."""
    if not is_cuda(device):
        return cpu_bench(fn)
    import triton.testing

    warmup, rep = (10, 40) if quick else (25, 100)
    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # very old Triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5]))


def time_fixed(
    fn: Callable[[], object],
    device: torch.device,
    *,
    iters: int,
    warmup: int,
    group=None,
) -> float:
    """Median ms of ``fn`` over a FIXED number of calls, each bracketed by CUDA events (perf_counter
    on the CPU), started after a barrier; then the MAX over the ranks of ``group`` (one all_reduce,
    outside the timed region). Every rank runs exactly ``warmup + iters`` calls, so collectives
    inside ``fn`` line up and nothing deadlocks."""
    import torch.distributed as dist

    distributed = group is not None and dist.is_initialized()
    for _ in range(warmup):
        fn()
    synchronize(device)
    if distributed:
        dist.barrier(group=group)
    times: list[float] = []
    if is_cuda(device):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    if distributed:
        t = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        ms = float(t.item())
    return ms


_SLEEP_CYCLES_PER_MS: list[float] = []


def _sleep_cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per ms on this GPU, measured once with CUDA events."""
    if not _SLEEP_CYCLES_PER_MS:
        cycles = 20_000_000
        torch.cuda._sleep(cycles // 10)  # warm-up
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        _SLEEP_CYCLES_PER_MS.append(cycles / a.elapsed_time(b))
    return _SLEEP_CYCLES_PER_MS[0]


HOST_AHEAD_NOTE = "GPU time per call with the host ahead (C.time_queued)"


def time_queued(
    fn: Callable[[], object], device: torch.device, *, calls: int = 12, warmup: int = 3, group=None
) -> float | None:
    """ms per call of GPU stream time with the host AHEAD of the GPU, as in a training step where
    the LM head's matmul gives the host time to queue the loss: a GPU sleep is queued first, long
    enough (1.5x + 2 ms of the measured host time of ``calls`` calls) for the host to queue all
    ``calls`` calls behind it, and CUDA events time the calls from the end of the sleep. Returns
    None if the sleep ended before the host had queued every call (the measurement would include
    host time). With a ``group``: every rank sleeps as long, then the MAX over the ranks; every
    rank runs the same number of calls. CUDA only (None on the CPU). ``calls`` stays under the
    group path's 16 pending header checks."""
    import torch.distributed as dist

    if not is_cuda(device):
        return None
    distributed = group is not None and dist.is_initialized()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    if distributed:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    if distributed:
        # Every rank sleeps as long (the longest host time). With each rank's own, the sleeps
        # differed by 1.5x the difference of the host times: the rank whose sleep ended first
        # waited in its first all-gathers for the others, and that wait counted as GPU time.
        t = torch.tensor([host_ms], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        host_ms = t.item()
        dist.barrier(group=group)
    asleep, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    torch.cuda._sleep(int((1.5 * host_ms + 2.0) * _sleep_cycles_per_ms()))
    asleep.record()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host_ahead = not asleep.query()  # the sleep still runs: every call was queued behind it
    torch.cuda.synchronize(device)
    ms, late = start.elapsed_time(end) / calls, 0.0 if host_ahead else 1.0
    if distributed:
        t = torch.tensor([ms, late], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        ms, late = t.tolist()
    return None if late else ms


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    cycles: int = 15,
    heat_ms: float = 400.0,
    heat_cycles: int = 3,
    group=None,
) -> dict[str, float]:
    """Median ms per call of each of ``fns``, timed turn by turn: ``cycles`` cycles of one call of
    each provider, in a new random order every cycle (seeded), every call bracketed by CUDA
    events, no host sync between calls. First the providers run in turns for ``heat_ms`` of wall
    time (compiles and autotuning, and the GPU settles at the clock it keeps under load).

    Why turns: a GPU at its power cap lowers its clock within a few hundred ms of dense matmuls
    and raises it again while idle (one H200 in v0.16: 1980 MHz after a rest, 1320-1620 MHz at
    675-703 W of its 700 W). Timed one after another, each provider runs at whatever clock the
    ones before it left; turn by turn they all share the same clocks, and their ratios are
    comparable. Why shuffled: a slow provider that draws little power (v0.16's fused backward)
    lets the clock rise for the call after it; in a fixed or rotated order that is always the
    same provider (v0.16: the matmul 10.7 ms after the slow ones, 12.2 ms among the fast ones).
    With a ``group`` (calls that run collectives): the warm-up is ``heat_cycles`` cycles instead,
    the same calls on every rank (wall time differs between ranks); every rank draws the same
    orders (the same seed); a barrier starts the timed cycles; each provider's result is the MAX
    over the ranks of the rank's median (one all_reduce). On the CPU: one warm-up cycle (or
    ``heat_cycles`` with a group), then ``perf_counter`` per call."""
    import random

    import torch.distributed as dist

    if cycles < 1 or heat_cycles < 1:
        raise ValueError(
            f"time_interleaved: cycles and heat_cycles must be at least 1 (got {cycles}, {heat_cycles})"
        )
    distributed = group is not None and dist.is_initialized()
    names = list(fns)
    rng = random.Random(0)
    cuda = is_cuda(device)
    t_end = time.perf_counter() + (heat_ms / 1e3 if cuda else 0.0)
    done = 0
    while True:  # at least one call of each
        for name in names:
            fns[name]()
        synchronize(device)
        done += 1
        if (done >= heat_cycles) if distributed else (time.perf_counter() >= t_end):
            break
    if distributed:
        dist.barrier(group=group)
    times: dict[str, list] = {name: [] for name in names}
    for _ in range(cycles):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                times[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    if cuda:
        times = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in times.items()}
    medians = {name: statistics.median(t) for name, t in times.items()}
    if distributed:
        t = torch.tensor([medians[name] for name in names], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        medians = dict(zip(names, t.tolist()))
    return medians


class ClockLog:
    """The GPU's SM clock, power draw and power-cap flag, sampled by ``nvidia-smi`` every
    ``interval_ms`` while the ``with`` block runs; ``summary()`` after it: one line, or None where
    there is no ``nvidia-smi`` (or no CUDA device)."""

    FIELDS = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"
    SW_POWER_CAP = 0x4  # bit of clocks_throttle_reasons.active

    def __init__(self, device: torch.device, interval_ms: int = 100):
        self.device, self.interval_ms = device, interval_ms
        self._proc, self._lines = None, []

    def __enter__(self):
        if is_cuda(self.device):
            cmd = ["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                   f"-lms={self.interval_ms}", f"--id={self.smi_id(self.device)}"]  # fmt: skip
            try:
                pipe, devnull = subprocess.PIPE, subprocess.DEVNULL
                self._proc = subprocess.Popen(cmd, stdout=pipe, stderr=devnull, text=True)
            except OSError:
                self._proc = None
        return self

    @staticmethod
    def smi_id(device: torch.device) -> str:
        """The GPU's id for ``nvidia-smi --id``: its PCI bus id, as nvidia-smi (which does not read
        CUDA_VISIBLE_DEVICES) numbers GPUs otherwise than this process may; the index without it."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        if not all(hasattr(p, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
            return str(index)
        return f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self._lines = [line for line in out.splitlines() if line.strip()]
        return False

    def samples(self) -> list[tuple[float, float, float, int]]:
        """(SM MHz, watts, power limit W, throttle reasons) per sample that parsed."""
        out = []
        for line in self._lines:
            parts = [p.strip() for p in line.split(",")]
            try:
                out.append((float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3], 16)))
            except (ValueError, IndexError):
                continue
        return out

    def summary(self) -> str | None:
        s = self.samples()
        if not s:
            return None
        clocks = sorted(x[0] for x in s)
        capped = sum(1 for x in s if x[3] & self.SW_POWER_CAP)
        return (
            f"SM clock median {statistics.median(clocks):.0f} MHz "
            f"(min {clocks[0]:.0f}, max {clocks[-1]:.0f}); "
            f"power max {max(x[1] for x in s):.0f} W of {s[-1][2]:.0f} W; "
            f"power cap throttling in {capped} of {len(s)} samples ({self.interval_ms} ms apart)"
        )


def wall_per_call(
    fn: Callable[[], object], device: torch.device, *, calls: int = 100, reps: int = 5, warmup: int = 10
) -> float:
    """End-to-end ms per call: the host wall time of ``calls`` back-to-back calls followed by one
    synchronize, divided by ``calls`` (so it is max(host launch time, GPU time) per call); median
    over ``reps`` repetitions. What a decode loop that launches one call per step sees."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(per_call)


def capture_graph(fn: Callable[[], object], device: torch.device):
    """(graph, outputs): ``fn`` captured in a torch.cuda.CUDAGraph after three warm-up calls on a
    side stream (kernels compiled, caches filled). Raises whatever the capture raises."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize(device)
    return graph, out


# ----------------------------------------------------------------------------------------------
# Machine baselines of this run
# ----------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, *, quick: bool = False) -> tuple[float, float, int]:
    """(bytes/s, ms, bytes moved) of one large device-to-device copy, counting bytes read plus bytes
    written (2 GiB each way on CUDA, 2 x 256 MiB with quick; 2 x 16 MiB on the CPU)."""
    if is_cuda(device):
        nbytes = (256 << 20) if quick else (2 << 30)
    else:
        nbytes = 16 << 20
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=quick)
    moved = 2 * nbytes
    return moved / (ms * 1e-3), ms, moved  # the buffers are freed on return


def matmul_rate(device: torch.device, *, quick: bool = False) -> tuple[float, float, int, torch.dtype]:
    """(FLOP/s, ms, n, dtype) of one n x n x n matmul: bf16 8192^3 on CUDA, fp32 128^3 on the CPU."""
    if is_cuda(device):
        n, dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        n, dtype = 128, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device, quick=quick)
    return 2.0 * n**3 / (ms * 1e-3), ms, n, dtype


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

L2_BYTES = 60 << 20  # H100: 50 MB, H200: 60 MB; sets smaller than this rotate


def n_buffers(set_bytes: int, *, max_sets: int = 8) -> int:
    """How many input sets to rotate through so that consecutive calls do not find their inputs
    in L2: enough to cover 2x the L2 size when one set fits in it, else 1."""
    if set_bytes >= L2_BYTES:
        return 1
    return max(2, min(max_sets, math.ceil(2 * L2_BYTES / max(set_bytes, 1))))


def random_logits(
    n: int, v: int, dtype: torch.dtype, device: torch.device, *, seed: int, scale: float = 3.0
) -> torch.Tensor:
    """Fresh ``randn * scale`` logits [n, v] in ``dtype`` (never zeros, so no kernel can shortcut),
    drawn in blocks of rows so that no full-size float32 temporary exists (N=32768, V=256000 in
    bf16 is 16 GB; its float32 draw would be 32 GB more)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    out = torch.empty(n, v, dtype=dtype, device=device)
    rows = max(1, (1 << 27) // max(v, 1))  # 512 MB of float32 per block
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = torch.randn(r1 - r0, v, generator=g, device=device, dtype=torch.float32)
        out[r0:r1] = block.mul_(scale)
    return out


def random_targets(n: int, v: int, device: torch.device, *, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed + 7919)
    return torch.randint(0, v, (n,), generator=g, device=device, dtype=torch.int64)


class Rotation:
    """Cycles through a few input sets; ``next()`` returns the index of the set to use now."""

    def __init__(self, count: int):
        self.count = count
        self.i = -1

    def next(self) -> int:
        self.i = (self.i + 1) % self.count
        return self.i


# ----------------------------------------------------------------------------------------------
# Float64 reference and checks
# ----------------------------------------------------------------------------------------------

# Normwise tolerance max|got - ref| / max|ref| by the dtype of the output checked: a few units
# of its rounding (bf16 u = 2^-8, fp16 u = 2^-11); fp32 results also carry the rounding of sums
# over up to ~10^6 terms. A wrong kernel misses these by orders of magnitude.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 5e-5, torch.float64: 1e-10}


@dataclass
class Reference:
    """Float64 ground truth for one logits tensor [N, V] (and targets), on the logits' device.
    Per-row scalars cover every row; full rows only a sample of rows (``rows``)."""

    rows: torch.Tensor  # [S] sampled row ids
    lse: torch.Tensor  # [N]
    loss_mean: torch.Tensor  # [] mean cross-entropy over all rows
    logp: torch.Tensor  # [S, V] log-softmax of the sampled rows
    topk_vals: torch.Tensor  # [S, k_max] largest logits of the sampled rows, descending
    topk_ids: torch.Tensor  # [S, k_max] their ids; equal values: the lower id first
    target: torch.Tensor | None  # [N]
    extra: dict = field(default_factory=dict)

    def grad_rows(self, n_total: int) -> torch.Tensor:
        """d mean-CE / d logits on the sampled rows: (softmax - onehot) / N."""
        g = self.logp.exp()
        g[torch.arange(len(self.rows), device=g.device), self.target[self.rows]] -= 1.0
        return g / n_total


def sample_rows(n: int, count: int, device: torch.device) -> torch.Tensor:
    if n <= count:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, count, device=device).round().long().unique()


def build_reference(
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    k_max: int,
    n_rows_checked: int = 64,
    chunk_bytes: int = 512 << 20,
) -> Reference:
    """Float64 lse of every row (in chunks of rows, so memory stays bounded), the mean loss, and
    log-softmax / top-k of a sample of rows. ``x`` is the full [N, V] logits."""
    n, v = x.shape
    lse = torch.empty(n, dtype=torch.float64, device=x.device)
    step = max(1, chunk_bytes // max(1, 8 * v))
    for r0 in range(0, n, step):
        lse[r0 : r0 + step] = torch.logsumexp(x[r0 : r0 + step].double(), dim=-1)
    loss_mean = torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    if target is not None:
        xt = x.gather(1, target[:, None])[:, 0].double()
        loss_mean = (lse - xt).mean()
    rows = sample_rows(n, n_rows_checked, x.device)
    xs = x[rows].double()
    logp = xs - lse[rows, None]
    k = min(k_max, v)
    # A stable descending sort keeps equal values in id order: the lower id first.
    vals, ids = torch.sort(xs, dim=-1, descending=True, stable=True)
    return Reference(rows, lse, loss_mean, logp, vals[:, :k].contiguous(), ids[:, :k].contiguous(), target)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref| in float64 (inf where got has NaN/inf that ref has not)."""
    got = got.double()
    ref = ref.double().to(got.device)
    if got.shape != ref.shape:
        raise CheckFailed(f"shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    return err / max(scale, 1e-300)


class CheckFailed(Exception):
    pass


def expect_close(what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Raise CheckFailed unless ``got`` is within TOLERANCE[got.dtype] of ``ref`` (normwise)."""
    tol = TOLERANCE.get(got.dtype, 1e-2)
    err = rel_error(got, ref)
    if not err <= tol:
        raise CheckFailed(
            f"{what}: relative error {err:.3g} > {tol:g} (output dtype {dtype_name(got.dtype)})"
        )


def expect_topk(
    what: str,
    ids: torch.Tensor,
    vals_raw: torch.Tensor,
    x_rows: torch.Tensor,
    ref: Reference,
    *,
    exact_ids: bool,
) -> None:
    """Top-k of the sampled rows: values (raw logits, descending) against the reference; ids either
    exactly (our documented tie-break) or, for providers with an unspecified tie order, by checking
    that every id holds the value reported for it and that no id repeats."""
    k = ids.shape[-1]
    ref_vals, ref_ids = ref.topk_vals[:, :k], ref.topk_ids[:, :k]
    expect_close(f"{what} top-{k} values", vals_raw, ref_vals)
    if exact_ids:
        bad = (ids.long() != ref_ids).sum().item()
        if bad:
            raise CheckFailed(
                f"{what}: {bad} top-{k} ids differ from the reference (tie-break: lower id first)"
            )
        return
    picked = x_rows.double().gather(1, ids.long())
    if not torch.equal(picked, ref_vals.to(picked.device)):
        raise CheckFailed(f"{what}: top-{k} ids do not point at the {k} largest values")
    if k > 1 and (ids.sort(dim=-1).values.diff(dim=-1) == 0).any():
        raise CheckFailed(f"{what}: repeated top-{k} ids")


def run_check(check: Callable[[], None]) -> tuple[str, str]:
    """Run ``check``: ("ok", "") or (status, reason) with status "wrong" (a result outside the
    tolerance), "oom" or "error" (it raised)."""
    try:
        check()
        return "ok", ""
    except CheckFailed as err:
        return "wrong", f"WRONG RESULT: {err}"
    except OOM:
        return "oom", "out of memory during the check"
    except Exception as err:  # a provider that cannot run here at all
        return "error", short_error(err, 240)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


ALLOC_ROUND_BYTES = 2 << 20  # the CUDA caching allocator's rounding of large segments


def extra_peak_memory(
    run: Callable[[], Sequence[torch.Tensor]], device: torch.device, inputs: Sequence[torch.Tensor] = ()
) -> int | None:
    """Peak memory of ``run()`` beyond what was allocated before it (the inputs) and beyond its
    outputs (``run`` returns them, e.g. (loss, grad)); an output that shares an input's storage
    (in-place gradient) is not subtracted. An output counts as what the caching allocator holds
    for it (a large block keeps the rest of its segment, rounded up to 2 MiB, when that rest is
    at most 1 MiB: a [8192, 32064] bf16 gradient holds 1 MiB more than its 501 MiB), measured as
    what stays allocated after ``run`` beyond ``base``, and never more than 2 MiB per output
    above its bytes (so a call that leaves more memory allocated is not hidden). None on the
    CPU."""
    if not is_cuda(device):
        run()
        return None
    import gc

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    outs = run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    held = torch.cuda.memory_allocated(device) - base  # the outputs, as the allocator holds them
    in_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: set[int] = set()
    out_bytes = n_outs = 0
    for t in outs:
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in in_ptrs or ptr in seen:
            continue
        seen.add(ptr)
        out_bytes += t.untyped_storage().nbytes()
        n_outs += 1
    del outs
    out_bytes = max(out_bytes, min(held, out_bytes + n_outs * ALLOC_ROUND_BYTES))
    return int(peak - base - out_bytes)


# ----------------------------------------------------------------------------------------------
# Baselines used by both scripts
# ----------------------------------------------------------------------------------------------


class MegatronVocabParallelCE(torch.autograd.Function):
    """Megatron-LM's vocab-parallel cross-entropy (tensor_parallel/cross_entropy.py), as commonly
    used: on fp32 logits (the caller passes ``logits.float()``); all_reduce MAX of the row max,
    subtract, exp, all_reduce SUM of the masked target logit and of the sum of exps (three
    all-reduces); saves the fp32 softmax for a backward that works in place on it (no collective).
    ``group=None``: one process, the all-reduces are skipped (the same math at TP=1)."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        import torch.distributed as dist

        n_rows, width = logits.shape
        logits_max = logits.max(dim=-1)[0]
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)
        target_mask = (target < vocab_start) | (target >= vocab_start + width)
        masked_target = target - vocab_start
        masked_target[target_mask] = 0
        rows = torch.arange(n_rows, device=logits.device)
        predicted = logits[rows, masked_target]
        predicted[target_mask] = 0.0
        if group is not None:
            dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        exp_logits = torch.exp(logits, out=logits)
        sum_exp = exp_logits.sum(dim=-1)
        if group is not None:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        loss = torch.log(sum_exp) - predicted
        exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp_logits, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad = softmax  # in place, as Megatron
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, masked_target] -= 1.0 - target_mask.to(grad.dtype)
        grad.mul_(grad_output.unsqueeze(-1))
        return grad, None, None, None


def megatron_ce(shard: torch.Tensor, target: torch.Tensor, vocab_start: int = 0, group=None) -> torch.Tensor:
    """Mean Megatron-style cross-entropy of this shard (fp32 upcast, three all-reduces)."""
    return MegatronVocabParallelCE.apply(shard.float(), target, vocab_start, group).mean()


def find_liger(device: torch.device):
    """(liger_kernel.transformers module, "") or (None, why not)."""
    if not is_cuda(device) and not triton_interpreted():
        return None, "Liger-Kernel's Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"
    try:
        import liger_kernel.transformers as lt
    except Exception as err:
        return None, f"liger_kernel not importable ({short_error(err, 120)})"
    return lt, ""


def megatron_memory(n: int, width: int) -> int:
    """Bytes the Megatron-style CE allocates for one fwd+bwd (fp32 copy, shifted fp32, a little)."""
    return 2 * n * width * 4 + 64 * n


# ----------------------------------------------------------------------------------------------
# Results: CSV rows and the tables
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "date", "commit", "gpu", "torch", "triton", "bench", "preset", "world_size", "tp",
    "op", "provider", "dtype", "n", "vocab", "v_shard", "k", "pass", "status",
    "ms", "bytes", "gb_s", "frac_of_copy_bw", "floor_ms", "x_floor", "copy_gb_s", "extra_mem_bytes", "note",
]  # fmt: skip

OURS = "shardsoftmax"


@dataclass
class Result:
    op: str
    provider: str
    dtype: str
    n: int
    v_shard: int
    k: int
    pass_: str
    ms: float | None
    floor_bytes: int  # the least traffic the op needs (same for every provider of a group)
    copy_bw: float  # bytes/s measured in this run
    extra_mem: int | None = None
    note: str = ""
    status: str = "ok"
    tp: int = 1
    vocab: int | None = None  # the global vocabulary (default: v_shard)

    @property
    def key(self) -> tuple:
        return (self.op, self.pass_, self.dtype, self.n, self.vocab_total, self.v_shard, self.k, self.tp)

    @property
    def vocab_total(self) -> int:
        return self.v_shard if self.vocab is None else self.vocab

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.ms is not None

    @property
    def floor_ms(self) -> float | None:
        if not self.floor_bytes or not self.copy_bw:
            return None
        return self.floor_bytes / self.copy_bw * 1e3

    @property
    def gb_s(self) -> float | None:
        if not self.ok or not self.ms or not self.floor_bytes:
            return None
        return self.floor_bytes / (self.ms * 1e-3) / 1e9

    @property
    def frac(self) -> float | None:
        if self.gb_s is None or not self.copy_bw:
            return None
        return self.gb_s * 1e9 / self.copy_bw

    @property
    def x_floor(self) -> float | None:
        if not self.ok or not self.ms or not self.floor_ms:
            return None
        return self.ms / self.floor_ms

    def csv_row(self, meta: dict) -> dict:
        def fmt(v, digits=6):
            return "" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else v)

        return {
            **meta,
            "tp": self.tp,
            "op": self.op,
            "provider": self.provider,
            "dtype": self.dtype,
            "n": self.n,
            "vocab": self.vocab_total,
            "v_shard": self.v_shard,
            "k": self.k,
            "pass": self.pass_,
            "status": self.status,
            "ms": fmt(self.ms) if self.ok else "",
            "bytes": self.floor_bytes or "",
            "gb_s": fmt(self.gb_s),
            "frac_of_copy_bw": fmt(self.frac, 4),
            "floor_ms": fmt(self.floor_ms),
            "x_floor": fmt(self.x_floor, 4),
            "copy_gb_s": fmt(self.copy_bw / 1e9 if self.copy_bw else None, 5),
            "extra_mem_bytes": "" if self.extra_mem is None else self.extra_mem,
            "note": self.note.replace("\n", " "),
        }


class CsvWriter:
    """Appends rows to ``path`` (header first), flushing each row so a cut-off run keeps them."""

    def __init__(self, path: str, meta: dict):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.meta = meta
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=CSV_COLUMNS)
        self._w.writeheader()
        self._f.flush()

    def write(self, r: Result) -> None:
        self._w.writerow(r.csv_row(self.meta))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def out_path(out_dir: str, stem: str, meta: dict) -> str:
    gpu = "".join(c if c.isalnum() else "-" for c in meta["gpu"]).strip("-").lower()[:40]
    stamp = meta["date"].replace(":", "").replace("-", "")
    return os.path.join(out_dir, f"{stem}_{gpu}_{stamp}.csv")


def speedups(results: Sequence[Result]) -> dict[int, float]:
    """For every non-ours result with a measured time: its ms / ours' ms in the same group."""
    ours = {r.key: r.ms for r in results if r.provider == OURS and r.ok}
    return {id(r): r.ms / ours[r.key] for r in results if r.provider != OURS and r.ok and r.key in ours}


def format_table(results: Sequence[Result]) -> str:
    """Compact table; 'ours_x' = how many times faster shardsoftmax is than that row's provider.
    Columns that hold one value for every row (dtype, N, TP) are stated once above the table."""
    sp = speedups(results)
    one_dtype = len({r.dtype for r in results}) <= 1
    one_n = len({r.n for r in results}) <= 1
    one_tp = len({r.tp for r in results}) <= 1
    above = []
    if results and one_dtype:
        above.append(f"dtype {results[0].dtype}")
    if results and one_n:
        above.append(f"N={results[0].n}")
    if results and one_tp:
        above.append(f"TP={results[0].tp}")

    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    head = (
        f"{'op':<13} {'pass':<7} "
        + ("" if one_dtype else f"{'dt':<4} ")
        + ("" if one_n else f"{'N':>5} ")
        + ("" if one_tp else f"{'TP':>2} ")
        + f"{'V_shard':>7} {'k':>4} {'provider':<17} {'ms':>9} {'GB/s':>6} {'%copy':>5} {'xfloor':>6} "
        + f"{'ours_x':>6} {'xmemMB':>7}"
    )
    lines = ([", ".join(above)] if above else []) + [head, "-" * len(head)]
    for r in results:
        mem = None if r.extra_mem is None else r.extra_mem / 2**20
        ms = f(r.ms, "9.3f") if r.ok else r.status
        lines.append(
            f"{r.op[:13]:<13} {r.pass_:<7} "
            + ("" if one_dtype else f"{r.dtype:<4} ")
            + ("" if one_n else f"{r.n:>5} ")
            + ("" if one_tp else f"{r.tp:>2} ")
            + f"{r.v_shard:>7} {r.k:>4} {r.provider[:17]:<17} {ms:>9} {f(r.gb_s, '6.0f'):>6} "
            + f"{f(None if r.frac is None else 100 * r.frac, '5.1f'):>5} {f(r.x_floor, '6.2f'):>6} "
            + f"{f(sp.get(id(r)), '6.2f'):>6} {f(mem, '7.1f'):>7}"
        )
    return "\n".join(lines)


def speedup_markdown(results: Sequence[Result], conditions: str) -> str:
    """Markdown table for the README: one line per measured (op, pass, dtype, N, V, k, TP) of
    shardsoftmax, its time and floor ratio, then for every peer in the run how many times faster
    shardsoftmax is (peer ms / ours ms), or that peer's status (oom, wrong, error)."""
    ours = [r for r in results if r.provider == OURS and r.ok]
    peers = []
    for r in results:
        if r.provider != OURS and r.provider not in peers and r.op not in ("copy", "matmul", "allgather"):
            peers.append(r.provider)
    by_key: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_key.setdefault(r.key, {})[r.provider] = r
    multi_tp = len({r.tp for r in results if r.op not in ("copy", "matmul")}) > 1 or any(
        r.tp > 1 for r in ours
    )
    head = ["op", "pass", "dtype", "N"] + (["TP", "V"] if multi_tp else []) + ["V_shard", "k"]
    head += ["shardsoftmax ms (x floor)"] + [f"vs {p}" for p in peers]
    lines = [f"_{conditions}_", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ours:
        if r.op in ("local_stats",):
            continue
        cells = [r.op, r.pass_, r.dtype, str(r.n)]
        if multi_tp:
            cells += [str(r.tp), str(r.vocab_total)]
        cells += [str(r.v_shard), str(r.k)]
        xf = f" ({r.x_floor:.2f}x)" if r.x_floor is not None else ""
        cells.append(f"{r.ms:.4g}{xf}")
        for p in peers:
            other = by_key.get(r.key, {}).get(p)
            if other is None:
                cells.append("-")
            elif other.ok:
                cells.append(f"{other.ms / r.ms:.2f}x")
            else:
                cells.append(other.status)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "vs X = X's time / shardsoftmax's time in the same run (above 1: shardsoftmax is faster); "
        "oom / wrong / error: that peer ran out of memory, failed its float64 check, or raised."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Bars
# ----------------------------------------------------------------------------------------------


@dataclass
class Bar:
    issue: int
    what: str  # the measurement and its configuration
    limit: str  # the bar, in words
    status: str  # PASS, FAIL or MISSING (not measured in this run)
    value: str = ""  # what was measured


def bar_lines(bars: Sequence[Bar]) -> list[str]:
    width = max([54] + [len(b.what) + 1 for b in bars])
    lines = [f"{b.status:<7} #{b.issue} {b.what:<{width}} {b.value:<30} bar: {b.limit}" for b in bars]
    counts = {s: sum(b.status == s for b in bars) for s in ("PASS", "FAIL", "MISSING")}
    summary = f"bars: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['MISSING']} MISSING"
    lines.append(summary + " (MISSING: not measured in this run)")
    return lines


def judge(
    issue: int, what: str, limit: str, value: float | None, ok: bool | None, shown: str, status=""
) -> Bar:
    """A bar line: MISSING when nothing was measured, else PASS/FAIL; ``status`` (oom, wrong,
    error) of the measured row makes it a FAIL that says why."""
    if status and status != "ok":
        return Bar(issue, what, limit, "FAIL", status)
    if value is None or ok is None:
        return Bar(issue, what, limit, "MISSING", "")
    return Bar(issue, what, limit, "PASS" if ok else "FAIL", shown)


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def write_report(lines: Sequence[str], csv_path: str, markdown: str | None = None) -> None:
    """Print the final report and save it beside the CSV (same name, .txt; the README table .md)."""
    text = "\n".join(lines)
    stem = csv_path[: -len(".csv")]
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    if markdown is not None:
        with open(stem + ".md", "w") as f:
            f.write(markdown + "\n")
    log(text)


def skip_summary(skips: Sequence[tuple[str, str]], limit: int = 2000) -> str:
    """'skipped: reason [what, what]; reason [what]' with each reason once."""
    by_reason: dict[str, list[str]] = {}
    for what, reason in skips:
        by_reason.setdefault(reason, [])
        if what not in by_reason[reason]:
            by_reason[reason].append(what)
    text = "; ".join(f"{reason} [{', '.join(whats)}]" for reason, whats in by_reason.items())
    return ("skipped: " + text)[:limit]


def print_header(title: str, meta: dict, copy_bw: float, mm_flops: float, mm_desc: str) -> None:
    versions = f"torch {meta['torch']} | triton {meta['triton']} | python {python_version()}"
    log(f"== {title} | {meta['gpu']} | {versions}")
    log(f"   commit {meta['commit']}; copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s;")
    log(f"   matmul {mm_desc}: {mm_flops / 1e12:.1f} TFLOP/s")


def conditions_line(meta: dict, copy_bw: float, extra: str = "") -> str:
    return (
        f"{meta['gpu']}, {meta['date'][:10]}, torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit']}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write){extra}"
    )


def python_version() -> str:
    return sys.version.split()[0]

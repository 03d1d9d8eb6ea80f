"""Shared pieces of the benchmarks: timers, the copy-bandwidth and matmul baselines of the run,
input generation, a float64 reference with per-dtype checks, the CSV writer and the table.

Everything that needs CUDA sits behind ``device.type == "cuda"``; on the CPU (``--device cpu``
smoke mode) timers fall back to ``time.perf_counter`` and memory measurements return None.
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


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
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


def run_meta(device: torch.device, world_size: int) -> dict:
    """The columns shared by every CSV row of one run."""
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "world_size": world_size,
    }


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------------
# Timers
# ----------------------------------------------------------------------------------------------


def cpu_bench(
    fn: Callable[[], object], *, min_reps: int = 3, max_reps: int = 50, budget_s: float = 0.2
) -> float:
    """Median wall time in ms of ``fn`` (CPU smoke mode: one warm-up call, then a few timed calls)."""
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


# ----------------------------------------------------------------------------------------------
# Machine baselines of this run
# ----------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, *, quick: bool = False) -> tuple[float, float, int]:
    """(bytes/s, ms, bytes moved) of one large device-to-device copy, counting bytes read plus bytes
    written (2 GiB each way on CUDA, 2 x 256 MiB with --quick; 2 x 64 MiB on the CPU)."""
    if is_cuda(device):
        nbytes = (256 << 20) if quick else (2 << 30)
    else:
        nbytes = 64 << 20
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=quick)
    moved = 2 * nbytes
    return moved / (ms * 1e-3), ms, moved  # the buffers are freed on return


def matmul_rate(device: torch.device, *, quick: bool = False) -> tuple[float, float, int, torch.dtype]:
    """(FLOP/s, ms, n, dtype) of one n x n x n matmul: bf16 8192^3 on CUDA, fp32 256^3 on the CPU."""
    if is_cuda(device):
        n, dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        n, dtype = 256, torch.float32
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
    """Fresh ``randn * scale`` logits [n, v] in ``dtype`` (never zeros, so no kernel can shortcut)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = torch.randn(n, v, generator=g, device=device, dtype=torch.float32)
    x.mul_(scale)
    return x.to(dtype)


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
    ref = ref.double()
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
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


def checked(name: str, check: Callable[[], None], *, on_fail: Callable[[str], None] | None = None) -> bool:
    """Run ``check``; print a skip reason and return False if it fails or raises."""
    try:
        check()
        return True
    except CheckFailed as err:
        reason = f"WRONG RESULT: {err}"
    except OOM:
        reason = "out of memory during the check"
    except Exception as err:  # a provider that cannot run here at all
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    log(f"  skip {name}: {reason}")
    if on_fail is not None:
        on_fail(reason)
    return False


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def extra_peak_memory(
    run: Callable[[], Sequence[torch.Tensor]], device: torch.device, inputs: Sequence[torch.Tensor] = ()
) -> int | None:
    """Peak memory of ``run()`` beyond what was allocated before it (the inputs) and beyond its
    outputs (``run`` returns them, e.g. (loss, grad)); an output that shares an input's storage
    (in-place gradient) is not subtracted. None on the CPU."""
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
    in_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: set[int] = set()
    out_bytes = 0
    for t in outs:
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in in_ptrs or ptr in seen:
            continue
        seen.add(ptr)
        out_bytes += t.untyped_storage().nbytes()
    del outs
    return int(peak - base - out_bytes)


# ----------------------------------------------------------------------------------------------
# Results: CSV rows and the table
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "date", "commit", "gpu", "torch", "triton", "world_size",
    "op", "provider", "dtype", "n", "v_shard", "k", "pass",
    "ms", "bytes", "gb_s", "frac_of_copy_bw", "floor_ms", "x_floor", "extra_mem_bytes", "note",
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

    @property
    def key(self) -> tuple:
        return (self.op, self.pass_, self.dtype, self.n, self.v_shard, self.k)

    @property
    def floor_ms(self) -> float | None:
        if not self.floor_bytes or not self.copy_bw:
            return None
        return self.floor_bytes / self.copy_bw * 1e3

    @property
    def gb_s(self) -> float | None:
        if not self.ms or not self.floor_bytes:
            return None
        return self.floor_bytes / (self.ms * 1e-3) / 1e9

    @property
    def frac(self) -> float | None:
        if self.gb_s is None or not self.copy_bw:
            return None
        return self.gb_s * 1e9 / self.copy_bw

    @property
    def x_floor(self) -> float | None:
        if not self.ms or not self.floor_ms:
            return None
        return self.ms / self.floor_ms

    def csv_row(self, meta: dict) -> dict:
        def fmt(v, digits=6):
            return "" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else v)

        return {
            **meta,
            "op": self.op,
            "provider": self.provider,
            "dtype": self.dtype,
            "n": self.n,
            "v_shard": self.v_shard,
            "k": self.k,
            "pass": self.pass_,
            "ms": fmt(self.ms),
            "bytes": self.floor_bytes or "",
            "gb_s": fmt(self.gb_s),
            "frac_of_copy_bw": fmt(self.frac, 4),
            "floor_ms": fmt(self.floor_ms),
            "x_floor": fmt(self.x_floor, 4),
            "extra_mem_bytes": "" if self.extra_mem is None else self.extra_mem,
            "note": self.note,
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
    ours = {r.key: r.ms for r in results if r.provider == OURS and r.ms}
    return {id(r): r.ms / ours[r.key] for r in results if r.provider != OURS and r.ms and r.key in ours}


def format_table(results: Sequence[Result]) -> str:
    """Compact table; 'ours_x' = how many times faster shardsoftmax is than that row's provider.
    Columns that hold one value for every row (dtype, N) are stated once above the table."""
    sp = speedups(results)
    one_dtype = len({r.dtype for r in results}) <= 1
    one_n = len({r.n for r in results}) <= 1
    above = []
    if results and one_dtype:
        above.append(f"dtype {results[0].dtype}")
    if results and one_n:
        above.append(f"N={results[0].n}")

    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    head = (
        f"{'op':<13} {'pass':<7} "
        + ("" if one_dtype else f"{'dt':<4} ")
        + ("" if one_n else f"{'N':>5} ")
        + f"{'V_shard':>7} {'k':>4} {'provider':<17} {'ms':>8} {'GB/s':>6} {'%copy':>5} {'xfloor':>6} "
        + f"{'ours_x':>6} {'xmemMB':>7}"
    )
    lines = ([", ".join(above)] if above else []) + [head, "-" * len(head)]
    for r in results:
        mem = None if r.extra_mem is None else r.extra_mem / 2**20
        lines.append(
            f"{r.op[:13]:<13} {r.pass_:<7} "
            + ("" if one_dtype else f"{r.dtype:<4} ")
            + ("" if one_n else f"{r.n:>5} ")
            + f"{r.v_shard:>7} {r.k:>4} {r.provider[:17]:<17} {f(r.ms, '8.3f'):>8} {f(r.gb_s, '6.0f'):>6} "
            + f"{f(None if r.frac is None else 100 * r.frac, '5.1f'):>5} {f(r.x_floor, '6.2f'):>6} "
            + f"{f(sp.get(id(r)), '6.2f'):>6} {f(mem, '7.1f'):>7}"
        )
    return "\n".join(lines)


def write_report(lines: Sequence[str], csv_path: str) -> None:
    """Print the final report and save it beside the CSV (same name, .txt)."""
    text = "\n".join(lines)
    with open(csv_path[: -len(".csv")] + ".txt", "w") as f:
        f.write(text + "\n")
    log(text)


def skip_summary(skips: Sequence[tuple[str, str]], limit: int = 1500) -> str:
    """'skipped: reason: what, what; reason: what' with each reason once."""
    by_reason: dict[str, list[str]] = {}
    for what, reason in skips:
        by_reason.setdefault(reason, [])
        if what not in by_reason[reason]:
            by_reason[reason].append(what)
    text = "; ".join(f"{reason} [{', '.join(whats)}]" for reason, whats in by_reason.items())
    return ("skipped: " + text)[:limit]


def print_header(title: str, meta: dict, copy_bw: float, mm_flops: float, mm_desc: str) -> None:
    log(f"== {title} | {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']}")
    log(f"   commit {meta['commit']}; copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s;")
    log(f"   matmul {mm_desc}: {mm_flops / 1e12:.1f} TFLOP/s")


def python_version() -> str:
    return sys.version.split()[0]

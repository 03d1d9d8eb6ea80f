"""Host overhead of one-process calls, eager and captured in a CUDA graph, on one GPU.

    python benchmarks/bench_host.py [--out DIR] [--budget-s 100]

For N in {8192, 1, 8, 64} tokens and V in {32064, 128256} (bf16) and each of softmax_stats (k=0,
k=50), cross_entropy forward and cross_entropy forward + backward (``torch.autograd.grad``):

* host µs: CPU clock around 50 calls without a sync (after warm-up and a sync), per call: what
  one call costs the Python thread (launches, torch ops, autograd);
* eager µs: CUDA events around 200 back-to-back calls, per call (the larger of host and GPU time);
* graph µs: the call captured once in a CUDA graph (warm-up on a side stream first), then CUDA
  events around 200 replays, per replay. Before timing, one replay's outputs must equal the eager
  outputs on the same inputs bit for bit (same kernels), else the row says FAIL and is not timed.

Also measures the copy bandwidth (read + write of a 256 MiB copy) and reports each time against
its floor (bytes that must move / bandwidth: N·V·2 read; fwd+bwd 3·N·V·2). Prints a table and the
bars of issues 2 and 5, writes a CSV (and the table as .txt) under --out (default $OUT or
./bench_out). Configurations left when --budget-s runs out are listed as skipped.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

import shardsoftmax as ss  # noqa: E402

HOST_CALLS = 50
TIMED_CALLS = 200
OPS = ("stats k=0", "stats k=50", "ce fwd", "ce fwd+bwd")
# Issue 2 first (CE at N=8192, V=32064), then the decode sizes of issue 5, then the rest.
CONFIGS = [
    (32064, 8192),
    (128256, 1),
    (128256, 8),
    (128256, 64),
    (128256, 8192),
    (32064, 1),
    (32064, 8),
    (32064, 64),
]
COLUMNS = [
    "date", "commit", "gpu", "torch", "triton", "op", "dtype", "n", "v_shard", "check",
    "host_us", "eager_us", "graph_us", "floor_us", "eager_x_floor", "graph_x_floor", "note",
]  # fmt: skip


@dataclass
class Row:
    op: str
    n: int
    v: int
    check: str
    host_us: float | None = None
    eager_us: float | None = None
    graph_us: float | None = None
    floor_us: float | None = None
    note: str = ""

    def ratio(self, us: float | None) -> float | None:
        return None if us is None or not self.floor_us else us / self.floor_us


def make_call(op: str, x: torch.Tensor, t: torch.Tensor):
    """A function of no arguments running ``op`` on x, t and returning its output tensors."""
    if op == "stats k=0":
        return lambda: tuple(f for f in ss.softmax_stats(x, t) if f is not None)
    if op == "stats k=50":
        return lambda: tuple(f for f in ss.softmax_stats(x, t, k=50) if f is not None)
    if op == "ce fwd":
        return lambda: (ss.cross_entropy(x, t),)
    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        loss = ss.cross_entropy(xg, t)
        (grad,) = torch.autograd.grad(loss, xg)
        return loss.detach(), grad

    return fwd_bwd


def host_us(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / HOST_CALLS * 1e6


def event_us(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(TIMED_CALLS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / TIMED_CALLS * 1e3


def same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b))


def measure(op: str, x: torch.Tensor, t: torch.Tensor, copy_bw: float) -> Row:
    n, v = x.shape
    nbytes = (3 if op == "ce fwd+bwd" else 1) * n * v * x.element_size()
    row = Row(op, n, v, "?", floor_us=nbytes / copy_bw * 1e6)
    fn = make_call(op, x, t)
    want = fn()
    for _ in range(2):
        fn()
    row.host_us = host_us(fn)
    row.eager_us = event_us(fn)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as err:  # report and go on: the other rows still mean something
        row.check, row.note = "FAIL", f"capture failed: {type(err).__name__}: {err}"[:300]
        return row
    if not same(captured, want):
        row.check, row.note = "FAIL", "graph replay differs from eager"
        return row
    row.check = "ok"
    row.graph_us = event_us(graph.replay)
    del graph, captured
    return row


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> list[str]:
    head = f"{'op':<11} {'V':>6} {'N':>5} {'host µs':>8} {'eager µs':>9} {'graph µs':>9} {'floor µs':>9} "
    head += f"{'eager/fl':>8} {'graph/fl':>8} check"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.op:<11} {r.v:>6} {r.n:>5} {fmt(r.host_us, '8.1f')} {fmt(r.eager_us, '9.1f')} "
            f"{fmt(r.graph_us, '9.1f')} {fmt(r.floor_us, '9.2f')} {fmt(r.ratio(r.eager_us), '8.2f')} "
            f"{fmt(r.ratio(r.graph_us), '8.2f')} {r.check}{'  ' + r.note if r.note else ''}"
        )
    return lines


def bars(rows: list[Row]) -> list[str]:
    """PASS/FAIL lines of the bars this benchmark measures."""
    by = {(r.op, r.v, r.n): r for r in rows}
    out = []

    def bar(name: str, value: float | None, limit: float, unit: str) -> None:
        verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
        out.append(f"{verdict:<4} {name}: {fmt(value, '.2f')}{unit} (bar {limit}{unit})")

    for v in (32064, 128256):
        r = by.get(("ce fwd+bwd", v, 8192))
        if r is not None:
            bar(f"issue 2: CE fwd+bwd eager, V={v}, N=8192", r.ratio(r.eager_us), 1.6, "x floor")
            bar(f"issue 5: CE fwd+bwd eager, V={v}, N=8192", r.ratio(r.eager_us), 1.15, "x floor")
    for op in OPS:
        for n in (1, 8, 64):
            r = by.get((op, 128256, n))
            if r is not None:
                bar(f"issue 5 decode: {op}, V=128256, N={n}, graph replay", r.graph_us, 30.0, " µs")
                bar("    the same case, eager call", r.eager_us, 30.0, " µs")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    p.add_argument(
        "--budget-s", type=float, default=100.0, help="stop starting new configurations after this"
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_host.py needs a CUDA GPU")
    t_start = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    meta = C.run_meta(device, bench="bench_host", world_size=1, preset="host")
    copy_bw, _, _ = C.copy_bandwidth(device, quick=True)
    C.log(
        f"== bench_host | {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit']}"
    )
    C.log(f"   copy bandwidth (read + write, 256 MiB): {copy_bw / 1e9:.0f} GB/s")
    os.makedirs(args.out, exist_ok=True)
    path = C.out_path(args.out, "bench_host", meta)
    rows: list[Row] = []
    skipped: list[str] = []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for v, n in CONFIGS:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"V={v} N={n}")
                continue
            g = torch.Generator(device=device).manual_seed(n + v)
            x = (torch.randn(n, v, device=device, generator=g) * 3).to(torch.bfloat16)
            t = torch.randint(0, v, (n,), device=device, generator=g)
            t[::7] = -100
            for op in OPS:
                try:
                    r = measure(op, x, t, copy_bw)
                except Exception as err:
                    r = Row(op, n, v, "FAIL", note=f"{type(err).__name__}: {err}"[:300])
                rows.append(r)
                C.log(table([r])[-1], f"[{time.perf_counter() - t_start:.0f}s]")
                writer.writerow(
                    {
                        **{k: meta[k] for k in ("date", "commit", "gpu", "torch", "triton")},
                        "op": r.op,
                        "dtype": "bf16",
                        "n": r.n,
                        "v_shard": r.v,
                        "check": r.check,
                        "host_us": fmt(r.host_us, ".2f"),
                        "eager_us": fmt(r.eager_us, ".2f"),
                        "graph_us": fmt(r.graph_us, ".2f"),
                        "floor_us": fmt(r.floor_us, ".2f"),
                        "eager_x_floor": fmt(r.ratio(r.eager_us), ".3f"),
                        "graph_x_floor": fmt(r.ratio(r.graph_us), ".3f"),
                        "note": r.note,
                    }  # fmt: skip
                )
                f.flush()
            del x, t
            torch.cuda.empty_cache()
    title = (
        f"bench_host: {meta['gpu']}, {meta['date']}, commit {meta['commit']}, bf16, copy bandwidth "
        f"{copy_bw / 1e9:.0f} GB/s, {time.perf_counter() - t_start:.0f} s"
    )
    lines = [title, *table(rows), "", *bars(rows)]
    if skipped:
        lines.append(f"skipped (time budget): {', '.join(skipped)}")
    failed = [r for r in rows if r.check != "ok"]
    lines.append(f"checks: {len(rows) - len(failed)} ok, {len(failed)} FAIL; CSV: {path}")
    C.write_report(lines, path)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

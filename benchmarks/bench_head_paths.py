"""Which path an LM head should take, per shape: the logits stored whole, or never.

    python benchmarks/bench_head_paths.py [--out DIR] [--n 1 64 1024 8192] [--v 32064 128256] [--k 0 50]
    TRITON_INTERPRET=1 python benchmarks/bench_head_paths.py --device cpu     # smoke run, tiny shapes

Statistics under ``torch.no_grad()`` (what the Ray scorer and ``VocabParallelLMHead``'s
``return_stats`` compute), with a target, bf16, H = --h, for every N x V_shard x k:

* ``unfused``: ``F.linear`` (cuBLAS bf16 logits ``[N, V_shard]``) + ``ss.softmax_stats``;
* ``chunked``: ``ss.linear_softmax_stats(impl="chunked")`` (cuBLAS per vocabulary chunk);
* ``fused``: ``ss.linear_softmax_stats(impl="fused")`` (the Triton kernels).

And the training loss, forward + backward (gradients of hidden and weight), at the N of --loss-n:
``unfused`` (``F.linear`` + ``ss.cross_entropy``) against ``chunked`` (``linear_cross_entropy``'s
eager forward).

Timing: the providers of one case and the bf16 matmul of its shape (``hidden @ weight.T``)
alternate over --rounds rounds; each round times a fixed number of back-to-back calls with CUDA
events (enough for ~--round-ms), and a time is the median over the rounds, so a clock drift hits
every provider and the matmul alike. Each case also records every provider's extra peak memory. Before timing,
each provider's lse, entropy and target log-prob are checked (normwise, --tol) against
``ss.softmax_stats`` of the same logits: bf16 (``unfused``'s) for chunked, float32 for fused,
which never rounds them and its top-k ids against the
float32 logits' (a row's ids may differ only where the reference's values tie within the
bf16 rounding). Writes a CSV and a table (the fastest provider per case) under --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

import shardsoftmax as ss  # noqa: E402

COLUMNS = [
    "date", "commit", "gpu", "torch", "triton", "op", "provider", "dtype", "n", "h", "v_shard", "k",
    "check", "ms", "matmul_ms", "x_matmul", "x_best", "extra_mem_bytes", "rounds", "calls_per_round",
]  # fmt: skip
STATS_PROVIDERS = ("unfused", "chunked", "fused")
LOSS_PROVIDERS = ("unfused", "chunked")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="folder for the CSV")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke sizes)")
    p.add_argument(
        "--n", type=int, nargs="+", default=None, help="tokens (default 1 16 64 256 1024 4096 8192 32768)"
    )
    p.add_argument("--h", type=int, default=None, help="hidden size (default 4096)")
    p.add_argument("--v", type=int, nargs="+", default=None, help="V_shard values (default 32064 128256)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="top-k values (default 0 50)")
    p.add_argument(
        "--loss-n", type=int, nargs="*", default=None, help="N of the loss cases (default 2048 8192)"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds per case (default 7; CPU 2)")
    p.add_argument("--round-ms", type=float, default=25.0, help="GPU time per provider and round")
    p.add_argument("--tol", type=float, default=1e-4, help="normwise tolerance of the stats checks")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def normwise(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def time_rounds(fns: dict[str, Callable], device: torch.device, rounds: int, round_ms: float) -> dict:
    """Median ms per call of each of ``fns`` over ``rounds`` rounds in which the providers take
    turns (the order rotates each round); each round times ``calls`` back-to-back calls, sized
    from a first timed call to take ~``round_ms``. Returns {name: (ms, calls)}."""
    calls = {}
    for name, fn in fns.items():  # warm-up (compiles, autotuning), then one call sizes the rounds
        fn()
        one = C.time_fixed(fn, device, iters=1, warmup=1)
        calls[name] = max(1, min(200, int(round_ms / max(one, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n_calls = fns[name], calls[name]
            C.synchronize(device)
            if C.is_cuda(device):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n_calls):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / n_calls)
            else:
                t0 = time.perf_counter()
                for _ in range(n_calls):
                    fn()
                times[name].append((time.perf_counter() - t0) * 1e3 / n_calls)
    return {name: (statistics.median(t), calls[name]) for name, t in times.items()}


def check_stats(st, ref, logits32: torch.Tensor, k: int, tol: float) -> tuple[bool, str]:
    """``st`` against ``ref`` (the same logits' stats) within ``tol``; top-k ids exact against
    ``logits32`` up to ties within bf16 rounding (the fp32 logit at each of our ids equals the
    fp32 order's value at that rank within 2**-7 relative)."""
    errs = [normwise(getattr(st, f), getattr(ref, f)) for f in ("lse", "entropy", "target_logprob")]
    ok, detail = max(errs) <= tol, f"stats {max(errs):.1e}"
    if k:
        ours = logits32.gather(1, st.topk_ids)
        best = logits32.topk(k, dim=1).values
        gap = float(((ours - best).abs() / best.abs().clamp_min(1.0)).max())
        ok = ok and gap <= 2.0**-7
        detail += f", top-{k} values at our ids vs the fp32 order {gap:.1e}"
    return ok, detail


class Run:
    def __init__(self, args, device, meta):
        self.args, self.device, self.meta = args, device, meta
        os.makedirs(args.out, exist_ok=True)
        self.path = C.out_path(args.out, "head_paths", meta)
        self.f = open(self.path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        self.w.writeheader()
        self.rows: list[dict] = []
        self.failed: list[str] = []

    def row(self, **kw):
        r = {c: self.meta.get(c, "") for c in COLUMNS}
        r.update(kw)
        self.w.writerow(r)
        self.f.flush()
        self.rows.append(r)


def stats_case(run: Run, n: int, h: int, v: int, ks: list[int]) -> None:
    dev, args = run.device, run.args
    g = torch.Generator(device=dev).manual_seed(args.seed)
    hidden = torch.randn(n, h, generator=g, device=dev).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=g, device=dev) * (3.0 / math.sqrt(h))).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), generator=g, device=dev)
    for k in ks:
        fns = {
            "unfused": lambda k=k: ss.softmax_stats(F.linear(hidden, weight), target, k=k),
            **{
                impl: (lambda impl=impl, k=k: ss.linear_softmax_stats(hidden, weight, target, k=k, impl=impl))
                for impl in ("chunked", "fused")
            },
        }
        with torch.no_grad():
            logits32 = hidden.float() @ weight.float().T
            refs = {"bf16": fns["unfused"](), "fp32": ss.softmax_stats(logits32, target, k=k)}
            checks = {}
            for name, fn in fns.items():
                ok, detail = check_stats(
                    fn(), refs["fp32" if name == "fused" else "bf16"], logits32, k, args.tol
                )
                checks[name] = "PASS" if ok else "FAIL"
                if not ok:
                    run.failed.append(f"N={n} V={v} k={k} {name}: {detail}")
                C.log(f"  check N={n} V={v} k={k} {name}: {checks[name]} ({detail})")
            del logits32, refs
            mems = {name: C.extra_peak_memory(lambda fn=fn: _fields(fn()), dev, (hidden, weight, target))
                    for name, fn in fns.items()}  # fmt: skip
            timed = time_rounds({**fns, "matmul": lambda: hidden @ weight.T}, dev, args.rounds, args.round_ms)
        mm = timed.pop("matmul")[0]
        best = min(ms for ms, _ in timed.values())
        for name, (ms, n_calls) in timed.items():
            run.row(op="stats_fwd", provider=name, dtype="bf16", n=n, h=h,
                    v_shard=v, k=k, check=checks[name], ms=f"{ms:.5f}", matmul_ms=f"{mm:.5f}",
                    x_matmul=f"{ms / mm:.4f}", x_best=f"{ms / best:.4f}", extra_mem_bytes=mems[name],
                    rounds=args.rounds, calls_per_round=n_calls)  # fmt: skip
        C.log(
            f"stats N={n:6d} V={v:6d} k={k:3d} matmul {mm:8.4f} ms | "
            + " | ".join(f"{name} {ms / mm:5.3f}x" for name, (ms, _) in timed.items())
        )
    C.empty_cache(dev)


def _fields(st) -> tuple:
    return tuple(getattr(st, f) for f in st._fields if isinstance(getattr(st, f), torch.Tensor))


def loss_case(run: Run, n: int, h: int, v: int) -> None:
    dev, args = run.device, run.args
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    hidden = torch.randn(n, h, generator=g, device=dev).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, device=dev) * (3.0 / math.sqrt(h))).to(torch.bfloat16)
    weight.requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g, device=dev)

    def grads(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), (hidden, weight))

    fns = {
        "unfused": grads(lambda: ss.cross_entropy(F.linear(hidden, weight), target)),
        "chunked": grads(lambda: ss.linear_cross_entropy(hidden, weight, target, impl="chunked")),
    }
    ref = fns["unfused"]()
    checks = {}
    for name, fn in fns.items():
        err = max(normwise(a, b) for a, b in zip(fn(), ref))
        ok = err <= 1e-2  # bf16 gradients: one rounding of dloss/dlogits, one of the output
        checks[name] = "PASS" if ok else "FAIL"
        if not ok:
            run.failed.append(f"loss N={n} V={v} {name}: gradients {err:.1e}")
    del ref
    mems = {name: C.extra_peak_memory(fn, dev, (hidden, weight, target)) for name, fn in fns.items()}
    timed = time_rounds({**fns, "matmul": lambda: hidden.detach() @ weight.detach().T}, dev, args.rounds,
                        args.round_ms)  # fmt: skip
    mm = timed.pop("matmul")[0]
    best = min(ms for ms, _ in timed.values())
    for name, (ms, n_calls) in timed.items():
        run.row(op="ce_fwd+bwd", provider=name, dtype="bf16", n=n, h=h, v_shard=v, k=0, check=checks[name],
                ms=f"{ms:.5f}", matmul_ms=f"{mm:.5f}", x_matmul=f"{ms / mm:.4f}", x_best=f"{ms / best:.4f}",
                extra_mem_bytes=mems[name], rounds=args.rounds, calls_per_round=n_calls)  # fmt: skip
    C.log(
        f"loss  N={n:6d} V={v:6d} 3 matmuls {3 * mm:8.4f} ms | "
        + " | ".join(f"{name} {ms / (3 * mm):5.3f}x" for name, (ms, _) in timed.items())
    )
    C.empty_cache(dev)


def table(rows: list[dict]) -> str:
    """One line per case: each provider's time as x the matmul, the fastest marked."""
    cases: dict[tuple, dict] = {}
    for r in rows:
        cases.setdefault((r["op"], int(r["n"]), int(r["v_shard"]), int(r["k"])), {})[r["provider"]] = r
    lines = ["| op | N | V_shard | k | " + " | ".join(STATS_PROVIDERS) + " |", "|" + "---|" * 7]
    for (op, n, v, k), by in sorted(cases.items()):
        best = min(float(r["ms"]) for r in by.values())
        cells = []
        for name in STATS_PROVIDERS:
            r = by.get(name)
            if r is None:
                cells.append("–")
                continue
            cell = f"{float(r['x_matmul']):.3f}x"
            cells.append(f"**{cell}**" if float(r["ms"]) == best else cell)
        lines.append(f"| {op} | {n} | {v} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = C.is_cuda(device)
    meta = C.run_meta(device, bench="head_paths", world_size=1, preset="default")
    ns = args.n or ([1, 16, 64, 256, 1024, 4096, 8192, 32768] if cuda else [1, 20])
    h = args.h or (4096 if cuda else 48)
    vs = args.v or ([32064, 128256] if cuda else [300])
    ks = args.k if args.k is not None else [0, 50]
    ks = ks if cuda or args.k is not None else [0, 3]
    loss_ns = args.loss_n if args.loss_n is not None else ([2048, 8192] if cuda else [20])
    args.rounds = args.rounds or (7 if cuda else 2)
    if not cuda:
        args.round_ms = min(args.round_ms, 1.0)
    torch.backends.cuda.matmul.allow_tf32 = False
    run = Run(args, device, meta)
    t0 = time.perf_counter()
    C.log(
        f"== bench_head_paths | {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']}"
        f" | {meta['commit']}"
    )
    for v in vs:
        for n in ns:
            stats_case(run, n, h, v, ks)
        for n in loss_ns:
            loss_case(run, n, h, v)
    run.f.close()
    lines = ["", f"== bench_head_paths: H={h} bf16 on {meta['gpu']} ({time.perf_counter() - t0:.0f} s)",
             "time per call as x the bf16 matmul of the same shape in the same run (loss: x one matmul; "
             "its floor is 3x); bold: the fastest", table(run.rows),
             *(f"  FAIL {f}" for f in run.failed), "PASS all checks" if not run.failed else "FAIL",
             f"csv: {run.path}"]  # fmt: skip
    C.write_report(lines, run.path)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())

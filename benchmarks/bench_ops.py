"""One-GPU benchmark of shardsoftmax's ops against PyTorch (eager and torch.compile) and Liger-Kernel.

    python benchmarks/bench_ops.py [--quick | --full] [--out DIR]
    python benchmarks/bench_ops.py --device cpu --quick          # smoke test of every code path

Measures the copy bandwidth and the bf16 matmul rate first, then for each configuration checks
every provider against a float64 reference and times the ones that pass with
``triton.testing.do_bench`` (median). Prints progress as it goes and a compact table plus the
acceptance bars at the END; writes every row to a CSV under --out. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

import shardsoftmax as ss  # noqa: E402

OURS = C.OURS

# ----------------------------------------------------------------------------------------------
# Eager baselines (module level so torch.compile sees plain functions)
# ----------------------------------------------------------------------------------------------


def torch_lse(x):
    return torch.logsumexp(x.float(), dim=-1)


def torch_lse_topk(x, k: int):
    return torch.logsumexp(x.float(), dim=-1), torch.topk(x, k, dim=-1)


def torch_ce(x, t):
    return F.cross_entropy(x, t)


def torch_ce_f32(x, t):
    return F.cross_entropy(x.float(), t)


def torch_softmax(x):
    return torch.softmax(x, dim=-1)


def torch_softmax_f32(x):
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def torch_log_softmax(x):
    return torch.log_softmax(x, dim=-1)


def torch_log_softmax_f32(x):
    return torch.log_softmax(x.float(), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing (CPU: tiny sizes)")
    p.add_argument("--full", action="store_true", help="the whole sweep over N, V, k and dtype (long)")
    p.add_argument(
        "--out", default="bench_out", help="folder for the CSV and the table (default ./bench_out)"
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--n", type=int, nargs="+", help="override the token counts N")
    p.add_argument("--v", type=int, nargs="+", help="override the shard widths V_shard")
    p.add_argument("--k", type=int, nargs="+", help="override the k values of softmax_stats")
    p.add_argument("--dtype", nargs="+", choices=sorted(C.DTYPES), help="override the dtypes")
    p.add_argument("--ops", nargs="+", default=["stats", "ce", "softmax"], choices=["stats", "ce", "softmax"])
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "all", "none"],
        help="torch.compile baselines: auto = the main baselines at the largest N and V only "
        "(all with --full); all = every baseline everywhere; none",
    )
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def plan(args, device):
    cpu = not C.is_cuda(device)
    if cpu:  # smoke sizes: odd widths, a single row, k across 0 and 50
        ns, vs, ks, dts = [1, 37], [301, 1031], [0, 50], ["bf16"]
        if args.full:
            ns, vs, ks, dts = [1, 37, 64], [301, 1031, 4099], [0, 1, 8, 50, 256], ["bf16", "fp32"]
    elif args.full:
        ns, vs = [1, 64, 1024, 8192, 32768], [32064, 64128, 128256, 256000]
        ks, dts = [0, 1, 8, 50, 256, 1024], ["bf16", "fp32"]
    elif args.quick:
        ns, vs, ks, dts = [8192], [32064, 128256], [0, 50], ["bf16"]
    else:
        ns, vs, ks, dts = [8192], [32064, 64128, 128256], [0, 50], ["bf16"]
    ns, vs, ks, dts = args.n or ns, args.v or vs, args.k or ks, args.dtype or dts
    return ns, vs, ks, dts


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.quick = args.quick
        self.results: list[C.Result] = []
        self.skips: list[tuple[str, str]] = []
        self.compiled: dict[str, Callable] = {}
        self.compile_broken: dict[str, str] = {}
        self.liger_ce, self.liger_reason = self._find_liger()

    # -- providers that may be missing ---------------------------------------------------------

    def _find_liger(self):
        if not C.is_cuda(self.device):
            return None, "Liger-Kernel's Triton kernels need CUDA"
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception as err:
            return None, f"liger_kernel not importable ({type(err).__name__}: {err})"
        return LigerCrossEntropyLoss(), ""

    def compiled_fn(self, name: str, fn: Callable) -> Callable | None:
        """torch.compile(fn), once per baseline; None (with a printed reason) if it cannot."""
        if name in self.compile_broken:
            return None
        if name not in self.compiled:
            try:
                backend = "inductor" if C.is_cuda(self.device) else "eager"  # CPU: only exercise the path
                self.compiled[name] = torch.compile(fn, backend=backend)
            except Exception as err:
                self.compile_broken[name] = f"{type(err).__name__}: {err}"
                C.log(f"  skip torch.compile({name}): {self.compile_broken[name][:200]}")
                return None
        return self.compiled[name]

    # -- measuring -----------------------------------------------------------------------------

    def record(self, r: C.Result) -> None:
        self.results.append(r)
        self.csv.write(r)
        frac = "-" if r.frac is None else f"{100 * r.frac:5.1f}% of copy"
        mem = "" if r.extra_mem is None else f", extra mem {r.extra_mem / 2**20:.1f} MiB"
        C.log(
            f"  {r.op:<13} {r.pass_:<7} N={r.n} V={r.v_shard} k={r.k} {r.provider:<22} "
            f"{r.ms:9.3f} ms  {frac}  x{r.x_floor or 0:.2f} floor{mem}{' (' + r.note + ')' if r.note else ''}"
        )

    def skip(self, what: str, reason: str) -> None:
        self.skips.append((what, reason))

    def time_it(self, fn: Callable[[], object]) -> float | None:
        try:
            return C.bench(fn, self.device, quick=self.quick)
        except C.OOM:
            C.empty_cache(self.device)
            C.log("    out of memory while timing")
            return None

    def result(self, op, provider, pass_, ms, floor_bytes, *, k=0, extra_mem=None, note=""):
        if ms is None:
            self.skip(f"{op} {pass_} {provider} N={self.n} V={self.v}", "out of memory")
            return
        self.record(
            C.Result(op, provider, C.dtype_name(self.dtype), self.n, self.v, k, pass_, ms, floor_bytes,
                     self.copy_bw, extra_mem, note)
        )  # fmt: skip

    def providers_checked(self, what: str, candidates: list[tuple[str, Callable[[], None]]]) -> list[str]:
        """Run each candidate's check; return the names that passed (failures are printed, skipped)."""
        ok = []
        for name, check in candidates:
            if C.checked(
                f"{what} {name}", check, on_fail=lambda reason, n=name: self.skip(f"{what} {n}", reason)
            ):
                ok.append(name)
        return ok

    def want_compile(self, main: bool) -> bool:
        mode = self.args.compile
        if mode == "none":
            return False
        if mode == "all" or self.args.full or not C.is_cuda(self.device):
            return True
        return main and self.n == max(self.ns) and self.v == max(self.vs)

    # -- one configuration ----------------------------------------------------------------------

    def setup(self, n: int, v: int, dtype: torch.dtype, k_max: int) -> None:
        self.n, self.v, self.dtype = n, v, dtype
        self.es = torch.finfo(dtype).bits // 8
        count = C.n_buffers(n * v * self.es * 2)  # input + an output of the same size
        base = self.args.seed + 1000 * len(self.results)
        self.xs = [C.random_logits(n, v, dtype, self.device, seed=base + i) for i in range(count)]
        self.ts = [C.random_targets(n, v, self.device, seed=base + i) for i in range(count)]
        self.rot = C.Rotation(count)
        self.ref = C.build_reference(self.xs[0], self.ts[0], k_max=k_max)
        self.x_rows = self.xs[0][self.ref.rows]

    def teardown(self) -> None:
        del self.xs, self.ts, self.ref, self.x_rows
        C.empty_cache(self.device)

    def nxt(self) -> int:
        return self.rot.next()

    # (a), (b): softmax_stats against logsumexp (+ topk)
    def run_stats(self, k: int) -> None:
        ref, rows, x0 = self.ref, self.ref.rows, self.xs[0]
        floor = self.n * self.v * self.es
        what = f"softmax_stats k={k} N={self.n} V={self.v}"

        def check_ours():
            s = ss.softmax_stats(x0, k=k)
            C.expect_close(f"{what} lse", s.lse, ref.lse)
            if k:
                raw = (s.topk_logprobs + s.lse[:, None])[rows]
                C.expect_topk(what, s.topk_ids[rows], raw, self.x_rows, ref, exact_ids=True)

        base_fn = torch_lse if k == 0 else (lambda x: torch_lse_topk(x, k))
        base_name = "torch"  # logsumexp(x.float()) (+ topk(x, k))

        def check_base(fn):
            def check():
                out = fn(x0)
                lse = out if k == 0 else out[0]
                C.expect_close(f"{what} lse", lse, ref.lse)
                if k:
                    vals, ids = out[1]
                    C.expect_topk(what, ids[rows], vals[rows], self.x_rows, ref, exact_ids=False)

            return check

        cands: list[tuple[str, Callable, Callable]] = [
            (OURS, lambda: ss.softmax_stats(self.xs[self.nxt()], k=k), check_ours),
            (base_name, lambda: base_fn(self.xs[self.nxt()]), check_base(base_fn)),
        ]
        if self.want_compile(main=True):
            cname = "torch_lse" if k == 0 else f"torch_lse_topk{k}"
            cfn = self.compiled_fn(cname, torch_lse if k == 0 else torch_lse_topk)
            if cfn is not None:
                cf = cfn if k == 0 else (lambda x, cfn=cfn: cfn(x, k))
                cands.append(("compile.torch", lambda cf=cf: cf(self.xs[self.nxt()]), check_base(cf)))
        ok = self.providers_checked(what, [(name, chk) for name, _, chk in cands])
        for name, fn, _ in cands:
            if name in ok:
                self.result("softmax_stats", name, "fwd", self.time_it(fn), floor, k=k)

    # (c): cross-entropy forward, backward, forward+backward and extra memory
    def run_ce(self) -> None:
        ref, rows = self.ref, self.ref.rows
        n, v = self.n, self.v
        what = f"cross_entropy N={n} V={v}"
        grad_ref = ref.grad_rows(n)

        # Each provider: (name, loss_fn(x, t), inputs). Liger overwrites its input with the
        # gradient during the forward, so it gets its own copies (timing on those overwritten
        # values costs the same; its check runs on a fresh copy).
        provs: list[tuple[str, Callable, list[torch.Tensor]]] = [(OURS, ss.cross_entropy, self.xs)]
        provs.append(("torch", torch_ce, self.xs))  # F.cross_entropy on the logits' own dtype
        if self.dtype != torch.float32:
            provs.append(("torch.f32", torch_ce_f32, self.xs))  # F.cross_entropy(x.float(), t)
        if self.liger_ce is not None:
            provs.append(("liger", self.liger_ce, [x.clone() for x in self.xs]))
        else:
            self.skip(f"{what} liger", self.liger_reason)
            C.log(f"  skip {what} liger: {self.liger_reason}")
        for main, (cname, fn) in ((True, ("torch_ce_f32", torch_ce_f32)), (False, ("torch_ce", torch_ce))):
            if self.dtype == torch.float32 and cname == "torch_ce_f32":
                continue
            if self.want_compile(main):
                cfn = self.compiled_fn(cname, fn)
                if cfn is not None:
                    provs.append(("compile.torch.f32" if main else "compile.torch", cfn, self.xs))

        def check(loss_fn, xs_p):
            def run():
                x = self.xs[0].detach().clone().requires_grad_(True)  # fresh: Liger overwrites it
                loss = loss_fn(x, self.ts[0])
                (g,) = torch.autograd.grad(loss, x)
                C.expect_close(f"{what} loss", loss.reshape(()), ref.loss_mean)
                C.expect_close(f"{what} grad", g[rows], grad_ref)

            return run

        ok = self.providers_checked(what, [(name, check(fn, xs_p)) for name, fn, xs_p in provs])
        for name, loss_fn, xs_p in provs:
            if name in ok:
                self.time_ce(name, loss_fn, xs_p)
                C.empty_cache(self.device)

    def time_ce(self, name: str, loss_fn: Callable, xs_p: list[torch.Tensor]) -> None:
        n, v, es = self.n, self.v, self.es
        leaves = [x.detach().requires_grad_(True) for x in xs_p]
        ts = self.ts

        def fwd():
            i = self.nxt()
            return loss_fn(leaves[i], ts[i])

        def fwd_bwd():
            i = self.nxt()
            return torch.autograd.grad(loss_fn(leaves[i], ts[i]), leaves[i])

        ms_f = self.time_it(fwd)
        self.result("cross_entropy", name, "fwd", ms_f, n * v * es)

        # Backward alone: run the forward once per input set OUTSIDE the timed region and keep its
        # graph (retain_graph=True), then time only autograd.grad on it. Where a provider's
        # backward cannot run twice on one graph, report fwd+bwd - fwd instead (noted).
        note = ""
        losses = []
        try:
            losses = [loss_fn(leaves[i], ts[i]) for i in range(len(leaves))]

            def bwd():
                i = self.nxt()
                return torch.autograd.grad(losses[i], leaves[i], retain_graph=True)

            bwd()
            bwd()
            ms_b = self.time_it(bwd)
        except C.OOM:
            ms_b = None
        except Exception as err:
            ms_b, note = None, f"derived: fwd+bwd - fwd ({type(err).__name__} with retain_graph)"
        losses.clear()
        C.empty_cache(self.device)

        ms_fb = self.time_it(fwd_bwd)
        if ms_b is None and note and ms_fb is not None and ms_f is not None:
            ms_b = max(ms_fb - ms_f, 0.0)
        if name == "liger":
            note = "gradient computed in its forward, written into the logits"
        self.result("cross_entropy", name, "bwd", ms_b, 2 * n * v * es, note=note)

        # Extra peak memory of one forward+backward beyond the inputs, the loss and the gradient.
        x0, t0 = leaves[0], ts[0]

        def once():
            loss = loss_fn(x0, t0)
            (g,) = torch.autograd.grad(loss, x0)
            return (loss, g)

        mem = None
        try:
            mem = C.extra_peak_memory(once, self.device, inputs=[x0, t0])
        except C.OOM:
            C.empty_cache(self.device)
        self.result("cross_entropy", name, "fwd+bwd", ms_fb, 3 * n * v * es, extra_mem=mem)

    # (d): softmax and log-softmax written out
    def run_softmax(self, log: bool) -> None:
        ref, rows, x0 = self.ref, self.ref.rows, self.xs[0]
        op = "log_softmax" if log else "softmax"
        what = f"{op} N={self.n} V={self.v}"
        floor = 3 * self.n * self.v * self.es  # read twice, write once
        ours = ss.log_softmax if log else ss.softmax
        eager = torch_log_softmax if log else torch_softmax
        eager_f32 = torch_log_softmax_f32 if log else torch_softmax_f32
        want = ref.logp if log else ref.logp.exp()

        # "torch": on the logits' dtype; "torch.f32": x.float(), softmax, back to the logits' dtype
        provs: list[tuple[str, Callable]] = [(OURS, ours), ("torch", eager)]
        if self.dtype != torch.float32:
            provs.append(("torch.f32", eager_f32))
        for main, (cname, fn) in ((True, (f"{op}_f32", eager_f32)), (False, (op, eager))):
            if self.dtype == torch.float32 and main:
                continue
            if self.want_compile(main):
                cfn = self.compiled_fn(cname, fn)
                if cfn is not None:
                    provs.append(("compile.torch.f32" if main else "compile.torch", cfn))

        def check(fn):
            def run():
                out = fn(x0)
                if out.dtype != self.dtype:
                    raise C.CheckFailed(f"output dtype {out.dtype}, expected {self.dtype}")
                C.expect_close(what, out[rows], want)

            return run

        ok = self.providers_checked(what, [(name, check(fn)) for name, fn in provs])
        for name, fn in provs:
            if name in ok:
                self.result(op, name, "fwd", self.time_it(lambda fn=fn: fn(self.xs[self.nxt()])), floor)

    # -- whole run ------------------------------------------------------------------------------

    def run(self) -> int:
        args, device = self.args, self.device
        t_start = time.perf_counter()
        self.ns, self.vs, self.ks, dts = plan(args, device)
        meta = C.run_meta(device, 1)
        os.makedirs(args.out, exist_ok=True)
        self.csv = C.CsvWriter(C.out_path(args.out, "ops", meta), meta)

        C.log(f"measuring copy bandwidth and matmul rate on {meta['gpu']} ...")
        self.copy_bw, copy_ms, moved = C.copy_bandwidth(device, quick=self.quick)
        mm_flops, mm_ms, mm_n, mm_dt = C.matmul_rate(device, quick=self.quick)
        mm_desc = f"{C.dtype_name(mm_dt)} {mm_n}^3"
        C.print_header("bench_ops", meta, self.copy_bw, mm_flops, mm_desc)
        self.n, self.v, self.dtype = 0, 0, torch.uint8
        self.record(C.Result("copy", "torch", "u8", 0, 0, 0, "fwd", copy_ms, moved, self.copy_bw,
                             note=f"{moved / 2**30:.1f} GiB read+written"))  # fmt: skip
        self.csv.write(C.Result("matmul", "torch", C.dtype_name(mm_dt), mm_n, mm_n, 0, "fwd", mm_ms, 0,
                                self.copy_bw, note=f"{mm_flops / 1e12:.2f} TFLOP/s"))  # fmt: skip
        C.log(
            f"plan: N={self.ns} V_shard={self.vs} k={self.ks} dtype={dts} ops={args.ops} "
            f"compile={args.compile}"
        )

        for dname in dts:
            dtype = C.DTYPES[dname]
            for n in self.ns:
                for v in self.vs:
                    C.log(f"-- {dname} N={n} V_shard={v}  (t={time.perf_counter() - t_start:.0f}s)")
                    ks = [k for k in self.ks if k <= v]
                    try:
                        self.setup(n, v, dtype, max(ks + [1]))
                    except C.OOM:
                        C.empty_cache(device)
                        self.skip(f"{dname} N={n} V={v}", "out of memory creating the inputs")
                        C.log("  skip: out of memory creating the inputs")
                        continue
                    if "stats" in args.ops:
                        for k in ks:
                            self.run_stats(k)
                    if "ce" in args.ops:
                        self.run_ce()
                    if "softmax" in args.ops:
                        self.run_softmax(log=False)
                        self.run_softmax(log=True)
                    self.teardown()
        self.csv.close()

        table = C.format_table([r for r in self.results if r.op != "copy"])
        bars = self.bars()
        tail = [
            "",
            f"== results ({meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"commit {meta['commit']}, "
            f"{meta['date']})",
            "ms: median (do_bench); GB/s and %copy count the op's floor bytes (README); "
            "xfloor = ms / floor ms; "
            "ours_x = that provider's ms / shardsoftmax's ms; xmemMB = extra peak memory of loss fwd+bwd",
            table,
        ]
        if self.skips:
            tail.append(C.skip_summary(self.skips))
        tail += ["", "== bars (issue acceptance)", *bars, ""]
        tail.append(
            f"copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (read+write), "
            f"matmul {mm_desc} {mm_flops / 1e12:.1f} "
            f"TFLOP/s; csv: {self.csv.path}; took {time.perf_counter() - t_start:.0f}s"
        )
        C.write_report(tail, self.csv.path)
        return 0

    def bars(self) -> list[str]:
        out = []

        def find(op, pass_, n, v, dtype, k=0):
            for r in self.results:
                want = (OURS, op, pass_, n, v, dtype, k)
                if (r.provider, r.op, r.pass_, r.n, r.v_shard, r.dtype, r.k) == want:
                    return r
            return None

        keys = sorted({(r.dtype, r.n, r.v_shard) for r in self.results if r.provider == OURS})
        for dt, n, v in keys:
            cfg = f"{dt} N={n} V={v}"
            r0 = find("softmax_stats", "fwd", n, v, dt, 0)
            if r0 is not None:
                out.append(
                    _bar(
                        f"softmax_stats k=0 >= 75% copy bw  [{cfg}]", r0.frac >= 0.75, f"{100 * r0.frac:.1f}%"
                    )
                )
            r50 = find("softmax_stats", "fwd", n, v, dt, 50)
            if r50 is not None:
                out.append(
                    _bar(
                        f"softmax_stats k=50 >= 35% copy bw [{cfg}]",
                        r50.frac >= 0.35,
                        f"{100 * r50.frac:.1f}%",
                    )
                )
            rce = find("cross_entropy", "fwd+bwd", n, v, dt)
            if rce is not None:
                out.append(_bar(f"cross_entropy fwd+bwd <= 1.6x floor [{cfg}]", rce.x_floor <= 1.6,
                                f"{rce.x_floor:.2f}x"))  # fmt: skip
        return out or ["(no shardsoftmax rows measured)"]


def _bar(text: str, ok: bool, value: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text:<58} {value}"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if C.is_cuda(device):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        C.log("(CPU smoke mode: perf_counter timings, tiny sizes; the numbers mean nothing)")
    torch.manual_seed(args.seed)
    return Bench(args, device).run()


if __name__ == "__main__":
    sys.exit(main())

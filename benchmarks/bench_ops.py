"""One-GPU benchmark of shardsoftmax's ops against PyTorch (eager and torch.compile), Liger-Kernel
and a Megatron-style cross-entropy, in one run on one card.

    python benchmarks/bench_ops.py                                  # --preset bars: the issues' bars
    python benchmarks/bench_ops.py --preset sweep --max-seconds 540 # the wider grid, by priority
    python benchmarks/bench_ops.py --dry-run                        # CPU: every code path, tiny sizes

Measures the copy bandwidth and the bf16 matmul rate first, then runs the preset's tasks in
priority order. Each provider is checked against a float64 reference before it is timed
(``triton.testing.do_bench``, median; decode cases also end-to-end wall time per call, eager and
as a CUDA-graph replay). Every row goes to the CSV as soon as it is measured (flushed), an
out-of-memory case is recorded as ``oom`` and the run goes on, and with ``--max-seconds`` a task
starts only if it is expected to fit in what is left (the longest task of its op, k, providers
and passes so far); the others are skipped and listed. At the end: a table, the bars of issues
2 and 5 (PASS / FAIL / MISSING) and a markdown speed-up table for the README. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

import shardsoftmax as ss  # noqa: E402

OURS = C.OURS
FAMILIES = ("ours", "eager", "liger", "megatron", "compile")
OPS = ("stats", "ce", "softmax", "log_softmax", "decode")
CE_PASSES = ("fwd", "bwd", "fwd+bwd")
DECODE_PASSES = ("fwd", "e2e", "graph")
OP_NAME = {
    "stats": "softmax_stats",
    "ce": "cross_entropy",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
}

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
# Presets: ordered task lists
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One op on one input configuration, for some provider families and passes."""

    op: str  # stats | ce | softmax | log_softmax
    dtype: str
    n: int
    v: int
    k: int
    families: tuple[str, ...]
    passes: tuple[str, ...]

    @property
    def config(self) -> tuple[str, int, int]:
        return (self.dtype, self.n, self.v)

    @property
    def kind(self) -> str:  # the --ops name
        return "decode" if "e2e" in self.passes or "graph" in self.passes else self.op

    def label(self) -> str:
        k = f" k={self.k}" if self.op == "stats" else ""
        return f"{OP_NAME[self.op]}{k} {self.dtype} N={self.n} V={self.v} [{'+'.join(self.families)}]"


@dataclass
class Grid:
    ns: list[int]
    vs: list[int]
    ks: list[int]
    dtypes: list[str]
    decode_ns: list[int]
    decode_vs: list[int]
    decode_ks: list[int]


GRIDS = {
    # the bars of issues 2 and 5 (headline V first)
    "bars": Grid(
        [8192, 32768], [128256, 32064, 64128, 256000], [0, 50, 1024], ["bf16"], [1, 64], [128256], [0, 50]
    ),
    # wider: every size of issue 5's list, bf16 before fp32, the common N first
    "sweep": Grid(
        [8192, 1024, 32768, 64, 1],
        [128256, 32064, 8192, 64128, 256000],
        [0, 50, 1, 8, 256, 1024],
        ["bf16", "fp32"],
        [1, 64],
        [128256, 32064, 256000],
        [0, 50],
    ),
    # CPU dry run: tiny, odd sizes that still hold k = 1024
    "smoke": Grid([9], [1031], [0, 50, 1024], ["bf16"], [1], [1031], [0, 50]),
}


def config_tasks(g: Grid, dt: str, n: int, v: int, families: tuple[str, ...]) -> list[Task]:
    tasks = [Task("stats", dt, n, v, k, families, ("fwd",)) for k in g.ks if k <= v]
    tasks.append(Task("ce", dt, n, v, 0, families, CE_PASSES))
    tasks += [Task(op, dt, n, v, 0, families, ("fwd",)) for op in ("softmax", "log_softmax")]
    return tasks


def decode_tasks(g: Grid) -> list[Task]:
    return [
        Task("stats", dt, n, v, k, ("ours", "eager"), DECODE_PASSES)
        for dt in g.dtypes
        for v in g.decode_vs
        for n in g.decode_ns
        for k in g.decode_ks
        if k <= v
    ]


def make_tasks(preset: str, g: Grid) -> list[Task]:
    """``bars`` (and ``smoke``): ours on every bar case first (the bars), then the decode cases,
    then the eager peers, Liger and Megatron-style on the same cases, then torch.compile (slow
    to compile: last). ``sweep``: per configuration ours with every eager peer, configurations in
    priority order, then decode, then torch.compile."""
    configs = [(dt, n, v) for dt in g.dtypes for n in g.ns for v in g.vs]
    tasks: list[Task] = []
    if preset == "sweep":
        for c in configs:
            tasks += config_tasks(g, *c, ("ours", "eager", "liger", "megatron"))
        tasks += decode_tasks(g)
    else:
        for c in configs:
            tasks += config_tasks(g, *c, ("ours",))
        tasks += decode_tasks(g)
        for c in configs:
            tasks += config_tasks(g, *c, ("eager", "liger", "megatron"))
    for c in configs:
        tasks += config_tasks(g, *c, ("compile",))
    return tasks


def filter_tasks(tasks: list[Task], ops: list[str] | None, families: list[str] | None) -> list[Task]:
    out = []
    for t in tasks:
        if ops is not None and t.kind not in ops:
            continue
        fams = tuple(f for f in t.families if families is None or f in families)
        if fams:
            out.append(replace(t, families=fams))
    return out


# ----------------------------------------------------------------------------------------------
# Bars of issues 2 and 5 (one GPU)
# ----------------------------------------------------------------------------------------------

I2_GRID = (("bf16",), (8192,), (32064, 64128, 128256))
I5_GRID = (("bf16",), (8192, 32768), (32064, 64128, 128256, 256000))
DECODE_GRID = (("bf16",), (1, 64), (128256,))
DECODE_BAR_MS = 0.030

# Whole calls of ours are also timed with the host ahead of the GPU (pass "fwd-gpu",
# ``C.time_queued``) when the logits are large enough that rotating inputs keep L2 out of it; the
# bandwidth bars are judged on that GPU time (the kernels' throughput, what a caller whose host
# runs ahead gets), and the line shows the whole call's number (do_bench) beside it.
HOST_AHEAD_MIN_BYTES = 256 << 20

# (issue, op, pass, k, metric, bar as text, predicate, grid)
BAR_SPECS = [
    (2, "softmax_stats", "fwd", 0, "frac", ">= 75% of copy bw", lambda x: x >= 0.75, I2_GRID),
    (2, "softmax_stats", "fwd", 50, "frac", ">= 35% of copy bw", lambda x: x >= 0.35, I2_GRID),
    (2, "cross_entropy", "fwd+bwd", 0, "x_floor", "<= 1.6x floor", lambda x: x <= 1.6, I2_GRID),
    (5, "softmax_stats", "fwd", 0, "frac", ">= 88% of copy bw", lambda x: x >= 0.88, I5_GRID),
    (5, "softmax_stats", "fwd", 50, "frac", ">= 65% of copy bw", lambda x: x >= 0.65, I5_GRID),
    (5, "softmax_stats", "fwd", 1024, "frac", ">= 25% of copy bw", lambda x: x >= 0.25, I5_GRID),
    (5, "cross_entropy", "fwd+bwd", 0, "x_floor", "<= 1.15x floor", lambda x: x <= 1.15, I5_GRID),
    (5, "softmax", "fwd", 0, "x_floor", "<= 1.2x floor", lambda x: x <= 1.2, I5_GRID),
    (5, "log_softmax", "fwd", 0, "x_floor", "<= 1.2x floor", lambda x: x <= 1.2, I5_GRID),
]


def ops_bars(results: list[C.Result], *, any_size: bool = False) -> list[C.Bar]:
    """One line per bar and configuration of the issue's grid (``any_size``: every configuration
    measured in this run instead, as in the CPU dry run). A bar with nothing measured in its grid
    gives one MISSING line."""
    ours = {}
    for r in results:
        if r.provider == OURS:
            ours[(r.op, r.pass_, r.k, r.dtype, r.n, r.v_shard)] = r
    bars: list[C.Bar] = []

    def grid_of(op, pass_, k, grid):
        if any_size:
            return sorted({(d, n, v) for (o, p, kk, d, n, v) in ours if (o, p, kk) == (op, pass_, k)})
        dts, ns, vs = grid
        return [(d, n, v) for d in dts for n in ns for v in vs]

    for issue, op, pass_, k, metric, limit, pred, grid in BAR_SPECS:
        name = f"{op}{f' k={k}' if op == 'softmax_stats' else ''} {pass_}"
        lines = []
        for d, n, v in grid_of(op, pass_, k, grid):
            r = ours.get((op, pass_, k, d, n, v))
            what = f"{name} [{d} N={n} V={v}]"
            if r is None:
                lines.append(C.Bar(issue, what, limit, "MISSING"))
                continue
            x = getattr(r, metric) if r.ok else None
            shown = "" if x is None else (f"{100 * x:.1f}%" if metric == "frac" else f"{x:.2f}x")
            gpu = ours.get((op, f"{pass_}-gpu", k, d, n, v))
            if x is not None and gpu is not None and gpu.ok:
                xg = getattr(gpu, metric)
                fmt = (lambda y: f"{100 * y:.1f}%") if metric == "frac" else (lambda y: f"{y:.2f}x")
                x, shown = xg, f"{fmt(xg)} GPU, {fmt(getattr(r, metric))} whole call"
            lines.append(C.judge(issue, what, limit, x, None if x is None else pred(x), shown, r.status))
        if all(b.status == "MISSING" for b in lines):
            lines = [C.Bar(issue, f"{name} [{grid_text(grid)}]", limit, "MISSING")]
        bars += lines

    # decode: end-to-end per call, eager or CUDA-graph replay, whichever is faster
    for k in (0, 50):
        cfgs = (
            sorted(
                {(d, n, v) for (o, p, kk, d, n, v) in ours if o == "softmax_stats" and p == "e2e" and kk == k}
            )
            if any_size
            else [(d, n, v) for d in DECODE_GRID[0] for n in DECODE_GRID[1] for v in DECODE_GRID[2]]
        )
        lines = []
        for d, n, v in cfgs:
            e2e = ours.get(("softmax_stats", "e2e", k, d, n, v))
            graph = ours.get(("softmax_stats", "graph", k, d, n, v))
            what = f"decode softmax_stats k={k} e2e [{d} N={n} V={v}]"
            times = [r.ms for r in (e2e, graph) if r is not None and r.ok]
            parts = [
                f"{lbl} {r.ms * 1e3:.1f}us" if r.ok else f"{lbl} {r.status}"
                for lbl, r in (("eager", e2e), ("graph", graph))
                if r is not None
            ]
            best = min(times) if times else None
            lines.append(
                C.judge(
                    5,
                    what,
                    "<= 30 us per call (eager or graph)",
                    best,
                    None if best is None else best <= DECODE_BAR_MS,
                    ", ".join(parts),
                )
            )
            if best is None and parts:
                lines[-1] = C.Bar(5, what, "<= 30 us per call (eager or graph)", "FAIL", ", ".join(parts))
        if lines and all(b.status == "MISSING" for b in lines):
            lines = [
                C.Bar(
                    5,
                    f"decode softmax_stats k={k} e2e [{grid_text(DECODE_GRID)}]",
                    "<= 30 us per call (eager or graph)",
                    "MISSING",
                )
            ]
        bars += lines
    return bars


def grid_text(grid) -> str:
    dts, ns, vs = grid
    return f"{'/'.join(dts)} N={','.join(map(str, ns))} V={','.join(map(str, vs))}"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class Provider:
    name: str
    call: Callable  # stats/softmax: call(x) -> output; ce: call(x, t) -> loss
    verify: Callable | None = None  # verify(output) raises CheckFailed; ce: None (checked by run_ce)
    inputs: list | None = None  # ce: this provider's own input tensors (Liger overwrites them)
    quick: bool = True  # shorter do_bench (peers); ours: the full one


class Inputs:
    """Logits (a few sets when one fits in L2), targets and the float64 reference of one config."""

    def __init__(self, dtype: torch.dtype, n: int, v: int, device: torch.device, seed: int):
        self.dtype, self.n, self.v = dtype, n, v
        self.es = torch.finfo(dtype).bits // 8
        count = C.n_buffers(n * v * self.es * 2)  # input + an output of the same size
        self.xs = [C.random_logits(n, v, dtype, device, seed=seed + i) for i in range(count)]
        self.ts = [C.random_targets(n, v, device, seed=seed + i) for i in range(count)]
        self.rot = C.Rotation(count)
        self.ref = C.build_reference(self.xs[0], self.ts[0], k_max=min(1024, v))
        self.x_rows = self.xs[0][self.ref.rows]
        self.grad_ref = self.ref.grad_rows(n)

    def nxt(self) -> int:
        return self.rot.next()


class Bench:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.cuda = C.is_cuda(device)
        self.results: list[C.Result] = []
        self.skips: list[tuple[str, str]] = []
        self.compiled: dict[str, Callable] = {}
        self.compile_broken: dict[str, str] = {}
        self.inputs: Inputs | None = None
        self.inputs_key = None
        self.durations: dict[tuple, float] = {}
        self.liger_mod, self.liger_reason = C.find_liger(device)
        self.liger_ce = self.liger_mod.LigerCrossEntropyLoss() if self.liger_mod is not None else None

    # -- rows ----------------------------------------------------------------------------------

    def record(
        self, task: Task, provider: str, pass_: str, ms, floor_bytes, *, status="ok", note="", extra_mem=None
    ) -> C.Result:
        r = C.Result(OP_NAME[task.op], provider, task.dtype, task.n, task.v, task.k, pass_, ms, floor_bytes,
                     self.copy_bw, extra_mem=extra_mem, note=note, status=status)  # fmt: skip
        self.results.append(r)
        self.csv.write(r)
        if r.ok:
            frac = "-" if r.frac is None else f"{100 * r.frac:5.1f}% of copy"
            mem = "" if r.extra_mem is None else f", extra mem {r.extra_mem / 2**20:.1f} MiB"
            val = f"{r.ms:9.4f} ms  {frac}  x{r.x_floor or 0:.2f} floor{mem}"
        else:
            val = f"{status.upper()}"
        C.log(
            f"  {r.op:<13} {pass_:<7} {task.dtype} N={task.n} V={task.v} k={task.k} {provider:<14} {val}"
            f"{'  (' + note + ')' if note else ''}"
        )
        return r

    def fail_rows(self, task: Task, provider: str, passes, status: str, reason: str) -> None:
        self.skips.append((f"{task.label()} {provider}", reason))
        for p in passes:
            self.record(task, provider, p, None, self.floor(task, p), status=status, note=reason)

    def floor(self, task: Task, pass_: str) -> int:
        one = task.n * task.v * (torch.finfo(C.DTYPES[task.dtype]).bits // 8)
        if task.op == "ce":
            return {"fwd": one, "bwd": 2 * one, "fwd+bwd": 3 * one}[pass_]
        if task.op in ("softmax", "log_softmax"):
            return 3 * one  # read twice (statistics, then the write pass), write once
        return one

    def time_it(self, fn: Callable[[], object], quick: bool) -> float:
        return C.bench(fn, self.device, quick=quick or self.args.quick)

    def wall(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            return C.wall_per_call(fn, self.device)
        return C.wall_per_call(fn, self.device, calls=2, reps=1, warmup=1)

    # -- inputs --------------------------------------------------------------------------------

    def get_inputs(self, task: Task) -> Inputs:
        if self.inputs_key != task.config:
            self.inputs, self.inputs_key = None, None
            C.empty_cache(self.device)
            dt, n, v = task.config
            seed = self.args.seed + 7 * n + 13 * v + (0 if dt == "bf16" else 1)
            self.inputs = Inputs(C.DTYPES[dt], n, v, self.device, seed)
            self.inputs_key = task.config
        return self.inputs

    # -- torch.compile -------------------------------------------------------------------------

    def compiled_fn(self, name: str, fn: Callable) -> Callable:
        """torch.compile(fn), once per baseline (static shapes: a recompile per shape); raises
        what torch.compile raises. On the CPU the 'eager' backend only exercises the path."""
        if name in self.compile_broken:
            raise RuntimeError(self.compile_broken[name])
        if name not in self.compiled:
            try:
                import torch._dynamo

                for opt in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
                    if hasattr(torch._dynamo.config, opt):
                        setattr(torch._dynamo.config, opt, max(256, getattr(torch._dynamo.config, opt)))
                backend = "inductor" if self.cuda else "eager"
                self.compiled[name] = torch.compile(fn, backend=backend, dynamic=False)
            except Exception as err:
                self.compile_broken[name] = C.short_error(err)
                raise
        return self.compiled[name]

    # -- providers -----------------------------------------------------------------------------

    def stats_providers(self, task: Task, inp: Inputs) -> list[Provider]:
        k, ref, rows = task.k, inp.ref, inp.ref.rows
        what = task.label()

        def verify_ours(s):
            C.expect_close(f"{what} lse", s.lse, ref.lse)
            if k:
                raw = (s.topk_logprobs + s.lse[:, None])[rows]
                C.expect_topk(what, s.topk_ids[rows], raw, inp.x_rows, ref, exact_ids=True)

        def verify_base(out):
            lse = out if k == 0 else out[0]
            C.expect_close(f"{what} lse", lse, ref.lse)
            if k:
                vals, ids = out[1]
                C.expect_topk(what, ids[rows], vals[rows], inp.x_rows, ref, exact_ids=False)

        provs = []
        if "ours" in task.families:
            provs.append(Provider(OURS, lambda x: ss.softmax_stats(x, k=k), verify_ours, quick=False))
        if "eager" in task.families:
            fn = torch_lse if k == 0 else (lambda x: torch_lse_topk(x, k))
            provs.append(Provider("torch", fn, verify_base))
        if "compile" in task.families:
            base = torch_lse if k == 0 else torch_lse_topk
            cname = "lse" if k == 0 else "lse_topk"

            def call(x, base=base, cname=cname):
                cfn = self.compiled_fn(cname, base)
                return cfn(x) if k == 0 else cfn(x, k)

            provs.append(Provider("torch.compile", call, verify_base))
        return provs

    def softmax_providers(self, task: Task, inp: Inputs) -> list[Provider]:
        log = task.op == "log_softmax"
        rows = inp.ref.rows
        want = inp.ref.logp if log else inp.ref.logp.exp()
        what = task.label()

        def verify(out):
            if out.dtype != inp.dtype:
                raise C.CheckFailed(f"output dtype {out.dtype}, expected {inp.dtype}")
            C.expect_close(what, out[rows], want)

        provs = []
        if "ours" in task.families:
            provs.append(Provider(OURS, ss.log_softmax if log else ss.softmax, verify, quick=False))
        if "eager" in task.families:
            provs.append(Provider("torch", torch_log_softmax if log else torch_softmax, verify))
            if inp.dtype != torch.float32:
                provs.append(
                    Provider("torch.f32", torch_log_softmax_f32 if log else torch_softmax_f32, verify)
                )
        if "compile" in task.families:
            base = torch_log_softmax_f32 if log else torch_softmax_f32
            name = task.op

            def call(x, base=base, name=name):
                return self.compiled_fn(name, base)(x)

            provs.append(Provider("torch.compile", call, verify))
        return provs

    def ce_providers(self, task: Task, inp: Inputs) -> list[Provider]:
        provs = []
        if "ours" in task.families:
            provs.append(Provider(OURS, ss.cross_entropy, inputs=inp.xs, quick=False))
        if "eager" in task.families:
            provs.append(Provider("torch", torch_ce, inputs=inp.xs))  # F.cross_entropy on the logits' dtype
            if inp.dtype != torch.float32:
                provs.append(Provider("torch.f32", torch_ce_f32, inputs=inp.xs))
        if "liger" in task.families:
            if self.liger_ce is None:
                self.skips.append((f"{task.label()} liger", self.liger_reason))
            else:
                # Liger writes the gradient into its input during the forward: its own copies.
                provs.append(Provider("liger", self.liger_ce, inputs=None))
        if "megatron" in task.families:
            provs.append(Provider("megatron", lambda x, t: C.megatron_ce(x, t, 0, None), inputs=inp.xs))
        if "compile" in task.families:

            def call(x, t):
                return self.compiled_fn("ce_f32", torch_ce_f32)(x, t)

            provs.append(Provider("torch.compile", call, inputs=inp.xs))
        return provs

    # -- measuring one task --------------------------------------------------------------------

    def run_task(self, task: Task) -> None:
        try:
            inp = self.get_inputs(task)
        except C.OOM:
            self.inputs, self.inputs_key = None, None
            C.empty_cache(self.device)
            reason = "out of memory creating the inputs and the reference"
            for fam in task.families:
                self.fail_rows(task, fam if fam != "ours" else OURS, task.passes, "oom", reason)
            return
        if task.op == "ce":
            provs = self.ce_providers(task, inp)
        elif task.op == "stats":
            provs = self.stats_providers(task, inp)
        else:
            provs = self.softmax_providers(task, inp)
        for prov in provs:
            start = len(self.results)
            try:
                if task.op == "ce":
                    self.run_ce(task, inp, prov)
                else:
                    self.run_plain(task, inp, prov)
            except Exception as err:  # OOM or a provider that raises: its remaining passes say so
                oom = isinstance(err, C.OOM)
                C.empty_cache(self.device)
                done = {r.pass_ for r in self.results[start:] if r.provider == prov.name}
                rest = [p for p in task.passes if p not in done]
                reason = "out of memory while timing" if oom else C.short_error(err)
                C.log(f"  {prov.name}: {reason}")
                self.fail_rows(task, prov.name, rest, "oom" if oom else "error", reason)
            C.empty_cache(self.device)

    def run_plain(self, task: Task, inp: Inputs, prov: Provider) -> None:
        """stats / softmax / log_softmax: check, then each pass (fwd; decode: e2e, graph)."""
        x0 = inp.xs[0]
        status, reason = C.run_check(lambda: prov.verify(prov.call(x0)))
        if status != "ok":
            C.log(f"  skip {task.label()} {prov.name}: {reason}")
            self.fail_rows(task, prov.name, task.passes, status, reason)
            return

        def fn():
            return prov.call(inp.xs[inp.nxt()])

        for pass_ in task.passes:
            floor = self.floor(task, pass_)
            if pass_ == "fwd":
                self.record(task, prov.name, pass_, self.time_it(fn, prov.quick), floor)
                self.host_ahead(task, prov, pass_, fn)
            elif pass_ == "e2e":
                note = "wall time per call, back-to-back calls, one sync at the end"
                self.record(task, prov.name, pass_, self.wall(fn), floor, note=note)
            elif pass_ == "graph":
                self.run_graph(task, inp, prov, floor)

    def run_graph(self, task: Task, inp: Inputs, prov: Provider, floor: int) -> None:
        if not self.cuda:
            reason = "CUDA graphs need CUDA"
            self.skips.append((f"{task.label()} {prov.name} graph", reason))
            self.record(task, prov.name, "graph", None, floor, status="skip", note=reason)
            return
        x0 = inp.xs[0]
        try:
            graph, out = C.capture_graph(lambda: prov.call(x0), self.device)
        except C.OOM:
            raise
        except Exception as err:
            reason = f"CUDA graph capture failed: {C.short_error(err)}"
            try:
                torch.cuda.synchronize(self.device)
            except Exception as err2:  # a broken context: the rest of the run cannot go on
                reason += f"; then synchronize failed: {C.short_error(err2)}"
            self.record(task, prov.name, "graph", None, floor, status="error", note=reason)
            return
        status, reason = C.run_check(lambda: prov.verify(out))
        if status != "ok":
            self.record(task, prov.name, "graph", None, floor, status=status, note=f"graph replay: {reason}")
            return
        note = "wall time per CUDAGraph replay, back-to-back, one sync at the end; input L2-resident"
        self.record(task, prov.name, "graph", self.wall(graph.replay), floor, note=note)

    def run_ce(self, task: Task, inp: Inputs, prov: Provider) -> None:
        """Cross-entropy: check loss and gradient, then fwd, bwd, fwd+bwd and extra memory."""
        ref, rows = inp.ref, inp.ref.rows
        what = task.label()
        loss_fn = prov.call
        xs_p = prov.inputs if prov.inputs is not None else [x.clone() for x in inp.xs]

        def check():
            x = inp.xs[0].detach().clone().requires_grad_(True)  # fresh: Liger overwrites it
            loss = loss_fn(x, inp.ts[0])
            (g,) = torch.autograd.grad(loss, x)
            C.expect_close(f"{what} loss", loss.reshape(()), ref.loss_mean)
            C.expect_close(f"{what} grad", g[rows], inp.grad_ref)

        status, reason = C.run_check(check)
        if status != "ok":
            C.log(f"  skip {what} {prov.name}: {reason}")
            self.fail_rows(task, prov.name, task.passes, status, reason)
            return
        C.empty_cache(self.device)
        ts = inp.ts
        leaves = [x.detach().requires_grad_(True) for x in xs_p]
        rot = C.Rotation(len(leaves))

        def fwd():
            i = rot.next()
            return loss_fn(leaves[i], ts[i])

        def fwd_bwd():
            i = rot.next()
            return torch.autograd.grad(loss_fn(leaves[i], ts[i]), leaves[i])

        ms_f = ms_fb = None
        liger_note = (
            "gradient computed in its forward, written into the logits" if prov.name == "liger" else ""
        )
        if "fwd" in task.passes:
            ms_f = self.time_it(fwd, prov.quick)
            self.record(task, prov.name, "fwd", ms_f, self.floor(task, "fwd"), note=liger_note)
        if "fwd+bwd" in task.passes:
            ms_fb = self.time_it(fwd_bwd, prov.quick)
        if "bwd" in task.passes:
            # Backward alone: the forward runs once per input set OUTSIDE the timed region and
            # keeps its graph (retain_graph=True); only autograd.grad is timed. A provider whose
            # backward cannot run twice on one graph gets fwd+bwd - fwd (noted).
            note, ms_b, losses = "", None, []
            try:
                losses = [loss_fn(leaves[i], ts[i]) for i in range(len(leaves))]

                def bwd():
                    i = rot.next()
                    return torch.autograd.grad(losses[i], leaves[i], retain_graph=True)

                bwd()
                bwd()
                ms_b = self.time_it(bwd, prov.quick)
            except C.OOM:
                raise
            except Exception as err:
                if ms_f is not None and ms_fb is not None and ms_fb > ms_f:
                    ms_b = ms_fb - ms_f
                    note = f"derived: fwd+bwd - fwd ({type(err).__name__} with retain_graph)"
                elif ms_f is not None and ms_fb is not None:  # timing noise: no number to report
                    note = f"fwd+bwd <= fwd in this run; backward not measurable ({type(err).__name__})"
                else:
                    note = C.short_error(err)
            losses.clear()
            C.empty_cache(self.device)
            if ms_b is None:
                self.record(task, prov.name, "bwd", None, self.floor(task, "bwd"), status="error", note=note)
            else:
                self.record(task, prov.name, "bwd", ms_b, self.floor(task, "bwd"), note=note or liger_note)
        if "fwd+bwd" in task.passes:
            x0, t0 = leaves[0], ts[0]

            def once():
                loss = loss_fn(x0, t0)
                (g,) = torch.autograd.grad(loss, x0)
                return (loss, g)

            mem = C.extra_peak_memory(once, self.device, inputs=[x0, t0])
            self.record(
                task,
                prov.name,
                "fwd+bwd",
                ms_fb,
                self.floor(task, "fwd+bwd"),
                extra_mem=mem,
                note="extra_mem: peak beyond inputs, loss and gradient",
            )
            self.host_ahead(task, prov, "fwd+bwd", fwd_bwd)

    def host_ahead(self, task: Task, prov: Provider, pass_: str, fn: Callable[[], object]) -> None:
        """Ours only, on CUDA, large inputs: the pass again with the host ahead (``<pass>-gpu``)."""
        floor = self.floor(task, pass_)
        if prov.name != OURS or not self.cuda or self.floor(task, "fwd") < HOST_AHEAD_MIN_BYTES:
            return
        gpu = C.time_queued(fn, self.device)
        if gpu is not None:
            note = C.HOST_AHEAD_NOTE + "; no L2 flush"
            self.record(task, prov.name, f"{pass_}-gpu", gpu, floor, note=note)

    # -- whole run ------------------------------------------------------------------------------

    @staticmethod
    def duration_key(task: Task) -> tuple:
        """Tasks that take about as long as each other: the same op, k, providers and passes. k is
        in it because a k's first task compiles its selection (v0.17, one H200: ~100 s for
        k = 1024, against 1-2 s for a k = 0 task)."""
        return (task.op, task.k, task.families, task.passes)

    def expected_seconds(self, task: Task) -> float:
        """What the budget expects a task to take: the longest one of its kind so far (a first
        torch.compile of a function: 60 s)."""
        if "compile" in task.families and not self.compiled and self.cuda:
            return 60.0
        return self.durations.get(self.duration_key(task), 2.0 if self.cuda else 0.0)

    def run(self) -> int:
        args, device = self.args, self.device
        budget = C.Budget(args.max_seconds)
        grid = self.grid()
        tasks = filter_tasks(make_tasks(args.grid_preset, grid), args.ops, args.providers)
        meta = C.run_meta(device, bench="ops", world_size=1, preset=args.preset)
        os.makedirs(args.out, exist_ok=True)
        self.csv = C.CsvWriter(C.out_path(args.out, "ops", meta), meta)

        C.log(f"measuring copy bandwidth and matmul rate on {meta['gpu']} ...")
        self.copy_bw, copy_ms, moved = C.copy_bandwidth(device, quick=args.quick)
        mm_flops, mm_ms, mm_n, mm_dt = C.matmul_rate(device, quick=args.quick)
        mm_desc = f"{C.dtype_name(mm_dt)} {mm_n}^3"
        C.print_header(f"bench_ops --preset {args.preset}", meta, self.copy_bw, mm_flops, mm_desc)
        copy_row = C.Result(
            "copy",
            "torch",
            "u8",
            0,
            0,
            0,
            "fwd",
            copy_ms,
            moved,
            self.copy_bw,
            note=f"{moved / 2**30:.2f} GiB read+written",
        )
        mm_row = C.Result(
            "matmul",
            "torch",
            C.dtype_name(mm_dt),
            mm_n,
            mm_n,
            0,
            "fwd",
            mm_ms,
            0,
            self.copy_bw,
            note=f"{mm_flops / 1e12:.2f} TFLOP/s",
        )
        for r in (copy_row, mm_row):
            self.csv.write(r)
        if self.liger_ce is None:
            C.log(f"liger: skipped everywhere: {self.liger_reason}")
        C.log(
            f"plan: {len(tasks)} tasks (preset {args.preset}), budget "
            f"{'none' if budget.max_seconds is None else f'{budget.max_seconds:g} s'}"
        )

        # A task that would not fit in what is left of the budget is skipped, and the later ones
        # that still fit run (a slow kind, e.g. k = 1024, does not stop the quick ones).
        not_run: list[Task] = []
        for i, task in enumerate(tasks):
            if not budget.allows(self.expected_seconds(task)):
                if not not_run:
                    at = f"{budget.elapsed():.0f}s of {budget.max_seconds:g}s"
                    C.log(f"-- budget: at {at}, skipping the tasks that would not fit")
                not_run.append(task)
                continue
            C.log(f"-- [{i + 1}/{len(tasks)}] {task.label()}  (t={budget.elapsed():.0f}s)")
            t0 = time.perf_counter()
            with C.ClockLog(device) as clocks:  # is the GPU at its power cap? (docs/performance.md v0.16)
                self.run_task(task)
            clock_line = clocks.summary()
            if clock_line:
                C.log(f"   GPU during the task: {clock_line}")
            key = self.duration_key(task)
            self.durations[key] = max(self.durations.get(key, 0.0), time.perf_counter() - t0)
        self.inputs = None
        C.empty_cache(device)
        self.csv.close()
        self.report(meta, mm_desc, mm_flops, budget, not_run)
        if args.plot:
            import plot

            plot.main([self.csv.path, "--out", args.plot])
        return 0

    def grid(self) -> Grid:
        a = self.args
        g = GRIDS[a.grid_preset]
        return Grid(
            a.n or g.ns, a.v or g.vs, a.k or g.ks, a.dtype or g.dtypes, g.decode_ns, g.decode_vs, g.decode_ks
        )

    def report(self, meta, mm_desc, mm_flops, budget: C.Budget, not_run: list[Task]) -> None:
        args = self.args
        cond = C.conditions_line(meta, self.copy_bw)
        lines = [
            "",
            f"== results: {cond}",
            "ms: median (do_bench; e2e/graph: wall time per call); GB/s and %copy count the op's floor "
            "bytes (README); xfloor = ms / floor ms; ours_x = that provider's ms / shardsoftmax's ms; "
            "xmemMB = extra peak memory of loss fwd+bwd",
        ]
        if args.dry_run:
            lines.append(
                "DRY RUN on the CPU: the numbers mean nothing; the bars below only exercise the code"
            )
        lines.append(C.format_table(self.results))
        if self.skips:
            lines.append(C.skip_summary(self.skips))
        if not_run:
            lines.append(
                f"not run (budget of {budget.max_seconds:g}s): "
                + "; ".join(t.label() for t in not_run[:40])
                + (" ..." if len(not_run) > 40 else "")
            )
        lines += [
            "",
            "== bars (issues 2 and 5, one GPU)",
            *C.bar_lines(ops_bars(self.results, any_size=args.dry_run)),
        ]
        md = C.speedup_markdown(self.results, f"bench_ops --preset {args.preset}: {cond}")
        lines += ["", "== speed-up over each peer (markdown, also in the .md file)", md, ""]
        lines.append(
            f"copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (read+write), matmul {mm_desc} "
            f"{mm_flops / 1e12:.1f} TFLOP/s; csv: {self.csv.path}; took {budget.elapsed():.0f}s"
        )
        C.write_report(lines, self.csv.path, markdown=md)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(GRIDS),
        default=None,
        help="bars (default): the cases of the bars of issues 2 and 5; sweep: the wider grid; "
        "smoke: tiny sizes (the --dry-run default)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, PyTorch backend, smoke sizes: runs every provider's check and the CSV, "
        "bars, table (and --plot) code; the numbers mean nothing",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="skip the tasks that would not fit in this wall-clock budget (0: none)",
    )
    p.add_argument(
        "--out", default="bench_out", help="folder for the CSV, .txt and .md (default ./bench_out)"
    )
    p.add_argument("--plot", default=None, metavar="DIR", help="also write the PNG figures into DIR")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default=None,
        help="shardsoftmax backend (default auto; torch with --dry-run)",
    )
    p.add_argument("--n", type=int, nargs="+", help="replace the preset's token counts N")
    p.add_argument("--v", type=int, nargs="+", help="replace the preset's shard widths V_shard")
    p.add_argument("--k", type=int, nargs="+", help="replace the preset's k values of softmax_stats")
    p.add_argument("--dtype", nargs="+", choices=sorted(C.DTYPES), help="replace the preset's dtypes")
    p.add_argument(
        "--ops", nargs="+", choices=OPS, help="only these ops (decode: the small-N e2e/graph cases)"
    )
    p.add_argument(
        "--providers",
        nargs="+",
        choices=FAMILIES,
        help="only these provider families (ours = shardsoftmax; eager = torch and torch.f32)",
    )
    p.add_argument("--quick", action="store_true", help="shorter timing (do_bench warmup 10 ms, rep 40 ms)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.backend = args.backend or "torch"
        args.preset = args.preset or "smoke"
    args.preset = args.preset or "bars"
    args.grid_preset = args.preset
    args.backend = args.backend or "auto"
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if C.is_cuda(device):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif not args.dry_run:
        C.log("(CPU: perf_counter timings; the numbers mean nothing)")
    torch.manual_seed(args.seed)
    with ss.use_backend(args.backend):
        return Bench(args, device).run()


if __name__ == "__main__":
    sys.exit(main())

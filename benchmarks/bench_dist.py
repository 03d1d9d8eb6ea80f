"""Multi-GPU benchmark: shardsoftmax over a vocabulary split across ranks, against a Megatron-style
vocab-parallel cross-entropy (three all-reduces on fp32, written here), gathering all logits
then computing, and Liger-Kernel's vocab-parallel cross-entropy (when installed).

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_dist.py                    # --preset bars
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_dist.py --preset scaling   # TP = 4, 2, 1
    torchrun --standalone --nproc-per-node 4 -m shardsoftmax.launch.torchrun bench [options]
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_dist.py --dry-run          # CPU, gloo

Every provider is checked on every rank against a float64 reference of the full logits first;
a provider that fails on any rank is recorded (wrong / error) and skipped on all of them.
Timing: a FIXED number of calls, each between CUDA events, after a barrier (do_bench would
choose a different repeat count on each rank and deadlock in the collectives); per-rank median,
then the MAX over the ranks. The same run measures the single-shard kernel (no collective) and
one all-gather of the partials-sized buffer. ``--preset scaling`` (issue 6) runs the same at
TP = every power of two up to the world size on sub-groups of ranks 0..TP-1, at a fixed global
vocabulary (strong scaling). Rank 0 prints progress, a table, the bars of issues 3 and 5, the
strong-scaling table and a markdown speed-up table at the end, and writes the CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

import shardsoftmax as ss  # noqa: E402
from shardsoftmax.collective import H as HEADER_WORDS  # noqa: E402
from shardsoftmax.collective import Header, packs_topk, payload_words  # noqa: E402

OURS = C.OURS
FAMILIES = ("ours", "megatron", "liger", "gather")
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------------------
# Gather-then-compute baseline
# ----------------------------------------------------------------------------------------------


def gather_full(shard: torch.Tensor, widths: list[int], group) -> torch.Tensor:
    """all_gather the shards into the full [N, V] logits (shards padded to the widest one)."""
    n, w = shard.shape
    wmax = max(widths)
    buf = shard if w == wmax else torch.nn.functional.pad(shard, (0, wmax - w))
    out = torch.empty(len(widths) * n * wmax * shard.element_size(), dtype=torch.uint8, device=shard.device)
    # raw bytes: gloo has no bf16
    _all_gather_into(out, buf.contiguous().view(torch.uint8).reshape(-1), group=group)
    out = out.view(shard.dtype).view(len(widths), n, wmax)
    return torch.cat([out[r, :, : widths[r]] for r in range(len(widths))], dim=1)


def gather_stats(shard, widths, k, group):
    full = gather_full(shard, widths, group)
    lse = torch.logsumexp(full.float(), dim=-1)
    return lse if k == 0 else (lse, torch.topk(full, k, dim=-1))


def split(v: int, world: int) -> list[int]:
    base, extra = divmod(v, world)
    return [base + (r < extra) for r in range(world)]


# ----------------------------------------------------------------------------------------------
# Presets and bars
# ----------------------------------------------------------------------------------------------


def preset_plan(preset: str, world: int) -> tuple[list[int], list[int], int]:
    """(TPs in the order they run, global vocabulary sizes, N)."""
    pow2 = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= world]
    every = sorted(set(pow2) | {world}, reverse=True)
    if preset == "bars":
        return [world], [128256, 256000], 8192
    if preset == "scaling":
        return every, [128256, 256000], 8192
    return every, [1030, 301], 37  # smoke: tiny, an even and an uneven split


I3_GRID = ((2, 4), (128256, 256000), 8192, "bf16")
I5_GRID = ((4,), (256000,), 8192, "bf16")


def dist_bars(got: dict, *, any_size: bool, k: int) -> list[C.Bar]:
    """``got[(tp, V, n, dtype)]`` holds the block's measured times (ms) and memory. One line per
    bar and block of the issue's grid (``any_size``: every measured block)."""

    def blocks(grid):
        if any_size:
            return sorted(got)
        tps, vs, n, dt = grid
        return [(tp, v, n, dt) for tp in tps for v in vs]

    def val(b, key):
        return got.get(b, {}).get(key)

    bars: list[C.Bar] = []

    def add(issue, grid, name, limit, compute):
        lines = []
        for b in blocks(grid):
            tp, v, n, dt = b
            what = f"{name} [TP={tp} V={v} N={n} {dt}]"
            status = next((val(b, f"status:{key}") for key in compute.keys if val(b, f"status:{key}")), "")
            value, ok, shown = compute(b)
            lines.append(C.judge(issue, what, limit, value, ok, shown, status))
        if lines and all(x.status == "MISSING" for x in lines):
            tps, vs, n, dt = grid
            lines = [C.Bar(issue, f"{name} [TP={tps} V={vs} N={n} {dt}]", limit, "MISSING")]
        bars.extend(lines)

    class Rule:
        """A bar's computation from the block's measurements ``keys``: fn(block, *values) ->
        (value, ok, shown); nothing measured -> MISSING."""

        def __init__(self, keys, fn):
            self.keys, self.fn = keys, fn

        def __call__(self, b):
            vals = [val(b, key) for key in self.keys]
            if any(x is None for x in vals):
                return None, None, ""
            return self.fn(b, *vals)

    def latency(extra_ms):
        # Judged on the GPU time with the host ahead (``C.time_queued``) where it was measured: the
        # bar is about the GPU work of one call (kernel + one all-gather + the merge), which is what
        # a training step pays when the host queues the loss behind the head's matmul. The
        # back-to-back time (host-bound when the host's ~0.3-0.6 ms per call exceeds it) is shown too.
        def fn(b, s0, local0, ag0):
            # the kernel and the all-gather with the host ahead too where measured: back to back,
            # a small shard's call is host-bound and would loosen the bar
            local0 = val(b, "local0_gpu") or local0
            ag0 = val(b, "allgather0_gpu") or ag0
            budget = local0 + ag0 + extra_ms
            parts = f"({local0:.3f}+{ag0:.3f}+{extra_ms:.3f})"
            gpu = val(b, "stats0_gpu")
            if gpu is None:
                return s0, s0 <= budget, f"{s0:.3f} vs {budget:.3f} ms {parts}"
            shown = f"{gpu:.3f} GPU, {s0:.3f} back-to-back vs {budget:.3f} ms {parts}"
            return gpu, gpu <= budget, shown

        return Rule(["stats0", "local0", "allgather0"], fn)

    def faster(ours_key, peer_key, factor):
        # Judged on both sides' GPU time with the host ahead where both were measured (the same
        # rule as ``latency``); the back-to-back ratio is shown beside it.
        def fn(b, ours, peer):
            back = f"{peer / ours:.2f}x ({ours:.3f} vs {peer:.3f} ms)"
            key_o, key_p = (k.replace(":", "_gpu:", 1) for k in (ours_key, peer_key))
            g_o, g_p = val(b, key_o), val(b, key_p)
            if g_o is None or g_p is None:
                return peer / ours, peer >= factor * ours, back
            shown = f"{g_p / g_o:.2f}x GPU ({g_o:.3f} vs {g_p:.3f} ms), {back} back-to-back"
            return g_p / g_o, g_p >= factor * g_o, shown

        return Rule([ours_key, peer_key], fn)

    def topk_ratio(b, sk, s0):
        # Judged on both GPU times with the host ahead where both were measured (back to back,
        # both calls are bound by the host's ~0.6 ms per group call: the ratio then says little);
        # the back-to-back ratio is shown beside it.
        back = f"{sk / s0:.2f}x ({sk:.3f} vs {s0:.3f} ms)"
        g_k, g_0 = val(b, f"stats{k}_gpu"), val(b, "stats0_gpu")
        if g_k is None or g_0 is None:
            return sk / s0, sk <= 1.5 * s0, back
        shown = f"{g_k / g_0:.2f}x GPU ({g_k:.3f} vs {g_0:.3f} ms), {back} back-to-back"
        return g_k / g_0, g_k <= 1.5 * g_0, shown

    def memory(b, mem):
        limit = b[2] * 64  # N * (64 + 16k) bytes with k = 0
        return mem, mem <= limit, f"{mem / 1024:.0f} KiB vs {limit / 1024:.0f} KiB"

    add(3, I3_GRID, "softmax_stats k=0 fwd", "<= local kernel + one all-gather + 60 us", latency(0.060))
    add(
        3,
        I3_GRID,
        "cross_entropy fwd vs Liger vocab-parallel fwd",
        ">= 2x faster",
        faster("ce_fwd:shardsoftmax", "ce_fwd:liger", 2.0),
    )
    add(
        3,
        I3_GRID,
        "cross_entropy fwd vs Megatron-style fwd",
        ">= 8x faster",
        faster("ce_fwd:shardsoftmax", "ce_fwd:megatron", 8.0),
    )
    add(
        3,
        I3_GRID,
        "cross_entropy fwd+bwd vs Liger vocab-parallel",
        ">= 2x faster",
        faster("ce_fb:shardsoftmax", "ce_fb:liger", 2.0),
    )
    add(
        3,
        I3_GRID,
        f"softmax_stats k={k} fwd vs k=0",
        "<= 1.5x the k=0 time",
        Rule([f"stats{k}", "stats0"], topk_ratio),
    )

    add(
        3,
        I3_GRID,
        "cross_entropy fwd+bwd extra memory per rank",
        "<= N*(64+16k) bytes, k=0",
        Rule(["ce_mem:shardsoftmax"], memory),
    )
    add(5, I5_GRID, "softmax_stats k=0 fwd", "<= one-GPU kernel + one all-gather + 40 us", latency(0.040))
    return bars


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench_dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=("bars", "scaling", "smoke"),
        default=None,
        help="bars (default): TP = world size, V in {128256, 256000}; scaling: TP = 1, 2, 4, 8 "
        "up to the world size; smoke: tiny sizes (the --dry-run default)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU + gloo, PyTorch backend, smoke sizes: every provider's check and the CSV, "
        "bars and tables; the numbers mean nothing",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="stop starting blocks / providers when this budget would be exceeded (0: none)",
    )
    p.add_argument("--out", default="bench_out", help="folder for the CSV, .txt and .md (rank 0)")
    p.add_argument("--device", default=None, help="cuda or cpu; must match the group (NCCL: cuda, gloo: cpu)")
    p.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default=None,
        help="shardsoftmax backend (default auto; torch with --dry-run)",
    )
    p.add_argument("--tp", type=int, nargs="+", default=None, help="replace the preset's TP sizes (<= world)")
    # --tokens / --vocab: under torchrun (which parses the whole command line first) --n and --v
    # are ambiguous abbreviations of its own options and stop the launch
    p.add_argument("--tokens", "--n", dest="n", type=int, default=None, help="N (default 8192; smoke 37)")
    p.add_argument(
        "--vocab", "--v", dest="v", type=int, nargs="+", default=None,
        help="global vocab sizes (default 128256 256000)",
    )  # fmt: skip
    p.add_argument("--k", type=int, default=50, help="top-k of the k>0 case (default 50)")
    p.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
    p.add_argument("--providers", nargs="+", choices=FAMILIES, default=None, help="only these providers")
    p.add_argument("--iters", type=int, default=None, help="timed calls per provider (default 20; CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; CPU 1)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.dry_run:
        args.backend = args.backend or "torch"
        args.preset = args.preset or "smoke"
    args.preset = args.preset or "bars"
    args.backend = args.backend or "auto"
    return args


class Stop(Exception):
    """The budget ran out: the block ends here on every rank of its group."""


class DistBench:
    def __init__(self, args, group, device):
        self.args, self.world_group, self.device = args, group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.cpu = not C.is_cuda(device)
        self.results: list[C.Result] = []
        self.skips: list[tuple[str, str]] = []
        self.got: dict[tuple, dict] = {}
        self.liger_mod, self.liger_reason = C.find_liger(device)
        self.iters = args.iters or (2 if self.cpu else 20)
        self.warmup = args.warmup or (1 if self.cpu else 5)
        self.budget = C.Budget(args.max_seconds)
        self.durations: dict[str, float] = {}
        self.families = args.providers or FAMILIES

    # -- helpers over the block's group ---------------------------------------------------------

    def say(self, *a) -> None:
        if self.rank == 0:
            C.log(*a)

    def agree(self, ok: bool, group=None) -> bool:
        """True only if ``ok`` on every rank of the group (so all ranks skip together)."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group or self.group)
        return bool(t.item())

    def reduce(self, value: float | None, op) -> float | None:
        t = torch.tensor(
            [float("nan") if value is None else float(value)], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(t, op=op, group=self.group)
        x = t.item()
        return None if x != x else x

    def timed(self, fn) -> float:
        return C.time_fixed(fn, self.device, iters=self.iters, warmup=self.warmup, group=self.group)

    def go(self, what: str, expected_s: float | None = None) -> None:
        """Rank 0 decides whether ``what`` still fits the budget; every rank of the group follows."""
        expected = (
            self.durations.get(what, 3.0 if not self.cpu else 0.0) if expected_s is None else expected_s
        )
        if not self.agree(self.budget.allows(expected) if self.rank == 0 else True):
            raise Stop(what)

    def fits(self, what: str, need_bytes: int) -> bool:
        """Skip (on every rank) a provider that would not fit in free memory: an OOM on one rank in
        the middle of a collective would leave the others waiting until the group's timeout."""
        free = C.free_bytes(self.device)
        ok = self.agree(free is None or need_bytes * 1.15 + (1 << 30) <= free)
        if not ok:
            reason = f"would not fit: needs ~{need_bytes / 2**30:.1f} GiB per rank"
            self.skips.append((what, reason))
            self.say(f"  skip {what}: {reason}")
        return ok

    def record(
        self, op, provider, pass_, ms, floor_bytes, *, k=0, extra_mem=None, note="", status="ok", sizes=None
    ) -> C.Result:
        n, v, v_shard, tp = sizes if sizes is not None else (self.n, self.v, max(self.widths), self.tp)
        mem = None if extra_mem is None else int(extra_mem)
        r = C.Result(op, provider, C.dtype_name(self.dtype), n, v_shard, k, pass_, ms, floor_bytes,
                     self.copy_bw, extra_mem=mem, note=note, status=status, tp=tp, vocab=v)  # fmt: skip
        self.results.append(r)
        if self.rank == 0:
            self.csv.write(r)
            if r.ok:
                frac = "" if r.frac is None else f"  {100 * r.frac:5.1f}% of copy"
                mem = "" if r.extra_mem is None else f"  extra mem {r.extra_mem / 2**20:.2f} MiB"
                val = f"{ms:9.3f} ms{frac}{mem}"
            else:
                val = status.upper()
            C.log(
                f"  {op:<13} {pass_:<7} TP={tp} V={v} k={k:<4} {provider:<14} {val}"
                f"{'  (' + note + ')' if note else ''}"
            )
        return r

    def keep(self, key: str, r: C.Result, value=None) -> None:
        """Remember a block's measurement for the bars and the scaling table."""
        d = self.got.setdefault((self.tp, self.v, self.n, C.dtype_name(self.dtype)), {})
        if r.ok:
            d[key] = r.ms if value is None else value
        else:
            d[f"status:{key}"] = r.status

    def check(self, what: str, fn) -> tuple[str, str]:
        """Run ``fn`` on every rank; ("ok", "") only if it passed everywhere."""
        status, reason = C.run_check(fn)
        if status != "ok":
            print(f"[rank {self.rank}] check {what}: {reason}"[:400], flush=True)
        if self.agree(status == "ok"):
            return "ok", ""
        # every rank learns the worst status (wrong > oom > error) from rank-wise codes
        code = {"ok": 0, "error": 1, "oom": 2, "wrong": 3}[status]
        worst = int(self.reduce(code, dist.ReduceOp.MAX))
        status = {1: "error", 2: "oom", 3: "wrong"}[worst]
        reason = reason or f"failed its check on another rank ({status})"
        self.skips.append((what, reason))
        self.say(f"  skip {what}: {reason}")
        return status, reason

    # -- one block: a TP size and a vocabulary size -------------------------------------------

    def setup(self, v: int) -> None:
        n, dtype, g = self.n, self.dtype, self.group
        self.v = v
        self.widths = split(v, self.tp)
        self.start = sum(self.widths[: self.rank])
        w = self.widths[self.rank]
        # The full logits, identical on every rank (made on rank 0, broadcast as raw bytes), for the
        # reference; each rank keeps only its slice.
        full = C.random_logits(n, v, dtype, self.device, seed=self.args.seed + v)
        target = C.random_targets(n, v, self.device, seed=self.args.seed + v)
        dist.broadcast(full.view(torch.uint8), src=0, group=g)  # raw bytes (gloo: no bf16)
        dist.broadcast(target, src=0, group=g)
        self.ref = C.build_reference(full, target, k_max=self.args.k)
        self.x_rows = full[self.ref.rows].contiguous()
        count = C.n_buffers(n * max(self.widths) * full.element_size() * 2)
        cols = slice(self.start, self.start + w)
        self.shards = [full[:, cols].contiguous()]
        del full
        C.empty_cache(self.device)
        for i in range(1, count):  # other sets: fresh values, same shape (timing only)
            self.shards.append(C.random_logits(n, w, dtype, self.device, seed=self.args.seed + v + 17 * i))
        self.target = target
        self.grad_ref = self.ref.grad_rows(n)[:, cols]
        self.rot = C.Rotation(count)

    def nxt(self):
        return self.shards[self.rot.next()]

    def run_block(self, v: int) -> None:
        g, n, k, es = self.group, self.n, self.args.k, self.dtype.itemsize
        self.setup(v)
        ref, rows, t = self.ref, self.ref.rows, self.target
        w = self.widths[self.rank]
        floor = n * max(self.widths) * es
        x0 = self.shards[0]
        tag = f"TP={self.tp} V={v}"
        fam = self.families

        def stats_check(kk, out, exact):
            lse = out.lse if exact else (out if kk == 0 else out[0])
            C.expect_close(f"{tag} lse", lse, ref.lse)
            if kk:
                if exact:
                    raw = (out.topk_logprobs + out.lse[:, None])[rows]
                    C.expect_topk(tag, out.topk_ids[rows], raw, self.x_rows, ref, exact_ids=True)
                else:
                    vals, ids = out[1]
                    C.expect_topk(tag, ids[rows], vals[rows], self.x_rows, ref, exact_ids=False)

        if "ours" in fam:
            for kk in (0, k):
                # (1) the kernel on this rank's shard alone: the one-GPU kernel time (no collective)
                self.go("local")
                local = lambda kk=kk: ss.softmax_stats(self.nxt(), k=kk)  # noqa: E731
                ms = self.reduce(C.bench(local, self.device, quick=True), dist.ReduceOp.MAX)
                note = "process_group=None on this rank's shard; max over ranks"
                self.keep(f"local{kk}", self.record("local_stats", OURS, "fwd", ms, floor, k=kk, note=note))
                self.host_ahead("local_stats", OURS, "fwd", local, floor, f"local{kk}_gpu", k=kk)
                # (2) one all-gather of what our collective sends: header + partials, per rank
                # (the top-k packed, one int32 per entry, where the call packs it)
                heads = [Header.make("stats", n, kk, self.dtype, False, width, None, None, -100, 1.0, None,
                                     0.0, 0.0) for width in self.widths]  # fmt: skip
                words = payload_words(torch.float32, n, kk, packs_topk(heads)) + 2 * HEADER_WORDS
                buf = torch.ones(words, dtype=torch.int32, device=self.device)
                out = torch.empty(self.tp * words, dtype=torch.int32, device=self.device)
                ag = lambda buf=buf, out=out: _all_gather_into(out, buf, group=g)  # noqa: E731
                ms = self.timed(ag)
                backend = dist.get_backend(g)
                r = self.record(
                    "allgather",
                    backend,
                    "fwd",
                    ms,
                    words * 4,
                    k=kk,
                    note=f"{words * 4} bytes per rank",
                )
                self.keep(f"allgather{kk}", r)
                self.host_ahead("allgather", backend, "fwd", ag, words * 4, f"allgather{kk}_gpu", k=kk)
                # (3) softmax_stats over the group: one shard pass, one all-gather, the merge
                self.go("stats")
                what = f"softmax_stats k={kk} {tag}"
                status, reason = self.check(
                    what, lambda kk=kk: stats_check(kk, ss.softmax_stats(x0, k=kk, process_group=g), True)
                )
                if status == "ok":
                    call = lambda kk=kk: ss.softmax_stats(self.nxt(), k=kk, process_group=g)  # noqa: E731
                    ms = self.timed(call)
                    self.keep(f"stats{kk}", self.record("softmax_stats", OURS, "fwd", ms, floor, k=kk))
                    self.host_ahead("softmax_stats", OURS, "fwd", call, floor, f"stats{kk}_gpu", k=kk)
                else:
                    r = self.record(
                        "softmax_stats", OURS, "fwd", None, floor, k=kk, status=status, note=reason
                    )
                    self.keep(f"stats{kk}", r)

        # (4) cross-entropy: ours, Megatron-style, Liger's vocab-parallel; fwd and fwd+bwd
        provs = []
        if "ours" in fam:
            provs.append((OURS, lambda x, tt: ss.cross_entropy(x, tt, process_group=g), n * w * es))
        if "megatron" in fam:
            provs.append(
                ("megatron", lambda x, tt: C.megatron_ce(x, tt, self.start, g), C.megatron_memory(n, w))
            )
        if "liger" in fam:
            if self.liger_mod is None:
                self.skips.append((f"liger {tag}", self.liger_reason))
                self.say(f"  skip liger {tag}: {self.liger_reason}")
            elif len(set(self.widths)) != 1:
                widths = sorted(set(self.widths))
                reason = f"Liger needs equal shards (its vocab_start = rank * V_local); widths {widths}"
                self.skips.append((f"liger {tag}", reason))
                self.say(f"  skip liger {tag}: {reason}")
            else:
                liger = self.liger_mod.LigerVocabParallelCrossEntropy()
                provs.append(
                    (
                        "liger",
                        lambda x, tt: liger(x.view(n, 1, w), tt.view(n, 1), tp_group=g).sum() / n,
                        n * w * (4 + es),
                    )
                )
        for name, loss_fn, need in provs:
            self.go(f"ce {name}")
            self.run_ce(name, loss_fn, need, tag, floor, t, x0, rows)
            C.empty_cache(self.device)

        # (5) gather all logits, then logsumexp (+ topk) on the full [N, V]
        if "gather" in fam:
            for kk in (0, k):
                self.go("gather")
                what = f"gather+torch k={kk} {tag}"
                if not self.fits(what, n * v * (2 * es + 4) + 2 * n * max(self.widths) * es * self.tp):
                    self.record(
                        "softmax_stats",
                        "gather+torch",
                        "fwd",
                        None,
                        floor,
                        k=kk,
                        status="skip",
                        note="would not fit in free memory",
                    )
                    continue
                status, reason = self.check(
                    what, lambda kk=kk: stats_check(kk, gather_stats(x0, self.widths, kk, g), False)
                )
                note = "all_gather of the shards, logsumexp(float)" + (" + topk" if kk else "")
                if status == "ok":
                    ms = self.timed(lambda kk=kk: gather_stats(self.nxt(), self.widths, kk, g))
                    self.keep(
                        f"gather{kk}",
                        self.record("softmax_stats", "gather+torch", "fwd", ms, floor, k=kk, note=note),
                    )
                else:
                    self.record(
                        "softmax_stats", "gather+torch", "fwd", None, floor, k=kk, status=status, note=reason
                    )

    def run_ce(self, name, loss_fn, need, tag, floor, t, x0, rows) -> None:
        what = f"cross_entropy {name} {tag}"
        if not self.fits(what, need + 2 * x0.numel() * x0.element_size()):
            for pass_ in ("fwd", "fwd+bwd"):
                r = self.record(
                    "cross_entropy",
                    name,
                    pass_,
                    None,
                    floor * (1 if pass_ == "fwd" else 3),
                    status="skip",
                    note="would not fit in free memory",
                )
                self.keep(f"ce_{'fwd' if pass_ == 'fwd' else 'fb'}:{name}", r)
            return

        def check_ce():
            x = x0.detach().clone().requires_grad_(True)
            loss = loss_fn(x, t)
            (gr,) = torch.autograd.grad(loss, x)
            C.expect_close(f"{tag} loss", loss.reshape(()), self.ref.loss_mean)
            C.expect_close(f"{tag} grad", gr[rows], self.grad_ref)

        status, reason = self.check(what, check_ce)
        if status != "ok":
            for pass_, key in (("fwd", "ce_fwd"), ("fwd+bwd", "ce_fb")):
                r = self.record("cross_entropy", name, pass_, None, floor, status=status, note=reason)
                self.keep(f"{key}:{name}", r)
            return
        leaves = [s.detach().requires_grad_(True) for s in self.shards]
        rot = C.Rotation(len(leaves))

        def fwd():
            return loss_fn(leaves[rot.next()], t)

        def fwd_bwd():
            x = leaves[rot.next()]
            return torch.autograd.grad(loss_fn(x, t), x)

        note = "gradient computed in the backward from its saved fp32 buffer" if name == "liger" else ""
        self.keep(
            f"ce_fwd:{name}", self.record("cross_entropy", name, "fwd", self.timed(fwd), floor, note=note)
        )
        ms_fb = self.timed(fwd_bwd)
        x_m = leaves[0]

        def once():
            loss = loss_fn(x_m, t)
            (gr,) = torch.autograd.grad(loss, x_m)
            return (loss, gr)

        mem = C.extra_peak_memory(once, self.device, inputs=[x_m, t])
        mem = self.reduce(mem, dist.ReduceOp.MAX)
        r = self.record(
            "cross_entropy",
            name,
            "fwd+bwd",
            ms_fb,
            3 * floor,
            extra_mem=mem,
            note="extra_mem: peak beyond inputs, loss and gradient; max over ranks",
        )
        self.keep(f"ce_fb:{name}", r)
        if mem is not None:
            self.keep(f"ce_mem:{name}", r, value=mem)
        # The same passes with the host ahead of the GPU (every provider alike): the GPU work per
        # call, which the ratio bars are judged on when both sides have it (see ``faster``).
        for pass_, key, fn, fl in (("fwd", "ce_fwd", fwd, floor), ("fwd+bwd", "ce_fb", fwd_bwd, 3 * floor)):
            self.host_ahead("cross_entropy", name, pass_, fn, fl, f"{key}_gpu:{name}")

    def host_ahead(self, op, provider, pass_, fn, floor, key, k=0) -> None:
        """``fn`` timed again with the host ahead of the GPU (``C.time_queued``), recorded as
        "<provider> host-ahead" and kept under ``key``; nothing where it cannot be measured."""
        gpu = C.time_queued(fn, self.device, group=self.group)
        if gpu is not None:
            r = self.record(op, f"{provider} host-ahead", pass_, gpu, floor, k=k, note=C.HOST_AHEAD_NOTE)
            self.keep(key, r)

    # -- whole run ------------------------------------------------------------------------------

    def run(self) -> int:
        args, wg = self.args, self.world_group
        self.dtype = C.DTYPES[args.dtype]
        tps, vs, n = preset_plan(args.preset, self.world)
        if args.tp:
            bad = [t for t in args.tp if not 1 <= t <= self.world]
            if bad:
                raise SystemExit(f"bench_dist: --tp {bad} outside 1..{self.world} (the world size)")
            tps = list(args.tp)
        self.vs = vs = args.v or vs
        self.n = n = args.n or n
        self.tps = tps
        meta = C.run_meta(self.device, bench="dist", world_size=self.world, preset=args.preset)
        if self.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            self.csv = C.CsvWriter(C.out_path(args.out, f"dist{self.world}", meta), meta)
        self.say(f"measuring copy bandwidth and matmul rate on every rank ({meta['gpu']}) ...")
        self.group = wg
        bw, _copy_ms, moved = C.copy_bandwidth(self.device, quick=True)
        self.copy_bw = self.reduce(bw, dist.ReduceOp.MIN)
        flops, _mm_ms, mm_n, mm_dt = C.matmul_rate(self.device, quick=True)
        flops = self.reduce(flops, dist.ReduceOp.MIN)
        mm_desc = f"{C.dtype_name(mm_dt)} {mm_n}^3"
        if self.rank == 0:
            title = f"bench_dist --preset {args.preset} ({self.world} ranks, {dist.get_backend(wg)})"
            C.print_header(title, meta, self.copy_bw, flops, mm_desc)
        self.record(
            "copy",
            "torch",
            "fwd",
            moved / self.copy_bw * 1e3,
            moved,
            note="min over ranks",
            sizes=(0, 0, 0, self.world),
        )
        if self.liger_mod is None:
            self.say(f"liger: skipped everywhere: {self.liger_reason}")
        self.say(
            f"plan: TP={tps} V={vs} N={n} k=0,{args.k} {args.dtype} providers={list(self.families)} "
            f"iters={self.iters} warmup={self.warmup} budget="
            f"{'none' if self.budget.max_seconds is None else f'{self.budget.max_seconds:g}s'}"
        )
        # Every rank creates every sub-group, in the same order (new_group is collective).
        groups = {
            tp: (wg if tp == self.world else dist.new_group(list(range(tp)))) for tp in sorted(set(tps))
        }
        stopped = []
        for tp in tps:
            for v in vs:
                key = f"block TP={tp} V={v}"
                expected = self.durations.get(f"block{tp}", 10.0 if not self.cpu else 0.0)
                if not self.agree(self.budget.allows(expected) if self.rank == 0 else True, group=wg):
                    stopped.append(key)
                    continue
                t0 = time.perf_counter()
                if self.rank < tp:
                    self.tp, self.group = tp, groups[tp]
                    self.say(f"-- {key}: split {split(v, tp)}  (t={self.budget.elapsed():.0f}s)")
                    try:
                        self.run_block(v)
                    except Stop as stop:
                        stopped.append(f"{key} from {stop}")
                        self.say(f"  budget: {key} stops before {stop}")
                    finally:
                        for attr in ("shards", "ref", "x_rows", "grad_ref", "target"):
                            self.__dict__.pop(attr, None)
                        C.empty_cache(self.device)
                dist.barrier(group=wg)
                self.durations[f"block{tp}"] = max(
                    self.durations.get(f"block{tp}", 0.0), time.perf_counter() - t0
                )
        self.group = wg
        if self.rank == 0:
            self.csv.close()
            self.finish(meta, flops, mm_desc, stopped)
        dist.barrier(group=wg)
        return 0

    def scaling_markdown(self) -> str:
        """Strong scaling (issue 6): per vocabulary size, one line per TP."""
        lines = []
        cols = [
            ("TP", None),
            ("V_shard", None),
            ("read floor ms", None),
            ("all-gather ms", "allgather0"),
            ("local k=0 ms", "local0"),
            ("stats k=0 ms", "stats0"),
            ("stats k=0 GPU ms (host ahead)", "stats0_gpu"),
            (f"stats k={self.args.k} ms", f"stats{self.args.k}"),
            (f"stats k={self.args.k} GPU ms (host ahead)", f"stats{self.args.k}_gpu"),
            ("CE fwd ms", "ce_fwd:shardsoftmax"),
            ("CE fwd+bwd ms", "ce_fb:shardsoftmax"),
            ("fwd+bwd floor ms", None),
            ("Megatron fwd", "ce_fwd:megatron"),
            ("Megatron fwd+bwd", "ce_fb:megatron"),
            ("Liger fwd", "ce_fwd:liger"),
            ("Liger fwd+bwd", "ce_fb:liger"),
            ("gather k=0", "gather0"),
        ]
        es = self.dtype.itemsize
        for v in self.vs:
            tps = sorted(tp for (tp, vv, _, _) in self.got if vv == v)
            if not tps:
                continue
            lines += [
                f"V = {v}, N = {self.n}, {self.args.dtype}:",
                "",
                "| " + " | ".join(c for c, _ in cols) + " |",
                "|" + "---|" * len(cols),
            ]
            for tp in tps:
                d = self.got[(tp, v, self.n, C.dtype_name(self.dtype))]
                wmax = max(split(v, tp))
                floor = self.n * wmax * es / self.copy_bw * 1e3
                cells = []
                for name, key in cols:
                    if name == "TP":
                        cells.append(str(tp))
                    elif name == "V_shard":
                        cells.append(str(wmax))
                    elif name == "read floor ms":
                        cells.append(f"{floor:.3f}")
                    elif name == "fwd+bwd floor ms":
                        cells.append(f"{3 * floor:.3f}")
                    elif key in d:
                        cells.append(f"{d[key]:.3f}")
                    else:
                        cells.append(d.get(f"status:{key}", "-"))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def finish(self, meta, flops, mm_desc, stopped) -> None:
        cond = C.conditions_line(
            meta, self.copy_bw, f", {self.world} ranks ({dist.get_backend(self.world_group)})"
        )
        lines = [
            "",
            f"== results: N={self.n}, {self.args.dtype}; {cond}",
            f"ms: median over {self.iters} calls per rank (CUDA events, after a barrier), max over ranks; "
            "local_stats: do_bench per rank, max; host-ahead rows: GPU time per call with the host ahead; "
            "GB/s and %copy count the floor bytes of the widest shard; "
            "ours_x = that row's ms / shardsoftmax's ms",
        ]
        if self.args.dry_run:
            lines.append(
                "DRY RUN on the CPU: the numbers mean nothing; the bars below only exercise the code"
            )
        for v in self.vs:
            lines.append(f"V={v}: shard widths " + ", ".join(f"TP={tp}: {split(v, tp)}" for tp in self.tps))
        lines.append(C.format_table([r for r in self.results if r.op != "copy"]))
        if self.skips:
            lines.append(C.skip_summary(self.skips))
        if stopped:
            lines.append(f"not run (budget of {self.budget.max_seconds:g}s): {'; '.join(stopped)}")
        bars = dist_bars(self.got, any_size=self.args.dry_run, k=self.args.k)
        lines += ["", "== bars (issues 3 and 5, distributed)", *C.bar_lines(bars)]
        scaling = self.scaling_markdown()
        speed = C.speedup_markdown(
            self.results, f"bench_dist --preset {self.args.preset}, N={self.n}: {cond}"
        )
        md = "## Strong scaling\n\n" + scaling + "\n## Speed-up over each peer\n\n" + speed
        lines += [
            "",
            "== strong scaling (markdown; also in the .md file)",
            scaling,
            "== speed-up over each peer (markdown)",
            speed,
            "",
        ]
        lines.append(
            f"copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (min over ranks), matmul {mm_desc} "
            f"{flops / 1e12:.1f} TFLOP/s; csv: {self.csv.path}; took {self.budget.elapsed():.0f}s"
        )
        C.write_report(lines, self.csv.path, markdown=md)


def main(argv: list[str], process_group=None) -> int:
    """Entry point for ``shardsoftmax.launch.torchrun bench`` (group already initialized)."""
    args = parse_args(argv)
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if args.device is not None and torch.device(args.device).type != device.type:
        raise SystemExit(
            f"bench_dist: --device {args.device} does not match the {dist.get_backend(group)} group"
        )
    if args.dry_run and device.type != "cpu":
        raise SystemExit(
            "bench_dist: --dry-run runs on the CPU (gloo): start it without CUDA or with --device cpu"
        )
    torch.manual_seed(args.seed)
    with ss.use_backend(args.backend):
        return DistBench(args, group, device).run()


def _init_from_torchrun(argv: list[str]):
    """``torchrun benchmarks/bench_dist.py``: join the group torchrun describes (NCCL on
    cuda:LOCAL_RANK, or gloo with --device cpu / --dry-run or without CUDA)."""
    import datetime

    cpu = "--dry-run" in argv or any(
        a in ("--device=cpu",) or (a == "--device" and i + 1 < len(argv) and argv[i + 1] == "cpu")
        for i, a in enumerate(argv)
    )
    timeout = datetime.timedelta(seconds=600)
    if cpu or not torch.cuda.is_available():
        dist.init_process_group("gloo", timeout=timeout)
    else:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    return dist.group.WORLD


def _cli() -> int:
    # Inside a function, so that no module global keeps the process group alive until interpreter
    # shutdown (gloo then sometimes aborts with "terminate called without an active exception").
    argv = sys.argv[1:]
    group = _init_from_torchrun(argv)
    try:
        return main(argv, group)
    finally:
        del group
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_cli())

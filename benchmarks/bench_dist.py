"""Multi-GPU benchmark: shardsoftmax over a vocabulary split across the ranks, against a
Megatron-style vocab-parallel cross-entropy, gathering all logits, and Liger-Kernel's
vocab-parallel cross-entropy (when installed).

    torchrun --standalone --nproc-per-node G -m shardsoftmax.launch.torchrun bench [--quick] [--out DIR]
    torchrun --standalone --nproc-per-node G benchmarks/bench_dist.py [--quick] [--out DIR]
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_dist.py --device cpu --quick   # gloo smoke

Every provider is checked on every rank against a float64 reference of the full logits first;
a provider that fails on any rank is skipped on all of them. Timing: a FIXED number of calls,
each between CUDA events, after a barrier (do_bench would choose a different repeat count on
each rank and deadlock in the collectives); per-rank median, then the MAX over the ranks.
Rank 0 prints progress, a table and the acceptance bars at the end, and writes a CSV.
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
from shardsoftmax.collective import payload_words  # noqa: E402

OURS = C.OURS
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------------------
# Baselines written here
# ----------------------------------------------------------------------------------------------


class MegatronVocabParallelCE(torch.autograd.Function):
    """Megatron-LM's vocab-parallel cross-entropy (tensor_parallel/cross_entropy.py), as commonly
    used: on fp32 logits (the caller passes ``logits.float()``); all_reduce MAX of the row max,
    subtract, exp, all_reduce SUM of the sum of exps and of the masked target logit; saves the fp32
    softmax for a backward that works in place on it (no collective)."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        n_rows, width = logits.shape
        logits_max = logits.max(dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)
        target_mask = (target < vocab_start) | (target >= vocab_start + width)
        masked_target = target - vocab_start
        masked_target[target_mask] = 0
        rows = torch.arange(n_rows, device=logits.device)
        predicted = logits[rows, masked_target]
        predicted[target_mask] = 0.0
        dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        exp_logits = torch.exp(logits, out=logits)
        sum_exp = exp_logits.sum(dim=-1)
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


def megatron_ce(shard, target, vocab_start, group):
    return MegatronVocabParallelCE.apply(shard.float(), target, vocab_start, group).mean()


def gather_full(shard: torch.Tensor, widths: list[int], group) -> torch.Tensor:
    """all_gather the shards into the full [N, V] logits (shards padded to the widest one)."""
    n, w = shard.shape
    wmax = max(widths)
    buf = shard if w == wmax else torch.nn.functional.pad(shard, (0, wmax - w))
    out = torch.empty(len(widths) * n * wmax * shard.element_size(), dtype=torch.uint8, device=shard.device)
    _all_gather_into(
        out, buf.contiguous().view(torch.uint8).reshape(-1), group=group
    )  # raw bytes (gloo: no bf16)
    out = out.view(shard.dtype).view(len(widths), n, wmax)
    return torch.cat([out[r, :, : widths[r]] for r in range(len(widths))], dim=1)


def gather_stats(shard, widths, k, group):
    full = gather_full(shard, widths, group)
    return torch.logsumexp(full.float(), dim=-1), torch.topk(full, k, dim=-1)


def find_liger_vocab_parallel(device):
    if not C.is_cuda(device):
        return None, "Liger-Kernel's Triton kernels need CUDA"
    try:
        from liger_kernel.transformers import LigerVocabParallelCrossEntropy
    except Exception as err:
        return (
            None,
            f"liger_kernel.transformers.LigerVocabParallelCrossEntropy not importable ({type(err).__name__})",
        )
    return LigerVocabParallelCrossEntropy(), ""


def split(v: int, world: int) -> list[int]:
    base, extra = divmod(v, world)
    return [base + (r < extra) for r in range(world)]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench_dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations (CPU: tiny sizes)")
    p.add_argument("--out", default="bench_out", help="folder for the CSV and the table (rank 0)")
    p.add_argument("--device", default=None, help="cuda or cpu; must match the group (NCCL: cuda, gloo: cpu)")
    p.add_argument("--n", type=int, default=None, help="tokens (default 8192; CPU smoke 37)")
    p.add_argument(
        "--v", type=int, nargs="+", default=None, help="global vocab sizes (default 128256 256000)"
    )
    p.add_argument("--k", type=int, default=50, help="top-k of the k>0 case (default 50)")
    p.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
    p.add_argument("--iters", type=int, default=None, help="timed calls per provider (default 20; quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; quick 3)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


class DistBench:
    def __init__(self, args, group, device):
        self.args, self.group, self.device = args, group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.cpu = not C.is_cuda(device)
        self.results: list[C.Result] = []
        self.skips: list[tuple[str, str]] = []
        self.bars: list[str] = []
        self.liger, self.liger_reason = find_liger_vocab_parallel(device)
        quick = args.quick or self.cpu
        self.iters = args.iters or (3 if self.cpu else 10 if quick else 20)
        self.warmup = args.warmup or (1 if self.cpu else 3 if quick else 5)

    def say(self, *a) -> None:
        if self.rank == 0:
            C.log(*a)

    def agree(self, ok: bool) -> bool:
        """True only if ``ok`` on every rank (so all ranks skip a provider together)."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def reduce_max(self, value: float | int | None):
        if value is None:
            return None
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.item()

    def reduce_min(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t.item()

    def timed(self, fn) -> float:
        return C.time_fixed(fn, self.device, iters=self.iters, warmup=self.warmup, group=self.group)

    def record(
        self, op, provider, pass_, ms, floor_bytes, *, k=0, extra_mem=None, note="", sizes=None
    ) -> C.Result:
        n, v_shard = sizes if sizes is not None else (self.n, max(self.widths))
        r = C.Result(op, provider, C.dtype_name(self.dtype), n, v_shard, k, pass_, ms, floor_bytes,
                     self.copy_bw, None if extra_mem is None else int(extra_mem), note)  # fmt: skip
        self.results.append(r)
        if self.rank == 0:
            self.csv.write(r)
            frac = "" if r.frac is None else f"  {100 * r.frac:5.1f}% of copy"
            mem = "" if r.extra_mem is None else f"  extra mem {r.extra_mem / 2**20:.2f} MiB"
            C.log(f"  {op:<13} {pass_:<7} V={self.v} k={k:<3} {provider:<20} {ms:9.3f} ms{frac}{mem}"
                  f"{'  (' + note + ')' if note else ''}")  # fmt: skip
        return r

    def check(self, what: str, fn) -> bool:
        ok = C.checked(what, fn) if self.rank == 0 else self._quiet_check(what, fn)
        ok = self.agree(ok)
        if not ok:
            self.skips.append((what, "failed its check"))
            self.say(f"  skip {what}: failed its check on at least one rank")
        return ok

    def _quiet_check(self, what, fn) -> bool:
        try:
            fn()
            return True
        except Exception as err:
            print(f"[rank {self.rank}] check {what} failed: {type(err).__name__}: {err}"[:400], flush=True)
            return False

    # -- one vocabulary size --------------------------------------------------------------------

    def setup(self, v: int) -> None:
        n, dtype = self.n, self.dtype
        self.v = v
        self.widths = split(v, self.world)
        self.start = sum(self.widths[: self.rank])
        w = self.widths[self.rank]
        # The full logits, identical on every rank (made on rank 0, broadcast as raw bytes), for the
        # reference; each rank keeps only its slice.
        full = C.random_logits(n, v, dtype, self.device, seed=self.args.seed + v)
        target = C.random_targets(n, v, self.device, seed=self.args.seed + v)
        dist.broadcast(full.view(torch.uint8), src=0, group=self.group)  # raw bytes (gloo: no bf16)
        dist.broadcast(target, src=0, group=self.group)
        self.ref = C.build_reference(full, target, k_max=self.args.k)
        self.x_rows = full[self.ref.rows].contiguous()
        count = C.n_buffers(n * max(self.widths) * full.element_size() * 2)
        cols = slice(self.start, self.start + w)
        self.shards = [full[:, cols].contiguous()]
        for i in range(1, count):  # other sets: fresh values, same shape (timing only)
            self.shards.append(C.random_logits(n, w, dtype, self.device, seed=self.args.seed + v + 17 * i))
        self.target = target
        self.grad_ref = self.ref.grad_rows(n)[:, cols]
        self.rot = C.Rotation(count)
        del full
        C.empty_cache(self.device)

    def nxt(self):
        return self.shards[self.rot.next()]

    def run_v(self, v: int) -> None:
        g, n, k, es = self.group, self.n, self.args.k, self.dtype.itemsize
        ref, rows, t = self.ref, self.ref.rows, self.target
        w = self.widths[self.rank]
        floor = n * max(self.widths) * es
        x0 = self.shards[0]
        tag = f"V={v}"
        got: dict[str, float] = {}

        # (1) softmax_stats k=0 and k=K, one collective each
        def check_stats(kk):
            def run():
                s = ss.softmax_stats(x0, k=kk, process_group=g)
                C.expect_close(f"{tag} lse", s.lse, ref.lse)
                if kk:
                    raw = (s.topk_logprobs + s.lse[:, None])[rows]
                    C.expect_topk(tag, s.topk_ids[rows], raw, self.x_rows, ref, exact_ids=True)

            return run

        for kk in (0, k):
            if self.check(f"softmax_stats k={kk} {tag}", check_stats(kk)):
                ms = self.timed(lambda kk=kk: ss.softmax_stats(self.nxt(), k=kk, process_group=g))
                got[f"stats{kk}"] = self.record("softmax_stats", OURS, "fwd", ms, floor, k=kk).ms

        # (2) the same kernel on this rank's shard alone (no collective), and one all-gather of the
        # bytes our collective sends: N * (7 + 3k) words of partials + the header, per rank.
        for kk in (0, k):
            ms_local = C.bench(lambda kk=kk: ss.softmax_stats(self.nxt(), k=kk), self.device, quick=True)
            ms_local = self.reduce_max(ms_local)
            note = "process_group=None on this rank's shard; max over ranks"
            got[f"local{kk}"] = self.record("local_stats", OURS, "fwd", ms_local, floor, k=kk, note=note).ms
            words = payload_words(torch.float32, n, kk) + 2 * HEADER_WORDS
            buf = torch.ones(words, dtype=torch.int32, device=self.device)
            out = torch.empty(self.world * words, dtype=torch.int32, device=self.device)
            ms_ag = self.timed(lambda buf=buf, out=out: _all_gather_into(out, buf, group=g))
            note = f"{words * 4} bytes per rank"
            backend = dist.get_backend(g)
            got[f"allgather{kk}"] = self.record(
                "allgather", backend, "fwd", ms_ag, words * 4, k=kk, note=note
            ).ms

        # (3) gather all logits, then logsumexp + topk on the full [N, V]
        def check_gather():
            lse, (vals, ids) = gather_stats(x0, self.widths, k, g)
            C.expect_close(f"{tag} gather lse", lse, ref.lse)
            C.expect_topk(f"{tag} gather", ids[rows], vals[rows], self.x_rows, ref, exact_ids=False)

        if self.check(f"gather+torch {tag}", check_gather):
            ms = self.timed(lambda: gather_stats(self.nxt(), self.widths, k, g))
            self.record("softmax_stats", "gather+torch", "fwd", ms, floor, k=k,
                        note="all_gather bf16 shards, logsumexp(float) + topk")  # fmt: skip

        # (4) cross-entropy: ours, Megatron-style, Liger's vocab-parallel; forward and forward+backward
        provs = [
            (OURS, lambda x, tt: ss.cross_entropy(x, tt, process_group=g)),
            ("megatron", lambda x, tt: megatron_ce(x, tt, self.start, g)),
        ]
        if self.liger is None:
            self.skips.append((f"liger {tag}", self.liger_reason))
            self.say(f"  skip liger {tag}: {self.liger_reason}")
        elif len(set(self.widths)) != 1:
            reason = (
                f"needs equal shards (its vocab_start = rank * V_local); widths {sorted(set(self.widths))}"
            )
            self.skips.append((f"liger {tag}", reason))
            self.say(f"  skip liger {tag}: {reason}")
        else:
            liger = self.liger
            provs.append(("liger", lambda x, tt: liger(x.view(n, 1, w), tt.view(n, 1), tp_group=g).sum() / n))

        for name, loss_fn in provs:

            def check_ce(loss_fn=loss_fn):
                x = x0.detach().clone().requires_grad_(True)
                loss = loss_fn(x, t)
                (gr,) = torch.autograd.grad(loss, x)
                C.expect_close(f"{tag} loss", loss.reshape(()), ref.loss_mean)
                C.expect_close(f"{tag} grad", gr[rows], self.grad_ref)

            if not self.check(f"cross_entropy {name} {tag}", check_ce):
                continue
            leaves = [s.detach().requires_grad_(True) for s in self.shards]
            rot = C.Rotation(len(leaves))

            def fwd(loss_fn=loss_fn, leaves=leaves, rot=rot):
                return loss_fn(leaves[rot.next()], t)

            def fwd_bwd(loss_fn=loss_fn, leaves=leaves, rot=rot):
                x = leaves[rot.next()]
                return torch.autograd.grad(loss_fn(x, t), x)

            got[f"ce_fwd_{name}"] = self.record("cross_entropy", name, "fwd", self.timed(fwd), floor).ms
            ms_fb = self.timed(fwd_bwd)
            x_m = leaves[0]

            def once(loss_fn=loss_fn, x_m=x_m):
                loss = loss_fn(x_m, t)
                (gr,) = torch.autograd.grad(loss, x_m)
                return (loss, gr)

            mem = (
                self.reduce_max(C.extra_peak_memory(once, self.device, inputs=[x_m, t]))
                if not self.cpu
                else None
            )
            if self.cpu:
                once()  # keep the ranks in step with the CUDA path (and exercise it)
            r = self.record("cross_entropy", name, "fwd+bwd", ms_fb, 3 * floor, extra_mem=mem)
            got[f"ce_fb_{name}"] = r.ms
            got[f"ce_mem_{name}"] = r.extra_mem
            del leaves
            C.empty_cache(self.device)

        self.add_bars(v, got)

    def add_bars(self, v, got) -> None:
        k, n = self.args.k, self.n
        cfg = f"[V={v}, {self.world} ranks]"

        def bar(text, ok, value):
            self.bars.append(f"{'PASS' if ok else 'FAIL'}  {text:<64} {value}")

        def na(text, why):
            self.bars.append(f"N/A   {text:<64} {why}")

        s0, sk = got.get("stats0"), got.get(f"stats{k}")
        if s0 is not None and "local0" in got and "allgather0" in got:
            budget = got["local0"] + got["allgather0"] + 0.060
            parts = f"{got['local0']:.3f} + {got['allgather0']:.3f} + 0.060"
            bar(f"fwd(k=0) <= local kernel + one all-gather + 60us {cfg}", s0 <= budget,
                f"{s0:.3f} ms vs {budget:.3f} ms ({parts})")  # fmt: skip
        fb, fb_l = got.get(f"ce_fb_{OURS}"), got.get("ce_fb_liger")
        if fb is not None and fb_l is not None:
            bar(
                f"ce fwd+bwd >= 2x faster than Liger vocab-parallel {cfg}",
                fb_l >= 2 * fb,
                f"{fb_l / fb:.2f}x",
            )
        else:
            na(f"ce fwd+bwd >= 2x faster than Liger vocab-parallel {cfg}", "no Liger measurement")
        if s0 is not None and sk is not None:
            bar(f"fwd(k={k}) <= 1.5x fwd(k=0) {cfg}", sk <= 1.5 * s0, f"{sk / s0:.2f}x")
        meg = got.get("ce_fwd_megatron")
        if sk is not None and meg is not None:
            bar(f"fwd(k={k}) >= 8x faster than Megatron-style fwd {cfg}", meg >= 8 * sk, f"{meg / sk:.2f}x")
        ce_f = got.get(f"ce_fwd_{OURS}")
        if ce_f is not None and meg is not None:
            self.bars.append(f"info  {'ce fwd vs Megatron-style fwd ' + cfg:<64} {meg / ce_f:.2f}x faster")
        mem = got.get(f"ce_mem_{OURS}")
        limit = n * 64
        if mem is not None:
            bar(f"ce fwd+bwd extra memory <= N*64 B per rank {cfg}", mem <= limit,
                f"{mem / 1024:.0f} KiB vs {limit / 1024:.0f} KiB")  # fmt: skip
        else:
            na(f"ce fwd+bwd extra memory <= N*64 B per rank {cfg}", "no CUDA memory statistics")

    # -- whole run ------------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        t0 = time.perf_counter()
        self.dtype = C.DTYPES[args.dtype]
        self.n = args.n or (37 if self.cpu else 8192)
        vs = self.vs = args.v or ([301, 1031] if self.cpu else [128256, 256000])
        meta = C.run_meta(self.device, self.world)
        if self.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            self.csv = C.CsvWriter(C.out_path(args.out, f"dist{self.world}", meta), meta)
        self.say(f"measuring copy bandwidth and matmul rate on every rank ({meta['gpu']}) ...")
        bw, copy_ms, moved = C.copy_bandwidth(self.device, quick=True)
        self.copy_bw = self.reduce_min(bw)
        flops, mm_ms, mm_n, mm_dt = C.matmul_rate(self.device, quick=True)
        flops = self.reduce_min(flops)
        mm_desc = f"{C.dtype_name(mm_dt)} {mm_n}^3"
        if self.rank == 0:
            title = f"bench_dist ({self.world} ranks, {dist.get_backend(self.group)})"
            C.print_header(title, meta, self.copy_bw, flops, mm_desc)
        self.v = 0
        self.record(
            "copy", "torch", "fwd", moved / self.copy_bw * 1e3, moved, note="min over ranks", sizes=(0, 0)
        )
        self.say(
            f"plan: N={self.n} V={vs} k=0,{args.k} dtype={args.dtype} iters={self.iters} warmup={self.warmup}"
        )
        for v in vs:
            self.say(f"-- V={v} split {split(v, self.world)}  (t={time.perf_counter() - t0:.0f}s)")
            self.setup(v)
            self.run_v(v)
            del self.shards, self.ref, self.x_rows, self.grad_ref
            C.empty_cache(self.device)
        if self.rank == 0:
            self.csv.close()
            self.finish(meta, flops, mm_desc, t0)
        dist.barrier(group=self.group)
        return 0

    def finish(self, meta, flops, mm_desc, t0) -> None:
        lines = [
            "",
            f"== results: {self.world} ranks, {meta['gpu']}, N={self.n}, {self.args.dtype}, "
            f"torch {meta['torch']}, "
            f"triton {meta['triton']}, commit {meta['commit']}, {meta['date']}",
            f"ms: median over {self.iters} calls per rank (CUDA events, after a barrier), max over ranks; "
            "GB/s and "
            "%copy count the floor bytes of the widest shard; ours_x = that row's ms / shardsoftmax's ms",
        ]
        for v in self.vs:
            lines.append(f"V={v}: shard widths {split(v, self.world)}; V_shard below is the widest")
        table = C.format_table([r for r in self.results if r.op != "copy"])
        lines.append(table)
        if self.skips:
            lines.append(C.skip_summary(self.skips))
        lines += ["", "== bars (issue acceptance)", *self.bars, ""]
        lines.append(
            f"copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (min over ranks), "
            f"matmul {mm_desc} {flops / 1e12:.1f} "
            f"TFLOP/s; csv: {self.csv.path}; took {time.perf_counter() - t0:.0f}s"
        )
        C.write_report(lines, self.csv.path)


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
    torch.manual_seed(args.seed)
    return DistBench(args, group, device).run()


def _init_from_torchrun(argv: list[str]):
    """``torchrun benchmarks/bench_dist.py``: join the group torchrun describes (NCCL on
    cuda:LOCAL_RANK, or gloo with --device cpu or without CUDA)."""
    import datetime

    cpu = "cpu" in [a.split("=", 1)[-1] for a in argv if a.startswith("--device")] or (
        "--device" in argv
        and argv.index("--device") + 1 < len(argv)
        and argv[argv.index("--device") + 1] == "cpu"
    )
    timeout = datetime.timedelta(seconds=300)
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

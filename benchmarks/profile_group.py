"""Where the time of a call over a process group goes, per rank: host time, wall time, syncs.

    torchrun --standalone --nproc-per-node 2 benchmarks/profile_group.py [--v 128256] [--n 8192]
    torchrun --standalone --nproc-per-node 2 benchmarks/profile_group.py --dry-run   # CPU, gloo

For ``softmax_stats`` (k=0 and k=50) and ``cross_entropy`` forward, on this rank's shard alone
(``process_group=None``) and over the group, rank 0 prints:

* host µs: the CPU clock around 50 back-to-back calls without a sync, per call (what one call
  costs the Python thread);
* wall µs: the same 50 calls followed by one sync, per call (max of host and GPU time);
* syncs: how many host-device synchronizations ``torch.cuda.set_sync_debug_mode("warn")`` reports
  in 5 steady-state calls (0 expected);
* the same host / wall µs for the parts of a group call alone: the bare all-gather of a buffer of
  the call's size (ProcessGroup ``_allgather_base`` into a kept output, into a fresh output each
  call, and ``dist.all_gather_into_tensor``), and ``collective.exchange`` with precomputed partials
  (no shard kernel);
* then a cProfile of 50 group calls of ``softmax_stats`` k=0 (top functions by own time), and a
  ``torch.profiler`` table of 20 such calls (CPU time of each op and CUDA runtime call, GPU time
  of each kernel: a blocking runtime call or an idle GPU shows there).
A tool for finding host overhead; the benchmark with the bars is bench_dist.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings

import torch
import torch.distributed as dist

import shardsoftmax as ss

CALLS = 50


def per_call_us(fn, device, *, sync_at_end: bool) -> float:
    for _ in range(min(10, CALLS)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        if sync_at_end and device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / CALLS * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
    return best


def count_syncs(fn, device) -> int:
    if device.type != "cuda":
        return 0
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ss.synchronize(dist.group.WORLD)
    return sum("synchroniz" in str(w.message) for w in caught)


def components(x, t, group, device) -> dict:
    """The parts of a group ``softmax_stats`` k=0 call, each callable alone (see the docstring)."""
    from shardsoftmax import collective
    from shardsoftmax.ops import ShardCall, global_pieces

    call = ShardCall("stats")
    global_pieces(x, t, call, group)  # agree on the layout (and its send buffer)
    agreed = collective._agreed[id(group)]
    buf = agreed.send
    kept = torch.empty((group.size(), buf.numel()), dtype=buf.dtype, device=device)
    header = call.header(x, True)

    def ag_kept():
        group._allgather_base(kept.view(-1), buf).wait()

    def ag_fresh():
        out = torch.empty((group.size(), buf.numel()), dtype=buf.dtype, device=device)
        group._allgather_base(out.view(-1), buf).wait()

    def ag_dist():
        dist.all_gather_into_tensor(kept.view(-1), buf, group=group)

    def exchange_only():
        collective.exchange(header, lambda layout, out: out, group, device=device)

    return {
        "allgather kept out": ag_kept,
        "allgather fresh out": ag_fresh,
        "all_gather_into_tensor": ag_dist,
        "exchange, no kernel": exchange_only,
    }


def torch_profile(fn, cuda: bool, rank: int, name: str, trace_dir: str | None = None) -> str:
    """A torch.profiler table of 20 calls of ``fn``, the group call ``name`` (every rank records;
    rank 0's table is returned). ``trace_dir``: each rank also writes its Chrome trace there
    (``<name>.rank<r>.json``)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(20):
            fn()
        if cuda:
            torch.cuda.synchronize()
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"{name.replace(' ', '_')}.rank{rank}.json"))
    if rank != 0:
        return ""
    avg = prof.key_averages()
    out = f"== torch.profiler, 20 group calls of {name} (rank 0), by self CPU time\n"
    out += avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    if cuda:
        out += "\n== by self CUDA time\n"
        out += avg.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v", type=int, default=128256, help="global vocabulary")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--trace", default=None, help="folder for each rank's Chrome trace of the profiled calls")
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny sizes, torch backend")
    ap.add_argument(
        "--profile-k",
        type=int,
        nargs="+",
        default=[0],
        help="the torch.profiler tables: softmax_stats with each of these k (default 0)",
    )
    args = ap.parse_args()
    if args.dry_run:  # a check that the script runs: the torch backend, a few calls
        global CALLS
        CALLS = 2
        ss.set_backend("torch")
    cuda = torch.cuda.is_available() and not args.dry_run
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    n, v = (args.n, args.v) if cuda else (16, 256)
    width = v // world + (rank < v % world)
    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn(n, width, generator=g).to(device=device, dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    group = dist.group.WORLD
    ops = {
        "softmax_stats k=0": lambda pg: ss.softmax_stats(x, t, process_group=pg),
        "softmax_stats k=50": lambda pg: ss.softmax_stats(x, t, k=50, process_group=pg),
        "cross_entropy fwd": lambda pg: ss.cross_entropy(x, t, process_group=pg),
    }
    rows = []
    for name, fn in components(x, t, group, device).items():
        host = per_call_us(fn, device, sync_at_end=False)
        wall = per_call_us(fn, device, sync_at_end=True)
        rows.append((name, "part", host, wall, 0))
    for name, op in ops.items():
        for where, pg in (("alone", None), ("group", group)):
            fn = lambda op=op, pg=pg: op(pg)  # noqa: E731
            host = per_call_us(fn, device, sync_at_end=False)
            wall = per_call_us(fn, device, sync_at_end=True)
            syncs = count_syncs(fn, device)
            rows.append((name, where, host, wall, syncs))
    profile = ""
    if rank == 0:
        prof = cProfile.Profile()
        prof.enable()
    for _ in range(CALLS):
        ops["softmax_stats k=0"](group)
    if cuda:
        torch.cuda.synchronize()
    if rank == 0:
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        profile = buf.getvalue()
    table = ""
    for k in args.profile_k:
        name = f"softmax_stats k={k}"
        fn = lambda k=k: ss.softmax_stats(x, t, k=k, process_group=group)  # noqa: E731
        table += torch_profile(fn, cuda, rank, name, args.trace)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"== profile_group: {name}, {world} ranks, N={n}, V={v} (V_shard ~{v // world}), bf16")
        print(f"{'op':20s} {'where':6s} " + " ".join(f"host/wall/syncs r{r:<10d}" for r in range(world)))
        for i, (op_name, where, *_rest) in enumerate(rows):
            cells = " ".join(f"{g[i][2]:7.0f} {g[i][3]:7.0f} {g[i][4]:3d}   " for g in gathered)
            print(f"{op_name:20s} {where:6s} {cells}")
        print(f"(µs per call; {CALLS} calls back to back; best of 3)")
        print(profile)
        print(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch.profiler's (kineto's) background thread can abort the interpreter's exit with
    # "terminate called without an active exception" (~1 exit in 7 on CPU with torch 2.13; known
    # upstream, pytorch/kineto#1051): every result is printed and the group destroyed by now, so
    # leave without running the exit handlers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Ray scoring throughput against the same computation under torchrun, on one machine (issue 4).

The computation, per batch of T tokens: this rank's logits ``hidden @ W_shard.T`` (bf16, [T, V/G]),
``ss.softmax_stats(..., k)`` over the group (one all-gather), and rank 0 copies the per-token
results (lse, target log-prob, entropy, top-k ids and log-probs) to the host. Both launchers start
from hidden states in host memory, as a scoring job does.

    # the torchrun baseline (G processes), then the Ray scorer with tp=G, in one command:
    python benchmarks/bench_ray.py --tp 2 4 --v 128256 256000 [--h 4096] [--tokens 8192] [--out DIR]

With no GPU it runs tiny sizes on the CPU (gloo, a local Ray) so that the code is exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def make_shard(v: int, h: int, lo: int, hi: int, dtype) -> torch.Tensor:
    """Rows [lo, hi) of the head weight: row r is a pure function of (seed, r), so the torchrun
    ranks and the Ray driver build the same head without materializing it twice."""
    g = torch.Generator().manual_seed(1234 + lo)
    return (torch.randn(hi - lo, h, generator=g) * 0.02).to(dtype)


def make_batches(n: int, t: int, h: int, v: int):
    g = torch.Generator().manual_seed(7)
    hid = [torch.randn(t, h, generator=g).to(torch.bfloat16) for _ in range(min(n, 4))]
    tgt = torch.randint(0, v, (t,), generator=g)
    return [(hid[i % len(hid)], tgt) for i in range(n)]


def bounds(v: int, g: int) -> list[int]:
    base, extra = divmod(v, g)
    out = [0]
    for r in range(g):
        out.append(out[-1] + base + (1 if r < extra else 0))
    return out


# --------------------------------------------------------------------------- torchrun baseline


def torchrun_worker(args) -> None:
    import torch.distributed as dist

    import shardsoftmax as ss

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args.v = args.v[0]
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)  # init_process_group's device_id needs the index
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": dev} if cuda else {}))
    b = bounds(args.v, world)
    dtype = torch.bfloat16 if cuda else torch.float32
    w = make_shard(args.v, args.h, b[rank], b[rank + 1], dtype).to(dev)
    batches = make_batches(args.batches + args.warmup, args.tokens, args.h, args.v)
    if cuda:
        batches = [(x.pin_memory(), t.pin_memory()) for x, t in batches]

    def step(x, t):
        x = x.to(dev, dtype, non_blocking=True)
        t = t.to(dev, non_blocking=True)
        with torch.no_grad():
            group = None if world == 1 else dist.group.WORLD
            st = ss.softmax_stats(
                x @ w.T, t, k=args.k, vocab_size=args.v, vocab_start=b[rank], process_group=group
            )
        if rank == 0:  # the results to the host, as the scorer returns them
            for r in (st.lse, st.target_logprob, st.entropy, st.topk_ids, st.topk_logprobs):
                r.cpu()

    for x, t in batches[: args.warmup]:
        step(x, t)
    dist.barrier()
    t0 = time.perf_counter()
    for x, t in batches[args.warmup :]:
        step(x, t)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"seconds": dt, "tokens": args.batches * args.tokens}, f)
    dist.destroy_process_group()


def run_torchrun(args, g: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [
        sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={g}",
        os.path.abspath(__file__), "--worker",
    ]  # fmt: skip
    # The worker's settings travel in the environment (torchrun's parser would take --v etc.).
    cfg = dict(v=[args.v1], h=args.h, tokens=args.tokens, batches=args.batches, warmup=args.warmup, k=args.k)
    env = dict(os.environ, BENCH_RAY_WORKER=json.dumps(dict(cfg, result=result)))
    subprocess.run(cmd, check=True, timeout=args.timeout, env=env)
    with open(result) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------- Ray


def run_ray(args, g: int) -> dict:
    from shardsoftmax.launch.ray_scorer import ShardedScorer

    cuda = torch.cuda.is_available()
    b = bounds(args.v1, g)
    dtype = torch.bfloat16 if cuda else torch.float32
    weight = torch.cat([make_shard(args.v1, args.h, b[r], b[r + 1], dtype) for r in range(g)])
    batches = make_batches(args.batches + args.warmup, args.tokens, args.h, args.v1)
    with ShardedScorer(
        weight, tp=g, replicas=1, k=args.k, device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32", max_inflight=2,
    ) as scorer:  # fmt: skip
        for _ in scorer.score_iter(batches[: args.warmup]):
            pass
        t0 = time.perf_counter()
        n = sum(1 for _ in scorer.score_iter(batches[args.warmup :]))
        dt = time.perf_counter() - t0
    assert n == args.batches
    return {"seconds": dt, "tokens": args.batches * args.tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--v", type=int, nargs="+", default=[128256, 256000])
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per batch")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torchrun_worker(argparse.Namespace(**json.loads(os.environ["BENCH_RAY_WORKER"])))
        return
    cuda = torch.cuda.is_available()
    if not cuda:  # exercise the code on tiny sizes
        args.v, args.h, args.tokens, args.batches, args.warmup = [1000], 32, 64, 3, 1
    name = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    print(
        f"{name}: H={args.h}, {args.tokens} tokens per batch, {args.batches} batches, k={args.k}", flush=True
    )
    for g in args.tp:
        if cuda and torch.cuda.device_count() < g:
            print(f"tp={g}: skipped ({torch.cuda.device_count()} GPUs)", flush=True)
            continue
        for v in args.v:
            args.v1 = v
            base = run_torchrun(args, g)
            ray_r = run_ray(args, g)
            tr = base["tokens"] / base["seconds"]
            rr = ray_r["tokens"] / ray_r["seconds"]
            overhead = tr / rr - 1
            rows.append(
                dict(gpu=name, tp=g, v=v, h=args.h, tokens_per_batch=args.tokens, k=args.k, torchrun_tok_s=tr,
                     ray_tok_s=rr, ray_tok_s_per_gpu=rr / g, ray_overhead=overhead)
            )  # fmt: skip
            print(
                f"tp={g} V={v}: torchrun {tr:,.0f} tok/s, Ray {rr:,.0f} tok/s ({rr / g:,.0f} per GPU), "
                f"Ray overhead {overhead:+.1%} ({'PASS' if overhead < 0.10 else 'FAIL'} < 10%)",
                flush=True,
            )
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_ray.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()

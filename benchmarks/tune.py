"""Tile/warp sweep for the shard kernels on one GPU (a tuning aid, not the benchmark).

    python benchmarks/tune.py [--n 8192] [--v 32064,64128,128256]

Checks each variant against the PyTorch reference before timing it; prints ms, GB/s and the
fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

import shardsoftmax as ss
from shardsoftmax import kernels, reference


# (ROWS, CHUNK, BITONIC) candidates per k
VARIANTS = {
    0: [(16, 256, False), (32, 128, False), (64, 64, False)],
    50: [(64, 32, False), (128, 32, False), (64, 64, False), (128, 16, False)],
    1024: [(1024, 8, True), (1024, 4, True)],
}


def copy_bw() -> float:
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", default="32064,64128,128256")
    ap.add_argument("--ks", default="0,50,1024")
    ap.add_argument("--warps", default="4,8")
    args = ap.parse_args()
    bw = copy_bw()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for v in [int(s) for s in args.v.split(",")]:
        x = (torch.randn(args.n, v, device="cuda") * 3).to(torch.bfloat16)
        t = torch.randint(0, v, (args.n,), device="cuda")
        floor = x.numel() * 2 / bw * 1e3
        for k in [int(s) for s in args.ks.split(",")]:
            ref = reference.shard_partials(
                x[:64], t[:64], k=k, n_valid_cols=v, vocab_start=0, ignore_index=-100, softcap=None, temperature=1.0
            )
            best = None
            tiles = VARIANTS[min(k, 1024) if k in VARIANTS else 50]
            for tile, warps in itertools.product(tiles, [int(w) for w in args.warps.split(",")]):

                def fn(tile=tile, warps=warps, k=k):
                    return kernels.shard_partials(
                        x, t, k=k, n_valid_cols=v, vocab_start=0, ignore_index=-100, softcap=None,
                        temperature=1.0, tile=tile, num_warps=warps,
                    )  # fmt: skip

                try:
                    stats, vals, ids = fn()
                except Exception as e:  # noqa: BLE001 - report and continue the sweep
                    print(f"v={v} k={k} tile={tile} warps={warps}: failed {type(e).__name__}: {str(e)[:120]}")
                    continue
                lse = stats[0, 0, :64] + torch.log(stats[1, 0, :64])
                lse_ref = ref.max + torch.log(ref.sumexp)
                ok = torch.allclose(lse, lse_ref, atol=1e-4) and (k == 0 or torch.equal(ids[0, :64], ref.topk_ids))
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                frac = floor / ms
                print(f"v={v:6d} k={k:4d} tile={tile} warps={warps:2d} ok={ok} {ms:.3f} ms  {frac:.1%} of copy bw", flush=True)
                if ok and (best is None or ms < best[0]):
                    best = (round(ms, 4), tile, warps, round(frac, 3))
            rows.append((v, k, best))
        # cross-entropy forward + backward and softmax write, default launch parameters
        xg = x.clone().requires_grad_(True)

        def ce_fb():
            loss = ss.cross_entropy(xg, t)
            loss.backward()
            return loss

        ms_ce = do_bench(ce_fb, warmup=10, rep=100, grad_to_none=[xg], return_mode="median")
        ms_ce_f = do_bench(lambda: ss.cross_entropy(x, t), warmup=10, rep=100, return_mode="median")
        ms_sm = do_bench(lambda: ss.softmax(x), warmup=10, rep=100, return_mode="median")
        ms_torch_ce = do_bench(lambda: torch.nn.functional.cross_entropy(x, t), warmup=10, rep=100, return_mode="median")
        ms_lse = do_bench(lambda: torch.logsumexp(x.float(), -1), warmup=10, rep=100, return_mode="median")
        import time

        for name, fn in (("CE fwd", lambda: ss.cross_entropy(x, t)), ("stats k=0", lambda: ss.softmax_stats(x, k=0))):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            print(f"v={v}: {name} host time per call {(t1 - t0) / 20 * 1e6:.0f} us (before sync)", flush=True)
        print(
            f"v={v}: CE fwd {ms_ce_f:.3f} ms ({ms_ce_f / floor:.2f}x floor), fwd+bwd {ms_ce:.3f} ms "
            f"({ms_ce / (3 * floor):.2f}x floor), softmax {ms_sm:.3f} ms ({ms_sm / (3 * floor):.2f}x floor), "
            f"F.cross_entropy fwd {ms_torch_ce:.3f} ms, torch.logsumexp(fp32) {ms_lse:.3f} ms",
            flush=True,
        )
    print("\nbest per (v, k): ms, tile, warps, fraction of copy bandwidth")
    for v, k, best in rows:
        print(f"  v={v:6d} k={k:4d} -> {best}")


if __name__ == "__main__":
    main()

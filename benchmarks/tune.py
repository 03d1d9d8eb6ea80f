"""Tile/warp sweep for the partials kernel on one GPU (a tuning aid; the benchmark is bench_ops.py).

    python benchmarks/tune.py [--n 8192] [--v 32064,64128,128256] [--ks 0,50,1024] [--warps 4,8]
        [--tiles 128x32,64x32] [--max-registers 128,0]

``--max-registers`` sweeps the register cap of the top-k path (k > 0; 0: none).

Checks each variant against the PyTorch reference before timing it; prints ms, GB/s and the
fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from shardsoftmax import kernels, reference

# (ROWS, CHUNK) candidates per k
VARIANTS = {
    0: [(64, 64), (64, 32), (32, 128), (128, 32)],
    50: [(64, 32), (128, 32), (64, 64), (128, 16)],
    1024: [(256, 8), (128, 16), (512, 8)],
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
    ap.add_argument("--tiles", default="", help="ROWSxCHUNK,... instead of the per-k defaults")
    ap.add_argument("--max-registers", default="128")
    args = ap.parse_args()
    caps = [int(a) for a in args.max_registers.split(",")]
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
                x[:64],
                t[:64],
                k=k,
                n_valid_cols=v,
                vocab_start=0,
                ignore_index=-100,
                softcap=None,
                temperature=1.0,
            )
            best = None
            tiles = VARIANTS[min(k, 1024) if k in VARIANTS else 50]
            if args.tiles:
                tiles = [tuple(int(a) for a in t.split("x")) for t in args.tiles.split(",")]
            warps_list = [int(w) for w in args.warps.split(",")]
            for tile, warps, cap in itertools.product(tiles, warps_list, caps if k > 0 else [128]):
                extra = dict(max_registers=cap)

                def fn(tile=tile, warps=warps, k=k, x=x, t=t, v=v, extra=extra):
                    return kernels.shard_partials(
                        x, t, k=k, n_valid_cols=v, vocab_start=0, ignore_index=-100, softcap=None,
                        temperature=1.0, tile=tile, num_warps=warps, **extra,
                    )  # fmt: skip

                try:
                    stats, vals, ids = fn()
                except Exception as e:  # noqa: BLE001 - report and continue the sweep
                    what = f"v={v} k={k} tile={tile} warps={warps} {extra}"
                    print(f"{what}: failed {type(e).__name__}: {e!s:.120}")
                    continue
                lse = stats[0, 0, :64] + torch.log(stats[1, 0, :64])
                lse_ref = ref.max + torch.log(ref.sumexp)
                ok = torch.allclose(lse, lse_ref, atol=1e-4) and (
                    k == 0 or torch.equal(ids[0, :64], ref.topk_ids)
                )
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                frac = floor / ms
                print(
                    f"v={v:6d} k={k:4d} tile={tile} warps={warps:2d} {extra if k else ''} "
                    f"ok={ok} {ms:.3f} ms {frac:.1%}",
                    flush=True,
                )
                if ok and (best is None or ms < best[0]):
                    best = (round(ms, 4), tile, warps, extra if k else {}, round(frac, 3))
            rows.append((v, k, best))
    print("\nbest per (v, k): ms, tile, warps, fraction of copy bandwidth")
    for v, k, best in rows:
        print(f"  v={v:6d} k={k:4d} -> {best}")


if __name__ == "__main__":
    main()

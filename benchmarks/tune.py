"""Tile / warp sweep for the partials kernels on one GPU (a tuning aid; the benchmark is bench_ops.py).

    python benchmarks/tune.py [--n 8192] [--v 32064,128256] [--ks 0,50,1024] [--old PATH,...]
        [--defaults-only]

For each (V, k) it sweeps the streaming kernel's tile and warps with the selection's defaults,
then, for k > 0, the selection's warps and programs per SM with the best tile, then the column
splits for k = 0. Each variant is checked against the PyTorch reference (lse, and top-k ids
exactly) before it is timed; it prints ms and the fraction of the copy bandwidth measured in the
same run. ``--old PATH[,PATH]`` also times saved earlier ``kernels/partials.py`` files (their
``shard_partials`` with their defaults) for an A/B in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import triton
from triton.testing import do_bench

from shardsoftmax import kernels, reference

# (ROWS, CHUNK) candidates of the streaming kernel per k
TILES = {
    0: [(64, 64), (32, 64), (64, 32), (32, 128), (16, 128)],
    50: [(64, 32), (128, 32), (64, 64), (32, 64), (128, 16)],
    1024: [(256, 8), (128, 16), (64, 32)],
}
WARPS = (4, 8)
SELECT_WARPS = (1, 2, 4)
PROGRAMS_PER_SM = (8, 16, 32)


def copy_bw() -> float:
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("partials_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.shard_partials


class Case:
    def __init__(self, n: int, v: int, k: int, bw: float):
        self.v, self.k = v, k
        self.x = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
        self.t = torch.randint(0, v, (n,), device="cuda")
        self.floor = self.x.numel() * 2 / bw * 1e3
        self.ref = reference.shard_partials(
            self.x[:64], self.t[:64], k=k, n_valid_cols=v, vocab_start=0, ignore_index=-100,
            softcap=None, temperature=1.0,
        )  # fmt: skip
        self.best = None

    def run(self, label: str, fn=kernels.shard_partials, **kw):
        def call():
            return fn(
                self.x, self.t, k=self.k, n_valid_cols=self.v, vocab_start=0, ignore_index=-100,
                softcap=None, temperature=1.0, **kw,
            )  # fmt: skip

        try:
            stats, vals, ids = call()
        except Exception as e:  # noqa: BLE001 - report and continue the sweep
            print(f"v={self.v} k={self.k} {label}: failed {type(e).__name__}: {e!s:.160}", flush=True)
            return None
        m = stats[0, :, :64].amax(0)
        lse = m + torch.log((stats[1, :, :64] * torch.exp(stats[0, :, :64] - m)).sum(0))
        ok = torch.allclose(lse, self.ref.max + torch.log(self.ref.sumexp), atol=1e-4)
        if self.k:
            top = vals[:, :64].permute(1, 0, 2).reshape(64, -1)
            tid = ids[:, :64].permute(1, 0, 2).reshape(64, -1)
            order = torch.sort(tid, dim=1, stable=True).indices  # ties: lower id first
            top, tid = top.gather(1, order), tid.gather(1, order)
            tid = tid.gather(1, torch.sort(top, dim=1, descending=True, stable=True).indices)
            ok = ok and torch.equal(tid[:, : self.k], self.ref.topk_ids)
        ms = do_bench(call, warmup=25, rep=200, return_mode="median")
        frac = self.floor / ms
        print(f"v={self.v:6d} k={self.k:4d} {label:44s} ok={ok} {ms:.4f} ms {frac:.1%}", flush=True)
        if ok and (self.best is None or ms < self.best[0]):
            self.best = (ms, frac, label, kw)
        return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", default="32064,128256")
    ap.add_argument("--ks", default="0,50,1024")
    ap.add_argument("--old", default="", help="paths (comma-separated) of earlier kernels/partials.py to A/B")
    ap.add_argument("--defaults-only", action="store_true", help="time the defaults (and --old) only")
    args = ap.parse_args()
    olds = [(path, load_old(path)) for path in args.old.split(",") if path]
    bw = copy_bw()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    cases = []
    for v in [int(s) for s in args.v.split(",")]:
        for k in [int(s) for s in args.ks.split(",")]:
            c = Case(args.n, v, k, bw)
            cases.append(c)
            c.run("default")
            for path, old in olds:
                c.run(f"{path} (defaults)", fn=old)
            if args.defaults_only:
                continue
            for tile in TILES[min(TILES, key=lambda kk: abs(kk - k))]:
                for warps in WARPS:
                    c.run(f"tile={tile} warps={warps}", tile=tile, num_warps=warps)
            if c.best is None:
                continue
            base = dict(c.best[3])
            if k > 0:
                for sw in SELECT_WARPS:
                    for pps in PROGRAMS_PER_SM:
                        kw = dict(base, select_warps=sw, select_programs_per_sm=pps)
                        c.run(f"{base} select_warps={sw} pps={pps}", **kw)
                base = dict(c.best[3])
                kp = max(2, 1 << (k - 1).bit_length())
                for params in ({"ngp": 4 * kp}, {"ngp": 4 * kp, "capc": 4 * kp}, {"bc": 16}, {"cb": 256}):
                    c.run(f"{base} {params}", **dict(base, select_params=params))
            else:
                for splits in (2, 4):
                    c.run(f"{base} n_splits={splits}", **dict(base, n_splits=splits))
            del c.x
            torch.cuda.empty_cache()
    print("\nbest per (v, k): ms, fraction of copy bandwidth, variant")
    for c in cases:
        if c.best:
            print(f"  v={c.v:6d} k={c.k:4d} -> {c.best[0]:.4f} ms {c.best[1]:.1%} {c.best[2]}")


if __name__ == "__main__":
    main()

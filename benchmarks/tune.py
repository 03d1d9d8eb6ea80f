"""Tile / warp sweep for the partials kernels on one GPU (a tuning aid; the benchmark is bench_ops.py).

    python benchmarks/tune.py [--n 8192] [--v 32064,128256] [--ks 0,50,1024] [--old PATH,...]
        [--defaults-only] [--tiles] [--budget-s 270] [--finalize] [--host-ahead] [--variants JSON]

First, for every (V, k): the defaults, each ``--old`` file (saved earlier ``kernels/partials.py``
files, their ``shard_partials`` with their defaults: an A/B in the same run) and, for k > 0, the
streaming kernel alone (``select_launch=False``), so that "selection" = total - stream is
printed for each. Then the sweeps, while the time budget lasts: the streaming kernel's tile and
warps (k = 0, or every k with ``--tiles``), the column splits (k = 0) and the selection's knobs
(k > 0: warps, programs per SM, ``topk_params`` keywords). ``--finalize`` first times the
finalize kernel's merge of S top-k lists per row by warps per program (``FINALIZE_CASES``).
``--variants`` replaces the sweeps by a list of keyword sets (an A/B of chosen variants);
``--host-ahead`` also prints each variant's GPU time with the host ahead and the host's time per
call (a variant with more launches can be host-bound in do_bench's back-to-back timing).
Each variant is checked against the PyTorch reference (lse of 512 rows, their top-k ids
exactly; for k > 0 also rows with ties, NaN, -inf and padding columns) before it is timed; it
prints ms and the fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from shardsoftmax import kernels, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

# (ROWS, CHUNK) candidates of the streaming kernel per k
TILES = {
    0: [(64, 64), (32, 64), (64, 32), (32, 128), (16, 128)],
    50: [(64, 32), (128, 32), (64, 64), (32, 64), (128, 16)],
    1024: [(256, 8), (128, 16), (64, 32)],
}
WARPS = (4, 8)
CHECK_ROWS = 512


def keyword_sets(text: str) -> list[dict]:
    """``--variants``: a JSON list of objects (keyword sets of ``shard_partials``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError("a JSON list of objects, e.g. '[{\"select_programs_per_sm\": 64}]'")
    return value


def select_variants(k: int) -> list[dict]:
    """Keywords of shard_partials for the selection sweep (all but the programs per SM compile)."""
    kp = max(2, 1 << (k - 1).bit_length())
    if k > 128:
        # KP = 1024 (sm_90, Triton 3.6): the defaults, 8 warps capped at 128 registers (16 warps
        # per SM, ~112 bytes of stack); uncapped 255 registers (8 warps per SM)
        return [
            dict(select_programs_per_sm=4),
            dict(select_programs_per_sm=16),
            dict(select_params=dict(ug=k + k // 2)),
            dict(select_params=dict(ug=k)),
            dict(select_warps=4),
            dict(select_params=dict(maxnreg=0)),
        ]
    # k <= 128 selects inside the streaming kernel (fused): its warps and tile are the stream's;
    # select_warps and select_programs_per_sm apply to the two-launch path (fused=False, rows > 1)
    return [
        dict(select_params=dict(fused=False)),
        dict(num_warps=4, tile=(128, 32)),
        dict(num_warps=2, tile=(128, 32)),
        dict(num_warps=1, tile=(32, 32)),
        dict(select_params=dict(maxnreg=96)),
        dict(select_params=dict(cb=1024)),  # all chunk maxima of V = 32064 at once
        dict(select_params=dict(bc=16)),
        dict(select_params=dict(ug=k)),
        dict(select_params=dict(ug=kp)),
        dict(select_params=dict(ngp=8 * kp)),
        dict(select_params=dict(ngp=2 * kp)),
        dict(select_params=dict(rows=2)),  # two launches, two rows per selection program
    ]


def copy_bw() -> float:
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


def load_old(path: str):
    """``shard_partials`` of a saved ``kernels/partials.py`` (``git show REV:kernels/partials.py >
    FILE``), loaded as a module of ``shardsoftmax.kernels`` so that its relative imports
    (``from .common import ...``) resolve to the installed package's modules."""
    name = f"shardsoftmax.kernels._old_{len(sys.modules)}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "shardsoftmax.kernels"
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.shard_partials


class Case:
    def __init__(self, n: int, v: int, k: int, bw: float):
        self.v, self.k = v, k
        self.x = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
        self.t = torch.randint(0, v, (n,), device="cuda")
        self.floor = self.x.numel() * 2 / bw * 1e3
        self.ref = self.reference(self.x[:CHECK_ROWS], v)
        self.best = None
        self.host_ahead = False
        self.stream_ms = None
        self.edge = None
        if k:  # ties (a grid of 1/4), a NaN, +inf, all -inf, padding columns
            e = torch.round(torch.randn(8, v, device="cuda") * 12) / 4
            e[1, v // 3] = float("nan")
            e[2, 7] = float("inf")
            e[3] = float("-inf")
            e[4] = 0.0
            self.edge = (e.to(torch.bfloat16), v - 5)
            self.edge_ref = self.reference(self.edge[0], v - 5)

    def reference(self, x, n_valid):
        return reference.shard_partials(
            x, None, k=self.k, n_valid_cols=n_valid, vocab_start=0, ignore_index=-100,
            softcap=None, temperature=1.0,
        )  # fmt: skip

    def call(self, fn, x, n_valid, **kw):
        return fn(
            x, None, k=self.k, n_valid_cols=n_valid, vocab_start=0, ignore_index=-100,
            softcap=None, temperature=1.0, **kw,
        )  # fmt: skip

    def same_topk(self, vals, ids, ref) -> bool:
        """The splits' top-k merged (value descending, NaN first; ties: lower id) equal ``ref``'s."""
        n = ref.topk_ids.shape[0]
        top = vals[:, :n].permute(1, 0, 2).reshape(n, -1)
        tid = ids[:, :n].permute(1, 0, 2).reshape(n, -1)
        order = torch.sort(tid, dim=1, stable=True).indices
        top, tid = top.gather(1, order), tid.gather(1, order)
        tid = tid.gather(1, torch.sort(top, dim=1, descending=True, stable=True).indices)
        return torch.equal(tid[:, : self.k], ref.topk_ids)

    def run(self, label: str, fn=kernels.shard_partials, **kw):
        def call():
            return self.call(fn, self.x, self.v, **kw)

        try:
            stats, vals, ids = call()
            ok = True
            selects = kw.get("select_launch", True)
            if selects:
                mx, se = stats[0, :, :CHECK_ROWS], stats[1, :, :CHECK_ROWS]
                m = mx.amax(0)
                lse = m + torch.log((se * torch.exp(mx - m)).sum(0))
                ok = torch.allclose(lse, self.ref.max + torch.log(self.ref.sumexp), atol=1e-4)
                if self.k:
                    ok = ok and self.same_topk(vals, ids, self.ref)
                    _, e_vals, e_ids = self.call(fn, self.edge[0], self.edge[1], **kw)
                    ok = ok and self.same_topk(e_vals, e_ids, self.edge_ref)
        except Exception as e:  # noqa: BLE001 - report and continue the sweep
            print(f"v={self.v} k={self.k} {label}: failed {type(e).__name__}: {e!s:.160}", flush=True)
            return None
        ms = do_bench(call, warmup=25, rep=200, return_mode="median")
        frac = self.floor / ms
        sel = f" selection {ms - self.stream_ms:.4f} ms" if self.stream_ms and selects else ""
        queued = ""
        if self.host_ahead:  # GPU time with the host ahead, and the host's time per call
            gpu = C.time_queued(call, torch.device("cuda"), calls=20)
            t = time.perf_counter()
            for _ in range(20):
                call()
            host = (time.perf_counter() - t) / 20 * 1e3
            torch.cuda.synchronize()
            gpu_s = "late" if gpu is None else f"{gpu:.4f} ms {self.floor / gpu:.1%}"
            queued = f" | host ahead {gpu_s}, host {host:.4f} ms/call"
        print(f"v={self.v:6d} k={self.k:4d} {label:52s} ok={ok} {ms:.4f} ms {frac:.1%}{sel}{queued}",
              flush=True)  # fmt: skip
        if ok and selects and (self.best is None or ms < self.best[0]):
            self.best = (ms, frac, label, kw)
        return ms


# (splits S, rows N, k) of the finalize kernel's top-k merge: TP = 2 and 4 at N = 8192 (the ranks'
# pieces), and the decode sizes' column splits
FINALIZE_CASES = [(2, 8192, 50), (4, 8192, 50), (2, 8192, 8), (8, 1, 50), (8, 64, 50), (32, 1, 8)]


def finalize_sweep() -> None:
    """``kernels.finalize_stats`` merging S sorted top-k lists per row, by warps per program; each
    variant's ids and values checked equal to the default's. Then, at the default warps, the same
    lists in ascending order: out of order for the merge, which then takes its full sort
    (``tl.topk`` of every candidate, the merge before 2026-11-27) instead of the halving steps."""
    from shardsoftmax.kernels import finalize

    for s, n, k in FINALIZE_CASES:
        vals = torch.sort(torch.randn(s, n, k, device="cuda") * 3, dim=-1, descending=True).values
        ids = torch.arange(s, device="cuda")[:, None, None] * 100_000 + torch.arange(k, device="cuda")
        ids = ids.expand(s, n, k).contiguous()
        stats = torch.zeros(len(kernels.FIELDS), s, n, device="cuda")
        stats[0], stats[1] = vals[..., 0], 1.0

        def call(w=None, stats=stats, vals=vals, ids=ids):
            return kernels.finalize_stats(
                stats, vals, ids, None, vocab_start=0, ignore_index=-100, num_warps=w
            )

        _, want_vals, want_ids = call()
        mp = finalize.merge_keys(s, k)
        default = finalize.default_warps(True, mp, n)
        for w in (1, 2, 4, 8):
            _, got_vals, got_ids = call(w)
            ok = torch.equal(got_ids, want_ids) and torch.equal(got_vals, want_vals)
            us = do_bench(lambda w=w: call(w), warmup=25, rep=200, return_mode="median") * 1e3
            mark = " (default)" if w == default else ""
            case = f"S={s:2d} N={n:5d} k={k:3d} ({mp:4d} keys) warps={w}{mark}"
            print(f"finalize merge {case}: {us:7.1f} us ok={ok}", flush=True)
        rev = dict(vals=vals.flip(-1).contiguous(), ids=ids.flip(-1).contiguous())
        _, got_vals, got_ids = call(**rev)
        ok = torch.equal(got_ids, want_ids) and torch.equal(got_vals, want_vals)
        us = do_bench(lambda rev=rev: call(**rev), warmup=25, rep=200, return_mode="median") * 1e3
        case = f"S={s:2d} N={n:5d} k={k:3d} ({mp:4d} keys) warps={default}, lists ascending (full sort)"
        print(f"finalize merge {case}: {us:7.1f} us ok={ok}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", default="32064,128256")
    ap.add_argument("--ks", default="0,50,1024")
    ap.add_argument("--old", default="", help="paths (comma-separated) of earlier kernels/partials.py to A/B")
    ap.add_argument("--defaults-only", action="store_true", help="time the defaults (and --old) only")
    ap.add_argument("--tiles", action="store_true", help="sweep the streaming kernel's tile for k > 0 too")
    ap.add_argument("--budget-s", type=float, default=270, help="start no sweep variant after this")
    ap.add_argument("--finalize", action="store_true", help="sweep the finalize merge's warps first")
    ap.add_argument(
        "--host-ahead",
        action="store_true",
        help="also time each variant with the host ahead (common.time_queued), and the host",
    )
    ap.add_argument("--variants", type=keyword_sets, default=None,
                    help="JSON list of shard_partials keywords to time instead of the sweeps, "
                         'e.g. \'[{"select_programs_per_sm": 64}]\'')  # fmt: skip
    args = ap.parse_args()
    t0 = time.time()
    if args.finalize:
        finalize_sweep()
    olds = [(path, load_old(path)) for path in args.old.split(",") if path]
    bw = copy_bw()
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    cases = []
    # First the A/B: defaults, --old files, the streaming kernel alone.
    for v in [int(s) for s in args.v.split(",")]:
        for k in [int(s) for s in args.ks.split(",")]:
            c = Case(args.n, v, k, bw)
            c.host_ahead = args.host_ahead
            cases.append(c)
            if k:
                c.stream_ms = c.run("stream alone (select_launch=False)", select_launch=False)
            c.run("default")
            for path, old in olds:
                c.run(f"{path} (defaults)", fn=old)
    # Then the sweeps, while the budget lasts; each variant runs on every V of its k in a row
    # (the selection's constexprs do not depend on V: one compilation).
    sweeps = []
    for k in dict.fromkeys(c.k for c in cases):
        same_k = [c for c in cases if c.k == k]
        if (k == 0 or args.tiles) and not args.variants:
            tiles = TILES[min(TILES, key=lambda kk: abs(kk - k))]
            sweeps += [(same_k, dict(tile=t, num_warps=w)) for t in tiles for w in WARPS]
        variants = select_variants(k) if k else [dict(n_splits=2), dict(n_splits=4)]
        if args.variants is not None:
            variants = args.variants
        sweeps += [(same_k, kw) for kw in variants]
    for same_k, kw in sweeps if not args.defaults_only else []:
        for c in same_k:
            if time.time() - t0 < args.budget_s:
                base = dict(c.best[3]) if c.best and "tile" not in kw and args.variants is None else {}
                merged = dict(base, **kw)
                if "select_params" in base and "select_params" in kw:
                    merged["select_params"] = {**base["select_params"], **kw["select_params"]}
                c.run(f"{base} {kw}" if base else f"{kw}", **merged)
    print(f"\nbest per (v, k): ms, fraction of copy bandwidth, variant ({time.time() - t0:.0f} s)")
    for c in cases:
        if c.best:
            sel = f" (selection {c.best[0] - c.stream_ms:.4f} ms)" if c.stream_ms else ""
            print(f"  v={c.v:6d} k={c.k:4d} -> {c.best[0]:.4f} ms {c.best[1]:.1%}{sel} {c.best[2]}")


if __name__ == "__main__":
    main()

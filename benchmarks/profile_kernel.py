"""One warm call of the partials kernels, bracketed for Nsight Compute (a profiling aid).

    ncu --clock-control none --profile-from-start off [-k regex:_select_kernel] \\
        --section SpeedOfLight --section SchedulerStats --section WarpStateStats \\
        --section InstructionStats --section LaunchStats --section Occupancy \\
        python -P benchmarks/profile_kernel.py [--n 8192] [--v 32064] [--k 50] [--no-select]

The script runs ``kernels.shard_partials`` on ``randn * 3`` bf16 logits ``--warmup`` times (compiled,
caches warm), then once more between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that
``ncu --profile-from-start off`` profiles exactly that call's kernels: for k <= 128 one kernel,
``_stream_select_kernel`` (the stream and the selection), for larger k the streaming kernel and
``_select_kernel``. The flags are the API's for ``softmax_stats`` (entropy, no sum x);
``--no-select`` leaves the selection out (the stream alone). ``--clock-control none`` keeps the
GPU's clocks as they are (the device notes ask not to lock them). docs/performance.md v0.10's
profiles ran this same call from scratch scripts (the first one with sum x too); this script
itself has run on the CPU only so far (``--device cpu``, tiny sizes, under TRITON_INTERPRET=1,
where it only checks that the call runs).
"""

from __future__ import annotations

import argparse

import torch

from shardsoftmax import kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None, help="rows (default 8192; CPU 4)")
    ap.add_argument("--v", type=int, default=None, help="columns of the shard (default 32064; CPU 300)")
    ap.add_argument("--k", type=int, default=50, help="top-k (0: the k = 0 stream only)")
    ap.add_argument("--no-select", action="store_true", help="k > 0: the streaming kernel alone")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    n = args.n if args.n is not None else (8192 if cuda else 4)
    v = args.v if args.v is not None else (32064 if cuda else 300)
    if n < 1 or v < 1:
        ap.error(f"--n and --v must be at least 1 (got {n}, {v})")
    if not 0 <= args.k <= min(kernels.MAX_K, v):
        ap.error(f"--k must be in [0, min({kernels.MAX_K}, --v = {v})] (got {args.k})")
    if args.warmup < 0:
        ap.error(f"--warmup must be at least 0 (got {args.warmup})")
    x = (torch.randn(n, v, device=device) * 3).to(torch.bfloat16)
    kw = dict(k=args.k, n_valid_cols=v, vocab_start=0, ignore_index=-100, softcap=None, temperature=1.0,
              need_entropy=True, need_sum_x=False, select_launch=not args.no_select)  # fmt: skip

    def call():
        return kernels.shard_partials(x, None, **kw)

    for _ in range(args.warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    stats, _, _ = call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    what = "the stream alone" if args.no_select or args.k == 0 else "the stream and the selection"
    print(f"profiled one call ({what}): N={n} V_shard={v} k={args.k} on {device}; rows with a finite "
          f"max: {int(torch.isfinite(stats[0]).all(0).sum())} of {n}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Run shardsoftmax's distributed self-check or benchmark on the ranks started by torchrun.

Commands (from the repository root; ``torchrun`` is ``python -m torch.distributed.run``)::

    # GPUs: NCCL, rank r on cuda:LOCAL_RANK, compiled Triton kernels
    torchrun --standalone --nproc-per-node 4 -m shardsoftmax.launch.torchrun tests
    # CPU: gloo; the Triton kernels run in the interpreter (slow) with TRITON_INTERPRET=1,
    # else the PyTorch backend runs
    TRITON_INTERPRET=1 torchrun --standalone --nproc-per-node 2 -m shardsoftmax.launch.torchrun tests
    # benchmark: calls main(args, process_group) of benchmarks/bench_dist.py with the words after "bench"
    torchrun --standalone --nproc-per-node 4 -m shardsoftmax.launch.torchrun bench --help
    # several nodes: the usual rendezvous options
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m shardsoftmax.launch.torchrun tests

Options before the mode: ``--backend {auto,triton,torch}`` (shardsoftmax's kernels),
``--dist-backend {auto,nccl,gloo}`` (auto: NCCL when CUDA is available, gloo otherwise),
``--timeout SECONDS`` (of every collective). NCCL_NVLS_ENABLE defaults to 0 (NVLink multicast
off) unless already set.

``tests`` checks, on every rank, the sharded results against a float64 reference of the full
logits: lse, max, entropy, log p(target), top-k (ids exact, ties across shard boundaries: the lower
id wins), softmax and log-softmax shards, cross-entropy (label smoothing, z-loss, ignored
targets, padded vocabulary with a rank that is all padding) and its gradient; and that every rank
got the same results. Each rank prints ``[rank r/W] PASS <check>`` or ``FAIL <check>: why``, then
``PASS all`` or ``FAIL n checks``; the exit status is non-zero on every rank if any rank failed.

This is the only place that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); the
library itself takes an explicit ``process_group``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
BENCH_FILE = Path("benchmarks") / "bench_dist.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m shardsoftmax.launch.torchrun",
        description="shardsoftmax self-check or benchmark on torchrun's ranks",
    )
    p.add_argument(
        "--backend", choices=("auto", "triton", "torch"), default="auto", help="shardsoftmax backend"
    )
    p.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a collective gives up")
    p.add_argument("mode", choices=("tests", "bench"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="bench: arguments for benchmarks/bench_dist.py")
    return p.parse_args(argv)


def init_from_torchrun(dist_backend: str, timeout_s: float) -> tuple[object, torch.device]:
    """Join the process group torchrun describes; returns (group, this rank's device)."""
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise SystemExit(
            f"shardsoftmax.launch.torchrun: {', '.join(missing)} not set; start it with torchrun, e.g.\n"
            "  torchrun --standalone --nproc-per-node 2 -m shardsoftmax.launch.torchrun tests"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if dist_backend == "auto":
        dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist_backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dist.group.WORLD, device


# ------------------------------------------------------------------------------------------------
# Self-check
# ------------------------------------------------------------------------------------------------


def _split(n_cols: int, world: int) -> list[int]:
    base, extra = divmod(n_cols, world)
    return [base + (r < extra) for r in range(world)]


def _cases(world: int, small: bool) -> list[dict]:
    """Inputs of every check, identical on each rank. ``small``: for the Triton interpreter (slow,
    above all its top-k)."""
    n, v = (4, 1003) if small else (33, 50257)
    k = (lambda big: min(big, 5)) if small else (lambda big: big)
    return [
        {"name": "uneven", "n": n, "cols": v, "k": k(33), "seed": 1},
        {  # 1024 columns, 600 real: with 3 or more ranks the last shard is all padding
            "name": "padded+smoothing+z_loss",
            "n": n,
            "cols": 1024,
            "vocab_size": 600,
            "k": k(9),
            "seed": 2,
            "ce": {"label_smoothing": 0.1, "z_loss": 1e-3},
        },
        {
            "name": "softcap+temperature",
            "n": n,
            "cols": 1003,
            "k": k(7),
            "seed": 3,
            "tf": {"softcap": 5.0, "temperature": 0.7},
        },
        {"name": "ties", "n": n, "cols": 997, "k": k(17), "seed": 4, "ties": True},
    ]


def _inputs(case: dict, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["n"], case["cols"], generator=g, dtype=torch.float64) * 3
    if case.get("ties"):
        x = torch.round(x * 2) / 2
        top = x.max() + 1
        widths = _split(case["cols"], world)
        for r in range(1, world):  # equal maxima on both sides of every boundary
            b = sum(widths[:r])
            x[:, b - 1 : b + 1] = top
    vocab = case.get("vocab_size") or case["cols"]
    t = torch.randint(0, vocab, (case["n"],), generator=g)
    t[torch.rand(case["n"], generator=g) < 0.25] = -100
    return x.float(), t


def _err_ok(got: torch.Tensor, want64: torch.Tensor, ref32: torch.Tensor, scale=None) -> tuple[bool, str]:
    """Within 4x PyTorch's own fp32 error plus 4 ulps of ``scale`` (default: the largest expected
    value); inf/NaN must match."""
    got, want, ref = got.detach().cpu().double(), want64.double(), ref32.detach().cpu().double()
    if got.shape != want.shape:
        return False, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isfinite(want)
    if not torch.equal(bad, ~torch.isfinite(got)) or not torch.equal(
        got[bad].nan_to_num(7.0), want[bad].nan_to_num(7.0)
    ):
        return False, "inf/NaN entries differ"
    if bad.all():
        return True, ""
    fin = ~bad
    err = (got[fin] - want[fin]).abs().max().item()
    scale = want[fin].abs().max().item() if scale is None else scale
    tol = 4 * (ref[fin] - want[fin]).abs().max().item() + 4 * torch.finfo(torch.float32).eps * scale
    return err <= tol, f"max error {err:.3g} > {tol:.3g}"


def _oracle(case: dict, x: torch.Tensor, t: torch.Tensor) -> dict:
    from shardsoftmax import reference as R

    tf, ce, vs = case.get("tf", {}), case.get("ce", {}), case.get("vocab_size")
    out = R.oracle_stats(x, t, k=case["k"], vocab_size=vs, **tf)
    out["log_softmax"] = R.oracle_log_softmax(x, vocab_size=vs, **tf)
    xg = x.clone().requires_grad_()
    loss = R.oracle_cross_entropy(xg, t, vocab_size=vs, **ce, **tf)
    loss.backward()
    out["ce"], out["grad"] = loss.detach(), xg.grad
    return out


def self_check(group, device: torch.device) -> int:
    """Run every check on this rank; print PASS/FAIL lines; return the number of failures on
    the whole group (the same number on every rank)."""
    import shardsoftmax as ss

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    small = device.type == "cpu" and ss.backend.uses_triton(torch.empty(0))
    failures = 0

    def report(name: str, ok: bool, why: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(
            f"[rank {rank}/{world}] {'PASS' if ok else 'FAIL'} {name}{'' if ok else ': ' + why}", flush=True
        )

    for case in _cases(world, small):
        x, t = _inputs(case, world)
        o64, o32 = _oracle(case, x.double(), t), _oracle(case, x, t)
        widths = _split(case["cols"], world)
        start = sum(widths[:rank])
        cols = slice(start, start + widths[rank])
        shard, td = x[:, cols].contiguous().to(device), t.to(device)
        tf, ce = case.get("tf", {}), case.get("ce", {})
        lay = {"vocab_size": case.get("vocab_size"), "process_group": group}
        name = case["name"]
        try:
            st = ss.softmax_stats(shard, td, k=case["k"], **tf, **lay)
            # entropy = lse - E_p[x]: its rounding error scales with |lse|, not with the entropy
            lse_scale = o64["lse"][torch.isfinite(o64["lse"])].abs().max().item()
            for f in ("lse", "max", "entropy", "target_logprob", "topk_logprobs"):
                scale = lse_scale if f == "entropy" else None
                report(f"{name} {f}", *_err_ok(getattr(st, f), o64[f], o32[f], scale))
            ids = st.topk_ids.cpu()
            report(
                f"{name} topk_ids",
                torch.equal(ids, o64["topk_ids"]),
                f"{ids[:1].tolist()} != {o64['topk_ids'][:1].tolist()}",
            )
            _, ids2 = ss.topk(shard, case["k"], **tf, **lay)
            report(f"{name} topk", torch.equal(ids2.cpu(), o64["topk_ids"]), "ids differ from the reference")
            lsm = ss.log_softmax(shard, **tf, **lay)
            report(
                f"{name} log_softmax", *_err_ok(lsm, o64["log_softmax"][:, cols], o32["log_softmax"][:, cols])
            )
            sm = ss.softmax(shard, **tf, **lay)
            report(
                f"{name} softmax",
                *_err_ok(sm, o64["log_softmax"][:, cols].exp(), o32["log_softmax"][:, cols].exp()),
            )
            xs = shard.clone().requires_grad_()
            loss = ss.cross_entropy(xs, td, **ce, **tf, **lay)
            loss.backward()
            report(f"{name} cross_entropy", *_err_ok(loss, o64["ce"], o32["ce"]))
            report(
                f"{name} cross_entropy grad", *_err_ok(xs.grad, o64["grad"][:, cols], o32["grad"][:, cols])
            )
            # every rank must hold the very same global results
            mine = torch.cat([st.lse.double(), st.entropy.double(), loss.detach().double().reshape(1)]).to(
                device
            )
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine, group=group)
            same = all(torch.equal(e.nan_to_num(7.0), every[0].nan_to_num(7.0)) for e in every)
            report(f"{name} same on every rank", same, "ranks disagree")
        except Exception as err:  # noqa: BLE001 - report and keep the ranks in step
            report(f"{name} raised", False, f"{type(err).__name__}: {err}")
            raise
    total = torch.tensor([failures], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------


def load_bench():
    """benchmarks/bench_dist.py of the source tree (it is not installed with the package)."""
    for root in (REPO, Path.cwd()):
        path = root / BENCH_FILE
        if path.is_file():
            break
    else:
        raise SystemExit(
            f"shardsoftmax.launch.torchrun bench: {BENCH_FILE} not found under {REPO} or {Path.cwd()}; "
            "the benchmarks ship with the source tree, not the package: run from a checkout"
        )
    sys.path.insert(0, str(path.parent))  # its own helpers (benchmarks/common.py)
    spec = importlib.util.spec_from_file_location("bench_dist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise SystemExit(f"shardsoftmax.launch.torchrun bench: {path} has no main(args, process_group)")
    return module


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = load_bench() if args.mode == "bench" else None  # fail before joining the group
    group, device = init_from_torchrun(args.dist_backend, args.timeout)
    import shardsoftmax as ss

    ss.set_backend(args.backend)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        if args.mode == "tests":
            n_failed = self_check(group, device)
            status = "PASS all" if n_failed == 0 else f"FAIL {n_failed} checks"
            where = f"backend {ss.get_backend()}, {dist.get_backend(group)}, {device}"
            print(f"[rank {rank}/{world}] {status} ({where})", flush=True)
            return 0 if n_failed == 0 else 1
        code = bench.main(list(args.rest), group)
        return code if isinstance(code, int) else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

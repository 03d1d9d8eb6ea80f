"""The LM head on one GPU: correctness checks, then timings against the matmul floor.

    python benchmarks/bench_linear.py [--out DIR] [--n 8192] [--h 4096] [--v 32064 128256]
    TRITON_INTERPRET=1 python benchmarks/bench_linear.py --device cpu     # smoke test of every path
    torchrun --nproc-per-node 2 benchmarks/bench_linear.py --tp [--vocab 128256]  # (3), a rank per GPU

(1) Checks, bf16 inputs, a few shapes (odd H, bias, padding, softcap, smoothing, z-loss, ignored
tokens), for every implementation (``impl="chunked"``: cuBLAS per vocabulary chunk + the shard
kernels, several chunks, and in training the eager-gradient forward, several blocks of rows on
the first shape; ``impl="recompute"``: the same forward, backward recomputing the chunks;
``impl="fused"``: the Triton kernels): ``ss.linear_softmax_stats`` (chunked and fused; recompute's
is chunked's) and ``ss.linear_cross_entropy`` (forward and the gradients of hidden, weight, bias)
against a ``torch`` matmul of the same inputs in the implementation's precision (bf16 for chunked
and recompute, which round the logits as ``F.linear`` does; float32 for fused, which never rounds
them) followed by the unfused API (``ss.softmax_stats`` / ``ss.cross_entropy``) and autograd. One
PASS/FAIL line per quantity.

(2) Timings at N x H x V_shard, bf16, in two groups per shape: the forward providers, then the
forward + backward ones, each group timed together with the bf16 matmul ``hidden @ weight.T`` of
the same sizes, turn by turn (``C.time_interleaved``: one call of each per cycle in a shuffled
order, medians over the cycles, so that all share the clocks of a GPU at its power cap; the log
gives the clocks).
That matmul's time sets the group's floors (forward 2 N H V FLOPs = one matmul, forward +
backward 6 N H V = three). Per op and provider: the time, the fraction of the floor reached
(floor_ms / ms) and the extra peak memory (``max_memory_allocated`` during one call alone, beyond
the inputs and the returned outputs).
Providers: ``chunked``, ``recompute`` and ``fused`` (ours, the three impls; ``chunked``'s
``ce_fwd+bwd`` row is the eager-gradient forward, 3 GEMMs; ``recompute`` only has that row: its
forward is chunked's), ``unfused`` (cuBLAS bf16 logits + our unfused API), ``torch`` (bf16 logits
+ ``F.cross_entropy`` on fp32 logits), and where importable ``liger``
(LigerFusedLinearCrossEntropyLoss), ``cce`` (Cut Cross-Entropy at its defaults; it sums its
gradients in bf16: checked on the loss only) and ``torch.lce``
(``F.linear_cross_entropy``). ``ce_fwd`` rows run under ``torch.no_grad()`` (the loss as an
evaluation computes it; with gradients enabled, chunked's forward would be the eager one, the
whole ``ce_fwd+bwd`` work). At each timed shape, before timing: the statistics (k = 0 and k = --k)
of chunked against the unfused API on bf16 logits and of fused against it on float32 logits, and
every loss provider against chunked (loss and gradients). ``--no-fused`` leaves the Triton
kernels out of (2). Writes a CSV and the table under --out (default $OUT or ./bench_out).

(3) ``--tp``, under ``torchrun --nproc-per-node TP``: per rank, ``linear_cross_entropy`` forward +
backward (chunked: eager; recompute) of this rank's V_shard = V / TP slice (uneven when V does not
divide) in a NCCL group, against the rank's floor: three matmuls of its own shape plus the
all-reduce of the fp32 [N, H] grad_hidden and the partials' all-gathers, all timed turn by turn
in the same cycles (CUDA events, the max over the ranks). Checked first against one rank's
unsplit computation. Liger's TP variant (CUTLASS + NVSHMEM, in the separate package
liger-cute-kernels) is not run, with the reason printed: its node-local TP uses NVLink multicast,
which the GPU machines this benchmark runs on keep off.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

import shardsoftmax as ss  # noqa: E402
from shardsoftmax import linear as ss_linear  # noqa: E402

COLUMNS = [
    "date", "commit", "gpu", "torch", "triton", "op", "provider", "dtype", "n", "h", "v_shard", "k",
    "check", "ms", "tflops", "floor_ms", "frac_of_floor", "extra_mem_bytes", "note",
]  # fmt: skip
STATS_TOL = 1e-4  # normwise, fp32 per-row results: the same bf16 products, another summation order
LOSS_TOL = 1e-4
GRAD_TOL = 1e-2  # normwise, bf16 gradients (one bf16 rounding of dloss/dlogits, one of the output)
UNFUSED_LOSS_TOL = 2e-3  # timed shapes: against the unfused path on bf16-rounded logits
# peers whose gradients are approximate by design: their loss is checked, their gradients' error
# printed and not judged. Cut Cross-Entropy (25.1.1) adds each vocabulary block's share of
# grad_hidden and grad_weight into bf16 buffers (3-4e-2 normwise against chunked on an H200, with
# or without its gradient filter; torch and Liger agree with chunked within 8e-3)
APPROXIMATE_GRADS = {"cce"}
IMPLS = ("chunked", "recompute", "fused")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="folder for the CSV")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke sizes)")
    # --tokens, --hidden, --vocab: the same, for torchrun, whose parser rejects --n and --v (prefixes
    # of several of its own options)
    p.add_argument("--n", "--tokens", type=int, default=None, help="tokens (default 8192)")
    p.add_argument("--h", "--hidden", type=int, default=None, help="hidden size (default 4096)")
    p.add_argument(
        "--v",
        "--vocab",
        type=int,
        nargs="+",
        default=None,
        help="V_shard values (default 32064 128256); --tp: the whole vocabulary (default 128256)",
    )
    p.add_argument("--k", type=int, default=None, help="k of the top-k rows (default 50; CPU 3; 0: none)")
    p.add_argument("--skip-checks", action="store_true", help="timings only")
    p.add_argument("--no-peers", action="store_true", help="skip Liger / CCE / F.linear_cross_entropy")
    p.add_argument("--no-fused", action="store_true", help="skip the Triton kernels (impl='fused') in (2)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tp", action="store_true", help="(3): per-rank fwd+bwd in a group, under torchrun")
    p.add_argument("--iters", type=int, default=None, help="--tp: timed cycles (default 15; CPU 2)")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters must be at least 1 (got {args.iters})")
    return args


def normwise(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref| in float64; inf if got has a NaN/inf where ref is finite."""
    got, ref = got.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), fin):
        return float("inf")
    if not fin.any():
        return 0.0
    return ((got - ref)[fin].abs().max() / ref[fin].abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# (1) Checks against fp32 torch matmul + the unfused API
# ------------------------------------------------------------------------------------------------


def make_inputs(n, h, v, dtype, device, *, seed, bias=False, ignore_frac=0.1, vocab=None, scale=2.0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) * (scale / math.sqrt(h))).to(dtype)
    b = (torch.randn(v, generator=g, device=device) * 0.5).to(dtype) if bias else None
    vocab = vocab or v
    target = torch.randint(0, vocab, (n,), generator=g, device=device)
    target[torch.rand(n, generator=g, device=device) < ignore_frac] = -100
    return hidden, weight, b, target


def run_checks(device, dtype, shapes, report: Callable[[str, bool, str], None]) -> None:
    """``shapes``: (N, H, V_shard, bias, vocab_size, options, chunk columns of the chunked path
    or None for its default, rows per block of the eager forward or None for its default)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for i, (n, h, v, bias, vocab, opts, cols, rows) in enumerate(shapes):
        name = f"N={n} H={h} V={v}" + (" bias" if bias else "") + (f" vocab={vocab}" if vocab else "")
        name += "".join(f" {k}={val}" for k, val in opts.items())
        itemsize = torch.empty((), dtype=dtype).element_size()
        width = cols or ss_linear.chunk_cols(n, itemsize)
        hidden, weight, b, target = make_inputs(n, h, v, dtype, device, seed=100 + i, bias=bias, vocab=vocab)
        lay = {"vocab_size": vocab} if vocab else {}
        tf = {k: opts[k] for k in ("softcap", "temperature") if k in opts}
        defaults = (
            ss_linear.CHUNK_BYTES,
            ss_linear.FORWARD_BLOCK_BYTES,
            ss_linear.EAGER_ROWS,
            ss_linear.EAGER_BLOCK_BYTES,
        )
        try:
            if cols:
                ss_linear.CHUNK_BYTES = ss_linear.FORWARD_BLOCK_BYTES = n * cols * itemsize
            if rows:  # blocks of exactly this many rows
                ss_linear.EAGER_ROWS, ss_linear.EAGER_BLOCK_BYTES = rows, 0
            n_fwd = len(ss_linear.forward_blocks(n, vocab or v, itemsize, ss_linear.FORWARD_BLOCK_BYTES))
            chunks = f" ({n_fwd} forward blocks, {-(-(vocab or v) // width)} backward chunks)"
            blocks = f" ({len(ss_linear.eager_blocks(n, v, itemsize)[1])} eager blocks)"
            _check_impl("chunked", name + chunks + blocks, hidden, weight, b, target, lay, tf, opts, report)
            _check_impl("recompute", name + chunks, hidden, weight, b, target, lay, tf, opts, report)
        finally:
            (
                ss_linear.CHUNK_BYTES,
                ss_linear.FORWARD_BLOCK_BYTES,
                ss_linear.EAGER_ROWS,
                ss_linear.EAGER_BLOCK_BYTES,
            ) = defaults
        _check_impl("fused", name, hidden, weight, b, target, lay, tf, opts, report)


def _chunked_logits(hidden, weight, b, real: int) -> torch.Tensor:
    """fp32 copy of the logits exactly as the chunked path computes them (the same cuBLAS calls
    on the same blocks, ``shardsoftmax.linear.forward_blocks``); padding columns 0 (excluded by
    vocab_size)."""
    n = hidden.shape[0]
    out = torch.zeros(n, weight.shape[0], dtype=torch.float32, device=hidden.device)
    for r0, r1 in ss_linear.forward_blocks(n, real, hidden.element_size(), ss_linear.FORWARD_BLOCK_BYTES):
        buf = torch.empty((r1 - r0) * real, dtype=hidden.dtype, device=hidden.device)
        out[r0:r1, :real] = ss_linear._logits_chunk(hidden[r0:r1], weight, b, 0, real, buf)
    return out


def _check_impl(impl, name, hidden, weight, b, target, lay, tf, opts, report) -> None:
    """The checks of ``run_checks`` for one implementation. The reference matmul has the
    implementation's precision: float32 for "fused" (its logits are never rounded); for
    "chunked", the same cuBLAS calls on the same chunks (``_chunked_logits``), so the reference
    logits are bit for bit the ones the chunks were given (one GEMM over all columns may round a
    logit to another bf16 value: cuBLAS picks its algorithm by shape), and what is checked is
    the partials of the chunks and their merge."""
    ref_dtype = torch.float32 if impl == "fused" else hidden.dtype  # of the loss's reference
    stats_tol, loss_tol = STATS_TOL, LOSS_TOL
    name = f"{impl} {name}"
    for k in () if impl == "recompute" else (0, 5):  # recompute's statistics are chunked's
        if impl == "chunked":
            logits_ref = _chunked_logits(hidden, weight, b, lay.get("vocab_size") or weight.shape[0])
        else:
            logits_ref = F.linear(*(None if x is None else x.float() for x in (hidden, weight, b)))
        st = ss.linear_softmax_stats(hidden, weight, target, bias=b, k=k, impl=impl, **tf, **lay)
        ref = ss.softmax_stats(logits_ref, target, k=k, **tf, **lay)
        errs = {f: normwise(getattr(st, f), getattr(ref, f)) for f in ("lse", "entropy", "target_logprob")}
        ok = all(e <= stats_tol for e in errs.values())
        detail = ", ".join(f"{f} {e:.1e}" for f, e in errs.items())
        if k:
            # our ids must hold the reference's top-k values (ties may order either way)
            xt = ss.log_softmax(logits_ref, **tf, **lay)
            picked = xt.gather(1, st.topk_ids)
            want = ref.topk_logprobs
            e_ids = normwise(picked, want)
            e_lp = normwise(st.topk_logprobs, want)
            same = (st.topk_ids == ref.topk_ids).float().mean().item()
            ok = ok and e_ids <= stats_tol and e_lp <= stats_tol
            detail += f", top-{k} values at our ids {e_ids:.1e}, logprobs {e_lp:.1e}, same ids {same:.1%}"
        report(f"stats k={k} {name}", ok, detail + f" (tol {stats_tol:g})")

    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (hidden, weight, b)]
    loss = ss.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], impl=impl, **opts, **lay)
    loss.backward()
    refs = [
        x.detach().to(ref_dtype).requires_grad_(True) if x is not None else None for x in (hidden, weight, b)
    ]
    ref_loss = ss.cross_entropy(F.linear(*refs), target, **opts, **lay)
    ref_loss.backward()
    e_loss = normwise(loss.detach(), ref_loss.detach())
    report(f"loss {name}", e_loss <= loss_tol, f"{e_loss:.1e} (tol {loss_tol:g})")
    for what, mine, theirs in zip(("hidden", "weight", "bias"), leaves, refs):
        if mine is None:
            continue
        e = normwise(mine.grad, theirs.grad)
        dt_ok = mine.grad.dtype == mine.dtype
        report(f"grad {what} {name}", e <= GRAD_TOL and dt_ok, f"{e:.1e} (tol {GRAD_TOL:g})")


# ------------------------------------------------------------------------------------------------
# (2) Timings
# ------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args, device, meta, stem: str = "bench_linear"):
        self.args, self.device, self.meta = args, device, meta
        os.makedirs(args.out, exist_ok=True)
        self.path = C.out_path(args.out, stem, meta)
        self._f = open(self.path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        self._w.writeheader()
        self.rows: list[dict] = []
        self.checks: list[tuple[str, bool, str]] = []

    def report(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))
        C.log(f"  {'PASS' if ok else 'FAIL'} {what}: {detail}")

    def row(self, op, provider, n, h, v, k, ms, flops, floor_ms, mem, check="", note=""):
        r = {**{c: self.meta.get(c, "") for c in ("date", "commit", "gpu", "torch", "triton")}}
        r.update(op=op, provider=provider, dtype="bf16", n=n, h=h, v_shard=v, k=k, check=check, note=note)
        r["ms"], r["floor_ms"], r["extra_mem_bytes"] = ms, floor_ms, mem
        r["tflops"] = None if not ms else flops / (ms * 1e-3) / 1e12
        r["frac_of_floor"] = None if not ms or not floor_ms else floor_ms / ms
        self.rows.append(r)
        self._w.writerow(
            {k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()}
        )
        self._f.flush()
        frac = "-" if r["frac_of_floor"] is None else f"{r['frac_of_floor']:.0%}"
        mem_s = "-" if mem is None else f"{mem / 2**20:.0f} MiB"
        C.log(
            f"  {op:<12} {provider:<10} V={v:<6} k={k:<3} {ms or float('nan'):8.3f} ms"
            f"  floor {frac:>5}  +{mem_s}"
        )

    def close(self):
        self._f.close()


def _peers(no_peers: bool) -> dict[str, Callable]:
    """loss_fn(hidden, weight, target) of the peers that import here."""
    out: dict[str, Callable] = {}
    if no_peers:
        return out
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, t: liger(w, h, t)
    except Exception as err:  # noqa: BLE001 - not installed or incompatible here
        C.log(f"  (liger not available: {type(err).__name__})")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = lambda h, w, t: cce(h, w, t)  # its defaults (APPROXIMATE_GRADS)
    except Exception as err:  # noqa: BLE001
        C.log(f"  (cut_cross_entropy not available: {type(err).__name__})")
    if hasattr(F, "linear_cross_entropy"):
        out["torch.lce"] = lambda h, w, t: F.linear_cross_entropy(h, w, t)
    return out


# floors in matmuls of the shape: forward = one, forward + backward = three
FLOOR_MATMULS = {"stats_fwd": 1, "ce_fwd": 1, "ce_fwd+bwd": 3}


def time_group(run: Run, n: int, h: int, v: int, matmul: Callable, entries: list, inputs, label: str) -> None:
    """Rows for ``entries`` [(op, provider, fn, k, check, note)]: each provider's extra memory (one
    call alone; one that runs out of memory gets its row and is not timed), then all of them and
    the bf16 matmul of the shape timed turn by turn (``C.time_interleaved``), the floors from that
    matmul's time (``FLOOR_MATMULS``), and the GPU's clocks meanwhile in the log."""
    dev = run.device
    mm_flops = 2.0 * n * h * v
    fns, mems, kept = {"matmul": matmul}, {}, []
    for op, provider, fn, k, check, note in entries:
        key = f"{op} {provider} k={k}"
        try:
            mems[key] = C.extra_peak_memory(lambda fn=fn: _as_tuple(fn()), dev, inputs)
        except C.OOM:
            flops = FLOOR_MATMULS[op] * mm_flops
            run.row(op, provider, n, h, v, k, None, flops, None, None, check, "out of memory")
            C.empty_cache(dev)
            continue
        fns[key] = fn
        kept.append((key, op, provider, k, check, note))
    with C.ClockLog(dev) as clocks:
        ms = C.time_interleaved(fns, dev)
    C.log(f"  ({label}: {len(fns)} timed turn by turn; {clocks.summary() or 'GPU clocks not sampled'})")
    mm = ms["matmul"]
    run.row("matmul", "torch", n, h, v, 0, mm, mm_flops, mm, None, note=f"bf16 hidden @ weight.T ({label})")
    for key, op, provider, k, check, note in kept:
        floors = FLOOR_MATMULS[op]
        run.row(op, provider, n, h, v, k, ms[key], floors * mm_flops, floors * mm, mems[key], check, note)


def time_shape(run: Run, n: int, h: int, v: int, k_top: int, peers: dict) -> None:
    dev = run.device
    hidden, weight, _, target = make_inputs(n, h, v, torch.bfloat16, dev, seed=run.args.seed, ignore_frac=0.0,
                                            scale=3.0)  # fmt: skip
    inputs = (hidden, weight)
    impls = [i for i in IMPLS if not (run.args.no_fused and i == "fused")]
    n_chunks = -(-v // ss_linear.chunk_cols(n, hidden.element_size()))
    fwd_entries: list = []  # (op, provider, fn, k, check, note), timed together
    bwd_entries: list = []

    # forward statistics: chunked checked against the unfused API on the same bf16 logits, fused
    # against it on float32 logits (it never rounds them), at this shape; then all three timed
    # (recompute's statistics are chunked's)
    itemsize = hidden.element_size()
    fwd_blocks = len(ss_linear.forward_blocks(n, v, itemsize, ss_linear.FORWARD_BLOCK_BYTES))
    rc_blocks = len(ss_linear.forward_blocks(n, v, itemsize, ss_linear.CHUNK_BYTES))
    chunks = f"{fwd_blocks} row blocks of <= {ss_linear.FORWARD_BLOCK_BYTES >> 20} MiB"
    recompute = (
        f"forward {rc_blocks} row blocks, backward {n_chunks} chunks, of <= {ss_linear.CHUNK_BYTES >> 20} MiB"
    )
    # the eager forward's blocks, as it sizes them (one process: from the shard's own width)
    rows, blocks = ss_linear.eager_blocks(n, v, itemsize)
    notes = {"chunked": chunks, "recompute": recompute, "fused": ""}
    bwd_notes = {**notes, "chunked": f"eager: {len(blocks)} blocks of {rows} rows"}
    stat_impls = [i for i in impls if i != "recompute"]
    torch.backends.cuda.matmul.allow_tf32 = False
    for k in sorted({0, k_top}):
        stats: dict[str, Callable] = {
            name: (lambda name=name, k=k: ss.linear_softmax_stats(hidden, weight, target, k=k, impl=name))
            for name in stat_impls
        }
        stats["unfused"] = lambda k=k: ss.softmax_stats(hidden @ weight.T, target, k=k)
        checks = {}
        for name in stat_impls:
            logits = hidden @ weight.T if name == "chunked" else hidden.float() @ weight.float().T
            ref, st = ss.softmax_stats(logits, target, k=k), stats[name]()
            errs = [normwise(getattr(st, f), getattr(ref, f)) for f in ("lse", "entropy", "target_logprob")]
            detail = f"lse/entropy/target_logprob {max(errs):.1e}"
            if k:  # the reference's log-probs at our ids must be its top-k (ties may order either way)
                errs.append(
                    normwise(ss.log_softmax(logits.float()).gather(1, st.topk_ids), ref.topk_logprobs)
                )
                detail += f", top-{k} values at our ids {errs[-1]:.1e}"
            checks[name] = all(e <= STATS_TOL for e in errs)
            what = f"V={v} stats k={k} {name} vs unfused on {'bf16' if name == 'chunked' else 'fp32'} logits"
            run.report(what, checks[name], f"{detail} (tol {STATS_TOL:g})")
            del logits, ref, st
        for name, fn in stats.items():
            check = "" if name == "unfused" else ("PASS" if checks[name] else "FAIL")
            fwd_entries.append(("stats_fwd", name, fn, k, check, notes.get(name, "")))

    # cross-entropy, forward and forward + backward (gradients of hidden and weight)
    h_req = hidden.detach().requires_grad_(True)
    w_req = weight.detach().requires_grad_(True)
    losses: dict[str, Callable] = {
        name: (lambda name=name: ss.linear_cross_entropy(h_req, w_req, target, impl=name)) for name in impls
    }
    losses.update({
        "unfused": lambda: ss.cross_entropy(F.linear(h_req, w_req), target),
        "torch": lambda: F.cross_entropy(F.linear(h_req, w_req).float(), target),
    })  # fmt: skip
    losses.update({name: (lambda fn=fn: fn(h_req, w_req, target)) for name, fn in peers.items()})

    def grads(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), (h_req, w_req))

    def no_grad(loss_fn):
        def fwd():
            with torch.no_grad():
                return loss_fn()

        return fwd

    # check every provider against chunked at this shape first
    ours_loss = losses["chunked"]().detach().float()
    ours_grads = grads(losses["chunked"])()
    ok_providers = {}
    for name, loss_fn in losses.items():
        if name == "chunked":
            continue
        try:
            loss = loss_fn()
            g = torch.autograd.grad(loss, (h_req, w_req))
            e_loss = normwise(ours_loss, loss.detach().float())
            e_g = max(normwise(a, b) for a, b in zip(ours_grads, g))
            # a peer that returns its loss in bf16 (F.linear_cross_entropy) rounds it by up to eps/2
            loss_tol = UNFUSED_LOSS_TOL + torch.finfo(loss.dtype).eps / 2
            ok, detail = peer_check(name, e_loss, loss_tol, e_g)
            run.report(f"V={v} chunked vs {name}", ok, detail)
            ok_providers[name] = ok
            del loss, g
        except Exception as err:  # noqa: BLE001 - a peer that cannot run here
            C.log(
                f"  skip {name}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            )
            C.empty_cache(dev)
    del ours_grads
    for name, loss_fn in losses.items():
        if name != "chunked" and name not in ok_providers:
            continue
        check = "" if name == "chunked" else ("PASS" if ok_providers[name] else "FAIL")
        if name != "recompute":  # (its forward is chunked's)
            note = "no_grad" + (f"; {notes[name]}" if notes.get(name) else "")
            fwd_entries.append(("ce_fwd", name, no_grad(loss_fn), 0, check, note))
        bwd_entries.append(("ce_fwd+bwd", name, grads(loss_fn), 0, check, bwd_notes.get(name, "")))
    del ours_loss
    matmul = lambda: hidden @ weight.T  # noqa: E731
    time_group(run, n, h, v, matmul, fwd_entries, inputs, "forward")
    time_group(run, n, h, v, matmul, bwd_entries, inputs, "forward + backward")


def peer_check(name: str, e_loss: float, loss_tol: float, e_grads: float) -> tuple[bool, str]:
    """(pass, detail) of a peer against chunked: the loss within ``loss_tol``, the gradients within
    2 GRAD_TOL unless the peer's are approximate by design (APPROXIMATE_GRADS: printed only)."""
    approx = name in APPROXIMATE_GRADS
    ok = e_loss <= loss_tol and (approx or e_grads <= 2 * GRAD_TOL)
    g_tol = "approximate by design, not judged" if approx else f"tol {2 * GRAD_TOL:g}"
    return ok, f"loss {e_loss:.1e} (tol {loss_tol:.2g}), grads {e_grads:.1e} ({g_tol})"


def _as_tuple(x):
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(t for t in x if isinstance(t, torch.Tensor))


def table(rows: list[dict]) -> str:
    head = f"{'op':<11} {'provider':<10} {'V_shard':>7} {'k':>3} {'ms':>9} {'TFLOP/s':>8} {'floor':>6}"
    head += f" {'xmem MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
        fr = "-" if r["frac_of_floor"] is None else f"{r['frac_of_floor']:.0%}"
        mem = "-" if r["extra_mem_bytes"] is None else f"{r['extra_mem_bytes'] / 2**20:.0f}"
        lines.append(
            f"{r['op']:<11} {r['provider']:<10} {r['v_shard']:>7} {r['k']:>3} {ms:>9} {tf:>8} {fr:>6}"
            f" {mem:>9}"
        )
    return "\n".join(lines)


def bars(rows: list[dict], k_top: int) -> list[str]:
    """The issue's bars (informational), for each of our impls: forward <= 1.15x its floor,
    forward + backward <= 1.25x of three matmuls (chunked: the eager-gradient forward; with its
    extra memory), top-k k=50 <= 1.10x the k=0 forward. Where Cut Cross-Entropy ran: the chunked
    and the fused cross-entropy forward >= 1.25x faster than its forward, with no more extra memory."""

    def find(op, provider, v, k=0):
        return next(
            (r for r in rows if (r["op"], r["provider"], r["v_shard"], r["k"]) == (op, provider, v, k)), None
        )

    out = []
    for v in sorted({r["v_shard"] for r in rows}):
        for impl in IMPLS:
            for op, limit in (("stats_fwd", 1.15), ("ce_fwd", 1.15), ("ce_fwd+bwd", 1.25)):
                r = find(op, impl, v)
                if r and r["ms"] and r["floor_ms"]:
                    x = r["ms"] / r["floor_ms"]
                    verdict = "PASS" if x <= limit else "FAIL"
                    what = f"{impl} (eager)" if impl == "chunked" and op == "ce_fwd+bwd" else impl
                    line = f"{verdict} bar V={v} {op} {what} <= {limit}x floor: {x:.2f}x"
                    if op == "ce_fwd+bwd" and r["extra_mem_bytes"] is not None:
                        line += f", extra memory {r['extra_mem_bytes'] / 2**20:.0f} MiB"
                    out.append(line)
            k0, kk = find("stats_fwd", impl, v), find("stats_fwd", impl, v, k_top)
            if k_top and k0 and kk and k0["ms"] and kk["ms"]:
                x = kk["ms"] / k0["ms"]
                out.append(
                    f"{'PASS' if x <= 1.10 else 'FAIL'} bar V={v} top-{k_top} {impl} <= 1.10x k=0: {x:.2f}x"
                )
        cce = find("ce_fwd", "cce", v)
        for impl in ("chunked", "fused"):
            ours = find("ce_fwd", impl, v)
            if not (ours and cce and ours["ms"] and cce["ms"]):
                continue
            x = cce["ms"] / ours["ms"]
            verdict = "PASS" if x >= 1.25 else "FAIL"
            out.append(f"{verdict} bar V={v} ce_fwd {impl} >= 1.25x faster than cce: {x:.2f}x "
                       f"({ours['ms']:.3f} vs {cce['ms']:.3f} ms)")  # fmt: skip
            m_o, m_c = ours["extra_mem_bytes"], cce["extra_mem_bytes"]
            if m_o is not None and m_c is not None:
                verdict = "PASS" if m_o <= m_c else "FAIL"
                out.append(f"{verdict} bar V={v} ce_fwd {impl} extra memory <= cce's: "
                           f"{m_o / 2**20:.2f} vs {m_c / 2**20:.2f} MiB")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------
# (3) Tensor parallel: per-rank forward + backward in a process group (under torchrun)
# ------------------------------------------------------------------------------------------------


def _liger_tp_reason(device) -> str:
    """Why Liger's tensor-parallel fused linear cross-entropy is not timed here."""
    lt, reason = C.find_liger(device)
    if lt is None:
        return reason
    try:  # Liger 0.8.5: a CUTLASS + NVSHMEM kernel in a separate native package
        from liger_kernel.ops.cute import fused_linear_scaled_cross_entropy_tp as tp_ce
    except ImportError:
        return "this liger_kernel has no tensor-parallel fused linear cross-entropy"
    # Its adapter (LigerFusedLinearScaledCrossEntropyNativeTPFunction) says node-local TP uses NVLink
    # multicast (NVLS), which these GPU machines keep off (NVSHMEM_DISABLE_NVLS=1 and the like: a
    # program using it can take the host's shared GPUs out of service), so it is not run here.
    nvls = ("its node-local TP uses NVLink multicast (NVLS), which stays off on the GPU machines this "
            "benchmark runs on (NCCL_NVLS_ENABLE=0, NVSHMEM_DISABLE_NVLS=1)")  # fmt: skip
    if not tp_ce.is_available():
        return (
            "Liger's tensor-parallel fused linear cross-entropy (liger_kernel.ops.cute) needs its native "
            f"package liger-cute-kernels (CUTLASS + NVSHMEM), which is not installed; and {nvls}"
        )
    return f"liger-cute-kernels is installed, but {nvls}"


def tp_main(args) -> int:
    """(3): every rank holds V_shard = shard_sizes(V, TP)[rank] rows of the head and runs
    ``linear_cross_entropy`` forward + backward (gradients of hidden and its weight slice) in the
    group. Checked against one process's unsplit computation on each rank; timed turn by turn
    with what sets its floor (``C.time_interleaved`` with the group: the same calls in the same
    orders on every rank, CUDA events, the max over the ranks of each rank's median): 3 x the
    rank's own matmul, plus the collectives: the fp32 [N, H] all-reduce of grad_hidden, and the
    all-gathers of the partials (the eager forward: one per block of rows)."""
    import torch.distributed as dist

    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n, h = args.n or (8192 if cuda else 64), args.h or (4096 if cuda else 48)
    meta = C.run_meta(device, bench="linear_tp", world_size=world, preset="default")
    run = Run(args, device, meta, f"bench_linear_tp{world}") if rank == 0 else None
    say = C.log if rank == 0 else (lambda *a, **kw: None)
    t0 = time.perf_counter()
    say(f"== bench_linear --tp | TP={world} | {meta['gpu']} | torch {meta['torch']} | {meta['commit']}")
    say(f"  skip liger (TP): {_liger_tp_reason(device)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    checks, bar_lines = [], []
    for v in args.v or ([128256] if cuda else [257]):
        _tp_shape(args, run, say, device, n, h, v, checks, bar_lines)
        C.empty_cache(device)
    failed = [c for c in checks if not c[1]]
    if run is not None:
        run.close()
        lines = ["", f"== bench_linear --tp: TP={world} N={n} H={h} bf16 on {meta['gpu']} "
                 f"({time.perf_counter() - t0:.0f} s)", table(run.rows), "", *bar_lines,
                 f"checks: {len(checks) - len(failed)} PASS, {len(failed)} FAIL",
                 "PASS all checks" if not failed else "FAIL", f"csv: {run.path}"]  # fmt: skip
        C.write_report(lines, run.path)
    dist.destroy_process_group()
    return 1 if failed else 0


def _tp_shape(args, run, say, device, n: int, h: int, v: int, checks: list, bar_lines: list) -> None:
    """(3) at one vocabulary size: the checks (appended to ``checks``, the same on every rank),
    the timings (rank 0's ``run`` rows) and the bar lines."""
    import torch.distributed as dist

    from shardsoftmax.nn import shard_sizes

    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    cuda = C.is_cuda(device)
    iters, warmup = args.iters or (15 if cuda else 2), 3 if cuda else 1
    widths = shard_sizes(v, world)
    cols = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
    hidden, weight, _, target = make_inputs(n, h, v, torch.bfloat16, device, seed=args.seed, ignore_frac=0.0,
                                            scale=3.0)  # fmt: skip
    w_shard = weight[cols].contiguous()
    h_req, w_req = hidden.detach().requires_grad_(True), w_shard.detach().requires_grad_(True)

    def fwd_bwd(impl):
        # vocab_size (the true vocabulary, known to a TP head) also sizes the eager blocks alike on
        # every rank (``linear.eager_max_width``)
        loss = ss.linear_cross_entropy(h_req, w_req, target, vocab_size=v, process_group=group, impl=impl)
        return (loss, *torch.autograd.grad(loss, (h_req, w_req)))

    # the check: one process's unsplit computation (eager), on every rank
    h1, w1 = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss1 = ss.linear_cross_entropy(h1, w1, target)
    ref = (loss1.detach().float(), *torch.autograd.grad(loss1, (h1, w1)))
    ok_impl = {}
    for impl in ("chunked", "recompute"):
        loss, g_h, g_w = fwd_bwd(impl)
        e_loss = normwise(loss.detach().float(), ref[0])
        e_g = max(normwise(g_h, ref[1]), normwise(g_w, ref[2][cols]))
        ok = e_loss <= UNFUSED_LOSS_TOL and e_g <= 2 * GRAD_TOL
        all_ok = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        dist.all_reduce(all_ok, op=dist.ReduceOp.MIN, group=group)
        ok_impl[impl] = bool(all_ok.item())
        what = f"TP={world} V={v} {impl} vs one process (every rank)"
        detail = (
            f"rank 0: loss {e_loss:.1e} (tol {UNFUSED_LOSS_TOL:g}), grads {e_g:.1e} (tol {2 * GRAD_TOL:g})"
        )
        checks.append((what, ok_impl[impl], detail))
        say(f"  {'PASS' if ok_impl[impl] else 'FAIL'} {what}: {detail}")
    del h1, w1, loss1, ref, loss, g_h, g_w, weight
    C.empty_cache(device)

    # floors: the rank's own matmul, the all-reduce of fp32 grad_hidden, one block's all-gather;
    # timed turn by turn with the two impls (C.time_interleaved, the max over the ranks), after
    # each impl's extra memory (one call; an impl that runs out of memory on any rank is not timed;
    # an OOM inside the call's own collectives still stalls the other ranks until the group's timeout)
    grad32 = torch.zeros(n, h, dtype=torch.float32, device=device)
    # the eager forward's blocks, as it sizes them (vocab_size given, see fwd_bwd)
    max_width = ss_linear.eager_max_width(w_shard.shape[0], v, group)
    rows, blocks = ss_linear.eager_blocks(n, max_width, hidden.element_size())
    send = torch.zeros(32 + 7 * rows, dtype=torch.int32, device=device)  # header + a block's stats
    gathered = torch.empty(world * send.numel(), dtype=torch.int32, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (torch 2.12 name)
    fns = {
        "matmul": lambda: hidden @ w_shard.T,
        "all_reduce": lambda: dist.all_reduce(grad32, group=group),
        "all_gather": lambda: gather(gathered, send, group=group),
    }
    mems = {}
    for impl in ("chunked", "recompute"):
        try:
            mems[impl] = C.extra_peak_memory(lambda impl=impl: fwd_bwd(impl), device, (hidden, w_shard))
            fits = 1
        except C.OOM:
            C.empty_cache(device)
            fits = 0
        fits_all = torch.tensor([fits], dtype=torch.int32, device=device)
        dist.all_reduce(fits_all, op=dist.ReduceOp.MIN, group=group)
        if fits_all.item():
            fns[impl] = lambda impl=impl: fwd_bwd(impl)
    with C.ClockLog(device) as clocks:
        times = C.time_interleaved(fns, device, cycles=iters, heat_cycles=warmup, group=group)
    say(f"  (timed turn by turn, max over ranks; rank 0's GPU: {clocks.summary() or 'clocks not sampled'})")
    mm_ms, ar_ms, ag_ms = times["matmul"], times["all_reduce"], times["all_gather"]
    for impl, n_gathers in (("chunked", len(blocks)), ("recompute", 1)):
        ms, mem = times.get(impl), mems.get(impl)
        coll = ar_ms + n_gathers * ag_ms
        floor = 3 * mm_ms + coll
        note = (f"TP={world} V={v}: floor 3 x {mm_ms:.3f} ms matmul + {coll:.3f} ms collectives (all-reduce "
                f"{ar_ms:.3f} ms, {n_gathers} all-gather(s) {ag_ms:.3f} ms each)")  # fmt: skip
        if run is not None:
            check = "PASS" if ok_impl[impl] else "FAIL"
            flops = 6.0 * n * h * widths[0]  # rank 0's shard, the widest (times: the slowest rank's)
            run.row("tp_fwd+bwd", impl, n, h, widths[0], 0, ms, flops, floor, mem, check, note)
            say(f"    {note}")
        if ms is not None:
            x = (ms - coll) / (3 * mm_ms)
            verdict = "PASS" if x <= 1.25 else "FAIL"
            what = f"{impl} (eager)" if impl == "chunked" else impl
            bar_lines.append(f"{verdict} bar TP={world} V={v} fwd+bwd {what} <= 1.25x 3 matmuls + "
                             f"collectives: {x:.2f}x ({ms:.3f} ms, floor {floor:.3f} ms)")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tp:
        return tp_main(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = C.is_cuda(device)
    meta = C.run_meta(device, bench="linear", world_size=1, preset="default")
    n = args.n or (8192 if cuda else 64)
    h = args.h or (4096 if cuda else 48)
    vs = args.v or ([32064, 128256] if cuda else [100, 257])
    k_top = args.k if args.k is not None else (50 if cuda else 3)  # k <= V / 32: fast interpreted top-k
    run = Run(args, device, meta)
    t0 = time.perf_counter()
    C.log(
        f"== bench_linear | {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']}"
        f" | commit {meta['commit']}"
    )
    C.log(f"   backend: {'triton' if ss.backend.uses_triton(torch.empty(0, device=device)) else 'torch'}")
    if not args.skip_checks:
        C.log("(1) checks, bf16 inputs: chunked vs bf16 torch matmul, fused vs float32 + the unfused API")
        smooth = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}
        shapes = [  # (N, H, V_shard, bias, vocab_size, options, chunk columns, eager rows per block)
            # 5 chunks, the last with 904 real columns; 3 eager blocks of 334 rows, the last padded
            (1000, 1000, 5003, True, 5000, smooth, 1024, 384),
            (4096, 4096, 32064, False, None, {}, None, None),  # the defaults: 2 chunks, 1 block
            (3, 512, 1000, True, None, {"temperature": 0.7}, None, None),
        ]
        if not cuda:  # 4 chunks, the last with 3 real columns; 3 blocks of 13 rows, the last padded
            shapes = [(37, 40, 101, True, 99, smooth, 32, 13)]
        from shardsoftmax.kernels import linear as kernels_linear

        tune, kernels_linear.AUTOTUNE = kernels_linear.AUTOTUNE, False  # fewer compiles: first configs
        try:
            run_checks(device, torch.bfloat16, shapes, run.report)
        finally:
            kernels_linear.AUTOTUNE = tune
        C.log(f"   checks took {time.perf_counter() - t0:.0f} s")
        if cuda:
            how = ss_linear.ADDMM_WAYS[ss_linear._addmm_way[0]]
            C.log(f"   fp32 accumulators (recompute's grad_hidden, eager grad_weight) summed with {how}")
    C.log(f"(2) timings: N={n} H={h} bf16, floors from the bf16 matmul rate of this run")
    peers = _peers(args.no_peers)
    for v in vs:
        time_shape(run, n, h, v, k_top, peers)
        C.empty_cache(device)
    run.close()
    failed = [c for c in run.checks if not c[1]]
    lines = ["", f"== bench_linear: N={n} H={h} bf16 on {meta['gpu']} ({time.perf_counter() - t0:.0f} s)",
             table(run.rows), "", *bars(run.rows, k_top),
             f"checks: {len(run.checks) - len(failed)} PASS, {len(failed)} FAIL",
             *(f"  FAIL {w}: {d}" for w, d in ((c[0], c[2]) for c in failed)),
             "PASS all checks" if not failed else "FAIL", f"csv: {run.path}"]  # fmt: skip
    C.write_report(lines, run.path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

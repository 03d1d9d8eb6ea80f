"""Multi-process tests: every rank passes its contiguous vocabulary shard and must get the exact
global results (float64 oracle on the full logits), identical on every rank, from ONE collective.

Tiers (one suite):

* CPU: gloo, world sizes 1-4 and 8, with the PyTorch backend (all cases, V up to 50257) and with the
  Triton kernels in the interpreter (small V: the interpreter costs seconds per call at large V).
* GPU: NCCL on 2 and 4 GPUs (compiled Triton, one GPU per rank), skipped where there are fewer.

Each ``run_ranks`` call starts a fresh process group on a free port (tests/dist_utils.py); each
batch runs many checks because starting processes costs seconds. Children collect failures
instead of raising at the first one, so every rank still makes the same collectives and the report
lists them all.

Tolerance rule: a low-precision result passes when its max error against the float64 oracle is at
most 4x the error of PyTorch's own computation at that precision plus 4 ulps of the largest value.
Top-k ids are compared exactly (tie-break: the lower global id wins).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import shardsoftmax as ss
from shardsoftmax import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import calls_that_sync, count_collectives, run_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Cases: built from a seed, identical on every rank.
# ------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    name: str
    n_rows: int
    n_cols: int  # columns over all shards, padding included
    k: int
    seed: int
    vocab_size: int | None = None  # true vocabulary; None: every column is real
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float = 1.0
    softcap: float | None = None
    ties: bool = False  # quantized logits and equal maxima on both sides of every shard boundary
    neg_inf: bool = False  # some -inf logits, including at shard boundaries
    widths: dict | None = None  # {world_size: shard widths}; default: even split, first ranks +1
    dtype: torch.dtype = torch.float32


def even_widths(n_cols: int, world_size: int) -> list[int]:
    base, extra = divmod(n_cols, world_size)
    return [base + (r < extra) for r in range(world_size)]


def widths_of(case: Case, world_size: int) -> list[int]:
    if case.widths is not None and world_size in case.widths:
        return list(case.widths[world_size])
    return even_widths(case.n_cols, world_size)


def boundaries(case: Case) -> list[int]:
    out = set()
    for w in (2, 3, 4, 8):
        ws = widths_of(case, w)
        out.update(sum(ws[:r]) for r in range(1, w))
    return sorted(b for b in out if 0 < b < case.n_cols)


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits [N, n_cols] in ``case.dtype`` and targets [N] (about 25% ``ignore_index``)."""
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.n_rows, case.n_cols, generator=g, dtype=torch.float64) * 3
    if case.ties:
        x = torch.round(x * 2) / 2  # many exact ties everywhere
        top = x.max() + 1
        for i, b in enumerate(boundaries(case)):
            rows = slice(None) if i % 2 == 0 else slice(0, None, 2)
            x[rows, b - 1] = top  # equal maxima straddling the boundary: b-1 must come first
            x[rows, b] = top
            x[1::2, b + 1 if b + 1 < case.n_cols else b - 2] = top - 0.5
    if case.neg_inf:
        x[0, : case.n_cols // 3] = float("-inf")
        for b in boundaries(case):
            x[-1, b] = float("-inf")
    vocab = case.vocab_size or case.n_cols
    t = torch.randint(0, vocab, (case.n_rows,), generator=g)
    ignored = torch.rand(case.n_rows, generator=g) < 0.25
    t[ignored] = case.ignore_index
    if case.neg_inf:  # keep the targets off the -inf logits (their loss would be +inf)
        third = case.n_cols // 3
        if not third <= t[0] < vocab:  # row 0 always counts: its -inf logits get a 0 gradient
            t[0] = third + abs(int(t[0])) % (vocab - third)
        t[-1] = case.ignore_index if int(t[-1]) in boundaries(case) else t[-1]
    return x.to(case.dtype), t


TORCH_CASES = [
    Case("uneven-ignored", 37, 1003, k=33, seed=1, neg_inf=True),
    Case(
        "padded-smooth-z",
        19,
        1024,
        k=65,
        seed=2,
        vocab_size=600,
        ignore_index=5,
        label_smoothing=0.1,
        z_loss=1e-3,
    ),
    Case("softcap-temperature", 11, 1003, k=64, seed=3, softcap=5.0, temperature=0.7, z_loss=1e-4),
    Case("ties", 8, 1003, k=31, seed=4, ties=True),
    Case(
        "irregular-bf16",
        5,
        1003,
        k=63,
        seed=5,
        label_smoothing=0.2,
        dtype=torch.bfloat16,
        widths={2: (1, 1002), 3: (1000, 2, 1), 4: (1, 500, 2, 500)},
    ),
    Case("tiny", 1, 7, k=5, seed=6),
    Case("vocab-50257", 3, 50257, k=64, seed=7),
]

# The Triton interpreter runs each kernel program in Python, and its top-k costs about a second
# per call at k=5 (growing fast with k): keep V <= 1003, N and k small. k=5 in "ties" still
# straddles boundaries: the 10 equal maxima sit on both sides of 5 boundaries; the lower 5 ids win.
TRITON_CASES = [
    Case("uneven-ignored", 4, 1003, k=5, seed=11, neg_inf=True),
    Case(
        "padded-smooth-z-softcap",
        3,
        256,
        k=3,
        seed=12,
        vocab_size=150,
        label_smoothing=0.1,
        z_loss=1e-3,
        softcap=4.0,
        temperature=0.9,
    ),
    Case("ties", 3, 97, k=5, seed=13, ties=True),
    Case("tiny", 1, 7, k=5, seed=14),
    # bf16 logits: the top-k crosses the group packed (collective.packs_topk), written so by the kernel
    Case("bf16-ties", 3, 97, k=5, seed=15, ties=True, neg_inf=True, dtype=torch.bfloat16),
]


# ------------------------------------------------------------------------------------------------
# Checks (run inside each rank)
# ------------------------------------------------------------------------------------------------


class Checker:
    """Collects failures instead of raising, so every rank keeps making the same collectives."""

    def __init__(self, where: str):
        self.where = where
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.failures.append(f"{self.where}: {what}")

    def true(self, name: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.fail(f"{name} {detail}")

    def exact(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        got = got.detach().cpu()
        if got.shape != want.shape or not torch.equal(got, want):
            diff = (got != want).nonzero()[:5].tolist() if got.shape == want.shape else "shape"
            head = f"got {got.tolist()[:2]}, want {want.tolist()[:2]}"
            self.fail(f"{name}: not equal (first differences at {diff}); {head}")

    def close(
        self, name: str, got: torch.Tensor, want64: torch.Tensor, ref_low: torch.Tensor, scale=None
    ) -> None:
        """``got`` vs the float64 oracle, allowed 4x PyTorch's own error (``ref_low``) + 4 ulps of
        ``scale`` (default: the largest expected value)."""
        got = got.detach().cpu().double()
        want = want64.detach().double()
        ref = ref_low.detach().cpu().double()
        if got.shape != want.shape:
            self.fail(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        nonfinite = ~torch.isfinite(want)
        same_nonfinite = torch.equal(nonfinite, ~torch.isfinite(got)) and torch.equal(
            got[nonfinite].nan_to_num(nan=7.0), want[nonfinite].nan_to_num(nan=7.0)
        )
        if not same_nonfinite:
            self.fail(f"{name}: non-finite entries (inf/NaN) differ from the oracle")
            return
        fin = ~nonfinite
        if not fin.any():
            return
        err = (got[fin] - want[fin]).abs().max().item()
        torch_err = (ref[fin] - want[fin]).abs().max().item()
        eps = torch.finfo(ref_low.dtype if ref_low.dtype.is_floating_point else torch.float32).eps
        scale = want[fin].abs().max().item() if scale is None else scale
        tol = 4 * torch_err + 4 * eps * scale
        if not err <= tol:
            self.fail(
                f"{name}: max error {err:.3g} > tolerance {tol:.3g} (PyTorch's own error {torch_err:.3g})"
            )


def oracle(case: Case, x_low: torch.Tensor, t: torch.Tensor, *, dtype_ref: bool) -> dict:
    """Every expected quantity from the full logits: in float64 (``dtype_ref=False``) or as
    PyTorch computes it at the logits' precision (``dtype_ref=True``)."""
    x = x_low if dtype_ref else x_low.double()
    tf = {"temperature": case.temperature, "softcap": case.softcap}
    vocab = case.vocab_size or case.n_cols
    out = R.oracle_stats(x, t, k=case.k, ignore_index=case.ignore_index, vocab_size=case.vocab_size, **tf)
    xt = R.transform(x, case.softcap, case.temperature)[:, :vocab]
    out["topk_vals"] = xt.gather(1, out["topk_ids"])
    lsm = R.oracle_log_softmax(x, vocab_size=case.vocab_size, **tf)
    out["log_softmax"] = lsm.to(x_low.dtype) if dtype_ref else lsm
    out["softmax"] = lsm.exp().to(x_low.dtype) if dtype_ref else lsm.exp()
    ce = {"ignore_index": case.ignore_index, "label_smoothing": case.label_smoothing, "z_loss": case.z_loss}
    out["ce_none"] = R.oracle_cross_entropy(x, t, reduction="none", vocab_size=case.vocab_size, **ce, **tf)
    xg = x.detach().clone().requires_grad_()
    loss = R.oracle_cross_entropy(xg, t, reduction="mean", vocab_size=case.vocab_size, **ce, **tf)
    loss.backward()
    out["ce_mean"], out["grad"] = loss.detach(), xg.grad
    return out


def check_case(
    ck: Checker, case: Case, x: torch.Tensor, t: torch.Tensor, start: int, width: int, group, device
):
    """All ops on this rank's shard vs the oracle. Returns this rank's results (for cross-rank and
    cross-world-size comparisons)."""
    o64 = oracle(case, x, t, dtype_ref=False)
    olow = oracle(case, x, t, dtype_ref=True)
    cols = slice(start, start + width)
    shard = x[:, cols].contiguous().to(device)
    td = t.to(device)
    tf = {"temperature": case.temperature, "softcap": case.softcap}
    lay = {"vocab_size": case.vocab_size, "process_group": group}
    ce = {"ignore_index": case.ignore_index, "label_smoothing": case.label_smoothing, "z_loss": case.z_loss}
    res = {}

    st = ss.softmax_stats(shard, td, k=case.k, ignore_index=case.ignore_index, **tf, **lay)
    # entropy = lse - E_p[x]: its rounding error scales with |lse|, not with the entropy itself
    lse_scale = o64["lse"][torch.isfinite(o64["lse"])].abs().max().item()
    for f in ("lse", "max", "entropy", "target_logprob", "topk_logprobs"):
        ck.close(f"stats.{f}", getattr(st, f), o64[f], olow[f], lse_scale if f == "entropy" else None)
        res[f] = getattr(st, f).cpu()
    ck.exact("stats.topk_ids", st.topk_ids, o64["topk_ids"])
    res["topk_ids"] = st.topk_ids.cpu()

    vals, ids = ss.topk(shard, case.k, **tf, **lay)
    ck.exact("topk.ids", ids, o64["topk_ids"])
    ck.close("topk.values", vals, o64["topk_vals"], olow["topk_vals"])
    res["topk_vals"] = vals.cpu()

    for name in ("softmax", "log_softmax"):
        out = getattr(ss, name)(shard, **tf, **lay)
        ck.true(f"{name}.dtype", out.dtype == case.dtype, f"{out.dtype} != {case.dtype}")
        ck.close(name, out, o64[name][:, cols], olow[name][:, cols])
        res[name] = out.cpu()

    rows = ss.cross_entropy(shard, td, reduction="none", **ce, **tf, **lay)
    ck.close("ce.none", rows, o64["ce_none"], olow["ce_none"])
    res["ce_none"] = rows.detach().cpu()

    xs = shard.clone().requires_grad_()
    loss = ss.cross_entropy(xs, td, reduction="mean", **ce, **tf, **lay)
    loss.backward()
    ck.close("ce.mean", loss, o64["ce_mean"], olow["ce_mean"])
    # d loss / d x = (p - onehot) / rows with p = exp(x - lse): an lse within a few ulps of |lse|
    # (the stats.lse check above) moves p by that many ulps times |lse|, relative
    grad_scale = o64["grad"].abs().max().item() * max(1.0, lse_scale)
    ck.close("ce.grad", xs.grad, o64["grad"][:, cols], olow["grad"][:, cols], grad_scale)
    vocab = case.vocab_size or case.n_cols
    n_real = max(0, min(width, vocab - start))
    ck.true("ce.grad padding", bool((xs.grad[:, n_real:] == 0).all()), "padding columns must get 0 gradient")
    res["ce_mean"] = loss.detach().cpu()
    res["grad"] = xs.grad.cpu()
    return res


def check_collective_counts(ck: Checker, case: Case, x, t, start, width, group, device) -> None:
    """Steady state (second call with the same shapes): exactly one collective per forward call;
    none in the cross-entropy backward."""
    shard = x[:, start : start + width].contiguous().to(device)
    td = t.to(device)
    tf = {"temperature": case.temperature, "softcap": case.softcap}
    lay = {"vocab_size": case.vocab_size, "process_group": group}
    calls = {
        "softmax_stats": lambda: ss.softmax_stats(shard, td, k=case.k, **tf, **lay),
        "topk": lambda: ss.topk(shard, case.k, **tf, **lay),
        "softmax": lambda: ss.softmax(shard, **tf, **lay),
        "log_softmax": lambda: ss.log_softmax(shard, **tf, **lay),
    }
    with count_collectives() as counts:
        for name, call in calls.items():
            call()  # may agree a new layout first (two collectives, this call only)
            counts.clear()
            call()
            ck.true(f"collectives in {name}", sum(counts.values()) == 1, f"expected 1, got {dict(counts)}")
        xs = shard.clone().requires_grad_()
        ss.cross_entropy(xs, td, **tf, **lay).backward()
        counts.clear()
        loss = ss.cross_entropy(xs, td, **tf, **lay)
        ck.true("collectives in cross_entropy forward", sum(counts.values()) == 1, f"got {dict(counts)}")
        counts.clear()
        loss.backward()
        ck.true("collectives in cross_entropy backward", sum(counts.values()) == 0, f"got {dict(counts)}")


def suite_rank(ctx, cases: list[Case], backend: str) -> dict:
    """One rank of the suite: every case's checks, collective counts, and (world size 1) the
    no-group path against the group-of-one path."""
    ss.set_backend(backend)
    ck = Checker(f"rank {ctx.rank}/{ctx.world_size} [{backend}]")
    results = {}
    for case in cases:
        ck.where = f"rank {ctx.rank}/{ctx.world_size} [{backend}] case {case.name}"
        x, t = make_inputs(case)
        widths = widths_of(case, ctx.world_size)
        start, width = sum(widths[: ctx.rank]), widths[ctx.rank]
        results[case.name] = check_case(ck, case, x, t, start, width, ctx.group, ctx.device)
        if ctx.world_size == 1:
            alone = check_case(ck, case, x, t, start, width, None, ctx.device)
            for key, val in alone.items():
                ck.true(
                    f"no group vs group of one: {key}", torch.equal(val, results[case.name][key]), "differ"
                )
    if backend == "triton":  # the count is the math layer's, the same for both backends
        return {"failures": ck.failures, "results": results}
    case = cases[0]
    ck.where = f"rank {ctx.rank}/{ctx.world_size} [{backend}] collective counts"
    x, t = make_inputs(case)
    widths = widths_of(case, ctx.world_size)
    check_collective_counts(ck, case, x, t, sum(widths[: ctx.rank]), widths[ctx.rank], ctx.group, ctx.device)
    return {"failures": ck.failures, "results": results}


# ------------------------------------------------------------------------------------------------
# Rank-mismatch errors: every rank must raise (no hang) and the group must keep working.
# ------------------------------------------------------------------------------------------------

ERR_CASE = Case("errors", 5, 61, k=3, seed=21)


def errors_rank(ctx, backend: str, defer: bool = False) -> dict:
    """Each entry: a call where the ranks disagree or one rank's input is invalid; every rank
    records (exception type, message), then a correct call must still give exact results.

    ``defer``: the header check of the fast path runs as on a CUDA device (forced on the CPU): a
    rank whose own call was valid may return, with every result NaN or id -1 (checked here), and
    raise at ``ss.synchronize``. On CUDA that is the default; on the CPU the check is immediate."""
    from shardsoftmax import collective

    collective.DEFER_ON_CPU = defer
    ss.set_backend(backend)
    rank, g = ctx.rank, ctx.group
    x, t = make_inputs(ERR_CASE)
    widths = widths_of(ERR_CASE, ctx.world_size)
    start = sum(widths[:rank])
    shard = x[:, start : start + widths[rank]].contiguous().to(ctx.device)
    td = t.to(ctx.device)
    o64 = oracle(ERR_CASE, x, t, dtype_ref=False)
    olow = oracle(ERR_CASE, x, t, dtype_ref=True)
    ck = Checker(f"rank {rank}/{ctx.world_size}")
    bad = {
        # first: before any successful call (no agreed layout yet)
        "rows": lambda: ss.softmax_stats(shard[:-1] if rank == 1 else shard, k=3, process_group=g),
        "dtype": lambda: ss.softmax_stats(
            shard.double() if rank == 2 % ctx.world_size else shard, process_group=g
        ),
        "k": lambda: ss.softmax_stats(shard, k=4 if rank == 0 else 3, process_group=g),
        "target shape": lambda: ss.cross_entropy(shard, td[:-1] if rank == 1 else td, process_group=g),
        "negative k": lambda: ss.topk(shard, -1 if rank == ctx.world_size - 1 else 3, process_group=g),
        "target dtype": lambda: ss.softmax_stats(shard, td.float() if rank == 0 else td, process_group=g),
        "temperature": lambda: ss.softmax_stats(
            shard, temperature=2.0 if rank == 0 else 1.0, process_group=g
        ),
        "operation": lambda: (ss.softmax if rank == 0 else ss.log_softmax)(shard, process_group=g),
        "k > vocabulary": lambda: ss.topk(shard, 100, process_group=g),
        "vocab_start on some ranks": lambda: ss.softmax_stats(
            shard, vocab_start=start if rank == 0 else None, process_group=g
        ),
        "label_smoothing": lambda: ss.cross_entropy(
            shard, td, label_smoothing=0.1 if rank == 1 else 0.0, process_group=g
        ),
        "temperature of the wrong type": lambda: ss.softmax_stats(
            shard, temperature="hot" if rank == 0 else 1.0, process_group=g
        ),
        # steady state: the other ranks repeat the agreed call (the fast path, which does not
        # exchange again), one rank does not
        "steady rows": lambda: ss.softmax_stats(
            *((shard[:-1], td[:-1]) if rank == 1 else (shard, td)), k=3, process_group=g
        ),
        "steady dtype": lambda: ss.softmax_stats(
            shard.double() if rank == ctx.world_size - 1 else shard, td, k=3, process_group=g
        ),
        "steady target shape": lambda: ss.softmax_stats(
            shard, td[:-1] if rank == 1 else td, k=3, process_group=g
        ),
        "steady temperature": lambda: ss.softmax_stats(
            shard, td, k=3, temperature=0.5 if rank == 0 else 1.0, process_group=g
        ),
        "steady shard width": lambda: ss.softmax_stats(
            shard[:, :-1] if rank == 1 else shard, td, k=3, process_group=g
        ),
        "steady wire format": lambda: _with_packing(
            rank != 0, ss.softmax_stats, shard, td, k=3, process_group=g
        ),
    }
    out = {}
    for name, call in bad.items():
        ck.where = f"rank {rank}/{ctx.world_size} after '{name}'"
        try:
            res = call()
            _check_poisoned(ck, name, res)
            ss.synchronize(g)
            out[name] = None
        except Exception as err:  # noqa: BLE001 - the test inspects the type and message
            out[name] = (type(err).__name__, str(err))
        st = ss.softmax_stats(shard, td, k=3, process_group=g)  # the group must still work
        ck.close("lse", st.lse, o64["lse"], olow["lse"])
        ck.exact("topk_ids", st.topk_ids, o64["topk_ids"])
    return {"failures": ck.failures, "errors": out}


def _with_packing(allowed: bool, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with this rank's ``collective.PACK_TOPK`` (SHARDSOFTMAX_PACK_TOPK)
    set to ``allowed``, then restored."""
    from shardsoftmax import collective

    saved = collective.PACK_TOPK
    collective.PACK_TOPK = allowed
    try:
        return fn(*args, **kwargs)
    finally:
        collective.PACK_TOPK = saved


def _check_poisoned(ck, name: str, res) -> None:
    """A call that returned although the ranks disagreed (deferred check) must give no usable
    number: every float NaN, every id -1."""
    fields = (
        zip(res._fields, res)
        if hasattr(res, "_fields")
        else enumerate(res if isinstance(res, tuple) else (res,))
    )
    for field, t in fields:
        if t is None or field == "target_logprob":  # 0.0 where the target is ignored, by definition
            continue
        bad = (t != -1).any() if not t.is_floating_point() else (~t.isnan()).any()
        if bool(bad):
            ck.failures.append(f"{ck.where}: '{name}' returned numbers that are not NaN / -1")


# Expected message fragments: (on the rank whose input is bad, on the others); one string: all ranks.
EXPECTED_ERRORS = {
    "rows": "ranks disagree on number of rows",
    "dtype": "ranks disagree on logits dtype",
    "k": "ranks disagree on k",
    "target shape": ("target must have shape", "rank 1 rejected its input"),
    "negative k": ("k must be >= 0", "rejected its input"),
    "target dtype": ("target must have an integer dtype", "rank 0 rejected its input"),
    "temperature": "ranks disagree on temperature",
    "operation": "ranks disagree on operation",
    "k > vocabulary": "larger than the vocabulary",
    "vocab_start on some ranks": "vocab_start must be given on every rank or on none",
    "label_smoothing": "ranks disagree on label_smoothing: rank 0 has 0.0, rank 1 has 0.1",
    "temperature of the wrong type": ("temperature must be a positive number", "rank 0 rejected its input"),
}
EXPECTED_ERRORS.update(
    {
        "steady rows": "ranks disagree on number of rows (tokens): rank 0 has 5, rank 1 has 4",
        "steady dtype": "ranks disagree on logits dtype",
        "steady target shape": ("target must have shape", "rank 1 rejected its input"),
        "steady temperature": "ranks disagree on temperature: rank 0 has 0.5, rank 1 has 1.0",
        "steady shard width": "rank(s) [1] changed their shard width in a call where the other ranks did not",
        "steady wire format": "rank(s) [0] changed their top-k wire format (SHARDSOFTMAX_PACK_TOPK",
    }
)
BAD_RANK = {
    "target shape": 1,
    "target dtype": 0,
    "temperature of the wrong type": 0,
    "steady target shape": 1,
}


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

_SUITE_CACHE: dict = {}
TIMEOUT = {"torch": 150, "triton": 200}


def suite(backend: str, world_size: int, dist_backend: str = "gloo") -> list[dict]:
    """Run (once per session) the suite on ``world_size`` ranks; fail with every rank's failures."""
    key = (backend, world_size, dist_backend)
    if key not in _SUITE_CACHE:
        cases = TORCH_CASES if backend in ("torch", "auto") else TRITON_CASES
        _SUITE_CACHE[key] = run_ranks(
            suite_rank, world_size, cases, backend, backend=dist_backend, timeout=TIMEOUT.get(backend, 200)
        )
    out = _SUITE_CACHE[key]
    failures = [f for r in out for f in r["failures"]]
    assert not failures, "\n".join(failures)
    return out


def assert_same_on_every_rank(out: list[dict]) -> None:
    r0 = out[0]["results"]
    for rank, r in enumerate(out[1:], start=1):
        for case, fields in r["results"].items():
            for key, val in fields.items():
                if key in ("softmax", "log_softmax", "grad"):
                    continue  # per-shard outputs
                ref = r0[case][key]
                same = torch.equal(val.nan_to_num(7.0), ref.nan_to_num(7.0)) and val.dtype == ref.dtype
                assert same, f"case {case}: {key} on rank {rank} differs from rank 0"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sharded_ops_match_oracle(backend, world_size):
    """Uneven, irregular and padded shards (a rank entirely padding at 3 and 4), ~25% ignored
    targets, label smoothing over the true vocabulary, z-loss, temperature/softcap, -inf logits,
    entropy, softmax/log_softmax shards, top-k ties across shard boundaries (ids exact), the
    cross-entropy gradient of each shard; exactly one collective per forward call and none in
    backward; identical results on every rank; world size 1: no group == group of one."""
    if backend == "triton" and world_size == 1:
        pytest.skip("the one-process Triton path is covered by the core tests; the group of one by torch")
    if backend == "triton" and world_size == 8:
        pytest.skip("8 interpreter ranks on a 2-core CI machine take minutes; TP=8 runs with torch here")
    out = suite(backend, world_size)
    assert_same_on_every_rank(out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tp_sizes_agree(backend):
    """World sizes 1-4 and 8 (triton: 2-4): same top-k ids; lse within 1e-6 relative (fp32)."""
    sizes = [1, 2, 3, 4, 8] if backend == "torch" else [2, 3, 4]
    by_size = {w: suite(backend, w)[0]["results"] for w in sizes}
    base = by_size[sizes[0]]
    for w in sizes[1:]:
        for case, fields in by_size[w].items():
            assert torch.equal(fields["topk_ids"], base[case]["topk_ids"]), (
                f"{case}: top-k ids differ at TP={w}"
            )
            a, b = fields["lse"].double(), base[case]["lse"].double()
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a))
            rel = ((a[fin] - b[fin]).abs() / b[fin].abs().clamp_min(1.0)).max().item()
            assert rel <= 1e-6, f"{case}: lse differs by {rel:.3g} relative between TP={sizes[0]} and TP={w}"


@pytest.mark.parametrize("world_size", [3])
@pytest.mark.parametrize("defer", [False, True], ids=["in-call", "deferred"])
def test_rank_mismatch_raises_on_every_rank(world_size, defer):
    """Different N / dtype / k / options / op on one rank, one rank with a bad target or k < 0:
    every rank raises a clear error, nothing hangs, and the next correct call works. Deferred (the
    CUDA default): ranks whose own call was valid get NaN / -1 and raise at ``ss.synchronize``."""
    out = run_ranks(errors_rank, world_size, "torch", defer, timeout=120)
    failures = [f for r in out for f in r["failures"]]
    assert not failures, "\n".join(failures)
    for name, expected in EXPECTED_ERRORS.items():
        bad_rank = BAD_RANK.get(name, world_size - 1)
        for rank, r in enumerate(out):
            got = r["errors"][name]
            assert got is not None, f"'{name}': rank {rank} did not raise"
            want = expected if isinstance(expected, str) else expected[0 if rank == bad_rank else 1]
            assert want in got[1], f"'{name}': rank {rank} raised {got[0]}: {got[1]!r}; expected {want!r}"


def _torchrun(n: int, *args: str, env: dict, timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    cmd += ["-m", "shardsoftmax.launch.torchrun", *args]
    # Not from the source tree: there ``shardsoftmax/`` (without its kernels, which live in
    # ``kernels/``) would shadow an installed, non-editable package.
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_torchrun_launcher_selfcheck_cpu():
    """``torchrun --nproc-per-node 2 -m shardsoftmax.launch.torchrun tests`` passes on CPU (gloo).
    The PyTorch backend keeps it quick (the Triton path is covered above); this checks the
    launcher: process group from torchrun's environment, PASS lines, exit status."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    code, log = _torchrun(2, "--backend", "torch", "tests", env=env, timeout=180)
    assert code == 0, log[-6000:]
    for rank in (0, 1):
        assert f"[rank {rank}/2] PASS all" in log, log[-6000:]
    assert " FAIL " not in log, log[-6000:]


# ------------------------------------------------------------------------------------------------
# GPU tier: NCCL, one GPU per rank, compiled Triton kernels.
# ------------------------------------------------------------------------------------------------


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_nccl_suite(world_size):
    """The CPU suite's checks (all cases) with NCCL on ``world_size`` GPUs, plus rank mismatches."""
    if _gpus() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs, found {_gpus()}")
    out = suite("auto", world_size, dist_backend="nccl")
    assert_same_on_every_rank(out)
    errs = run_ranks(errors_rank, world_size, "auto", backend="nccl", timeout=180)
    failures = [f for r in errs for f in r["failures"]]
    assert not failures, "\n".join(failures)
    for name in EXPECTED_ERRORS:
        assert all(r["errors"][name] is not None for r in errs), f"'{name}': some rank did not raise"


def steady_no_sync_rank(ctx) -> list[str]:
    """Steady-state calls on NCCL under ``torch.cuda.set_sync_debug_mode("error")``: any op that
    syncs the host with the GPU raises. Returns the calls that synced."""
    x = torch.randn(64, 1000, device=ctx.device).to(torch.bfloat16)
    t = torch.randint(0, 1000 * ctx.world_size, (64,), device=ctx.device)
    calls = {
        "softmax_stats k=0": lambda: ss.softmax_stats(x, t, process_group=ctx.group),
        "softmax_stats k=8": lambda: ss.softmax_stats(x, t, k=8, process_group=ctx.group),
        "cross_entropy": lambda: ss.cross_entropy(x, t, process_group=ctx.group),
        "log_softmax": lambda: ss.log_softmax(x, process_group=ctx.group),
    }
    return calls_that_sync(calls, ctx.group)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_nccl_steady_state_does_not_sync():
    """With NCCL, a call whose layout the ranks already agreed on never waits for the GPU (the
    header check runs on the device), so the host can run ahead as in a training step."""
    if _gpus() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {_gpus()}")
    synced = [s for r in run_ranks(steady_no_sync_rank, 2, backend="nccl", timeout=180) for s in r]
    assert not synced, "\n".join(synced)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_torchrun_launcher_selfcheck_nccl():
    """The launcher's self-check on 2 GPUs: NCCL, rank r on cuda:r, compiled Triton kernels."""
    if _gpus() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {_gpus()}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NCCL_NVLS_ENABLE"] = "0"
    code, log = _torchrun(2, "tests", env=env, timeout=300)
    assert code == 0, log[-6000:]
    for rank in (0, 1):
        assert f"[rank {rank}/2] PASS all" in log and "nccl, cuda:" in log, log[-6000:]


def float64_rank(ctx) -> list[str]:
    """float64 logits over a group (partials travel as float64: two words each): the same lse,
    entropy and top-k as one process on the whole vocabulary, twice (the second call takes the
    steady-state path)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (6,), generator=g)
    widths = [50 // ctx.world_size + (r < 50 % ctx.world_size) for r in range(ctx.world_size)]
    start = sum(widths[: ctx.rank])
    shard = x[:, start : start + widths[ctx.rank]].contiguous()
    want = ss.softmax_stats(x, t, k=4)
    bad = []
    for call in range(2):
        got = ss.softmax_stats(shard, t, k=4, process_group=ctx.group)
        for f in ("lse", "entropy", "target_logprob", "topk_logprobs"):
            a, b = getattr(got, f), getattr(want, f)
            if a.dtype != torch.float64 or not torch.allclose(a, b):
                bad.append(f"call {call}: {f} {getattr(got, f)} vs {getattr(want, f)}")
        if not torch.equal(got.topk_ids, want.topk_ids):
            bad.append(f"call {call}: topk_ids {got.topk_ids} vs {want.topk_ids}")
    return bad


@pytest.mark.parametrize("world_size", [2, 3])
def test_float64_logits_over_a_group(world_size):
    bad = [b for r in run_ranks(float64_rank, world_size) for b in r]
    assert not bad, "\n".join(bad)


def packed_rank(ctx, backend: str) -> list[str]:
    """bf16 logits with ties across shard boundaries, -inf and a NaN: ``softmax_stats`` and
    ``topk`` exchange their top-k packed (one int32 per entry; the send buffer 4 bytes per entry
    smaller) and give bit for bit what the 8-byte entries give (``PACK_TOPK`` off) and the
    oracle's ids; a steady-state call whose check fails (deferred, as on a GPU) reads the poison
    as NaN / id -1."""
    from shardsoftmax import collective

    ss.set_backend(backend)
    case = Case("packed", 3, 131, k=7, seed=31, ties=True, neg_inf=True, dtype=torch.bfloat16)
    x, t = make_inputs(case)
    x[2, 100] = float("nan")
    widths = widths_of(case, ctx.world_size)
    start = sum(widths[: ctx.rank])
    shard = x[:, start : start + widths[ctx.rank]].contiguous().to(ctx.device)
    want = oracle(case, x, t, dtype_ref=False)["topk_ids"]
    g, key = ctx.group, id(ctx.group)
    bad = []
    runs = {}
    encoded = []  # the host-side packing's calls: none where the kernel writes the words in place
    host_pack = collective.kernels.pack_key16
    collective.kernels.pack_key16 = lambda *a: encoded.append(1) or host_pack(*a)
    for pack in (True, False):
        collective.PACK_TOPK = pack
        # (a call that agrees a new layout then computes as in the steady state: the kernel
        # writes the agreed send buffer)
        st = ss.softmax_stats(shard, k=case.k, process_group=g)
        agreed = collective._agreed[key]
        words = 2 * collective.H + collective.payload_words(torch.float32, case.n_rows, case.k, pack)
        if (agreed.key_base is not None) != pack or agreed.send.numel() != words:
            bad.append(f"pack={pack}: key_base {agreed.key_base}, send {agreed.send.numel()}")
        vals, ids = ss.topk(shard, case.k, process_group=g)
        runs[pack] = (st.lse, st.topk_logprobs, st.topk_ids, vals, ids)
        if not torch.equal(ids.cpu(), want) or not torch.equal(st.topk_ids.cpu(), want):
            bad.append(f"pack={pack}: ids {ids.tolist()} != oracle {want.tolist()}")
    if bool(encoded) != (backend == "torch"):
        bad.append(f"{backend}: packed on the host {len(encoded)} times")
    for a, b in zip(runs[True], runs[False]):
        if not torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)):
            bad.append(f"packed and unpacked results differ: {a.tolist()} vs {b.tolist()}")
    collective.PACK_TOPK = True
    collective.DEFER_ON_CPU = True
    ss.topk(shard, case.k, process_group=g)  # agree the packed layout again
    try:
        vals, ids = ss.topk(shard, case.k, temperature=0.5 if ctx.rank == 0 else 1.0, process_group=g)
        if not (vals.isnan().all() and (ids == -1).all()):
            bad.append(f"a poisoned packed call gave numbers: {vals.tolist()} {ids.tolist()}")
        ss.synchronize(g)
        bad.append("the failed check did not raise")
    except ValueError as err:
        if "temperature" not in str(err):
            bad.append(f"unexpected error {err}")
    collective.DEFER_ON_CPU = False
    return bad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_topk_travels_packed(backend):
    bad = [b for r in run_ranks(packed_rank, 3, backend, timeout=TIMEOUT[backend]) for b in r]
    assert not bad, "\n".join(bad)

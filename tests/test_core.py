"""Single-process results of the public API against float64 ground truth.

Every test runs on each ``core_tier`` (see conftest.py): the Triton kernels in the CPU
interpreter, the PyTorch backend, and the Triton kernels on CUDA where a GPU exists. The
interpreter takes seconds per call at large k or many rows, so tests marked
``core_tiers("cpu-torch", "cuda-triton")`` hold the large sizes.

Accuracy rule: a result passes when its error against ``shardsoftmax.reference.oracle_*`` on the
float64 logits is within a small multiple of the error PyTorch itself makes computing the same
thing in the result's precision (fp32 per-row results: torch's fp32 computation; softmax and
log-softmax in the logits' dtype: torch's fp32 computation rounded to that dtype), plus a floor of
a few fp32 epsilons. Errors are measured relative to the quantity's conditioning (see ``row_scale``).
Top-k ids are compared exactly: value descending, the lower global id first among equal values.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import shardsoftmax as ss
from shardsoftmax import reference as R

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps
FACTOR = 4.0  # allowed multiple of PyTorch's own error
FLOOR = 4 * EPS32  # allowed normalized error when PyTorch's happens to be ~0
LARGE = pytest.mark.core_tiers("cpu-torch", "cuda-triton")
INF = float("inf")
NAN = float("nan")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def make_logits(n: int, v: int, dtype: torch.dtype, *, seed: int, kind: str = "normal") -> torch.Tensor:
    """``normal``: N(0, 3^2) (bf16/fp16 rounding makes ties). ``grid``: the same on a 1/16 grid,
    exact in every dtype, so transforms keep the order and ties are common. ``few``: four distinct
    values, mostly ties."""
    g = torch.Generator().manual_seed(seed)
    if kind == "few":
        x = torch.randint(0, 4, (n, v), generator=g).float() * 0.5 - 1.0
    else:
        x = torch.randn(n, v, generator=g) * 3
        if kind == "grid":
            x = torch.round(x.clamp(-15, 15) * 16) / 16
    return x.to(dtype)


def make_target(n: int, v: int, *, seed: int, ignore_index: int = IGNORE) -> torch.Tensor:
    """Ids in [0, v); every 4th row (3, 7, ...) is ignored: 25% of a long batch."""
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, max(v, 1), (n,), generator=g)
    t[3::4] = ignore_index
    return t


def on(tier, *tensors):
    out = tuple(None if t is None else t.to(tier.device) for t in tensors)
    return out if len(out) > 1 else out[0]


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def row_scale(ref: dict) -> torch.Tensor:
    """Per-row size of the rounding error any fp32 computation of a log-domain quantity makes:
    |lse| + |max| + 1; 1 for rows without a finite lse (their non-finite results are compared
    exactly; what is finite there, such as padding, is exact too)."""
    rs = ref["lse"].abs() + ref["max"].abs() + 1
    return torch.where(rs.isfinite(), rs, torch.ones_like(rs))


def assert_like_torch(ours, ref, baseline, scale, *, what: str, floor: float = FLOOR) -> None:
    """``ref`` float64 truth, ``baseline`` PyTorch's own result in the same precision as ours.
    Where ref is finite: |ours - ref| / scale <= FACTOR * max(|baseline - ref| / scale) + floor.
    Elsewhere ours must match exactly: NaN where NaN, the same infinity."""
    ours = ours.detach().cpu().double()
    ref = ref.detach().cpu().double()
    baseline = baseline.detach().cpu().double()
    scale = torch.as_tensor(scale).cpu().double().expand_as(ref)
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan), (
        f"{what}: NaN pattern differs; ours NaN at {ours.isnan().nonzero().tolist()[:8]}, "
        f"ref NaN at {nan.nonzero().tolist()[:8]}"
    )
    infinite = ref.isinf()
    assert torch.equal(ours[infinite], ref[infinite]), f"{what}: infinities differ"
    finite = ~nan & ~infinite
    if not finite.any():
        return
    err = ((ours - ref).abs() / scale)[finite]
    base = ((baseline - ref).abs() / scale)[finite]
    bound = FACTOR * base.max().item() + floor
    worst = err.argmax()
    assert err.max().item() <= bound, (
        f"{what}: normalized error {err.max().item():.3g} > {bound:.3g} (torch's own max "
        f"{base.max().item():.3g}); ours {ours[finite][worst].item()!r}, ref {ref[finite][worst].item()!r}"
    )


def assert_ids_equal(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ours = ours.cpu()
    assert ours.dtype == torch.int64, f"{what}: dtype {ours.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    bad = (ours != ref).any(dim=-1).nonzero().flatten() if ours.dim() > 1 else (ours != ref).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} rows differ, first row {bad[0].item()}: "
        f"ours {ours[bad[0]][:12].tolist()} ref {ref[bad[0]][:12].tolist()}"
    )


def check_stats(got: ss.SoftmaxStats, x: torch.Tensor, target, *, k: int, what: str = "", **opts) -> None:
    """Every field of ``softmax_stats`` against the float64 oracle on the same logits."""
    x = x.cpu()
    target = None if target is None else target.cpu()
    ref = R.oracle_stats(x.double(), target, k=k, **opts)
    base = R.oracle_stats(x.float(), target, k=k, **opts)
    rs = row_scale(ref)
    want_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name in ("lse", "max", "entropy", "topk_logprobs") + (
        ("target_logprob",) if target is not None else ()
    ):
        field = getattr(got, name)
        assert field.dtype == want_dtype, f"{what} {name}: dtype {field.dtype}, want {want_dtype}"
    assert_ids_equal(got.topk_ids, ref["topk_ids"], f"{what} topk_ids")
    assert_like_torch(got.lse, ref["lse"], base["lse"], rs, what=f"{what} lse")
    assert_like_torch(got.max, ref["max"], base["max"], rs, what=f"{what} max")
    assert_like_torch(got.entropy, ref["entropy"], base["entropy"], rs, what=f"{what} entropy")
    lp_scale = ref["topk_logprobs"].abs() + rs[..., None]
    assert_like_torch(
        got.topk_logprobs, ref["topk_logprobs"], base["topk_logprobs"], lp_scale, what=f"{what} topk_logprobs"
    )
    if target is None:
        assert got.target_logprob is None
    else:
        tl_scale = ref["target_logprob"].abs() + rs
        assert_like_torch(
            got.target_logprob,
            ref["target_logprob"],
            base["target_logprob"],
            tl_scale,
            what=f"{what} target_logprob",
        )
        ignored = target == opts.get("ignore_index", IGNORE)
        assert torch.all(got.target_logprob.cpu()[ignored] == 0), (
            f"{what}: ignored rows must have target_logprob 0"
        )


def check_log_softmax(got: torch.Tensor, x: torch.Tensor, *, log: bool, what: str = "", **opts) -> None:
    """(log-)softmax in the logits' dtype against the float64 oracle; PyTorch's baseline is its
    fp32 computation rounded to that dtype."""
    x = x.cpu()
    assert got.dtype == x.dtype and got.shape == x.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    vocab_size = opts.get("vocab_size")
    ref = R.oracle_log_softmax(x.double(), **opts)
    base = R.oracle_log_softmax(x.float(), **opts).to(x.dtype)
    stats = R.oracle_stats(x.double(), **opts)
    rs = row_scale(stats)[..., None]
    if log:
        assert_like_torch(got, ref, base, ref.abs() + rs, what=f"{what} log_softmax")
    else:
        real = x.shape[-1] if vocab_size is None else vocab_size
        xt = R.transform(x.float(), opts.get("softcap"), opts.get("temperature", 1.0))
        p_base = torch.zeros_like(xt)
        p_base[..., :real] = torch.softmax(xt[..., :real], -1)
        p_ref = ref.exp()
        tiny = torch.finfo(x.dtype).tiny  # below it, errors count in absolute terms
        assert_like_torch(got, p_ref, p_base.to(x.dtype), p_ref * rs + tiny, what=f"{what} softmax")


# ------------------------------------------------------------------------------------------------
# softmax_stats: shapes, dtypes, k
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    n: int
    v: int
    dtype: str
    k: int
    kind: str = "normal"

    def __str__(self) -> str:
        return f"{self.dtype}-N{self.n}-V{self.v}-k{self.k}" + (
            "" if self.kind == "normal" else f"-{self.kind}"
        )


SMALL_CASES = [
    Case(0, 7, "fp32", 2),
    Case(1, 1, "fp32", 1),
    Case(1, 1, "bf16", 1),
    Case(3, 7, "fp32", 2),
    Case(3, 7, "bf16", 2),
    Case(3, 7, "fp16", 2),
    Case(257, 1000, "bf16", 0),
    Case(3, 1000, "fp16", 2),
    Case(3, 1000, "bf16", 1),
    Case(3, 50257, "fp32", 1),
    Case(3, 50257, "bf16", 0),
    Case(2, 50257, "fp16", 2),
]


def _large_cases():
    k_for = {1: 1, 7: 7, 1000: 100, 50257: 1024}
    for n in (0, 1, 3, 257):
        for v in (1, 7, 1000, 50257):
            for dt in DTYPES:
                if n == 257 and v == 50257 and dt != "fp32":
                    continue  # the fp32 case covers the size; low precision is covered at N=3
                yield Case(n, v, dt, k_for[v])


LARGE_CASES = list(_large_cases())


def seed_of(case) -> int:
    return zlib.crc32(str(case).encode()) % 10_000


def _run_stats_case(tier, case: Case, seed: int) -> None:
    x = make_logits(case.n, case.v, DTYPES[case.dtype], seed=seed, kind=case.kind)
    if case.v > 3 and case.n > 0:
        x[:, 2] = -INF  # a masked column in every row
    t = make_target(case.n, case.v, seed=seed)
    got = ss.softmax_stats(*on(tier, x, t), k=case.k)
    assert got.lse.shape == (case.n,) and got.topk_ids.shape == (case.n, case.k)
    assert got.lse.device.type == tier.device
    check_stats(got, x, t, k=case.k, what=str(case))


@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_stats_match_oracle(core_tier, case):
    _run_stats_case(core_tier, case, seed=seed_of(case))


@LARGE
@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_stats_match_oracle_large(core_tier, case):
    _run_stats_case(core_tier, case, seed=seed_of(case))


def test_stats_float64_logits_use_float64(core_tier):
    x = make_logits(5, 300, torch.float64, seed=3)
    t = make_target(5, 300, seed=3)
    got = ss.softmax_stats(*on(core_tier, x, t), k=5)
    ref = R.oracle_stats(x, t, k=5)
    assert got.lse.dtype == torch.float64
    assert_ids_equal(got.topk_ids, ref["topk_ids"], "topk_ids")
    for name in ("lse", "max", "entropy", "target_logprob", "topk_logprobs"):
        torch.testing.assert_close(getattr(got, name).cpu(), ref[name], rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------------
# Top-k: k straddling powers of two, ties under "value descending, lower id first"
# ------------------------------------------------------------------------------------------------

# (k, V, data kind) for every tier; the interpreter (N=1) takes seconds per row at large k.
K_SMALL = [
    (1, 1000, "grid"),
    (1, 1000, "few"),
    (2, 7, "grid"),
    (2, 7, "few"),
    (31, 100, "few"),
    (32, 100, "grid"),
    (33, 100, "few"),
    (64, 257, "grid"),
    (100, 300, "few"),
    (1024, 1024, "few"),
]
K_ALL = [1, 2, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 1023, 1024]


def _check_topk(tier, n, v, k, kind, seed):
    x = make_logits(n, v, torch.float32, seed=seed, kind=kind)
    vals, ids = ss.topk(on(tier, x), k)
    ref = R.oracle_stats(x.double(), k=k)
    assert_ids_equal(ids, ref["topk_ids"], f"k={k} {kind} ids")
    assert vals.dtype == torch.float32
    assert torch.equal(vals.cpu(), x.gather(1, ref["topk_ids"])), f"k={k}: values differ"


@pytest.mark.parametrize(("k", "v", "kind"), K_SMALL, ids=[f"k{k}-V{v}-{kind}" for k, v, kind in K_SMALL])
def test_topk_ties_exact(core_tier, k, v, kind):
    _check_topk(core_tier, 1 if core_tier.interpreted else 3, v, k, kind, seed=k)


@LARGE
@pytest.mark.parametrize("kind", ["normal", "grid", "few"])
@pytest.mark.parametrize("k", K_ALL, ids=[f"k{k}" for k in K_ALL])
def test_topk_ties_exact_large(core_tier, k, kind):
    _check_topk(core_tier, 3, 50257, k, kind, seed=k)


def test_topk_all_equal_row_gives_lowest_ids(core_tier):
    x = torch.zeros(2, 300)
    x[1, 290:] = 1.0  # the last 10 columns win, then the lowest ids among the zeros
    vals, ids = ss.topk(on(core_tier, x), 17, vocab_start=1000)
    assert ids[0].tolist() == list(range(1000, 1017))
    assert ids[1].tolist() == list(range(1290, 1300)) + list(range(1000, 1007))
    assert vals[1].tolist() == [1.0] * 10 + [0.0] * 7


# ------------------------------------------------------------------------------------------------
# Masked, NaN, ignored and out-of-range rows
# ------------------------------------------------------------------------------------------------


SPECIAL_ROWS = (
    "plain",
    "some -inf columns, target finite",
    "all -inf",
    "NaN column",
    "ignored target",
    "target on a -inf column",
    "NaN, all else -inf",
    "-inf except one column",
    "ignored and all -inf",
)


def special_rows(v: int, dtype: torch.dtype):
    """Rows with documented special behaviour (one per entry of SPECIAL_ROWS): (logits, target)."""
    x = make_logits(len(SPECIAL_ROWS), v, torch.float32, seed=7)
    t = torch.tensor([1, 1, 0, 0, IGNORE, 0, 0, v - 2, IGNORE])
    x[1, ::3] = -INF  # columns 0, 3, 6, ...; the target, 1, stays finite
    x[2] = -INF
    x[3, v // 2] = NAN
    x[5, 0] = -INF
    x[6] = -INF
    x[6, v - 1] = NAN
    x[7] = -INF
    x[7, v - 2] = 2.0
    x[8] = -INF
    return x.to(dtype), t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [7, 1000])
def test_special_rows(core_tier, dtype, v):
    x, t = special_rows(v, DTYPES[dtype])
    rows = SPECIAL_ROWS
    k = 3
    got = ss.softmax_stats(*on(core_tier, x, t), k=k)
    check_stats(got, x, t, k=k, what=f"{dtype} V{v}")
    # The documented values, independently of the oracle.
    lse, ent, tlp = got.lse.cpu(), got.entropy.cpu(), got.target_logprob.cpu()
    assert lse[2] == -INF and got.max[2] == -INF and ent[2].isnan() and tlp[2].isnan(), rows[2]
    assert got.topk_ids[2].tolist() == list(range(k)) and got.topk_logprobs[2].isnan().all(), rows[2]
    for r in (3, 6):
        assert lse[r].isnan() and got.max[r].isnan() and ent[r].isnan() and tlp[r].isnan(), rows[r]
    assert tlp[4] == 0 and tlp[8] == 0, "ignored rows"
    assert tlp[5] == -INF, rows[5]
    assert lse[7] == 2.0 and ent[7] == 0 and tlp[7] == 0, rows[7]
    # Without top-k the kernels take another path to the row max; NaN must survive it too.
    lse0 = ss.softmax_stats(on(core_tier, x), k=0).lse.cpu()
    assert lse0[3].isnan() and lse0[6].isnan(), "NaN rows without top-k"
    assert lse0[2] == -INF
    torch.testing.assert_close(lse0[[0, 1, 4, 5, 7]], lse[[0, 1, 4, 5, 7]], rtol=8 * EPS32, atol=0)

    loss = ss.cross_entropy(*on(core_tier, x, t), reduction="none").cpu()
    assert loss[2].isnan() and loss[3].isnan() and loss[6].isnan(), "masked and NaN rows give NaN loss"
    assert loss[4] == 0 and loss[8] == 0 and loss[5] == INF and loss[7] == 0
    keep = torch.tensor([0, 1, 4, 7, 8])
    ref = R.oracle_cross_entropy(x[keep].double(), t[keep], reduction="none")
    base = R.oracle_cross_entropy(x[keep].float(), t[keep], reduction="none")
    rs = row_scale(R.oracle_stats(x[keep].double()))
    assert_like_torch(loss[keep], ref, base, ref.abs() + rs, what="finite rows' loss")


def test_out_of_range_target_is_nan_not_a_crash(core_tier):
    v = 50
    x = make_logits(6, v, torch.float32, seed=11)
    t = torch.tensor([3, v, -1, 10**12, IGNORE, 40])
    xd, td = on(core_tier, x, t)
    got = ss.softmax_stats(xd, td, k=1)
    assert got.target_logprob.isnan().cpu().tolist() == [False, True, True, True, False, False]
    loss = ss.cross_entropy(xd, td, reduction="none").cpu()
    assert loss.isnan().tolist() == [False, True, True, True, False, False]
    keep = torch.tensor([0, 4, 5])
    ref = R.oracle_cross_entropy(x[keep].double(), t[keep], reduction="none")
    base = R.oracle_cross_entropy(x[keep].float(), t[keep], reduction="none")
    rs = row_scale(R.oracle_stats(x[keep].double()))
    assert_like_torch(loss[keep], ref, base, ref.abs() + rs, what="in-range rows")
    assert ss.cross_entropy(xd, td).isnan(), "the mean includes the NaN rows"


def test_custom_ignore_index_inside_vocab(core_tier):
    x = make_logits(8, 30, torch.float32, seed=12)
    t = make_target(8, 30, seed=12, ignore_index=5)
    t[0] = 5
    got = ss.softmax_stats(*on(core_tier, x, t), k=3, ignore_index=5)
    check_stats(got, x, t, k=3, ignore_index=5)
    loss = ss.cross_entropy(*on(core_tier, x, t), ignore_index=5)
    ref = R.oracle_cross_entropy(x.double(), t, ignore_index=5)
    base = R.oracle_cross_entropy(x.float(), t, ignore_index=5)
    assert_like_torch(loss, ref, base, ref.abs() + row_scale(R.oracle_stats(x.double())).mean(), what="loss")


def test_positive_inf_logit_gives_nan(core_tier):
    """Documented: a row with a +inf logit has NaN lse, entropy and log-probs."""
    x = make_logits(2, 20, torch.float32, seed=13)
    x[0, 4] = INF
    got = ss.softmax_stats(on(core_tier, x), k=2)
    assert got.lse[0].isnan() and got.entropy[0].isnan() and got.topk_logprobs[0].isnan().all()
    assert got.topk_ids[0, 0] == 4
    assert ss.log_softmax(on(core_tier, x))[0].isnan().all()
    assert torch.isfinite(got.lse[1])


# ------------------------------------------------------------------------------------------------
# Padded vocabulary and vocab_start
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("width", "pad", "start"), [(8, 1, 0), (1000, 24, 0), (1000, 24, 5000), (7, 6, 3)])
def test_padded_vocab_and_offset(core_tier, dtype, width, pad, start):
    """Columns at or past ``vocab_size`` hold garbage (NaN, +inf, huge) and must never count."""
    n, k = 6, min(3, width - pad)
    real = width - pad
    x = make_logits(n, width, DTYPES[dtype], seed=width + pad)
    x[:, real:] = torch.tensor([NAN, INF, 1e4, -INF, 0.0, 3e3] * (pad // 6 + 1))[:pad].to(x.dtype)
    local_t = make_target(n, real, seed=width)
    t = torch.where(local_t == IGNORE, local_t, local_t + start)
    t[0] = start + real  # the first padding column: outside the vocabulary
    kw = dict(vocab_size=start + real, vocab_start=start)
    xd, td = on(core_tier, x, t)

    got = ss.softmax_stats(xd, td, k=k, **kw)
    assert got.target_logprob[0].isnan(), "a target in the padding is out of range"
    assert (got.topk_ids.cpu() >= start).all() and (got.topk_ids.cpu() < start + real).all()
    keep = torch.arange(1, n)
    sub = ss.SoftmaxStats(*(f[keep] if f is not None else None for f in got))
    sub = sub._replace(topk_ids=sub.topk_ids - start)
    check_stats(sub, x[keep, :real], local_t[keep], k=k)

    for log in (False, True):
        out = (ss.log_softmax if log else ss.softmax)(xd, **kw).cpu()
        check_log_softmax(out, x, log=log, vocab_size=real)
        assert torch.all(out[:, real:] == (-INF if log else 0.0)), "padding columns"

    loss = ss.cross_entropy(xd, td, reduction="none", **kw).cpu()
    assert loss[0].isnan()
    ref = R.oracle_cross_entropy(x[keep, :real].double(), local_t[keep], reduction="none")
    base = R.oracle_cross_entropy(x[keep, :real].float(), local_t[keep], reduction="none")
    rs = row_scale(R.oracle_stats(x[keep, :real].double()))
    assert_like_torch(loss[keep], ref, base, ref.abs() + rs, what="padded loss")


# ------------------------------------------------------------------------------------------------
# cross_entropy options and reductions
# ------------------------------------------------------------------------------------------------

LOSS_OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "temp": {"temperature": 0.7},
    "softcap": {"softcap": 20.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-4, "temperature": 1.3, "softcap": 15.0},
}


def _check_loss(tier, n, v, dtype, options, reduction, seed):
    x = make_logits(n, v, dtype, seed=seed)
    x[:, 1] = -INF
    t = make_target(n, v, seed=seed)
    t[t == 1] = 0  # the target is never the masked column
    loss = ss.cross_entropy(*on(tier, x, t), reduction=reduction, **options)
    assert loss.dtype == torch.float32 and loss.device.type == tier.device
    assert loss.shape == ((n,) if reduction == "none" else ())
    ref = R.oracle_cross_entropy(x.double(), t, reduction=reduction, **options)
    base = R.oracle_cross_entropy(x.float(), t, reduction=reduction, **options)
    transform = {k: options[k] for k in ("temperature", "softcap") if k in options}
    row_loss = R.oracle_cross_entropy(x.double(), t, reduction="none", **options)
    rs = (row_loss.abs() + row_scale(R.oracle_stats(x.double(), **transform))) * (t != IGNORE)
    scale = {"none": rs, "sum": rs.sum(), "mean": rs.sum() / (t != IGNORE).sum()}[reduction]
    assert_like_torch(loss, ref, base, scale + 1, what=f"{reduction} loss")


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_options(core_tier, dtype, options):
    _check_loss(core_tier, 17, 1000, DTYPES[dtype], LOSS_OPTIONS[options], "none", seed=1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_reductions(core_tier, dtype, reduction):
    _check_loss(core_tier, 33, 257, DTYPES[dtype], LOSS_OPTIONS["all"], reduction, seed=2)


LARGE_LOSS = [(257, 50257, "fp32", "all"), (64, 50257, "bf16", "all"), (257, 1000, "fp16", "plain")]


@LARGE
@pytest.mark.parametrize(
    ("n", "v", "dtype", "options"), LARGE_LOSS, ids=["-".join(map(str, c)) for c in LARGE_LOSS]
)
def test_cross_entropy_large(core_tier, n, v, dtype, options):
    _check_loss(core_tier, n, v, DTYPES[dtype], LOSS_OPTIONS[options], "none", seed=3)


def test_cross_entropy_mean_is_over_non_ignored(core_tier):
    x = make_logits(8, 40, torch.float32, seed=4)
    t = make_target(8, 40, seed=4)
    t[:3] = IGNORE
    xd, td = on(core_tier, x, t)
    rows = ss.cross_entropy(xd, td, reduction="none")
    assert torch.all(rows[t.to(rows.device) == IGNORE] == 0)
    n_valid = int((t != IGNORE).sum())
    torch.testing.assert_close(ss.cross_entropy(xd, td), rows.sum() / n_valid, rtol=1e-6, atol=0)
    torch.testing.assert_close(ss.cross_entropy(xd, td, reduction="sum"), rows.sum(), rtol=1e-6, atol=0)
    every = torch.full_like(td, IGNORE)
    assert ss.cross_entropy(xd, every).isnan(), "mean over no tokens is NaN, as PyTorch"
    assert ss.cross_entropy(xd, every, reduction="sum") == 0


# ------------------------------------------------------------------------------------------------
# softmax / log_softmax / topk with transforms; leading dims; strides
# ------------------------------------------------------------------------------------------------

SOFTMAX_OPTIONS = {
    "plain": {},
    "temp-softcap": {"temperature": 0.7, "softcap": 20.0},
    "padded": {"vocab_size": 990},
}


@pytest.mark.parametrize("options", SOFTMAX_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_matches_oracle(core_tier, log, dtype, options):
    opts = SOFTMAX_OPTIONS[options]
    x = make_logits(5, 1000, DTYPES[dtype], seed=5)
    x[0, ::2] = -INF
    x[1] = -INF  # a row of -inf: NaN, as torch.softmax (softcap maps -inf to -softcap, a number)
    out = (ss.log_softmax if log else ss.softmax)(on(core_tier, x), **opts)
    assert out.device.type == core_tier.device
    out = out.cpu()
    assert out[1, : opts.get("vocab_size", 1000)].isnan().all() == ("softcap" not in opts)
    check_log_softmax(out, x, log=log, what=f"{dtype} {options}", **opts)
    if not log:
        sums = out[[0, 2, 3, 4]].double().sum(-1)
        atol = torch.finfo(x.dtype).eps + 64 * EPS32  # rounding to the dtype, plus fp32 exp error
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=atol)


@LARGE
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_oracle_large(core_tier, dtype):
    x = make_logits(16, 50257, DTYPES[dtype], seed=6)
    for log in (False, True):
        out = (ss.log_softmax if log else ss.softmax)(on(core_tier, x), temperature=0.9, vocab_size=50200)
        check_log_softmax(out.cpu(), x, log=log, temperature=0.9, vocab_size=50200)


@pytest.mark.parametrize(
    "options", [{"temperature": 0.7}, {"softcap": 20.0}, {"temperature": 2.0, "softcap": 30.0}], ids=str
)
def test_transforms_in_stats_and_topk(core_tier, options):
    x = make_logits(4, 500, torch.float32, seed=8, kind="grid")  # transforms keep its order exactly
    t = make_target(4, 500, seed=8)
    got = ss.softmax_stats(*on(core_tier, x, t), k=4, **options)
    check_stats(got, x, t, k=4, **options)
    vals, ids = ss.topk(on(core_tier, x), 4, **options)
    assert torch.equal(ids, got.topk_ids)
    ref = R.oracle_stats(x.double(), k=4, **options)
    base = R.oracle_stats(x.float(), k=4, **options)
    ref_vals = ref["topk_logprobs"] + ref["lse"][:, None]
    base_vals = base["topk_logprobs"] + base["lse"][:, None]
    assert_like_torch(vals, ref_vals, base_vals, ref_vals.abs() + 1, what="topk values")


def test_leading_dims_are_flattened_and_restored(core_tier):
    b, s, v, k = 2, 3, 40, 4
    x = make_logits(b * s, v, torch.float32, seed=9).reshape(b, s, v)
    t = make_target(b * s, v, seed=9).reshape(b, s)
    xd, td = on(core_tier, x, t)
    x2, t2 = xd.reshape(-1, v), td.reshape(-1)
    got, flat = ss.softmax_stats(xd, td, k=k), ss.softmax_stats(x2, t2, k=k)
    for name, field in got._asdict().items():
        want = getattr(flat, name)
        assert field.shape == (b, s, *want.shape[1:]), name
        assert torch.equal(field.reshape(want.shape), want), name
    loss = ss.cross_entropy(xd, td, reduction="none")
    assert loss.shape == (b, s)
    assert torch.equal(loss.reshape(-1), ss.cross_entropy(x2, t2, reduction="none"))
    assert torch.equal(ss.cross_entropy(xd, td), ss.cross_entropy(x2, t2))
    for fn in (ss.softmax, ss.log_softmax):
        out = fn(xd)
        assert out.shape == (b, s, v) and torch.equal(out.reshape(-1, v), fn(x2))
    vals, ids = ss.topk(xd, k)
    assert vals.shape == ids.shape == (b, s, k)
    # a single row without a batch dimension
    one = ss.softmax_stats(xd[0, 0], td[0, 0], k=k)
    assert one.lse.shape == () and one.topk_ids.shape == (k,)
    assert torch.equal(one.lse, got.lse[0, 0]) and torch.equal(one.topk_ids, got.topk_ids[0, 0])


@pytest.mark.parametrize("layout", ["row-slice", "transposed", "3d-slice"])
def test_non_contiguous_logits(core_tier, layout):
    n, v, k = 5, 300, 3
    base = make_logits(n, v, torch.float32, seed=10)
    t = make_target(n, v, seed=10)
    if layout == "row-slice":  # rows further apart than V: stride (V + 37, 1)
        wide = torch.full((n, v + 37), 1e4)
        wide[:, 11 : 11 + v] = base
        x = on(core_tier, wide)[:, 11 : 11 + v]
    elif layout == "transposed":
        x = on(core_tier, base.t().contiguous()).t()
    else:
        wide = torch.full((1, n, v + 5), 1e4)
        wide[0, :, :v] = base
        x = on(core_tier, wide)[:, :, :v]
    assert not x.is_contiguous()
    xc, td = on(core_tier, base, t)
    if layout == "3d-slice":
        td = td[None]
        xc = xc[None]
    s1, s2 = ss.softmax_stats(x, td, k=k), ss.softmax_stats(xc, td, k=k)
    for name, field in s1._asdict().items():
        assert torch.equal(field, getattr(s2, name)), name
    assert torch.equal(ss.cross_entropy(x, td, reduction="none"), ss.cross_entropy(xc, td, reduction="none"))
    assert torch.equal(ss.log_softmax(x), ss.log_softmax(xc))
    assert torch.equal(ss.topk(x, k)[1], ss.topk(xc, k)[1])


def test_strided_target(core_tier):
    """A target that is a strided view (every other element) reads the right ids, forward and
    backward (the kernels index the target by row)."""
    n, v = 5, 300
    x = on(core_tier, make_logits(n, v, torch.float32, seed=11))
    wide = on(core_tier, make_target(2 * n, v, seed=11))
    t = wide[::2]
    assert not t.is_contiguous()
    tc = t.contiguous()
    assert torch.equal(ss.softmax_stats(x, t).target_logprob, ss.softmax_stats(x, tc).target_logprob)
    grads = []
    for target in (t, tc):
        xd = x.clone().requires_grad_(True)
        loss = ss.cross_entropy(xd, target, reduction="none")
        loss.backward(torch.linspace(0.5, 1.5, n, device=x.device))
        grads.append((loss.detach(), xd.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

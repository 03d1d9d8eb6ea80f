"""Small Triton helpers shared by the shard kernels: the logit transform and the top-k sort keys;
and the launchers' integer arithmetic (plain Python: ``triton.cdiv`` is a constexpr function
whose host call costs about a microsecond).

Sort keys pack (value, column) into one int64 whose signed order is "value descending, then
column ascending": the high 32 bits are the fp32 value mapped to an order-preserving int32
(NaN canonicalized above +inf, -0.0 folded into +0.0), the low 32 bits are ``2**31 - 1 - col``.
Ranking keys therefore ranks values under the library's tie-break (lower id wins).
"""

import torch
import triton
import triton.language as tl

# A missing top-k entry's id (a shard narrower than k): int64 max, or int32 max in the int32 ids
# that cross a process group (``shardsoftmax.collective``); ``widen_ids`` / ``narrow_ids`` convert.
ID_SENTINEL = tl.constexpr(9223372036854775807)
ID32_SENTINEL = tl.constexpr(2147483647)


def widen_ids(ids: torch.Tensor) -> torch.Tensor:
    """Top-k ids as int64: int32 ids (how they travel between ranks) widened, their missing-entry
    mark ``ID32_SENTINEL`` mapped to ``ID_SENTINEL``; int64 ids as they are."""
    if ids.dtype == torch.int64:
        return ids
    return torch.where(ids == ID32_SENTINEL.value, ID_SENTINEL.value, ids.to(torch.int64))


def topk_select(vals: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (value, id) pairs along the last dim: value descending, lower id first on ties;
    NaN ranks above every number (as in torch.topk)."""
    ids_sorted, order = torch.sort(ids, dim=-1, stable=True)
    vals_sorted = torch.gather(vals, -1, order)
    vals_out, order2 = torch.sort(vals_sorted, dim=-1, descending=True, stable=True)
    return vals_out[..., :k], torch.gather(ids_sorted, -1, order2)[..., :k]


def narrow_ids(ids: torch.Tensor) -> torch.Tensor:
    """int64 top-k ids as the int32 they travel as (``ID_SENTINEL`` as ``ID32_SENTINEL``); ids
    must be below ``ID32_SENTINEL`` (``collective`` refuses wider groups)."""
    if ids.dtype == torch.int32:
        return ids
    return torch.where(ids == ID_SENTINEL.value, ID32_SENTINEL.value, ids).to(torch.int32)


@triton.jit
def transform_logits(x, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """x -> softcap * tanh(x / softcap) (if HAS_SOFTCAP), then * (1 / temperature). fp32 in and out."""
    if HAS_SOFTCAP:
        # tanh(y) = 2 * sigmoid(2y) - 1; saturates cleanly to +-1 and keeps +-inf finite.
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    if HAS_TEMPERATURE:
        x = x * inv_temperature
    return x


@triton.jit
def transform_grad(x, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """d transform_logits / dx, elementwise, fp32."""
    if HAS_SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
        return (1.0 - th * th) * inv_temperature
    else:
        return tl.zeros_like(x) + inv_temperature  # (not 0 * x: NaN at x = -inf)


@triton.jit
def cross_entropy_grad(
    raw,
    cols,
    local_target,
    lse,
    scale,
    smooth_per_class,
    target_weight,
    two_z_loss,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
):
    """d(scale * loss_row)/d raw: scale * (p (1 + 2 z lse) - eps / C - (1 - eps) [col == target])
    * dx'/dx, with x' = transform(raw) and p = exp(x' - lse). Elementwise with broadcasting (per-row
    ``local_target``, ``lse``, ``scale``); fp32. The caller masks padding columns and scale-0 rows."""
    x = transform_logits(raw, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    p = tl.exp2((x - lse) * 1.4426950408889634)
    g = p * (1.0 + two_z_loss * lse) - smooth_per_class
    g = g - tl.where(cols == local_target, target_weight, 0.0)
    return g * scale * transform_grad(raw, softcap, inv_temperature, HAS_SOFTCAP)


@triton.jit
def safe_max(m):
    """m, with -inf replaced by 0 so that exp(x - m) never forms -inf - -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def rescale_factor(m, new_max):
    """exp(m - new_max), 0 for an empty state (m = -inf): the monoid's rescale, as in
    shardsoftmax.partials.rescale."""
    return tl.where(m == float("-inf"), 0.0, tl.exp(m - safe_max(new_max)))


@triton.jit
def online_update(m, s, t, sum_x, x, valid, tile_max, NEED_ENTROPY: tl.constexpr,
                  NEED_SUM_X: tl.constexpr):  # fmt: skip
    """Fold a tile ``x`` [R, C] (fp32 transformed logits, -inf where not ``valid``) with its row
    maxima ``tile_max`` [R] into R online states (m = max x, s = sum exp(x - m),
    t = sum exp(x - m) x, sum x); returns the new (m, s, t, sum_x). The monoid's rescale, as in
    shardsoftmax.partials."""
    m_new = tl.maximum(m, tile_max)
    alpha = rescale_factor(m, m_new)
    # exp(x - m) as exp2(x log2e - m log2e): one FMA and one MUFU op per element.
    e = tl.exp2(x * 1.4426950408889634 - (safe_max(m_new) * 1.4426950408889634)[:, None])
    s = s * alpha + tl.sum(e, axis=1)
    if NEED_ENTROPY:
        # max(x, -FLT_MAX) keeps e * x = 0 (not NaN) for -inf columns.
        t = t * alpha + tl.sum(e * tl.maximum(x, -3.4028234663852886e38), axis=1)
    if NEED_SUM_X:
        sum_x += tl.sum(tl.where(valid, x, 0.0), axis=1)
    return m_new, s, t, sum_x


@triton.jit
def ordered_int32(x):
    """fp32 -> int32 with the same order; NaN maps above +inf, -0.0 equals +0.0."""
    i = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    i = tl.where(x != x, 0x7FC00000, i)  # every NaN becomes the positive quiet NaN
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def unordered_fp32(k32):
    """Inverse of ordered_int32."""
    i = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)
    return i.to(tl.float32, bitcast=True)


@triton.jit
def make_key(x, col):
    """(fp32 value, int column < 2**31) -> int64 key; larger key = higher rank."""
    hi = ordered_int32(x).to(tl.int64) << 32
    lo = (2147483647 - col).to(tl.int64)
    return hi | lo


@triton.jit
def key_value(key):
    return unordered_fp32((key >> 32).to(tl.int32))


@triton.jit
def key_col(key):
    return 2147483647 - key.to(tl.int32)  # truncation keeps the low 32 bits


# Keys of 32 bits for values that are exactly bfloat16 (bf16 logits, no transform): the high half
# of the value's order-preserving int32 (its low half is 0, or 0xFFFF for negative values), then
# 65535 - the column, for columns below 2**16. They order as ``make_key``'s, and sort in about
# half the time of the int64 keys (Triton 3.6, H200, 1024 keys per row: docs/performance.md
# v0.14). The missing entry is the int32 minimum, below the key of -inf.
MIN_KEY16 = tl.constexpr(-2147483648)
KEY16_COLS = 65536


@triton.jit
def make_key16(x, col):
    """(fp32 value that is exactly a bfloat16, int column < 2**16) -> int32 key; larger = higher rank."""
    return (ordered_int32(x) & -65536) | (65535 - col)


@triton.jit
def key16_value(key):
    hi = key & -65536
    return unordered_fp32(hi | ((hi >> 31) & 0xFFFF))


@triton.jit
def key16_col(key):
    return 65535 - (key & 0xFFFF)


# Top-k entries as they cross a process group when every value is exactly a bfloat16 (bf16
# logits, no temperature or softcap) and every rank's shard has at most KEY16_COLS columns: one
# int32 per entry, ``make_key16`` of (value, the column in the rank's shard), half the bytes of an
# fp32 value and an int32 id (``shardsoftmax.collective``). MIN_KEY16 is a missing entry, and -1
# (a word no real entry has: its high half would be the key of a negative zero, which ``ordered_int32``
# folds into +0) the poison of a failed header check, read as (NaN, id -1).
POISON_KEY16 = tl.constexpr(-1)


def pack_key16(vals: torch.Tensor, ids: torch.Tensor, base: int) -> torch.Tensor:
    """Top-k entries (fp32 ``vals`` exactly bfloat16, int64 / int32 global ``ids``, missing ones
    ``ID_SENTINEL`` / ``ID32_SENTINEL``) as int32 ``make_key16`` words of (value, id - base);
    ids - base must lie in [0, KEY16_COLS)."""
    bits = torch.where(vals == 0, torch.zeros_like(vals), vals).float().view(torch.int32)
    bits = torch.where(vals.isnan(), 0x7FC00000, bits)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    words = (ordered & -65536) | (65535 - (ids.to(torch.int64) - base)).to(torch.int32)
    missing = (ids == ID_SENTINEL.value) | (ids == ID32_SENTINEL.value)
    return torch.where(missing, MIN_KEY16.value, words)


def unpack_key16(words: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_key16`` for words [S, N, k] with per-piece bases ``base`` [S] (int64):
    (fp32 values, int64 global ids); missing entries (-inf, ID_SENTINEL), poison (NaN, -1)."""
    hi = words & -65536
    ordered = hi | ((hi >> 31) & 0xFFFF)
    vals = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    ids = base.view(-1, 1, 1) + (65535 - (words & 0xFFFF)).to(torch.int64)
    missing, poison = words == MIN_KEY16.value, words == POISON_KEY16.value
    vals = torch.where(missing, float("-inf"), torch.where(poison, float("nan"), vals))
    ids = torch.where(missing, ID_SENTINEL.value, torch.where(poison, -1, ids))
    return vals, ids


@triton.jit
def min_key_like(shape: tl.constexpr):
    """A key below every real key (the identity of the top-k monoid)."""
    return tl.full(shape, -2147483648, tl.int64) << 32


@triton.jit
def _index_bit(N_DIMS: tl.constexpr, J: tl.constexpr):
    """Bit J of the flat index, as 0 / 1 along its axis of a [2] * N_DIMS hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - J - 1) + [2] + [1] * J)


@triton.jit
def _compare_swap(h, flip, J: tl.constexpr, N_DIMS: tl.constexpr):
    """One bitonic step on the [2] * N_DIMS int64 hypercube ``h``: each pair of keys that differ
    in index bit J is put in ascending order, or descending where ``flip`` is 1."""
    partner = h ^ tl.xor_sum(h, N_DIMS - 1 - J, keep_dims=True)
    return tl.where((h > partner) != (flip ^ _index_bit(N_DIMS, J)), partner, h)


@triton.jit
def _bitonic_merge(h, STAGE: tl.constexpr, ALTERNATE: tl.constexpr, N_DIMS: tl.constexpr):
    """Sort each bitonic run of 2**STAGE keys: runs alternately ascending and descending
    (ALTERNATE), or all descending."""
    if ALTERNATE:
        flip = _index_bit(N_DIMS, STAGE)
    else:
        flip = 1
    for i in tl.static_range(STAGE):
        h = _compare_swap(h, flip, STAGE - 1 - i, N_DIMS)
    return h


@triton.jit
def topk_sorted_runs(keys, LOG_K: tl.constexpr, LOG_N: tl.constexpr):
    """The 2**LOG_K largest of the int64 ``keys`` [2**LOG_N], descending, when they come as runs
    of 2**LOG_K keys, each already sorted: even runs ascending, odd runs descending. The bitonic
    top-k (``tl.topk``'s second half: the elementwise max of two such runs is a bitonic run that
    holds the top 2**LOG_K of both; merge it in LOG_K compare-and-swap steps; halve again)
    without ``tl.topk``'s first half, which sorts the runs in LOG_K (LOG_K + 1) / 2 steps over the
    whole input."""
    h = tl.reshape(keys, [2] * LOG_N)
    for s in tl.static_range(LOG_N - LOG_K):
        h = tl.max(h, axis=LOG_N - s - 1 - LOG_K)  # run pairs, elementwise
        h = _bitonic_merge(h, LOG_K, s + 1 < LOG_N - LOG_K, LOG_N - s - 1)
    return tl.reshape(h, [2**LOG_K])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def key_slots(k: int) -> int:
    """KP: a top-k's key slots per row (a power of two >= k, at least 2: ``tl.topk`` needs 2)."""
    return max(2, next_pow2(k))

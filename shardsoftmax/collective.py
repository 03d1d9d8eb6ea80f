"""The one collective: every rank's partials, packed with a small header, exchanged by one
all-gather, then merged on every rank (each rank's partials are one more piece for finalize).

Protocol (keeps every rank's buffer size equal, so no input can hang the group):

* Each rank keeps, per process group, the *agreed layout* of the last successful exchange: every
  rank's header (rows, k, dtype, shard width, vocab start, options). All ranks update it from the
  same gathered headers, so it is the same everywhere.
* Steady state (one collective): if this call's header equals the agreed one, a rank computes its
  partials with the agreed ``vocab_start`` and sends ``header + payload``. The gathered headers
  must all equal the agreed ones; on the CPU that is checked within the call, on a CUDA device on
  the device without a host sync (see ``_check_fast``: a failed check poisons that call's results
  and raises at the rank's next call on the group or at ``synchronize``).
* Otherwise (first call, new shapes, or a rank reporting bad input) a rank sends its header and a
  zero payload of the agreed size and reads every header. If some ranks took the fast path, they
  will not exchange again, so every rank raises the same clear error. If none did, every rank
  either raises the same error or adopts the new layout and exchanges again (two collectives for
  that call only). Buffers are the agreed size in every case, so no input can hang the group.
* The header also holds what decides the call's sequence of collectives: the LM head's ``impl``,
  the loss's ``reduction``, which gradients the call computes (grad mode, the inputs'
  ``requires_grad``, ``reduce_hidden_grad``: they decide the eager-gradient forward and backward's
  all-reduce), the call's rows and its number of exchanges (one per block of rows for the eager
  forward, each with the same header). So ranks that would make different collectives disagree at
  the call's first exchange. A call that exchanges again first resolves that exchange's check
  (``confirm``, one host sync per such call on CUDA), and backward polls it before its all-reduce
  (``poll``, no wait), so no rank enters a second collective that the others skip.
* A rank that dies leaves the others in the all-gather until the process group's timeout
  (``timeout=`` of ``init_process_group``) expires; nothing here waits longer than that.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import backend, kernels
from ._validate import REDUCTIONS
from .partials import SCALAR_FIELDS, Pieces, scalar_fields
from .partials import pack as pack_pieces

MAGIC = 0x55AA5501
HEADER_FIELDS = (
    "magic",
    "error",
    "op",
    "n_rows",
    "k",
    "dtype",
    "has_target",
    "width",
    "start",  # -1: derive from the group
    "vocab_size",  # -1: all columns are real
    "ignore_index",
    "temperature_bits",
    "softcap_bits",
    "label_smoothing_bits",
    "z_loss_bits",
    "impl",  # the LM head's implementation (CHOICES); 0: not the LM head
    "reduction",  # the loss's reduction (CHOICES); 0: not a loss
    "grads",  # the gradients the call computes (bits of GRADS); recorded by the LM head's loss only
    "call_rows",  # rows of the whole call (n_rows is per exchange)
    "exchanges",  # exchanges the call makes (the eager forward: one per block of rows)
    "pack_topk",  # 1: this rank may send its top-k packed (PACK_TOPK); packed only if every rank may
)
H = len(HEADER_FIELDS)
_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
OPS = {"stats": 1, "cross_entropy": 2, "softmax": 3, "log_softmax": 4, "topk": 5, "sample": 6,
       "linear_stats": 7, "linear_cross_entropy": 8}  # fmt: skip

IMPLS = ("chunked", "recompute", "fused")  # the LM head's implementations (see ``linear``)
# String options as header words: 1 + their index here; 0 where the op has no such option, -2 for
# a value that is none of these (a rank reporting bad input still sends a well-formed header).
CHOICES = {"impl": IMPLS, "reduction": REDUCTIONS}
# Bits of the header's "grads": which gradients the LM head's loss computes (they decide its
# eager forward, one exchange per block of rows, and backward's all-reduce of hidden's gradient).
GRADS = ("hidden", "weight", "bias", "hidden's all-reduced")

# Error codes a rank can report instead of its partials.
ERR_INVALID_INPUT = 1

# Top-k entries cross the group as one int32 each (``kernels.common.pack_key16``: the bf16 value
# and the column in the rank's shard) where that is exact: bf16 logits, no temperature or softcap,
# every shard at most 2**16 columns (``packs_topk``); else as an fp32 value and an int32 id.
# SHARDSOFTMAX_PACK_TOPK=0 keeps the 8-byte entries (an A/B of the wire format).
PACK_TOPK = os.environ.get("SHARDSOFTMAX_PACK_TOPK", "1") not in ("", "0")


def _float_bits(x) -> int:
    """The float64 bits of ``x`` as an int64; -1 for None, -2 for something not a number (a rank
    reporting bad input still sends a well-formed header)."""
    if x is None:
        return -1
    try:
        return struct.unpack("<q", struct.pack("<d", float(x)))[0]
    except (TypeError, ValueError):
        return -2


def _shown(field: str, value: int):
    """A header value as the user wrote it (floats travel as their bits)."""
    if field.endswith("_bits") and value >= 0:
        return struct.unpack("<d", struct.pack("<q", value))[0]
    if field == "dtype":
        return next((str(d) for d, code in _DTYPES.items() if code == value), value)
    if field == "op":
        return next((name for name, code in OPS.items() if code == value), value)
    if field in CHOICES:
        options = CHOICES[field]
        return options[value - 1] if 0 < value <= len(options) else {0: None}.get(value, "invalid")
    if field == "grads":
        names = [name for i, name in enumerate(GRADS) if value >> i & 1]
        return "gradients of " + ", ".join(names) if names else "no gradients"
    return {-1: None, -2: "invalid"}.get(value, value) if field.endswith("_bits") else value


def _int_or(x, default: int = -2) -> int:
    return int(x) if isinstance(x, numbers.Integral) else default


def _choice(field: str, value) -> int:
    if value is None:
        return 0
    options = CHOICES[field]
    return options.index(value) + 1 if isinstance(value, str) and value in options else -2


def grad_bits(hidden: bool, weight: bool, bias: bool, reduce_hidden: bool) -> int:
    """The header's "grads" word: the gradients a call computes (``GRADS``); the all-reduce of
    hidden's gradient counts only when that gradient is computed."""
    bits = (bool(hidden), bool(weight), bool(bias), bool(hidden) and bool(reduce_hidden))
    return sum(b << i for i, b in enumerate(bits))


@dataclass(frozen=True)
class Header:
    op: int
    n_rows: int
    k: int
    dtype: int
    has_target: int
    width: int
    start: int
    vocab_size: int
    ignore_index: int
    temperature_bits: int
    softcap_bits: int
    label_smoothing_bits: int
    z_loss_bits: int
    impl: int = 0
    reduction: int = 0
    grads: int = 0
    call_rows: int = -1
    exchanges: int = 1
    pack_topk: int = 0
    error: int = 0
    magic: int = MAGIC

    @classmethod
    def make(
        cls, op, n_rows, k, dtype, has_target, width, start, vocab_size, ignore_index, temperature, softcap,
        label_smoothing, z_loss, *, impl=None, reduction=None, grads=0, call_rows=None, exchanges=1,
        pack_topk=None,
    ):  # fmt: skip
        """``call_rows``: the call's rows when it makes several exchanges of ``n_rows`` each;
        ``pack_topk``: whether this rank may send packed top-k entries (default ``PACK_TOPK``)."""
        return cls(
            op=OPS[op],
            n_rows=int(n_rows),
            k=_int_or(k),
            dtype=_DTYPES.get(dtype, 0),
            has_target=int(has_target),
            width=int(width),
            start=-1 if start is None else _int_or(start),
            vocab_size=-1 if vocab_size is None else _int_or(vocab_size),
            ignore_index=_int_or(ignore_index),
            temperature_bits=_float_bits(temperature),
            softcap_bits=_float_bits(softcap),
            label_smoothing_bits=_float_bits(label_smoothing),
            z_loss_bits=_float_bits(z_loss),
            impl=_choice("impl", impl),
            reduction=_choice("reduction", reduction),
            grads=_int_or(grads),
            call_rows=int(n_rows) if call_rows is None else _int_or(call_rows),
            exchanges=_int_or(exchanges),
            pack_topk=int(PACK_TOPK if pack_topk is None else pack_topk),
        )

    def as_list(self) -> list[int]:
        return [getattr(self, f) for f in HEADER_FIELDS]


@dataclass(frozen=True)
class Layout:
    """Where this rank's shard sits in the global vocabulary."""

    vocab_start: int
    vocab_size: int
    n_valid_cols: int
    total_cols: int
    n_classes: int  # real columns over every shard of the call: the softmax's support


@dataclass(frozen=True)
class Agreed:
    headers: tuple[Header, ...]
    starts: tuple[int, ...]
    total_cols: int
    vocab_size: int
    payload_words: int
    words: torch.Tensor  # the headers as gathered: [G, H * 2] int32 on the group's device
    words_host: torch.Tensor  # the same on the host
    send: torch.Tensor  # this rank's send buffer (see ``_send_buffer``)
    slots: Pieces  # views of its payload for the shard kernel
    key_base: torch.Tensor | None  # packed top-k (``packs_topk``): the ranks' starts, int64 [G]

    def layout(self, rank: int) -> Layout:
        start, width = self.starts[rank], self.headers[rank].width
        n_valid = max(0, min(width, self.vocab_size - start))
        return Layout(start, self.vocab_size, n_valid, self.total_cols, n_classes=self.vocab_size)


_agreed: dict[int, Agreed] = {}


def local_layout(n_cols: int, vocab_start: int | None, vocab_size: int | None) -> Layout:
    """One process: the shard starts at ``vocab_start`` (default 0); ``vocab_size`` defaults to
    all columns. The softmax runs over this shard's real columns only (``n_classes``)."""
    start = 0 if vocab_start is None else vocab_start
    total = start + n_cols
    size = total if vocab_size is None else vocab_size
    if size > total:
        raise ValueError(
            f"vocab_size={size} is larger than the columns this shard covers (vocab_start={start} + {n_cols})"
        )
    n_valid = max(0, min(n_cols, size - start))
    return Layout(start, size, n_valid, total, n_classes=n_valid)


def packs_topk(headers) -> bool:
    """Whether the ranks of these (consistent) headers exchange their top-k packed, one int32 per
    entry (``kernels.common.pack_key16``): every rank may (``PACK_TOPK``), there are several,
    the call's top-k values are logits as they are (``softmax_stats`` / ``topk``; not sampling's
    noisy values or the LM head's fp32 logits), exactly bfloat16 (bf16 logits, no temperature or
    softcap), and every shard has at most 2**16 columns."""
    h0 = headers[0]
    return (
        len(headers) > 1
        and all(h.pack_topk == 1 for h in headers)
        and h0.op in (OPS["stats"], OPS["topk"])
        and h0.k > 0
        and h0.dtype == _DTYPES[torch.bfloat16]
        and h0.temperature_bits == _float_bits(1.0)
        and h0.softcap_bits == -1
        and all(0 <= h.width <= kernels.KEY16_COLS for h in headers)
    )


def _offsets(partials_dtype: torch.dtype, n_rows: int, k: int, packed: bool = False) -> tuple[int, int, int]:
    """Word offsets in one rank's payload: stats [7, N] end, top-k values [N, k] end (the ids
    [N, k] int32 start there), total (even, so that fp64 partials can be viewed in place).
    ``packed``: no values; the [N, k] int32 words of ``kernels.common.pack_key16`` start at the
    stats' end (4 bytes per entry instead of 8).

    Ids travel as int32 global ids: 8 bytes per top-k entry with its fp32 value instead of 12
    (at TP = 4, N = 8192, k = 50 the all-gather was 78 µs for 5.1 MB per rank, docs/performance.md
    v0.10). That is exact for every vocabulary the merge takes: its sort keys hold a column in 31
    bits (``kernels.common.make_key``), and ``_check_consistent`` refuses a group of more than
    2**31 - 1 columns (so no id reaches 2**31 - 1, which marks a missing entry)."""
    w = 2 if partials_dtype == torch.float64 else 1
    a = 7 * w * n_rows
    b = a if packed else a + w * n_rows * k
    total = b + n_rows * k
    return a, b, total + total % 2


def payload_words(partials_dtype: torch.dtype, n_rows: int, k: int, packed: bool = False) -> int:
    return _offsets(partials_dtype, n_rows, k, packed)[2]


def pack(p: Pieces, head: torch.Tensor, key_base: int | None = None) -> torch.Tensor:
    """``head`` (int32 words) then one piece's partials as one flat int32 tensor: the [7, N]
    stats (NaN for the fields a kernel did not store, ``partials.scalar_fields``), the top-k
    values, the ids as int32, a pad word where needed (see ``_offsets``). ``key_base`` (the
    rank's first global id): the top-k as packed words instead of values and ids (``packs_topk``)."""
    stats, vals, ids = p.stats[:, 0], p.topk_vals[0], p.topk_ids[0]
    if stats.shape[0] < len(SCALAR_FIELDS):
        stats = torch.stack(scalar_fields(stats))
    words = [head, stats.reshape(-1).view(torch.int32)]
    if key_base is not None:
        words.append(kernels.pack_key16(vals, ids, key_base).reshape(-1))
    else:
        words += [vals.reshape(-1).view(torch.int32), kernels.narrow_ids(ids).reshape(-1)]
    _, b, total = _offsets(stats.dtype, stats.shape[1], vals.shape[1], key_base is not None)
    if total > b + ids.numel():
        words.append(torch.zeros(1, dtype=torch.int32, device=head.device))
    return torch.cat(words)


def unpack(gathered: torch.Tensor, dtype: torch.dtype, n_rows: int, k: int,
           key_base: torch.Tensor | None = None) -> Pieces:  # fmt: skip
    """Inverse of ``pack`` for the gathered [G, header + payload] int32 words: the ranks' partials
    as G pieces, stats as a strided view of ``gathered`` (two ops: a call's host time is mostly
    its torch ops); the top-k values and the int32 ids as strided views as well (finalize reads
    them as they are; ``Pieces.unpacked`` widens them for the merge on the host side). With
    ``key_base`` (the ranks' first global ids, int64 [G]) the top-k came packed: the pieces hold
    the words and ``key_base`` (see ``partials.Pieces``)."""
    g, row = gathered.shape
    w = 2 if dtype == torch.float64 else 1
    packed = key_base is not None
    a, b, _ = _offsets(dtype, n_rows, k, packed)
    flat = gathered.view(dtype)  # [G, row / w]: header and payload lengths are even
    base = flat.storage_offset() + 2 * H // w
    stats = flat.as_strided((7, g, n_rows), (n_rows, row // w, 1), base)
    if n_rows * k == 0:
        vals = torch.empty((g, n_rows, k), dtype=dtype, device=gathered.device)
        ids = torch.empty((g, n_rows, k), dtype=torch.int32, device=gathered.device)
    else:  # strided views too (finalize takes any split and row strides)
        vals = None if packed else flat.as_strided((g, n_rows, k), (row // w, k, 1), base + a // w)
        start = gathered.storage_offset() + 2 * H + b
        ids = gathered.as_strided((g, n_rows, k), (row, k, 1), start)
    if packed:
        return Pieces(stats, None, ids, key_base)
    return Pieces(stats, vals, ids)


def _check_consistent(headers: list[Header]) -> tuple[tuple[int, ...], int, int]:
    """Raise the same error on every rank if the ranks' calls disagree; else (starts, total, vocab)."""
    for r, h in enumerate(headers):
        if h.magic != MAGIC:
            raise RuntimeError(f"shardsoftmax: rank {r} sent a malformed header (ranks out of step?)")
        if h.error:
            raise RuntimeError(
                f"shardsoftmax: rank {r} rejected its input (its own error says why); "
                "no rank computed a result"
            )
    h0 = headers[0]
    names = {  # in this order: the first mismatch found is the one reported
        "op": "operation",
        "impl": "impl",
        "reduction": "reduction",
        "grads": "grad mode / requires_grad (the gradients the call computes: torch.is_grad_enabled(), "
        "requires_grad of hidden, weight and bias, reduce_hidden_grad)",
        "call_rows": "number of rows (tokens)",
        "n_rows": "rows per exchange",
        "k": "k",
        "dtype": "logits dtype",
        "has_target": "target given or not",
        "vocab_size": "vocab_size",
        "ignore_index": "ignore_index",
        "temperature_bits": "temperature",
        "softcap_bits": "softcap",
        "label_smoothing_bits": "label_smoothing",
        "z_loss_bits": "z_loss",
        "exchanges": "number of exchanges in the call",
    }
    for r, h in enumerate(headers[1:], start=1):
        for f, what in names.items():
            if getattr(h, f) != getattr(h0, f):
                mine, theirs = _shown(f, getattr(h0, f)), _shown(f, getattr(h, f))
                raise ValueError(
                    f"shardsoftmax: ranks disagree on {what}: rank 0 has {mine}, rank {r} has {theirs}. "
                    "Every rank must call with the same rows, options, dtype and grad mode."
                )
    widths = [h.width for h in headers]
    total = sum(widths)
    given = [h.start for h in headers]
    if all(s == -1 for s in given):
        starts = tuple(sum(widths[:r]) for r in range(len(widths)))
    elif any(s == -1 for s in given):
        raise ValueError("shardsoftmax: vocab_start must be given on every rank or on none")
    else:
        spans = sorted(zip(given, widths))
        pos = 0
        for s, w in spans:
            if s != pos:
                raise ValueError(
                    f"shardsoftmax: the ranks' shards (vocab_start, width)={list(zip(given, widths))} "
                    f"do not tile [0, {total}) without gaps or overlaps"
                )
            pos += w
        starts = tuple(given)
    if total > kernels.ID32_SENTINEL.value:
        raise ValueError(
            f"shardsoftmax: the group's shards cover {total} columns; at most 2**31 - 1 are supported "
            "(top-k ids travel between ranks as int32)"
        )
    vocab = total if h0.vocab_size == -1 else h0.vocab_size
    if vocab > total:
        raise ValueError(f"vocab_size={vocab} is larger than the group's {total} columns")
    return starts, total, vocab


def _send_buffer(words: torch.Tensor, pdtype: torch.dtype, n: int, k: int,
                 packed: bool = False) -> tuple[torch.Tensor, Pieces]:  # fmt: skip
    """A rank's send buffer for an agreed layout, kept with it across calls: its header ``words``
    (written once) then the payload, and the payload's views as one piece (``pack``'s layout),
    for the partials kernel to write into (``packed``: no values view; the kernel writes packed
    words into the ids' view where it can, ``kernels.shard_partials``). Reusing it is safe in
    stream order: the all-gather that read it finished before later work on the stream (its
    ``wait``)."""
    a, b, total = _offsets(pdtype, n, k, packed)
    buf = torch.empty(2 * H + total, dtype=torch.int32, device=words.device)
    buf[: 2 * H].copy_(words)
    payload = buf[2 * H :]
    slots = Pieces(
        payload[:a].view(pdtype).view(7, 1, n),
        None if packed else payload[a:b].view(pdtype).view(1, n, k),
        payload[b : b + n * k].view(1, n, k),
    )
    return buf, slots


def _all_gather(buf: torch.Tensor, group) -> torch.Tensor:
    """``buf`` of every rank, stacked [G, len]. The ProcessGroup's own method when it has one: the
    Python front end (``dist.all_gather_into_tensor``) spent ~137 µs of its own time per call under
    cProfile on an H200 host (``benchmarks/profile_group.py``) on checks ``exchange`` does not need."""
    out = torch.empty((group.size(), buf.numel()), dtype=buf.dtype, device=buf.device)
    if hasattr(group, "_allgather_base"):
        group._allgather_base(out.view(-1), buf).wait()  # wait: the current stream waits (NCCL)
    else:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # 2.12 name
        gather(out.view(-1), buf, group=group)
    return out


def _header_words(headers) -> torch.Tensor:
    """Headers as the int32 words they travel as: [H * 2] for one, [G, H * 2] for several."""
    rows = [h.as_list() for h in headers] if isinstance(headers, (list, tuple)) else headers.as_list()
    return torch.tensor(rows, dtype=torch.int64).view(torch.int32)


def _read_headers(words: torch.Tensor) -> list[Header]:
    """The gathered [G, H * 2] header words (any device) as headers, on the host."""
    rows = words.cpu().contiguous().view(torch.int64).tolist()
    return [Header(**dict(zip(HEADER_FIELDS, row))) for row in rows]


def _mismatch(headers: list[Header], agreed: Agreed | None) -> BaseException:
    """The error every rank raises for gathered headers that do not all equal the agreed layout
    when some ranks took the fast path (they computed with the agreed layout and will not exchange
    again): a rank's own rejection, the ranks' disagreement, or a partial layout change."""
    try:
        _check_consistent(headers)
    except BaseException as err:  # noqa: BLE001 - returned, raised by the caller
        return err
    changed = [r for r, h in enumerate(headers) if agreed is None or h != agreed.headers[r]]
    # consistent headers can differ from the agreed ones only in a rank's own words
    pairs = [] if agreed is None else [(headers[r], agreed.headers[r]) for r in changed]
    fields = [f for f in HEADER_FIELDS if any(getattr(new, f) != getattr(old, f) for new, old in pairs)]
    what = [_CHANGED_FIELD.get(f, f) for f in fields] or ["shard (width or vocab_start)"]
    return ValueError(
        f"shardsoftmax: rank(s) {changed} changed their {' and '.join(what)} in a call where the other "
        "ranks did not; every rank must change it in the same call"
    )


# How _mismatch names a rank's own header words
_CHANGED_FIELD = {
    "width": "shard width",
    "start": "vocab_start",
    "pack_topk": "top-k wire format (SHARDSOFTMAX_PACK_TOPK / collective.PACK_TOPK)",
}


# Steady-state header checks. On a CUDA device the fast path does not read the gathered headers
# back in the call (that host sync would keep the host from running ahead of the GPU). Instead the
# call compares them with the agreed ones on the device, poisons its gathered partials if they
# differ (every payload word -1: NaN values, id -1, so every result of that call is NaN / -1), and
# queues an asynchronous copy of the headers. The check resolves, raising the same clear error as
# the ranks whose own call was wrong, at the next call on the group once the copy has landed, or
# at ``synchronize(group)``. ``SHARDSOFTMAX_SYNC_CHECKS=1`` resolves every check within its call
# (a host sync per call, like CUDA_LAUNCH_BLOCKING for kernels). On the CPU checks always resolve
# within the call (nothing to overlap), unless ``DEFER_ON_CPU`` (set by tests of the deferred path:
# a check then lands only when waited for, as on a GPU that is behind the host, see ``_LateEvent``).
SYNC_CHECKS = os.environ.get("SHARDSOFTMAX_SYNC_CHECKS", "0") not in ("", "0")
DEFER_ON_CPU = False
MAX_PENDING = 16  # pending checks per group; the oldest is waited for beyond this


@dataclass
class _Check:
    words: torch.Tensor  # [G * H * 2 + 2] int32 on the host (pinned when CUDA): headers, the flag, a pad
    event: object  # torch.cuda.Event recorded after the copy (``_LateEvent`` on the CPU)
    agreed: Agreed
    seq: int  # checks queued on the group before this one


_pending: dict[int, deque] = {}
_queued: dict[int, int] = {}  # checks ever queued per group (the next check's ``seq``)


class _LateEvent:
    """``DEFER_ON_CPU``'s stand-in for a CUDA event: not landed until waited for (the worst case
    on a GPU: the host far ahead), so tests see every check resolve where the code waits for it."""

    def __init__(self):
        self.landed = False

    def record(self):
        self.landed = False

    def query(self) -> bool:
        return self.landed

    def synchronize(self):
        self.landed = True


class _Ring:
    """The buffers of one group's pending checks, allocated once (a pinned allocation or an event
    creation per call costs more host time than the rest of the check): a device buffer the check
    kernel writes (the gathered headers and the flag), and MAX_PENDING + 1 host copies of it with
    their events. ``_resolve`` keeps at most MAX_PENDING checks queued, so the slot handed out
    next (used MAX_PENDING + 1 calls ago) is no longer queued."""

    def __init__(self, n_words: int, device: torch.device):
        cuda = device.type == "cuda"
        self.dev = torch.empty(n_words, dtype=torch.int32, device=device)
        self.host = torch.empty((MAX_PENDING + 1, n_words), dtype=torch.int32, pin_memory=cuda)
        self.events = [torch.cuda.Event() if cuda else _LateEvent() for _ in range(MAX_PENDING + 1)]
        self.i = 0

    def next(self):
        i, self.i = self.i, (self.i + 1) % len(self.events)
        return self.host[i], self.events[i]


_rings: dict[int, _Ring] = {}


def _resolve(key: int, *, wait: bool, own_from: int | None = None) -> None:
    """Drop the checks of group ``key`` whose headers have landed and agree (with ``wait``: all
    of them); raise the error of the first that does not (each failed call raises once).
    ``own_from``: checks with this ``seq`` or later are the running call's own (their error is
    not attributed to an earlier call)."""
    queue = _pending.get(key)
    while queue:
        check = queue[0]
        if not check.event.query():  # not landed yet
            if not wait and len(queue) <= MAX_PENDING:
                return
            check.event.synchronize()
        queue.popleft()
        n_head = len(check.agreed.headers) * 2 * H
        if check.words[n_head].item():  # the kernel's flag: some header differs from the agreed one
            words = check.words[:n_head].view(-1, 2 * H)
            err = _mismatch(_read_headers(words), check.agreed)
            if own_from is not None and check.seq >= own_from:
                raise err
            raise type(err)(
                f"{err} (found by the check of an earlier call on this rank, whose results are NaN / id -1)"
            ) from None


def synchronize(process_group) -> None:
    """Wait for this group's pending header checks (see ``_resolve``) and raise the error of any
    earlier call whose ranks disagreed. A no-op when none is pending."""
    _resolve(id(process_group), wait=True)


def checks_queued(process_group) -> int:
    """How many deferred header checks this rank has queued on the group so far (for ``confirm``)."""
    return _queued.get(id(process_group), 0)


def confirm(process_group, since: int) -> None:
    """Within a call that exchanges more than once: wait for the header checks pending on the group
    (its own since ``since`` = ``checks_queued`` before its first exchange, and any before them)
    and raise if the ranks disagreed, before this rank exchanges again (the other ranks raised at
    that exchange and will not). On CUDA one host sync; nothing to wait for where the exchange
    checked within the call (the CPU, or a layout change)."""
    _resolve(id(process_group), wait=True, own_from=since)


def poll(process_group) -> None:
    """Raise the error of any pending header check of this group that has landed and failed,
    without waiting (before a collective outside ``exchange``, e.g. backward's all-reduce, that a
    rank which raised at the exchange would not join). Checks not landed yet stay pending."""
    _resolve(id(process_group), wait=False)


def _check_fast(key: int, gathered: torch.Tensor, agreed: Agreed) -> None:
    """The fast path's header check: raise now, or poison ``gathered`` and defer (see above)."""
    cuda = gathered.is_cuda
    if not cuda and not DEFER_ON_CPU:
        words = gathered[:, : 2 * H]
        if not torch.equal(words, agreed.words_host):
            raise _mismatch(_read_headers(words), agreed)
        return
    n_words = agreed.words.numel() + 2  # headers, the flag, a pad word (even: int64 rows stay aligned)
    ring = _rings.get(key)
    if ring is None or ring.dev.numel() != n_words:
        ring = _rings[key] = _Ring(n_words, gathered.device)
    host, event = ring.next()
    backend.check_headers(gathered, agreed.words, ring.dev)
    host.copy_(ring.dev, non_blocking=cuda)
    event.record()
    seq = _queued.get(key, 0)
    _queued[key] = seq + 1
    _pending.setdefault(key, deque()).append(_Check(host, event, agreed, seq))
    if SYNC_CHECKS:
        _resolve(key, wait=True)


def exchange(
    header: Header, compute, group, *, device, error: BaseException | None = None
) -> tuple[Pieces, Layout]:
    """Run ``compute(layout, out) -> Pieces`` on this rank (``out``: one piece's views of the
    send buffer, for the shard kernel to write into when it can) and return the partials of all
    ranks as G pieces (one per rank; a rank's own pieces are merged first when it has several),
    with this rank's layout. ``error``: this rank's input was rejected; it still takes part, so that every
    rank raises instead of hanging."""
    key = id(group)
    _resolve(key, wait=False)
    rank = group.rank()
    if error is not None:
        header = Header(**{**header.__dict__, "error": ERR_INVALID_INPUT})
    for _attempt in range(2):
        agreed = _agreed.get(key)
        if error is None and agreed is not None and agreed.headers[rank] == header:
            layout = agreed.layout(rank)
            send, slots = agreed.send, agreed.slots
            local = compute(layout, slots)
            if local.stats.data_ptr() != slots.stats.data_ptr():  # not written in place: pack it
                if local.n_splits != 1:
                    local = pack_pieces(local.merged())
                base = layout.vocab_start if agreed.key_base is not None else None
                send = pack(local, agreed.words[rank], base)
            gathered = _all_gather(send, group)
            _check_fast(key, gathered, agreed)
            return unpack(gathered, local.stats.dtype, header.n_rows, header.k, agreed.key_base), layout
        # Slow path: send the header and a zero payload of the agreed size, read every header.
        n_words = agreed.payload_words if agreed is not None else 0
        head = _header_words(header).to(device)
        gathered = _all_gather(torch.cat([head, head.new_zeros(n_words)]), group)
        headers = _read_headers(gathered[:, : 2 * H])
        if agreed is not None and any(h == a for h, a in zip(headers, agreed.headers)):
            err = _mismatch(headers, agreed)  # some ranks were fast: they will not exchange again
            raise error if error is not None else err
        try:
            starts, total, vocab = _check_consistent(headers)
        except BaseException:
            if error is not None:
                raise error from None
            raise
        pdtype = torch.float64 if header.dtype == _DTYPES[torch.float64] else torch.float32
        words_host = _header_words(headers)
        words = words_host.to(device)
        packed = packs_topk(headers)
        send, slots = _send_buffer(words[rank], pdtype, header.n_rows, header.k, packed)
        key_base = torch.tensor(starts, dtype=torch.int64, device=device) if packed else None
        _agreed[key] = Agreed(
            tuple(headers), starts, total, vocab, payload_words(pdtype, header.n_rows, header.k, packed),
            words=words, words_host=words_host, send=send, slots=slots, key_base=key_base,
        )  # fmt: skip
    raise RuntimeError("shardsoftmax: ranks could not agree on a layout")  # pragma: no cover


def forget(group) -> None:
    """Drop the agreed layout and pending checks cached for ``group`` (after destroying it)."""
    _agreed.pop(id(group), None)
    _pending.pop(id(group), None)
    _rings.pop(id(group), None)
    _queued.pop(id(group), None)

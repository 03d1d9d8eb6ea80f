"""The one collective: every rank's partials, packed with a small header, exchanged by one
all-gather, then merged by ``partials.merge_stacked`` on every rank.

Protocol (keeps every rank's buffer size equal, so no input can hang the group):

* Each rank keeps, per process group, the *agreed layout* of the last successful exchange: every
  rank's header (rows, k, dtype, shard width, vocab start, options). All ranks update it from the
  same gathered headers, so it is the same everywhere.
* Steady state (one collective): if this call's header equals the agreed one, a rank computes its
  partials with the agreed ``vocab_start`` and sends ``header + payload``; if the gathered
  headers all equal the agreed ones, the payloads are merged. Reading the headers costs one small
  device-to-host copy.
* Otherwise (first call, new shapes, or a rank reporting bad input) a rank sends its header and a
  zero payload of the agreed size. Every rank then sees the same headers and either raises the same
  clear error, or adopts the new layout and exchanges again (two collectives for that call only).
* A rank that dies leaves the others in the all-gather until the process group's timeout
  (``timeout=`` of ``init_process_group``) expires; nothing here waits longer than that.
"""

from __future__ import annotations

import numbers
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .partials import Pieces, merge_stacked
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
)
H = len(HEADER_FIELDS)
_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
OPS = {"stats": 1, "cross_entropy": 2, "softmax": 3, "log_softmax": 4, "topk": 5, "sample": 6,
       "linear_stats": 7, "linear_cross_entropy": 8}  # fmt: skip

# Error codes a rank can report instead of its partials.
ERR_INVALID_INPUT = 1


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
    return {-1: None, -2: "invalid"}.get(value, value) if field.endswith("_bits") else value


def _int_or(x, default: int = -2) -> int:
    return int(x) if isinstance(x, numbers.Integral) else default


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
    error: int = 0
    magic: int = MAGIC

    @classmethod
    def make(
        cls, op, n_rows, k, dtype, has_target, width, start, vocab_size, ignore_index, temperature, softcap,
        label_smoothing, z_loss,
    ):  # fmt: skip
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


def _offsets(partials_dtype: torch.dtype, n_rows: int, k: int) -> tuple[int, int, int, int]:
    """Word offsets in one rank's payload: stats [7, N] end, top-k values [N, k] end, ids start
    (even, so that they can be viewed as int64 in place), total (even)."""
    w = 2 if partials_dtype == torch.float64 else 1
    a = 7 * w * n_rows
    b = a + w * n_rows * k
    c = b + b % 2
    return a, b, c, c + 2 * n_rows * k


def payload_words(partials_dtype: torch.dtype, n_rows: int, k: int) -> int:
    return _offsets(partials_dtype, n_rows, k)[3]


def pack(p: Pieces, head: torch.Tensor) -> torch.Tensor:
    """``head`` (int32 words) then one piece's partials as one flat int32 tensor: the [7, N]
    stats, the top-k values, a pad word where needed, the ids as their int64 bits."""
    stats, vals, ids = p.stats[:, 0], p.topk_vals[0], p.topk_ids[0]
    words = [head, stats.reshape(-1).view(torch.int32), vals.reshape(-1).view(torch.int32)]
    a, b, c, _ = _offsets(stats.dtype, stats.shape[1], vals.shape[1])
    if c > b:
        words.append(torch.zeros(1, dtype=torch.int32, device=head.device))
    words.append(ids.reshape(-1).view(torch.int32))
    return torch.cat(words)


def unpack(words: torch.Tensor, dtype: torch.dtype, n_rows: int, k: int) -> Pieces:
    """Inverse of ``pack`` for the gathered [G, payload] tensor (header words removed): the ranks'
    partials as G pieces, stats as a view of ``words``."""
    g = words.shape[0]
    a, b, c, _ = _offsets(dtype, n_rows, k)
    stats = words[:, :a].view(dtype).view(g, 7, n_rows).transpose(0, 1)
    if n_rows * k == 0:
        vals = torch.empty((g, n_rows, k), dtype=dtype, device=words.device)
        ids = torch.empty((g, n_rows, k), dtype=torch.int64, device=words.device)
    else:  # contiguous copies: finalize reads values and ids with the same strides
        vals = words[:, a:b].view(dtype).view(g, n_rows, k).contiguous()
        ids = words[:, c:].view(torch.int64).view(g, n_rows, k).contiguous()
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
    names = {
        "op": "operation",
        "n_rows": "number of rows (tokens)",
        "k": "k",
        "dtype": "logits dtype",
        "has_target": "target given or not",
        "vocab_size": "vocab_size",
        "ignore_index": "ignore_index",
        "temperature_bits": "temperature",
        "softcap_bits": "softcap",
        "label_smoothing_bits": "label_smoothing",
        "z_loss_bits": "z_loss",
    }
    for r, h in enumerate(headers[1:], start=1):
        for f, what in names.items():
            if getattr(h, f) != getattr(h0, f):
                mine, theirs = _shown(f, getattr(h0, f)), _shown(f, getattr(h, f))
                raise ValueError(
                    f"shardsoftmax: ranks disagree on {what}: rank 0 has {mine}, rank {r} has {theirs}. "
                    "Every rank must call with the same rows, options and dtype."
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
    vocab = total if h0.vocab_size == -1 else h0.vocab_size
    if vocab > total:
        raise ValueError(f"vocab_size={vocab} is larger than the group's {total} columns")
    return starts, total, vocab


def _all_gather(buf: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((world, buf.numel()), dtype=buf.dtype, device=buf.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
    gather(out.view(-1), buf, group=group)
    return out


def exchange(
    header: Header, compute, group, *, device, error: BaseException | None = None
) -> tuple[Pieces, Layout]:
    """Run ``compute(layout) -> Pieces`` on this rank and return the partials of all ranks as G
    pieces (one per rank; a rank's own pieces are merged first when it has several), with this
    rank's layout. ``error``: this rank's input was rejected; it still takes part, so that every
    rank raises instead of hanging."""
    key = id(group)
    rank = dist.get_rank(group)
    if error is not None:
        header = Header(**{**header.__dict__, "error": ERR_INVALID_INPUT})
    for _attempt in range(2):
        agreed = _agreed.get(key)
        fast = error is None and agreed is not None and agreed.headers[rank] == header
        head = torch.tensor(header.as_list(), dtype=torch.int64).view(torch.int32).to(device)
        if fast:
            layout = agreed.layout(rank)
            local = compute(layout)
            if local.n_splits != 1:
                local = pack_pieces(merge_stacked(local.unpacked()))
            buf = pack(local, head)
        else:
            n_words = agreed.payload_words if agreed is not None else 0
            buf = torch.cat([head, torch.zeros(n_words, dtype=torch.int32, device=device)])
        gathered = _all_gather(buf, group)
        head_words = gathered[:, : 2 * H].clone(memory_format=torch.contiguous_format)  # see unpack
        headers_raw = head_words.view(torch.int64).cpu().tolist()
        headers = [Header(**dict(zip(HEADER_FIELDS, row))) for row in headers_raw]
        if fast and tuple(headers) == agreed.headers:
            return unpack(gathered[:, 2 * H :], local.stats.dtype, header.n_rows, header.k), layout
        try:
            starts, total, vocab = _check_consistent(headers)
        except BaseException:
            if error is not None:
                raise error from None
            raise
        pdtype = torch.float64 if header.dtype == _DTYPES[torch.float64] else torch.float32
        _agreed[key] = Agreed(
            tuple(headers), starts, total, vocab, payload_words(pdtype, header.n_rows, header.k)
        )
    raise RuntimeError("shardsoftmax: ranks could not agree on a layout")  # pragma: no cover


def forget(group) -> None:
    """Drop the agreed layout cached for ``group`` (call after destroying a group)."""
    _agreed.pop(id(group), None)

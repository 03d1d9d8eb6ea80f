"""File formats of the batch-scoring job: the head, the input shards and their validation.

No Ray here; ``ray_scorer`` and ``job`` both use it (also ``HEAD_IMPLS``, the workers' paths).

Head: a safetensors file (or a ``torch.save`` dict, ``.pt``/``.pth``) with ``weight`` ``[V, H]``
(any float dtype), optional ``bias`` ``[V]`` and optionally the true vocabulary size, either as a
tensor entry ``vocab_size`` (one integer) or as safetensors metadata ``{"vocab_size": "..."}``.
Rows of ``weight`` at or past the true vocabulary size are padding and never count.

Input shards: safetensors files, each with ``hidden`` ``[T, H]`` (float16, bfloat16, float32 or
float64) and optionally ``targets`` ``[T]`` (an integer dtype; ``ignore_index``, -100 by default,
marks tokens without a target). safetensors headers are read without loading the data, and batches
are read as row slices, so neither validation nor scoring loads a whole shard.

Batches that the workers read themselves are ``FileRows`` (a file, tensor names, a row range);
``RowReader`` reads such a row range with positional reads (``os.preadv``) straight into a
caller's buffer (e.g. pinned memory), from the byte offsets in the safetensors header.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# How a worker turns its hidden states into statistics (``head_impl``): "unfused" stores this
# shard's [T, V_shard] logits (``F.linear``) and calls ``softmax_stats``; the others are
# ``linear_softmax_stats``' implementations, which never hold them all ("chunked": one block of
# rows of cuBLAS logits at a time; "fused": the Triton kernels). "unfused" is the default because
# it was the fastest on an H200 nearly everywhere (1-32768 tokens, V_shard 32064-256000, k 0 and
# 50, bf16; docs/performance.md v0.15): at 1024-32768 tokens chunked took 0-6% longer and fused
# 0-11% (k = 0) and 16-33% (k = 50); at 1-256 tokens up to 1.5x and 2.2x. The others bound the
# memory: at most 512 MiB of logits blocks, or < 1 MiB for fused at k = 0, where unfused holds
# T x V_shard x 2 bytes (bf16).
HEAD_IMPLS = ("unfused", "chunked", "fused")
_ST_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ST_INT = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
_ST_TORCH = {
    **_ST_FLOAT,
    **{"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8},
    **{"U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool},
    **{"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2},
}


class InputError(ValueError):
    """A problem with the job's inputs or options, found before any work starts."""


# ---------------------------------------------------------------------------------------------- head


@dataclass(frozen=True)
class HeadInfo:
    path: str
    format: str  # "safetensors" or "torch"
    rows: int  # V: rows of the weight, padding included
    hidden_size: int  # H
    dtype: torch.dtype
    has_bias: bool
    vocab_size: int  # the true vocabulary size (<= rows)


def _st_open(path: str):
    from safetensors import safe_open

    return safe_open(path, framework="pt")


def _torch_load(path: str) -> dict:
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(obj, dict):
        raise InputError(
            f"head {path}: expected a dict with 'weight' (and optional 'bias'), got {type(obj).__name__}"
        )
    return obj


def inspect_head(path: str | os.PathLike, vocab_size: int | None = None) -> HeadInfo:
    """Read the head's shapes (not its data, for safetensors) and resolve the true vocab size."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"head file not found: {path}")
    file_vocab = None
    try:
        if path.endswith(SAFETENSORS_SUFFIXES):
            fmt = "safetensors"
            with _st_open(path) as f:
                keys = set(f.keys())
                if "weight" not in keys:
                    raise InputError(f"head {path}: no tensor named 'weight' (found {sorted(keys)})")
                w = f.get_slice("weight")
                shape, st_dtype = list(w.get_shape()), w.get_dtype()
                if st_dtype not in _ST_FLOAT:
                    raise InputError(f"head {path}: weight must be a float tensor, got {st_dtype}")
                dtype = _ST_FLOAT[st_dtype]
                bias_shape = list(f.get_slice("bias").get_shape()) if "bias" in keys else None
                if "vocab_size" in keys:
                    file_vocab = int(f.get_tensor("vocab_size").reshape(-1)[0])
                elif (f.metadata() or {}).get("vocab_size") is not None:
                    file_vocab = int(f.metadata()["vocab_size"])
        elif path.endswith(TORCH_SUFFIXES):
            fmt = "torch"
            obj = _torch_load(path)
            if not isinstance(obj.get("weight"), torch.Tensor):
                raise InputError(f"head {path}: no tensor named 'weight' (found {sorted(obj)})")
            shape, dtype = list(obj["weight"].shape), obj["weight"].dtype
            if not dtype.is_floating_point:
                raise InputError(f"head {path}: weight must be a float tensor, got {dtype}")
            bias = obj.get("bias")
            bias_shape = None if bias is None else list(bias.shape)
            if obj.get("vocab_size") is not None:
                file_vocab = int(torch.as_tensor(obj["vocab_size"]).reshape(-1)[0])
        else:
            raise InputError(
                f"head {path}: unknown format (use .safetensors, or a torch.save dict as "
                f"{'/'.join(TORCH_SUFFIXES)})"
            )
    except InputError:
        raise
    except Exception as err:  # corrupt file: safetensors / pickle errors
        raise InputError(f"head {path}: cannot read it ({type(err).__name__}: {err})") from err
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise InputError(f"head {path}: weight must have shape [V, H] with V, H >= 1, got {shape}")
    rows, hidden = shape
    if bias_shape is not None and bias_shape != [rows]:
        raise InputError(f"head {path}: bias must have shape [{rows}] (the weight's rows), got {bias_shape}")
    vocab = vocab_size if vocab_size is not None else (file_vocab if file_vocab is not None else rows)
    if not 1 <= vocab <= rows:
        raise InputError(f"vocab_size={vocab} must be between 1 and the head's {rows} rows")
    return HeadInfo(path, fmt, rows, hidden, dtype, bias_shape is not None, int(vocab))


def read_head_rows(info: HeadInfo, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``[start, stop)`` of the weight (and bias), read without loading the rest."""
    if info.format == "safetensors":
        with _st_open(info.path) as f:
            w = f.get_slice("weight")[start:stop]
            b = f.get_slice("bias")[start:stop] if info.has_bias else None
        return w.contiguous(), (None if b is None else b.contiguous())
    obj = _torch_load(info.path)
    b = obj["bias"][start:stop].clone() if info.has_bias else None
    return obj["weight"][start:stop].clone(), b


def shard_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """Contiguous, as-even-as-possible row ranges ``[start, stop)`` of ``rows`` over ``world`` ranks
    (the first ``rows % world`` ranks get one more row)."""
    base, extra = divmod(rows, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


# -------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputShard:
    name: str  # output file stem and the value of the ``shard`` column
    path: str
    n_tokens: int
    has_targets: bool
    size: int  # bytes, for the manifest fingerprint
    mtime_ns: int

    def fingerprint(self) -> dict:
        return {"path": os.path.abspath(self.path), "size": self.size, "mtime_ns": self.mtime_ns}


def find_inputs(spec: str | os.PathLike) -> list[str]:
    """A directory (its ``*.safetensors`` files), a glob pattern, or one file; sorted."""
    spec = str(spec)
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.safetensors")))
        if not paths:
            raise InputError(f"input directory {spec} holds no *.safetensors files")
        return paths
    if glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise InputError(f"input pattern {spec!r} matches no files")
        return paths
    if not os.path.isfile(spec):
        raise InputError(f"input not found: {spec}")
    return [spec]


def inspect_input(path: str, head: HeadInfo, *, ignore_index: int = -100, chunk: int = 1 << 20) -> InputShard:
    """Check one shard's header (and its target ids, read in chunks) against the head."""
    if not path.endswith(SAFETENSORS_SUFFIXES):
        raise InputError(
            f"input {path}: expected a .safetensors file with 'hidden' [T, H] and optional 'targets' [T]"
        )
    try:
        with _st_open(path) as f:
            keys = set(f.keys())
            if "hidden" not in keys:
                raise InputError(f"input {path}: no tensor named 'hidden' (found {sorted(keys)})")
            h = f.get_slice("hidden")
            shape, st_dtype = list(h.get_shape()), h.get_dtype()
            if st_dtype not in _ST_FLOAT:
                raise InputError(
                    f"input {path}: hidden must be float16/bfloat16/float32/float64, got {st_dtype}"
                )
            if len(shape) != 2:
                raise InputError(f"input {path}: hidden must have shape [T, H], got {shape}")
            n_tokens, hidden = shape
            if hidden != head.hidden_size:
                raise InputError(
                    f"input {path}: hidden size {hidden} does not match the head's hidden size "
                    f"{head.hidden_size}"
                )
            has_targets = "targets" in keys
            if has_targets:
                t = f.get_slice("targets")
                if t.get_dtype() not in _ST_INT:
                    raise InputError(f"input {path}: targets must have an integer dtype, got {t.get_dtype()}")
                if list(t.get_shape()) != [n_tokens]:
                    raise InputError(
                        f"input {path}: targets must have shape [{n_tokens}], got {list(t.get_shape())}"
                    )
                for a in range(0, n_tokens, chunk):
                    ids = t[a : a + chunk].to(torch.int64)
                    bad = (ids != ignore_index) & ((ids < 0) | (ids >= head.vocab_size))
                    if bool(bad.any()):
                        i = int(bad.nonzero()[0, 0])
                        raise InputError(
                            f"input {path}: target id {int(ids[i])} at position {a + i} is outside the "
                            f"vocabulary [0, {head.vocab_size}) (and is not ignore_index={ignore_index})"
                        )
    except InputError:
        raise
    except Exception as err:  # corrupt or truncated file
        raise InputError(f"input {path}: cannot read it ({type(err).__name__}: {err})") from err
    st = os.stat(path)
    name = Path(path).name[: -len(".safetensors")]
    return InputShard(name, path, int(n_tokens), has_targets, st.st_size, st.st_mtime_ns)


def inspect_inputs(spec, head: HeadInfo, *, ignore_index: int = -100) -> list[InputShard]:
    shards = [inspect_input(p, head, ignore_index=ignore_index) for p in find_inputs(spec)]
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen:
            raise InputError(f"two inputs share the shard name {s.name!r}: {seen[s.name]} and {s.path}")
        seen[s.name] = s.path
    return shards


def iter_batches(shard: InputShard, batch_tokens: int, *, read_hidden: bool = True):
    """Yield ``(start, hidden, targets [b] int64 or None)`` for each batch of ``batch_tokens`` rows of
    one shard, in order. ``hidden``: the rows ``[b, H]`` read here, or with ``read_hidden=False``
    a ``FileRows`` reference to them (for the workers to read; the targets are still read here,
    for the output's nulls)."""
    path = os.path.abspath(shard.path)
    with _st_open(path) as f:
        h = f.get_slice("hidden") if read_hidden else None
        t = f.get_slice("targets") if shard.has_targets else None
        for a in range(0, shard.n_tokens, batch_tokens):
            b = min(a + batch_tokens, shard.n_tokens)
            hidden = h[a:b] if read_hidden else FileRows(path, a, b, "hidden", "targets" if t else None)
            yield a, hidden, (None if t is None else t[a:b].to(torch.int64))


# ---------------------------------------------------------------------------------- worker-side reads


@dataclass(frozen=True)
class FileRows:
    """A batch by reference: rows ``[start, stop)`` of the tensor ``hidden`` (``[T, H]``, float) of
    a safetensors file, and of its ``targets`` (``[T]``, integer ids; ``None``: no targets). The
    scorer's workers read these rows themselves, so ``path`` must be readable, at the same path,
    on every node that runs them (a shared file system); a relative path is taken from the
    driver's working directory."""

    path: str
    start: int
    stop: int
    hidden: str = "hidden"
    targets: str | None = "targets"

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


def _named(path: str, spans: dict, name: str) -> TensorSpan:
    """Tensor ``name`` of a file's layout (``InputError`` if there is no such tensor)."""
    if name not in spans:
        raise InputError(f"{path}: no tensor named {name!r} (found {sorted(spans)})")
    return spans[name]


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes are in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the first element in the file
    end: int

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n * self.dtype.itemsize


MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def safetensors_layout(path: str, size: int | None = None) -> dict[str, TensorSpan]:
    """Every tensor's dtype, shape and byte range, from the header of a safetensors file (an
    8-byte little-endian header length, then a JSON header; tensor offsets are relative to the end
    of the header). Reads the header only; tensors of a dtype torch lacks are left out. Raises
    ``InputError`` if the header is malformed or the file (``size`` bytes, default its current
    size) is too short for its tensors."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size if size is None else size
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise InputError(f"{path}: not a safetensors file, or truncated (header of {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({type(err).__name__}: {err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a safetensors file (bad header: {err})") from err
    base = 8 + n
    spans = {}
    for name, d in header.items():
        if name == "__metadata__":
            continue
        try:
            if d["dtype"] not in _ST_TORCH:
                continue
            dtype = _ST_TORCH[d["dtype"]]
            shape = tuple(int(x) for x in d["shape"])
            begin, end = (base + int(x) for x in d["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: tensor {name!r}: unsupported or malformed entry {d!r}") from err
        numel = 1
        for x in shape:
            numel *= x
        if end - begin != numel * dtype.itemsize or begin < base:
            raise InputError(f"{path}: tensor {name!r}: byte range does not match its shape {list(shape)}")
        if end > size:
            raise InputError(f"{path}: truncated: tensor {name!r} ends at byte {end}, the file has {size}")
        spans[name] = TensorSpan(dtype, shape, begin, end)
    return spans


def check_file_rows(rows: FileRows, spans: dict[str, TensorSpan], hidden_size: int | None = None) -> None:
    """``InputError`` unless ``rows`` names a float ``[T, H]`` tensor (``H == hidden_size`` if
    given), an integer ``[T]`` targets tensor (if named) and a row range within ``[0, T]``."""
    p = rows.path
    h = spans.get(rows.hidden)
    if h is None:
        raise InputError(f"{p}: no tensor named {rows.hidden!r} (found {sorted(spans)})")
    if not h.dtype.is_floating_point or len(h.shape) != 2:
        raise InputError(f"{p}: {rows.hidden!r} must be a float tensor [T, H], got {h.dtype} {list(h.shape)}")
    n_tokens, hidden = h.shape
    if hidden_size is not None and hidden != hidden_size:
        raise InputError(f"{p}: hidden size {hidden} does not match the head's hidden size {hidden_size}")
    if rows.targets is not None:
        t = spans.get(rows.targets)
        if t is None:
            raise InputError(
                f"{p}: no tensor named {rows.targets!r} (found {sorted(spans)}); "
                "use targets=None for a file without targets"
            )
        if t.dtype.is_floating_point or t.shape != (n_tokens,):
            raise InputError(
                f"{p}: {rows.targets!r} must be an integer tensor [{n_tokens}], got {t.dtype} {list(t.shape)}"
            )
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (rows.start, rows.stop))
    if not (ints and 0 <= rows.start <= rows.stop <= n_tokens):
        raise InputError(f"{p}: rows [{rows.start}, {rows.stop}) are not within the file's {n_tokens} rows")


# Each reading thread reads at least this many bytes of a batch.
READ_BLOCK_MIN_BYTES = 4 << 20


class RowReader:
    """Reads ``FileRows`` straight into a caller's buffer: the rows' bytes are one contiguous range
    of the file, read with ``os.preadv`` (by up to ``threads`` threads, one slice each, the GIL
    released in the system call) into the destination, e.g. pinned memory. No memory map, so no
    page faults on the source, and a file truncated under a reader raises ``InputError`` instead of
    a bus error. Headers are parsed once per file; a file whose path now names another inode, size
    or modification time is re-read. At most ``max_open`` files stay open (least recently used
    closed first)."""

    def __init__(self, threads: int = 1, max_open: int = 64):
        self.threads = max(1, int(threads))
        self.max_open = max_open
        self._files: OrderedDict[str, tuple[int, tuple, dict[str, TensorSpan]]] = OrderedDict()
        self._pool = ThreadPoolExecutor(self.threads, "shardsoftmax-read") if self.threads > 1 else None

    def layout(self, path: str) -> tuple[int, dict[str, TensorSpan]]:
        """The open descriptor and the tensor layout of ``path``."""
        try:
            st = os.stat(path)
        except OSError as err:
            raise InputError(f"{path}: cannot read it ({type(err).__name__}: {err})") from err
        key = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
        entry = self._files.get(path)
        if entry is not None and entry[1] == key:
            self._files.move_to_end(path)
            return entry[0], entry[2]
        if entry is not None:
            self._close(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise InputError(f"{path}: cannot read it ({type(err).__name__}: {err})") from err
        try:
            spans = safetensors_layout(path, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        self._files[path] = (fd, key, spans)
        while len(self._files) > self.max_open:
            self._close(next(iter(self._files)))
        return fd, spans

    def span(self, path: str, name: str) -> TensorSpan:
        """Where tensor ``name`` of ``path`` is (``InputError`` if there is no such tensor)."""
        return _named(path, self.layout(path)[1], name)

    def read_into(self, path: str, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` into the front of ``out`` (a contiguous CPU
        tensor of at least that many bytes); returns them as a view of ``out`` with the tensor's
        dtype and shape ``[stop - start, ...]``."""
        fd, spans = self.layout(path)  # one stat of the file per read
        span = _named(path, spans, name)
        if not 0 <= start <= stop <= span.shape[0]:
            raise InputError(f"{path}: rows [{start}, {stop}) are not within {name!r}'s {span.shape[0]} rows")
        nbytes = (stop - start) * span.row_bytes
        if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() < nbytes:
            raise ValueError(f"out must be a contiguous CPU tensor of at least {nbytes} bytes")
        dest = out.view(torch.uint8).reshape(-1)[:nbytes]
        offset = span.begin + start * span.row_bytes
        view = memoryview(dest.numpy())
        n = max(1, min(self.threads, nbytes // READ_BLOCK_MIN_BYTES))
        if n == 1 or self._pool is None:
            self._pread(fd, path, view, offset)
        else:
            step = -(-nbytes // n)
            parts = [(view[a : a + step], offset + a) for a in range(0, nbytes, step)]
            list(self._pool.map(lambda p: self._pread(fd, path, *p), parts))  # raises the first error
        return dest.view(span.dtype).view(stop - start, *span.shape[1:])

    @staticmethod
    def _pread(fd: int, path: str, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                raise InputError(f"{path}: read failed ({type(err).__name__}: {err})") from err
            if got == 0:
                raise InputError(f"{path}: unexpected end of file at byte {offset + done} (truncated?)")
            done += got

    def _close(self, path: str) -> None:
        fd = self._files.pop(path)[0]
        try:
            os.close(fd)
        except OSError:
            pass

    def close(self) -> None:
        for path in list(self._files):
            self._close(path)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

"""The batch-scoring job behind ``shardsoftmax score``: validate everything, stream the input
shards through a ``ShardedScorer``, write one parquet file per input shard, exactly once.

Output: ``OUT/<shard>.parquet`` for input ``<shard>.safetensors``, one row per token with columns
``shard`` (string), ``position`` (int64, the token's row in the input), ``lse``,
``target_logprob`` (null where the input has no targets or the target is ``ignore_index``),
``entropy`` (float32), ``topk_ids`` (list<int64>) and ``topk_logprobs`` (list<float32>).

Exactly once and resumable:

* A shard's rows are written, in order, to a temporary file in ``OUT`` (``.<shard>.parquet.tmp-*``)
  which is fsync'ed and renamed (``os.replace``, atomic) to ``<shard>.parquet`` only when all
  its rows are in. Then ``OUT/_manifest.json`` is rewritten the same way (temp file + replace),
  adding the shard with its row count, its input's fingerprint (absolute path, size, mtime) and a
  hash of the settings that change results (head file fingerprint, vocab size, k, dtype,
  temperature, softcap, ignore_index, and head_impl when it is not the default).
* A rerun skips a shard whose manifest entry matches its input and settings and whose file has the
  recorded row count; it recomputes every other shard (new, changed, or interrupted) and removes
  leftover temporary files. A crash between the rename and the manifest update leaves a complete
  file that is recomputed and atomically replaced: one file per shard, never a partial or
  duplicated one. Read the shards listed in the manifest.
* Worker failures are handled by the scorer (the failed group is rebuilt and its batches retried),
  so a failure costs recomputing a few batches, not the shard.

Data path: by default the driver sends each batch as a ``FileRows`` reference (input file, row
range) and every worker of the group reads the rows itself, straight into its pinned staging
buffer; the driver reads only the headers and the target ids (for the output's nulls). The input
files must then be readable at the same path on every node of the cluster (a shared file system;
always true on one machine). ``read_in_driver`` (``--read-in-driver``) restores the driver path
for clusters without one: the driver reads each batch and ships it through Ray's object store.

Everything (head, every input header, every target id) is validated before Ray starts and before
``OUT`` is created, so bad input produces a clear error and no output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .data import HEAD_IMPLS, HeadInfo, InputError, InputShard, inspect_head, inspect_inputs, iter_batches

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = "shardsoftmax-score/1"
FAULT_ENV = "SHARDSOFTMAX_FAULT_KILL_AFTER_SHARDS"  # testing: kill one worker after N shards commit


@dataclass
class JobConfig:
    head: str
    input: str
    output: str
    tp: int = 2
    replicas: int = 1
    k: int = 20
    batch_tokens: int = 8192
    vocab_size: int | None = None
    max_retries: int = 3
    device: str = "auto"
    dtype: str = "float32"
    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100
    ray_address: str | None = None
    num_cpus: int | None = None
    progress: bool = True
    read_in_driver: bool = False  # the driver reads the batches and ships them (no shared file system)
    head_impl: str = "unfused"  # how workers compute statistics (data.HEAD_IMPLS)


@dataclass
class JobSummary:
    output: str
    shards_total: int
    shards_computed: int
    shards_skipped: int
    tokens: int  # computed in this run
    seconds: float  # scoring time (after the workers are up)
    startup_seconds: float
    workers: int
    device: str
    rebuilds: int
    computed: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        unit = "GPU" if self.device == "cuda" else "worker"
        lines = [
            f"shardsoftmax score: {self.shards_total} shards ({self.shards_computed} computed, "
            f"{self.shards_skipped} already done)",
            f"  tokens: {self.tokens}  seconds: {self.seconds:.2f} (+{self.startup_seconds:.1f} s start-up)  "
            f"tokens/s: {self.tokens_per_s:,.0f}  tokens/s per {unit}: "
            f"{self.tokens_per_s / max(self.workers, 1):,.0f} ({self.workers} {unit}s, {self.device})",
        ]
        if self.rebuilds:
            lines.append(f"  recovered from {self.rebuilds} worker-group failure(s)")
        lines.append(f"  output: {self.output}  (manifest: {os.path.join(self.output, MANIFEST)})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ manifest


def _file_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_hash(cfg: JobConfig, head: HeadInfo) -> tuple[str, dict]:
    settings = {
        "head": _file_fingerprint(head.path),
        "vocab_size": head.vocab_size,
        "k": cfg.k,
        "dtype": cfg.dtype,
        "temperature": cfg.temperature,
        "softcap": cfg.softcap,
        "ignore_index": cfg.ignore_index,
    }
    if cfg.head_impl != "unfused":
        # the logits' summation order may differ in the last bit; a key only when set, so that
        # manifests written before the option existed still match
        settings["head_impl"] = cfg.head_impl
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], settings


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_manifest(out: str) -> dict:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return {"format": MANIFEST_FORMAT, "shards": {}}
    try:
        with open(path) as f:
            m = json.load(f)
        if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), dict):
            raise ValueError("unexpected format")
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a shardsoftmax manifest ({err}); use another --output") from err
    return m


def _is_done(out: str, manifest: dict, shard: InputShard, settings: str) -> bool:
    entry = manifest["shards"].get(shard.name)
    if not entry or entry.get("input") != shard.fingerprint() or entry.get("settings") != settings:
        return False
    path = os.path.join(out, entry["file"])
    if not os.path.isfile(path) or entry.get("rows") != shard.n_tokens:
        return False
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == shard.n_tokens
    except Exception:
        return False


# ------------------------------------------------------------------------------------ parquet


def output_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("shard", pa.string()),
            ("position", pa.int64()),
            ("lse", pa.float32()),
            ("target_logprob", pa.float32()),
            ("entropy", pa.float32()),
            ("topk_ids", pa.list_(pa.int64())),
            ("topk_logprobs", pa.list_(pa.float32())),
        ]
    )


def _table(name: str, start: int, targets, res, ignore_index: int, schema):
    import pyarrow as pa

    n, k = res.topk_ids.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32))
    if res.target_logprob is None:
        tlp = pa.nulls(n, pa.float32())
    else:
        tlp = pa.array(res.target_logprob, mask=(targets == ignore_index).numpy(), type=pa.float32())
    cols = [
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([name])).cast(pa.string()),
        pa.array(np.arange(start, start + n, dtype=np.int64)),
        pa.array(res.lse, type=pa.float32()),
        tlp,
        pa.array(res.entropy, type=pa.float32()),
        pa.ListArray.from_arrays(offsets, pa.array(res.topk_ids.reshape(-1), type=pa.int64())),
        pa.ListArray.from_arrays(offsets, pa.array(res.topk_logprobs.reshape(-1), type=pa.float32())),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


class _ShardWriter:
    """Rows of one shard into a temporary parquet file; ``commit`` renames it into place."""

    def __init__(self, out: str, shard: InputShard, schema):
        import pyarrow.parquet as pq

        self.shard, self.final = shard, os.path.join(out, f"{shard.name}.parquet")
        self.tmp = os.path.join(out, f".{shard.name}.parquet.tmp-{uuid.uuid4().hex[:8]}")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.rows = 0

    def write(self, table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> None:
        if self.rows != self.shard.n_tokens:  # cannot happen unless the scorer lost or duplicated rows
            raise RuntimeError(
                f"shard {self.shard.name}: wrote {self.rows} rows, expected {self.shard.n_tokens}"
            )
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


# ------------------------------------------------------------------------------------ the job


def validate(cfg: JobConfig) -> tuple[HeadInfo, list[InputShard]]:
    """Every check that needs no cluster: options, head, input headers and target ids."""
    for name in ("tp", "replicas", "batch_tokens"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if not isinstance(cfg.max_retries, int) or cfg.max_retries < 0:
        raise InputError(f"--max-retries must be >= 0, got {cfg.max_retries!r}")
    if cfg.head_impl not in HEAD_IMPLS:
        raise InputError(f"--head-impl must be one of {HEAD_IMPLS}, got {cfg.head_impl!r}")
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise InputError(f"--output {cfg.output} exists and is not a directory")
    head = inspect_head(cfg.head, cfg.vocab_size)
    if not isinstance(cfg.k, int) or not 0 <= cfg.k <= min(1024, head.vocab_size):
        raise InputError(f"--k must be in [0, min(1024, vocab_size={head.vocab_size})], got {cfg.k!r}")
    if cfg.tp > head.rows:
        raise InputError(f"--tp {cfg.tp} is larger than the head's {head.rows} rows")
    shards = inspect_inputs(cfg.input, head, ignore_index=cfg.ignore_index)
    return head, shards


def _fault_hook() -> Callable | None:
    """``SHARDSOFTMAX_FAULT_KILL_AFTER_SHARDS=N``: once N shards have committed, kill the last rank
    of replica 0 (a crash, to exercise recovery from the command line)."""
    after = os.environ.get(FAULT_ENV)
    if not after:
        return None
    state = {"n": 0}

    def hook(scorer, name: str) -> None:
        state["n"] += 1
        if state["n"] == int(after):
            print(f"[{FAULT_ENV}] killing worker rank {scorer.tp - 1} of replica 0", file=sys.stderr)
            scorer.kill_worker(0, scorer.tp - 1)

    return hook


def run_job(cfg: JobConfig, *, on_shard_done: Callable | None = None, out=sys.stdout) -> JobSummary:
    """Run the job; ``on_shard_done(scorer, shard_name)`` is called after each shard commits
    (fault injection in tests). Raises ``InputError`` before any work on bad input."""
    t0 = time.perf_counter()
    head, shards = validate(cfg)
    settings, settings_doc = settings_hash(cfg, head)
    out_dir = os.path.abspath(cfg.output)
    manifest = load_manifest(out_dir) if os.path.isdir(out_dir) else {"format": MANIFEST_FORMAT, "shards": {}}
    todo = [s for s in shards if not _is_done(out_dir, manifest, s, settings)]
    summary = JobSummary(out_dir, len(shards), len(todo), len(shards) - len(todo), 0, 0.0, 0.0,
                         cfg.tp * cfg.replicas, "-", 0)  # fmt: skip
    if not todo:
        print(summary.text(), file=out)
        return summary

    from .ray_scorer import ShardedScorer

    scorer = ShardedScorer(
        cfg.head, vocab_size=head.vocab_size, tp=cfg.tp, replicas=cfg.replicas, k=cfg.k, device=cfg.device,
        dtype=cfg.dtype, temperature=cfg.temperature, softcap=cfg.softcap, ignore_index=cfg.ignore_index,
        max_retries=cfg.max_retries, address=cfg.ray_address, num_cpus=cfg.num_cpus, head_impl=cfg.head_impl,
    )  # fmt: skip
    with scorer:
        summary.device = scorer.device
        summary.startup_seconds = time.perf_counter() - t0
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # leftovers of an interrupted run
            if (name.startswith(".") and ".parquet.tmp-" in name) or name.startswith(MANIFEST + ".tmp-"):
                os.remove(os.path.join(out_dir, name))
        manifest.setdefault("shards", {})
        manifest["settings"] = settings_doc
        fault = _fault_hook()
        schema = output_schema()
        t1 = time.perf_counter()
        done = _score_shards(cfg, scorer, todo, out_dir, manifest, settings, schema, on_shard_done, fault)
        summary.seconds = time.perf_counter() - t1
        summary.tokens = sum(s.n_tokens for s in done)
        summary.computed = [s.name for s in done]
        summary.rebuilds = scorer.rebuilds
    print(summary.text(), file=out)
    return summary


def _score_shards(cfg, scorer, todo, out_dir, manifest, settings, schema, on_shard_done, fault) -> list:
    from tqdm import tqdm

    def commit(w: _ShardWriter) -> None:
        w.commit()
        manifest["shards"][w.shard.name] = {
            "file": os.path.basename(w.final),
            "rows": w.rows,
            "input": w.shard.fingerprint(),
            "settings": settings,
            "finished_unix": time.time(),
        }
        _atomic_write(
            os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode()
        )
        done.append(w.shard)
        for hook in (on_shard_done, fault):
            if hook is not None:
                hook(scorer, w.shard.name)

    meta: deque = deque()  # (shard, start, targets) of each batch handed to the scorer, in order

    def batches():
        for s in todo:
            for start, hidden, targets in iter_batches(s, cfg.batch_tokens, read_hidden=cfg.read_in_driver):
                meta.append((s, start, targets))
                yield (hidden, targets) if cfg.read_in_driver else hidden  # tensors, or a FileRows

    done: list = []
    writer: _ShardWriter | None = None
    bar = tqdm(
        total=sum(s.n_tokens for s in todo), unit="tok", unit_scale=True, disable=not cfg.progress,
        desc="scoring", dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
    try:
        for s in todo:  # empty shards never reach the scorer
            if s.n_tokens == 0:
                writer = _ShardWriter(out_dir, s, schema)
                commit(writer)
                writer = None
        for res in scorer.score_iter(batches()):
            s, start, targets = meta.popleft()
            if writer is None or writer.shard is not s:
                writer = _ShardWriter(out_dir, s, schema)
            writer.write(_table(s.name, start, targets, res, cfg.ignore_index, schema))
            bar.update(res.lse.shape[0])
            if writer.rows == s.n_tokens:
                commit(writer)
                writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    return done


# ------------------------------------------------------------------------------------ demo


def make_demo_data(root: str, *, seed: int = 0) -> tuple[str, str]:
    """A small deterministic head (1003 rows, true vocab 1000, H=64, with bias) and four input
    shards of uneven length (about 10% ignored targets). Written once; reused if present."""
    import torch
    from safetensors.torch import save_file

    head_path = os.path.join(root, "head.safetensors")
    in_dir = os.path.join(root, "inputs")
    lengths = (1500, 1024, 1201, 777)
    names = [os.path.join(in_dir, f"part-{i:03d}.safetensors") for i in range(len(lengths))]
    if os.path.isfile(head_path) and all(os.path.isfile(p) for p in names):
        return head_path, in_dir
    os.makedirs(in_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows, vocab, hidden = 1003, 1000, 64
    weight = torch.randn(rows, hidden, generator=g) * 0.3
    bias = torch.randn(rows, generator=g) * 0.1
    save_file({"weight": weight, "bias": bias}, head_path, metadata={"vocab_size": str(vocab)})
    for path, n in zip(names, lengths):
        h = torch.randn(n, hidden, generator=g)
        t = torch.randint(0, vocab, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.1] = -100
        save_file({"hidden": h, "targets": t}, path)
    return head_path, in_dir


def run_demo(cfg: JobConfig, out=sys.stdout) -> JobSummary:
    """``shardsoftmax score --demo``: demo data under ``<output>/data``, scores under ``<output>/scores``."""
    root = os.path.abspath(cfg.output)
    head_path, in_dir = make_demo_data(os.path.join(root, "data"))
    print(f"demo data: head {head_path}, inputs {in_dir}", file=out)
    cfg = JobConfig(
        **{**asdict(cfg), "head": head_path, "input": in_dir, "output": os.path.join(root, "scores")}
    )
    if cfg.num_cpus is None:
        cfg.num_cpus = max(os.cpu_count() or 1, cfg.tp * cfg.replicas)
    return run_job(cfg, out=out)

"""Ray launcher: a resident, fault-tolerant, vocabulary-sharded scorer.

``ShardedScorer`` holds ``replicas`` tensor-parallel groups of ``tp`` Ray actors. Each actor holds
one contiguous row range of the head weight ``[V, H]`` (uneven splits allowed: the first
``V % tp`` ranks get one extra row) and computes only its own logits shard
``hidden @ W_shard.T (+ bias)``; ``shardsoftmax.softmax_stats`` then merges the shards' partials
with one all-gather inside the group, so no actor ever holds the whole vocabulary's logits
(``head_impl="chunked"`` or ``"fused"``: ``linear_softmax_stats``, so none holds even its whole
shard's).

* **Gang scheduling.** Each group reserves a placement group of ``tp`` bundles with
  ``STRICT_PACK`` (one node, so NCCL uses NVLink): one GPU per actor when the cluster has GPUs
  (NCCL), else one CPU (gloo). Rank 0 picks a free port on its node and its IP and port are passed
  to the others for ``torch.distributed`` rendezvous; nothing else is needed from the environment.
* **Data parallelism.** Batches go to the least-loaded group (at most ``max_inflight`` in flight
  per group); ``score_iter`` yields results in input order.
* **Two data paths.** A batch given as tensors, ``(hidden, targets)``, goes through the object
  store: the driver puts each batch's hidden states as up to ``put_threads`` row blocks, put by
  that many threads at once (``ray.put`` releases the GIL while it copies), and each actor copies
  the blocks into its pinned buffer with ``cpus_per_worker`` torch threads. A batch given as a
  ``FileRows`` (a safetensors file, tensor names, a row range; ``score_files`` makes them) travels
  as that small reference only: every actor of the group reads the rows itself, with positional
  reads by ``cpus_per_worker`` threads straight into its pinned buffer (``RowReader``), so the
  driver is out of the data path (it checks each file's header once). The files must then be
  readable at the same path on every node.
* **Pipelining.** A worker answers two batches behind: the call that sends batch ``i`` starts
  staging it on the actor's stager thread, launches batch ``i-1`` and returns batch ``i-2``'s
  results (``flush`` calls launch and return the last ones). On a GPU the stager reads (or copies)
  batch ``i`` into reused pinned memory and copies it to the device on a copy stream while batch
  ``i-1`` computes, and the results come back through pinned memory as one packed int32 array per
  batch, from rank 0 only. The driver prepares the next batches meanwhile. On CPU (gloo) the same
  protocol runs without pinned memory or streams.
* **Timing breakdown.** With ``breakdown=True`` the driver and every actor sum the time (and the
  page faults) of each stage of the data path; ``timing_breakdown()`` returns them per batch.
  Off, each stage boundary costs one flag test.
* **Fault tolerance.** If any actor of a group dies (``RayActorError``, a crashed worker, a lost
  node, or a collective that fails because its peer died), the whole group is killed, its placement
  group removed, and a new group is built (new placement group, new rendezvous). The batches that
  were in flight on it (sent and not answered, including a worker's pending batch) are resubmitted;
  each batch may be tried ``1 + max_retries`` times. Scoring a batch is a pure function of the
  batch, so a retry gives the same rows and each row is returned exactly once (a ``FileRows``
  batch is retried by sending the same reference). Errors in the input (``ValueError``/
  ``TypeError`` raised by the library, a worker's ``InputError`` reading a file) are not retried.
* **Weights are loaded once:** the driver reads each rank's row range (from a safetensors file
  without reading the other rows, or from tensors) into the Ray object store; a rebuilt group's
  actors take their shard from there, so no shared file system is needed.
* **Backend.** On CPU the actors use the PyTorch reference path (fast on CPU); the actors are
  started with ``TRITON_INTERPRET=0`` whatever the driver's environment, unless ``backend="triton"``
  asks for the Triton interpreter explicitly. On GPU the library's "auto" backend runs Triton.

Multi-node: start a cluster (``ray start --head --port=6379`` on one node, ``ray start
--address=HEAD_IP:6379`` on the others, each with ``shardsoftmax`` installed), then run the same
code or command with ``RAY_ADDRESS=HEAD_IP:6379`` (or ``address=``/``--ray-address``). Each group
stays on one node; replicas spread over the nodes. The driver reads the head and ships it through
the object store, and writes the outputs. Batches given as tensors travel through the object store
too; ``FileRows`` batches (the job's default) are read by the workers, so their files must be
readable at the same path on every node (a shared file system); without one, give tensors (the
job: ``--read-in-driver``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .data import (
    HEAD_IMPLS,
    FileRows,
    HeadInfo,
    InputError,
    RowReader,
    check_file_rows,
    inspect_head,
    read_head_rows,
    shard_bounds,
)

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class ScoreResult(NamedTuple):
    """Per-token results of one batch of ``T`` tokens, as numpy arrays."""

    lse: np.ndarray  # [T] float32: log-sum-exp over the global vocabulary
    target_logprob: np.ndarray | None  # [T] float32: log p(target); 0 where ignored; None without targets
    entropy: np.ndarray  # [T] float32, nats
    topk_ids: np.ndarray  # [T, k] int64 global ids, descending logit; ties: lower id first
    topk_logprobs: np.ndarray  # [T, k] float32


class ResourceError(InputError):
    """The cluster cannot hold the requested groups."""


def ensure_ray(
    address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None
) -> bool:
    """Connect to Ray unless already connected: ``address`` (or ``RAY_ADDRESS``) joins a cluster,
    otherwise a local instance starts (``num_cpus`` logical CPUs, an object store of
    ``object_store_memory`` bytes, Ray's default when None). True if this call started it."""
    if ray.is_initialized():
        return False
    joining = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    ray.init(
        address=address,
        num_cpus=None if joining else num_cpus,
        object_store_memory=None if joining else object_store_memory,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    return True


# The local object store this scorer starts is sized to what it holds (the head's shards, the
# batches in flight, their results) rather than Ray's default of ~30% of RAM: the store hands a
# new object fresh memory until it has used its capacity once, and fresh memory costs a page
# fault per 4 KiB. Measured on the 2-core CPU machine (Ray 2.60, 64 MiB put as 4 blocks, the last
# 4 batches kept): default store 39 ms and ~12,300 faults per put; a 1 GiB store 9.8 ms and ~17
# faults. On 4 H200s the driver's put was the floor of the job: 10.5-11.5 ms and ~7,500 faults
# per 64 MiB batch (docs/performance.md, v0.3).
INFLIGHT_BATCH_BYTES = 256 << 20  # store room per batch in flight (8192 x 4096 bf16 is 64 MiB)
STORE_MARGIN_BYTES = 1 << 30


def local_store_bytes(head_bytes: int, replicas: int, max_inflight: int) -> int:
    """The object store size for a local instance: the head's shards, ``INFLIGHT_BATCH_BYTES``
    per batch in flight, and a margin, at most Ray's own default (30% of the machine's memory)."""
    want = head_bytes + replicas * max_inflight * INFLIGHT_BATCH_BYTES + STORE_MARGIN_BYTES
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(want, 0.3 * total))


def to_wire(t: torch.Tensor | None):
    """A tensor as a numpy array (Ray ships numpy zero-copy through the object store, torch
    tensors by pickling); bfloat16 travels as its int16 bits."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return ("bfloat16", t.view(torch.int16).numpy())
    return ("", t.numpy())


def from_wire(w) -> torch.Tensor | None:
    if w is None:
        return None
    tag, arr = w
    with warnings.catch_warnings():  # a read-only view of the object store; only ever read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if tag == "bfloat16" else t


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _minor_faults() -> int:
    """Minor page faults of this process so far (every thread; 0 where ``resource`` is missing).
    A copy into memory this process has not touched yet faults once per 4 KiB page."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Clock:
    """Seconds (and counts) summed per stage of the data path, for ``timing_breakdown``. Off, its
    methods only test ``on``: no clock is read and nothing is stored."""

    def __init__(self, on: bool):
        self.on = on
        self.sums: dict[str, float] = {}
        self._t = 0.0
        self._idle_from: float | None = None

    def start(self, *, idle: bool = False) -> None:
        """Start timing a call; with ``idle``, the time since the last ``stop`` counts as "idle"."""
        if self.on:
            self._t = time.perf_counter()
            if idle and self._idle_from is not None:
                self.add("idle", self._t - self._idle_from)

    def lap(self, stage: str) -> None:
        """The time since the last ``start`` or ``lap`` counts for ``stage``."""
        if self.on:
            t = time.perf_counter()
            self.add(stage, t - self._t)
            self._t = t

    def stop(self) -> None:
        if self.on:
            self._idle_from = time.perf_counter()

    def faults(self) -> int:
        return _minor_faults() if self.on else 0

    def add(self, name: str, value: float) -> None:
        if self.on:
            self.sums[name] = self.sums.get(name, 0.0) + value

    def take(self) -> dict[str, float]:
        """The sums so far; they restart from zero."""
        sums, self.sums = self.sums, {}
        return sums


# A batch's hidden states go into the object store as row blocks of at least this many bytes, at
# most ``put_threads`` of them, each put by its own thread.
PUT_BLOCK_MIN_BYTES = 4 << 20

# Packed per-token results: one int32 array [T, 3 + 2k] per batch, so that a batch's results cross
# the object store as one buffer. Words per row: lse, target_logprob (0 without targets), entropy
# (float32 bits), then the k top-k ids (int32), then the k top-k log-probs (float32 bits).
PACKED_HEAD = 3


def pack_results(st, k: int) -> torch.Tensor:
    """``SoftmaxStats`` of T rows as one int32 tensor ``[T, 3 + 2k]`` on their device."""
    n = st.lse.shape[0]
    words = torch.empty(n, PACKED_HEAD + 2 * k, dtype=torch.int32, device=st.lse.device)
    words[:, 0] = st.lse.float().view(torch.int32)
    if st.target_logprob is None:
        words[:, 1] = 0
    else:
        words[:, 1] = st.target_logprob.float().view(torch.int32)
    words[:, 2] = st.entropy.float().view(torch.int32)
    words[:, PACKED_HEAD : PACKED_HEAD + k] = st.topk_ids
    words[:, PACKED_HEAD + k :] = st.topk_logprobs.float().view(torch.int32)
    return words


def unpack_results(words: np.ndarray, has_targets: bool) -> ScoreResult:
    """The inverse of ``pack_results``, as contiguous numpy arrays (a copy: ``words`` may be a
    read-only view of the object store)."""
    k = (words.shape[1] - PACKED_HEAD) // 2

    def f32(cols) -> np.ndarray:
        return np.ascontiguousarray(cols).view(np.float32)

    return ScoreResult(
        lse=f32(words[:, 0]),
        target_logprob=f32(words[:, 1]) if has_targets else None,
        entropy=f32(words[:, 2]),
        topk_ids=words[:, PACKED_HEAD : PACKED_HEAD + k].astype(np.int64),
        topk_logprobs=f32(words[:, PACKED_HEAD + k :]),
    )


def _grown(buffers: dict, name: str, nbytes: int, *, device, pin: bool) -> torch.Tensor:
    """The first ``nbytes`` of the reusable byte buffer ``buffers[name]``, reallocated when too small."""
    buf = buffers.get(name)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
        buffers[name] = buf
    return buf[:nbytes]


class _Slot:
    """The buffers of one batch on a worker. Three slots rotate: one batch is staged (on the
    stager thread) while the previous one computes and the results of the one before that are
    returned. On CUDA: pinned host buffers and their device twins; ``copied`` is recorded on the
    copy stream after the batch's host-to-device copies (by the stager thread), ``done`` on the
    compute stream after its kernels and the results' device-to-host copy; once both have passed,
    every buffer of the slot is free again. On the CPU the staged tensors are used as they are
    (file reads go to the slot's host buffer) and there are no events."""

    def __init__(self, cuda: bool):
        self.host: dict[str, torch.Tensor] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self.copied = torch.cuda.Event() if cuda else None
        self.done = torch.cuda.Event() if cuda else None


@dataclass
class _Staged:
    """A batch whose staging runs (or ran) on the worker's stager thread."""

    seq: int
    k: int
    slot: _Slot
    stage_name: str  # "stage" (from the object store) or "read" (from its file)
    future: object  # concurrent.futures.Future of ``_timed(TPWorker._stage, slot, fill)``


def _timed(fn, *args):
    """``(fn(*args), seconds, minor page faults)``: the stager thread's own clock."""
    t0, f0 = time.perf_counter(), _minor_faults()
    out = fn(*args)
    return out, time.perf_counter() - t0, _minor_faults() - f0


@dataclass
class _Pending:
    """A batch launched on a worker whose results have not been returned yet."""

    seq: int
    slot: _Slot
    n_rows: int
    width: int  # int32 words per row of its packed results


class TPWorker:
    """One rank of a tensor-parallel group: one vocabulary shard of the head.

    Protocol, two batches behind: ``score(seq, k, targets, *hidden_blocks)`` (its hidden states
    as consecutive row blocks from the object store, one object each) or ``score_file(seq, k,
    rows)`` (a ``FileRows`` the worker reads itself) starts staging batch ``seq`` on the worker's
    stager thread (into pinned memory, then on a GPU its host-to-device copy on a copy stream),
    launches the batch staged by the call before, and returns the results of the batch launched
    by the call before that as ``(prev_seq, words)`` (``None`` while there is none). ``flush()``
    launches the staged batch, if any, and returns the next results; the driver calls it until
    every batch it sent has come back. On a GPU this keeps every stage busy at once: batch ``seq``
    is read (or copied from the object store) into pinned memory and copied to the GPU while batch
    ``seq - 1`` is launched and ``seq - 2``'s results are returned, so a batch costs the slowest
    stage, not their sum (the read of a 64 MiB batch took 4-6 ms on an H200 host, as long as the
    GPU's work at TP = 4). Only the calling thread launches kernels and collectives, in call
    order, so every rank of a group runs the same collectives in the same order.
    ``words`` is the ``pack_results`` array on rank 0 and None on the other ranks (every rank holds
    the same global results; only one ships them). ``timings()`` returns the summed stage times
    when ``breakdown`` is on (see ``ShardedScorer.timing_breakdown``).

    Cross-stream and cross-thread hazards, and what guards each (``_stage``, ``_advance``,
    ``_launch``, ``_compute``): a slot is reused only after the batch before in it is copied in
    (``copied``), computed and copied out (``done``); the device buffers are allocated on the copy
    stream that writes them; the compute stream waits for ``copied``, recorded before the stager's
    future completes; the results are read after ``done``; the stager thread sets this worker's
    device and the copy stream as its own. A pinned buffer that grows is freed to torch's pinned
    allocator, which reuses it only after the copies that used it (it records an event per
    asynchronous copy); a device buffer that grows, after the compute stream's kernels that read
    it (``record_stream``).
    """

    def __init__(self, rank, world, vocab_start, weight, bias, vocab_size, device, dtype, backend, options,
                 threads=1, breakdown=False, head_impl="unfused"):  # fmt: skip
        import shardsoftmax as ss

        self.ss = ss
        if backend is not None:
            ss.set_backend(backend)
        torch.set_num_threads(max(1, int(threads)))  # the staging copy runs on these
        self.rank, self.world, self.vocab_start, self.vocab_size = rank, world, vocab_start, vocab_size
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.device)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        weight, bias = from_wire(weight), from_wire(bias)
        self.dtype = weight.dtype if dtype is None else dtype
        self.weight = weight.to(self.device, self.dtype, copy=True)
        self.bias = None if bias is None else bias.to(self.device, self.dtype, copy=True)
        self.options = options  # temperature, softcap, ignore_index
        self.head_impl = head_impl  # "unfused", or linear_softmax_stats' impl
        self.group = None
        self.copy_stream = torch.cuda.Stream() if self.cuda else None
        # Three slots: one being staged (in the background), one computing, one whose results
        # are returned by the current call; see the class docstring.
        self.slots = tuple(_Slot(self.cuda) for _ in range(3))
        self.n_used = 0  # batches given a slot so far (the next slot is slots[n_used % 3])
        self.staged: _Staged | None = None  # staging or staged, not yet launched
        self.pending: _Pending | None = None  # launched, results not yet returned
        # Hazard: CUDA's current device is per thread (a new thread starts on device 0), so the
        # stager thread sets this worker's device before anything else; its current stream is
        # per thread too, and `_stage` makes it the copy stream.
        init = (torch.cuda.set_device, (self.device,)) if self.cuda else (None, ())
        self.stager = ThreadPoolExecutor(1, "shardsoftmax-stage", initializer=init[0], initargs=init[1])
        self.clock = _Clock(breakdown)
        self.reader = RowReader(threads)  # batches sent as FileRows: read here (stager thread only)

    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def init_group(self, addr: str, port: int, timeout_s: float) -> int:
        import torch.distributed as dist

        kw = {"device_id": self.device} if self.cuda else {}
        dist.init_process_group(
            "nccl" if self.cuda else "gloo",
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=timeout_s),
            **kw,
        )
        self.group = dist.group.WORLD
        return os.getpid()

    def score(self, seq: int, k: int, targets, *hidden_blocks):
        """Stage batch ``seq``, sent through the object store, and launch the one before it; return
        the results of the one before that (see the class docstring)."""
        self.clock.start(idle=True)
        # The blocks are read-only views of the object store; the closure keeps them (and so the
        # objects) alive until the stager has copied them.
        blocks, targets = [from_wire(b) for b in hidden_blocks], from_wire(targets)

        def fill(slot: _Slot):
            h = self._stage_host(slot, "hidden", blocks)
            return h, None if targets is None else self._stage_host(slot, "targets", [targets])

        return self._advance(seq, k, fill, "stage")

    def score_file(self, seq: int, k: int, rows: FileRows):
        """Read batch ``seq`` from ``rows`` (in the background, straight into its staging buffer)
        and launch the one before it; return the results of the one before that (see the class
        docstring)."""
        self.clock.start(idle=True)
        return self._advance(seq, k, lambda slot: self._read_host(slot, rows), "read")

    def _advance(self, seq: int, k: int, fill, stage_name: str):
        """Start staging batch ``seq`` into a free slot on the stager thread (``fill(slot) ->
        (hidden, targets)`` in host memory, then ``_stage``), launch the batch staged before it,
        and return the results of the batch launched before that."""
        c = self.clock
        slot = self.slots[self.n_used % len(self.slots)]
        self.n_used += 1
        # The two batches that may still use slots are the two given one most recently (staged
        # and pending; a flush only moves one to the other), never the one before them.
        if any(b is not None and b.slot is slot for b in (self.staged, self.pending)):
            raise RuntimeError(f"worker rank {self.rank}: staging slot still in use (protocol bug)")
        if self.cuda:
            # Hazard: the stager refills this slot's pinned buffers and device buffers. The batch
            # that used it three slots ago must be done reading them: its host-to-device copy out
            # of the pinned buffers (``copied``; an asynchronous copy reads the host memory when it
            # runs, not when it is queued), and its kernels reading the device buffers and its
            # results' copy into ``host["out"]`` (``done``). Both passed already in the protocol
            # (its results were returned), so this costs nothing; it keeps the slot safe if a call
            # failed half-way.
            slot.copied.synchronize()
            slot.done.synchronize()
        c.lap("slot_wait")
        previous = self.staged
        future = self.stager.submit(_timed, self._stage, slot, fill)
        self.staged = _Staged(seq, k, slot, stage_name, future)
        return self._launch(previous)

    def _stage(self, slot: _Slot, fill):
        """On the stager thread: ``fill(slot)`` (the batch into the slot's host buffers), then on
        CUDA its host-to-device copies (``_to_device``) with ``slot.copied`` recorded after them.
        Returns ``(hidden, targets)`` on this worker's device (targets None or int64)."""
        if not self.cuda:
            return fill(slot)
        with torch.cuda.stream(self.copy_stream):  # this thread's current stream: the copy stream
            try:
                h, t = fill(slot)
                h = self._to_device(slot, "hidden", h)
                return h, None if t is None else self._to_device(slot, "targets", t)
            finally:
                # Recorded even if a step raised after a copy was queued (say the targets' buffer
                # after the hidden states' copy): the next batch in this slot waits on it
                # (``_advance``) before it refills the pinned buffers.
                slot.copied.record(self.copy_stream)

    def _launch(self, staged: _Staged | None, *, count: bool = True):
        """Launch ``staged`` (once the stager finished it) and return the results of the batch
        launched before it. If that fails, the launched batch is forgotten: the driver abandons
        the batches of a call that raised (a retried batch is sent again), and its slot is free
        for the next batch (whose staging waits for the slot's events first)."""
        try:
            return self._launch_inner(staged, count=count)
        except BaseException:
            self.pending = None
            raise

    def _launch_inner(self, staged: _Staged | None, *, count: bool):
        c = self.clock
        prev = self.pending
        if staged is not None:
            try:
                (h, t), seconds, faults = staged.future.result()
            except InputError as err:  # deterministic: the driver does not retry it
                if staged.stage_name != "read":
                    raise
                raise InputError(
                    f"worker rank {self.rank} on node {ray.util.get_node_ip_address()}: {err}. Workers "
                    "read their batches from the input files, which must exist at the same path on every "
                    "node (a shared file system); otherwise read in the driver (`--read-in-driver`, or "
                    "pass tensors)"
                ) from None
            c.lap(staged.stage_name + "_wait")  # this thread waiting for the stager
            c.add(staged.stage_name, seconds)  # the stager's own time (overlapped with this thread's)
            c.add(staged.stage_name + "_faults", faults)
            slot = staged.slot
            if self.cuda:
                if prev is not None:
                    # Wait for the previous batch before launching this one (a few microseconds of
                    # idle GPU): then this call's collective resolves the library's deferred checks
                    # of the previous batch, which raise here, before its results are returned.
                    prev.slot.done.synchronize()
                compute = torch.cuda.current_stream()
                # Hazard: ``h`` and ``t`` are written on the copy stream and read on this one. The
                # compute stream waits for ``copied``, which the stager recorded before its future
                # completed (waiting on an event not recorded yet would wait for nothing: the
                # ``result()`` above comes first).
                compute.wait_event(slot.copied)
                # Hazard: the buffers belong to the copy stream's pool (allocated there). If one is
                # freed (a slot's buffer grows), the caching allocator must not hand its memory to
                # the copy stream again before this stream's kernels reading it are done; it knows
                # of those only through ``record_stream``.
                h.record_stream(compute)
                if t is not None:
                    t.record_stream(compute)
            c.lap("prev_wait")
            width = self._compute(slot, h, t, staged.k)
            c.lap("launch")
            self.pending = _Pending(staged.seq, slot, h.shape[0], width)
        else:
            self.pending = None
            if prev is not None and self.cuda:
                prev.slot.done.synchronize()
            if prev is not None:
                self.ss.synchronize(self.group)  # raise any deferred check of that batch first
            c.lap("prev_wait")
        # Hazard: the results' device-to-host copy is asynchronous; ``prev.slot.done`` (recorded
        # after it) was synchronized above before ``_take`` reads ``host["out"]``.
        out = self._take(prev)
        c.lap("take" if count else "flush")
        if count:
            c.add("calls", 1)
        c.stop()
        return out

    def flush(self):
        """With no new batch: launch the staged batch, if any, and return the results of the one
        launched before it, ``(seq, words)``, or None if there is none. Called until nothing is
        left (each call returns at most one batch's results)."""
        self.clock.start(idle=True)
        staged, self.staged = self.staged, None
        return self._launch(staged, count=False)

    def timings(self, reset: bool = False) -> dict[str, float]:
        """Summed seconds per stage (and ``calls``, ``stage_faults``) since the last reset, and
        ``threads``, the torch threads of the staging copy; empty when ``breakdown`` is off."""
        sums = self.clock.take() if reset else dict(self.clock.sums)
        return {**sums, "threads": torch.get_num_threads()} if self.clock.on else {}

    def _stage_host(self, slot: _Slot, name: str, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Consecutive row blocks (host memory, read-only in the object store) as one tensor in
        host memory: on CUDA copied into the slot's pinned buffer (torch's ``copy_`` splits each
        block over the worker's ``threads``); on the CPU the blocks themselves (concatenated)."""
        if not self.cuda:
            return blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        x = blocks[0]
        shape = (sum(b.shape[0] for b in blocks), *x.shape[1:])
        host = _grown(slot.host, name, x.element_size() * math.prod(shape), device="cpu", pin=True)
        rows = host.view(x.dtype).view(shape)
        start = 0
        for b in blocks:
            rows[start : start + b.shape[0]].copy_(b)
            start += b.shape[0]
        return rows

    def _read_host(self, slot: _Slot, rows: FileRows):
        """``rows`` read from their file (``RowReader``: positional reads by the worker's threads)
        into the slot's host buffer (pinned on CUDA), as ``(hidden, targets)`` in host memory;
        targets as int64."""
        span = self.reader.span(rows.path, rows.hidden)
        host = _grown(slot.host, "hidden", rows.n_rows * span.row_bytes, device="cpu", pin=self.cuda)
        h = self.reader.read_into(rows.path, rows.hidden, rows.start, rows.stop, host)
        if rows.targets is None:
            return h, None
        raw_bytes = rows.n_rows * self.reader.span(rows.path, rows.targets).row_bytes
        raw = _grown(slot.host, "targets_raw", raw_bytes, device="cpu", pin=False)
        t = self.reader.read_into(rows.path, rows.targets, rows.start, rows.stop, raw)
        return h, self._stage_host(slot, "targets", [t.to(torch.int64)])

    def _to_device(self, slot: _Slot, name: str, host: torch.Tensor) -> torch.Tensor:
        """The staged ``host`` tensor (pinned) in the slot's device buffer ``name``: one
        asynchronous copy on the copy stream (CUDA), or ``host`` itself (CPU). The buffer is
        allocated (when missing or too small) on that stream. Hazard: allocated on the compute
        stream instead, it could be carved from memory the previous batch's kernels just freed
        there and are still reading (the caching allocator reuses a block freed on a stream right
        away for that stream's next allocation, which is safe only for work queued on the same
        stream), and the copy would race them."""
        if not self.cuda:
            return host
        with torch.cuda.stream(self.copy_stream):
            dev = _grown(slot.dev, name, host.numel() * host.element_size(), device=self.device, pin=False)
            out = dev.view(host.dtype).view(host.shape)
            out.copy_(host, non_blocking=True)
        return out

    def _compute(self, slot: _Slot, hidden: torch.Tensor, targets, k: int) -> int:
        """Queue the batch on the current stream; rank 0 also queues its packed results' copy into
        ``slot.host["out"]``. Returns the packed width."""
        try:
            with torch.no_grad():
                h = hidden.to(self.dtype)
                t = None if targets is None else targets.to(torch.int64)
                layout = {"vocab_size": self.vocab_size, "vocab_start": self.vocab_start}
                if self.head_impl == "unfused":
                    logits = torch.nn.functional.linear(h, self.weight, self.bias)  # [T, V_shard]: this shard
                    st = self.ss.softmax_stats(
                        logits, t, k=k, process_group=self.group, **layout, **self.options
                    )
                else:  # never all of this shard's logits at once
                    st = self.ss.linear_softmax_stats(
                        h, self.weight, t, bias=self.bias, k=k, process_group=self.group, impl=self.head_impl,
                        **layout, **self.options,
                    )  # fmt: skip
                if self.rank == 0:
                    words = pack_results(st, k)
                    out = _grown(slot.host, "out", words.numel() * 4, device="cpu", pin=self.cuda)
                    out.view(torch.int32).view(words.shape).copy_(words, non_blocking=self.cuda)
        finally:
            if self.cuda:
                # After everything queued for this batch, also when a check raised half-way with
                # kernels reading the slot's device buffers already queued: the slot is not reused
                # before they are done (``_advance``).
                slot.done.record()
        return PACKED_HEAD + 2 * k

    def _take(self, prev: _Pending | None):
        """``(seq, words)`` of a launched batch (its results must have landed), or None."""
        if prev is None:
            return None
        if self.rank != 0:
            return prev.seq, None
        n = prev.n_rows * prev.width
        words = prev.slot.host["out"][: 4 * n].view(torch.int32).view(prev.n_rows, prev.width)
        return prev.seq, words.numpy().copy()  # a copy: the slot's buffer is reused


_RemoteWorker = ray.remote(max_restarts=0, max_task_retries=0)(TPWorker)


@dataclass
class _Group:
    index: int
    actors: list = field(default_factory=list)
    pg: object = None
    inflight: list = field(default_factory=list)  # seqs sent to it whose results are not back, in order
    calls: list = field(default_factory=list)  # _Calls sent to it that have not returned on every rank


@dataclass
class _Task:
    seq: int
    k: int
    has_targets: bool
    hidden_refs: list = field(default_factory=list)  # the hidden states' row blocks, in order
    targets_ref: object = None
    rows: FileRows | None = None  # instead of the refs: a batch the workers read themselves
    attempts: int = 0
    result: ScoreResult | None = None


@dataclass
class _Call:
    """One method call (``score`` or ``flush``) on every actor of a group."""

    group: int
    refs: list
    n_done: int = 0
    value: object = None  # rank 0's return value: (seq, packed words) or None


# Event counters of the timing sums, and the stages (of the driver) that happen once per batch put
# rather than once per result; the others are divided by the results (driver) or calls (worker).
_COUNTS = ("batches", "results", "calls", "threads")
_PER_PUT = ("read", "put", "put_faults", "put_objects")


def _per_batch(sums: dict[str, float], per: str) -> dict[str, float]:
    """The sums of a ``_Clock`` per event: seconds as milliseconds (``<stage>_ms``), other sums
    (``*_faults``, ``*_objects``) as they are, each divided by ``sums[per]``, or, for the driver
    (``per == "results"``), by ``sums["batches"]`` for ``_PER_PUT`` stages (a worker's ``read``
    is per call); the counters themselves unchanged."""
    out = {}
    for name, v in sorted(sums.items()):
        if name in _COUNTS:
            out[name] = v
            continue
        v /= max(sums.get("batches" if per == "results" and name in _PER_PUT else per, 0), 1)
        if name.endswith(("_faults", "_objects")):
            out[name] = v
        else:
            out[name + "_ms"] = 1e3 * v
    return out


def _retryable(err: BaseException) -> bool:
    """Input errors from the library are deterministic; anything else (a dead actor or node, a
    collective broken by a dead peer) is fixed by rebuilding the group."""
    if isinstance(err, ray.exceptions.RayTaskError):
        return not isinstance(err.cause, (ValueError, TypeError))
    return True


class ShardedScorer:
    """Resident vocabulary-sharded scorer over Ray; see the module docstring.

    ``head``: a path (safetensors or torch.save dict with ``weight`` [V, H], optional ``bias`` [V])
    or a weight tensor ``[V, H]`` (with ``bias=``). ``vocab_size``: the true vocabulary size
    (default: from the file, else V); weight rows past it are padding. ``device``: "auto" (GPUs
    if the cluster has any, else CPUs), "cuda" or "cpu". ``dtype``: the logits' dtype ("float32",
    "bfloat16", "float16", "float64", or "auto" for the head's). ``max_inflight``: batches in
    flight per replica (read ahead, in the object store, or not yet yielded; 4 keeps a GPU busy).
    ``cpus_per_worker``: CPUs reserved per actor, also the threads of its staging copy
    and of its file reads.
    ``put_threads``: driver threads that put a batch into the object store, as that many row
    blocks of at least ``PUT_BLOCK_MIN_BYTES`` each. ``breakdown``: time the stages of the data
    path, see ``timing_breakdown``. ``object_store_memory``: bytes of the object store when the
    scorer starts a local Ray instance (default ``local_store_bytes``: sized to what it holds, so
    that the store reuses its memory; ignored when joining a cluster, whose store its owner sizes).
    ``head_impl``: "unfused" (default, the fastest), "chunked" or "fused" (bounded memory); see
    ``HEAD_IMPLS``. Results are the same up to the matmul's rounding.
    Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        head,
        *,
        bias: torch.Tensor | None = None,
        vocab_size: int | None = None,
        tp: int = 2,
        replicas: int = 1,
        k: int = 20,
        device: str = "auto",
        dtype: str = "float32",
        temperature: float = 1.0,
        softcap: float | None = None,
        ignore_index: int = -100,
        max_retries: int = 3,
        max_inflight: int = 4,
        cpus_per_worker: float = 1,
        put_threads: int = 4,
        breakdown: bool = False,
        backend: str | None = None,
        address: str | None = None,
        num_cpus: int | None = None,
        object_store_memory: int | None = None,
        collective_timeout_s: float = 600.0,
        start_timeout_s: float = 300.0,
        head_impl: str = "unfused",
    ):
        positive = {"tp": tp, "replicas": replicas, "max_inflight": max_inflight, "put_threads": put_threads}
        for name, v in positive.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if object_store_memory is not None and (
            not isinstance(object_store_memory, int)
            or isinstance(object_store_memory, bool)
            or object_store_memory < 1
        ):
            raise ValueError(
                f"object_store_memory must be a number of bytes > 0 or None, got {object_store_memory!r}"
            )
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        if backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend must be None, 'auto', 'torch' or 'triton', got {backend!r}")
        if head_impl not in HEAD_IMPLS:
            raise ValueError(f"head_impl must be one of {HEAD_IMPLS}, got {head_impl!r}")
        self.head_impl = head_impl

        self.info = self._head_info(head, bias, vocab_size)
        if self.info.rows < tp:
            raise InputError(f"tp={tp} is larger than the head's {self.info.rows} rows")
        if not isinstance(k, int) or not 0 <= k <= min(1024, self.info.vocab_size):
            raise InputError(
                f"k must be an int in [0, min(1024, vocab_size={self.info.vocab_size})], got {k!r}"
            )
        if self.info.vocab_size >= 2**31:  # the packed results carry top-k ids as int32
            raise InputError(f"vocab_size={self.info.vocab_size} must be < 2**31")
        self.tp, self.replicas, self.k = tp, replicas, k
        self.max_retries, self.max_inflight = max_retries, max_inflight
        self.cpus_per_worker, self.put_threads = cpus_per_worker, put_threads
        self.collective_timeout_s, self.start_timeout_s = collective_timeout_s, start_timeout_s
        self._clock = _Clock(breakdown)  # the driver's stages; each worker has its own
        self._put_pool = ThreadPoolExecutor(put_threads, "shardsoftmax-put") if put_threads > 1 else None
        self._headers = RowReader()  # the headers of FileRows batches' files, for the driver's checks
        self.options = {"temperature": temperature, "softcap": softcap, "ignore_index": ignore_index}
        self.rebuilds = 0
        self._next_seq = 0  # batch ids, unique over the scorer's life
        self._groups: list[_Group] = []
        head_bytes = self.info.rows * self.info.hidden_size * self.info.dtype.itemsize
        store = object_store_memory or local_store_bytes(head_bytes, replicas, max_inflight)
        self._owns_ray = ensure_ray(address, num_cpus, store)
        try:
            self.device = self._pick_device(device)
            self._check_resources()
            self._dtype = None if dtype == "auto" else DTYPES[dtype]
            if backend is None:
                backend = "torch" if self.device == "cpu" else "auto"
            self._backend = backend
            interpret = "1" if (backend == "triton" and self.device == "cpu") else "0"
            self._runtime_env = {"env_vars": {"TRITON_INTERPRET": interpret}}
            self._shards = self._put_shards(head, bias)
            self._groups = [_Group(i) for i in range(replicas)]
            for g in self._groups:
                self._start_group(g)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------ setup

    @staticmethod
    def _head_info(head, bias, vocab_size) -> HeadInfo:
        if isinstance(head, torch.Tensor):
            if head.dim() != 2 or not head.dtype.is_floating_point:
                raise InputError(
                    f"head weight must be a float tensor [V, H], got {head.dtype} {tuple(head.shape)}"
                )
            if bias is not None and tuple(bias.shape) != (head.shape[0],):
                raise InputError(f"bias must have shape [{head.shape[0]}], got {tuple(bias.shape)}")
            vocab = head.shape[0] if vocab_size is None else vocab_size
            if not 1 <= vocab <= head.shape[0]:
                raise InputError(f"vocab_size={vocab} must be between 1 and the head's {head.shape[0]} rows")
            return HeadInfo(
                "<tensor>", "tensor", head.shape[0], head.shape[1], head.dtype, bias is not None, vocab
            )
        if bias is not None:
            raise ValueError("bias= is only for a weight tensor; a head file carries its own 'bias'")
        return inspect_head(head, vocab_size)

    def _put_shards(self, head, bias) -> list:
        refs = []
        for start, stop in shard_bounds(self.info.rows, self.tp):
            if isinstance(head, torch.Tensor):
                w = head[start:stop].detach().cpu().contiguous()
                b = None if bias is None else bias[start:stop].detach().cpu().contiguous()
            else:
                w, b = read_head_rows(self.info, start, stop)
            refs.append((start, ray.put(to_wire(w)), None if b is None else ray.put(to_wire(b))))
            del w, b
        return refs

    def _pick_device(self, device: str) -> str:
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "auto":
            return "cuda" if gpus >= 1 else "cpu"
        return device

    def _check_resources(self) -> None:
        """Fail now, with a clear message, if the groups can never be placed (a placement group
        that cannot fit would otherwise wait forever)."""
        kind, per = ("GPU", 1) if self.device == "cuda" else ("CPU", self.cpus_per_worker)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        best = max((n.get(kind, 0) for n in nodes), default=0)
        total = sum(n.get(kind, 0) for n in nodes)
        what = "GPUs" if kind == "GPU" else "CPUs"
        if self.tp * per > best:
            raise ResourceError(
                f"tp={self.tp} needs {self.tp * per:g} {what} on one node, but the largest node has {best:g} "
                f"(cluster total {total:g}); lower --tp"
            )
        if self.tp * self.replicas * per > total:
            raise ResourceError(
                f"tp={self.tp} x replicas={self.replicas} needs {self.tp * self.replicas * per:g} {what}, "
                f"but the cluster has {total:g}; lower --replicas or --tp"
            )

    def _start_group(self, g: _Group) -> None:
        """Reserve a placement group, start the actors and form their process group. Bounded
        retries: a port taken between pick and bind, or an actor dying during start-up."""
        last = None
        for _ in range(1 + self.max_retries):
            try:
                self._try_start_group(g)
                return
            except (ray.exceptions.RayError, OSError, RuntimeError) as err:
                if isinstance(err, ray.exceptions.GetTimeoutError):
                    self._stop_group(g)
                    raise RuntimeError(
                        f"group {g.index}: resources for {self.tp} workers did not become free within "
                        f"{self.start_timeout_s:g} s"
                    ) from err
                last = err
                log.warning("group %d failed to start (%s); retrying", g.index, err)
                self._stop_group(g)
        raise RuntimeError(f"group {g.index} failed to start {1 + self.max_retries} times") from last

    def _try_start_group(self, g: _Group) -> None:
        gpu = self.device == "cuda"
        bundle = {"CPU": self.cpus_per_worker, **({"GPU": 1} if gpu else {})}
        g.pg = placement_group([dict(bundle) for _ in range(self.tp)], strategy="STRICT_PACK")
        ray.get(g.pg.ready(), timeout=self.start_timeout_s)
        g.actors = [
            _RemoteWorker.options(
                num_cpus=self.cpus_per_worker,
                num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(g.pg, placement_group_bundle_index=r),
                runtime_env=self._runtime_env,
            ).remote(
                r,
                self.tp,
                start,
                w_ref,
                b_ref,
                self.info.vocab_size,
                self.device,
                self._dtype,
                self._backend,
                self.options,
                self.cpus_per_worker,
                self._clock.on,
                self.head_impl,
            )  # fmt: skip
            for r, (start, w_ref, b_ref) in enumerate(self._shards)
        ]
        addr, port = ray.get(g.actors[0].rendezvous_address.remote(), timeout=self.start_timeout_s)
        pids = [a.init_group.remote(addr, port, self.collective_timeout_s) for a in g.actors]
        ray.get(pids, timeout=self.start_timeout_s)

    def _stop_group(self, g: _Group) -> None:
        for a in g.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        if g.pg is not None:
            try:
                remove_placement_group(g.pg)
            except Exception:
                pass
        g.actors, g.pg = [], None

    # ------------------------------------------------------------------------------------ scoring

    @property
    def n_workers(self) -> int:
        return self.tp * self.replicas

    def _check_batch(self, hidden, targets):
        hidden = torch.as_tensor(hidden)
        if hidden.dim() != 2 or hidden.shape[1] != self.info.hidden_size:
            raise ValueError(
                f"hidden must have shape [T, {self.info.hidden_size}], got {tuple(hidden.shape)}"
            )
        if not hidden.dtype.is_floating_point:
            raise TypeError(f"hidden must be a float tensor, got {hidden.dtype}")
        if targets is not None:
            targets = torch.as_tensor(targets)
            if tuple(targets.shape) != (hidden.shape[0],):
                raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
            if targets.dtype.is_floating_point or targets.dtype == torch.bool:
                raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
        return hidden.cpu(), None if targets is None else targets.cpu()

    def _check_rows(self, rows: FileRows) -> FileRows:
        """``rows`` checked against its file's header (read once per file, again if it changes)
        and the head's hidden size, with an absolute path (the workers' directory differs)."""
        path = os.path.abspath(rows.path)
        _, spans = self._headers.layout(path)
        check_file_rows(rows, spans, self.info.hidden_size)
        return rows if path == rows.path else dataclasses.replace(rows, path=path)

    def _put_batch(self, hidden: torch.Tensor, targets: torch.Tensor | None) -> tuple[list, object]:
        """Put one batch in the object store; return its hidden row blocks' refs, in order, and
        the targets' ref (or None). ``hidden`` goes as up to ``put_threads`` row blocks of at least
        ``PUT_BLOCK_MIN_BYTES``, put at once by the put threads: each ``ray.put`` is a copy into
        object-store memory that this process may not have touched yet (a page fault per 4 KiB)."""
        rows, nbytes = hidden.shape[0], hidden.numel() * hidden.element_size()
        n = max(1, min(self.put_threads, rows, nbytes // PUT_BLOCK_MIN_BYTES))
        items = [hidden[a:b] for a, b in shard_bounds(rows, n)]
        if targets is not None:
            items.append(targets)

        def put(x: torch.Tensor):
            return ray.put(to_wire(x))

        if self._put_pool is None or len(items) == 1:
            refs = [put(x) for x in items]
        else:
            refs = list(self._put_pool.map(put, items))  # in order; waits for all of them
        self._clock.add("put_objects", len(refs))
        return (refs[:-1], refs[-1]) if targets is not None else (refs, None)

    def score(self, hidden, targets=None, *, k: int | None = None) -> ScoreResult:
        """Score one batch: ``hidden`` [T, H], ``targets`` [T] integer ids or None; or ``hidden``
        a ``FileRows`` (the workers read the rows and their targets from the file)."""
        if isinstance(hidden, FileRows):
            if targets is not None:
                raise ValueError("targets must be None with FileRows (it names its targets tensor)")
            return next(self.score_iter([hidden], k=k))
        return next(self.score_iter([(hidden, targets)], k=k))

    def score_files(
        self,
        paths,
        *,
        batch_tokens: int = 8192,
        k: int | None = None,
        hidden: str = "hidden",
        targets: str | None = "targets",
    ) -> Iterator[tuple[FileRows, ScoreResult]]:
        """Score every row of one or more safetensors files, read by the workers themselves.

        ``paths``: a path or a list of paths, each holding ``hidden`` ``[T, H]`` (float) and, if the
        file has a tensor named ``targets`` (``None``: never), the target ids ``[T]``. Each file is
        cut into ``FileRows`` of ``batch_tokens`` rows, and ``(rows, result)`` is yielded per batch,
        in order. Every file's header is checked before any batch is sent. The files must be
        readable at the same path from every node that runs a worker (see ``FileRows``)."""
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be an int >= 1, got {batch_tokens!r}")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        batches = []
        for p in paths:
            p = os.path.abspath(p)
            _, spans = self._headers.layout(p)
            span = spans.get(hidden)
            n = span.shape[0] if span is not None and span.shape else 0
            name = targets if targets in spans else None
            file_batches = [
                FileRows(p, a, min(a + batch_tokens, n), hidden, name) for a in range(0, n, batch_tokens)
            ]
            for rows in file_batches or [FileRows(p, 0, 0, hidden, name)]:
                self._check_rows(rows)  # also a file without rows, for its error
            batches += file_batches
        return zip(batches, self.score_iter(batches, k=k))

    def score_iter(self, batches: Iterable, *, k: int | None = None) -> Iterator[ScoreResult]:
        """Score batches over all replicas; yield results in input order. A batch is a
        ``(hidden, targets)`` pair of tensors (or arrays), which the driver puts in the object store,
        or a ``FileRows``, which only travels as a reference: the workers read its rows themselves.

        At most ``replicas * max_inflight`` batches are in flight: read from ``batches``, put in the
        object store and not yet yielded (each group holds at most ``max_inflight`` of them). The
        workers answer two batches behind (``TPWorker``): a group's ``score`` call for batch ``s``
        returns the results of the batch sent to it two calls before ``s`` (or None); when nothing
        more can be sent to a group that still holds a batch, it is sent ``flush`` (which launches
        the batch staged last and returns the one before it) until every batch came back."""
        k = self.k if k is None else k
        if not isinstance(k, int) or not 0 <= k <= min(1024, self.info.vocab_size):
            raise ValueError(
                f"k must be an int in [0, min(1024, vocab_size={self.info.vocab_size})], got {k!r}"
            )
        source = iter(batches)
        exhausted = False
        tasks: dict[int, _Task] = {}  # in flight, by seq
        owner: dict = {}  # ObjectRef -> (call, rank)
        order: list[int] = []  # seqs of this iteration, in input order, not yet yielded
        cap = self.replicas * self.max_inflight

        def send(g: _Group, method: str, *args) -> None:
            call = _Call(g.index, [getattr(a, method).remote(*args) for a in g.actors])
            for r, ref in enumerate(call.refs):
                owner[ref] = (call, r)
            g.calls.append(call)

        def submit(task: _Task, g: _Group) -> None:
            task.attempts += 1
            if task.rows is not None:
                send(g, "score_file", task.seq, task.k, task.rows)
            else:
                send(g, "score", task.seq, task.k, task.targets_ref, *task.hidden_refs)
            g.inflight.append(task.seq)

        def returned(call: _Call) -> None:
            """Every rank answered: the batch rank 0 returned is done (a seq that is not in flight
            in this group is a leftover of an abandoned iteration and is dropped)."""
            g = self._groups[call.group]
            g.calls.remove(call)
            if call.value is None:
                return
            seq, words = call.value
            if seq in g.inflight:
                task = tasks[seq]
                task.result = unpack_results(words, task.has_targets)
                g.inflight.remove(seq)
                clock.lap("unpack")

        def fail(g: _Group, err: BaseException) -> None:
            victims = [tasks[s] for s in g.inflight]
            for call in g.calls:
                for ref in call.refs:
                    owner.pop(ref, None)
            g.calls.clear()
            g.inflight.clear()
            for t in victims:
                if t.attempts > self.max_retries:
                    raise RuntimeError(
                        f"batch {t.seq} failed {t.attempts} times (max_retries={self.max_retries}); "
                        f"last error: {err}"
                    ) from err
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.warning("group %d failed (%s: %s); rebuilding it", g.index, type(err).__name__, first_line)
            self._stop_group(g)
            self.rebuilds += 1
            self._start_group(g)
            for t in victims:
                submit(t, g)

        clock = self._clock  # the stages of this loop, see `timing_breakdown`
        clock.start()
        try:
            while True:
                while not exhausted and len(tasks) < cap:
                    g = min(self._groups, key=lambda x: len(x.inflight))
                    if len(g.inflight) >= self.max_inflight:
                        break
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    seq = self._next_seq  # unique over the scorer's life (see `returned`)
                    if isinstance(item, FileRows):  # the workers read it: only the reference travels
                        rows = self._check_rows(item)
                        t = _Task(seq, k, rows.targets is not None, rows=rows)
                        clock.lap("read")
                    else:
                        hidden, targets = item
                        hidden, targets = self._check_batch(hidden, targets)
                        clock.lap("read")
                        faults = clock.faults()
                        refs, targets_ref = self._put_batch(hidden, targets)
                        t = _Task(seq, k, targets is not None, refs, targets_ref)
                        clock.add("put_faults", clock.faults() - faults)
                        clock.lap("put")
                    self._next_seq += 1
                    clock.add("batches", 1)
                    tasks[seq] = t
                    order.append(seq)
                    submit(t, g)
                    clock.lap("send")
                for g in self._groups:  # nothing more goes to this group now: collect its last batch
                    if g.inflight and not g.calls:
                        send(g, "flush")
                        clock.lap("send")
                if order and tasks[order[0]].result is not None:
                    clock.add("results", 1)
                    yield tasks.pop(order.pop(0)).result
                    clock.lap("caller")  # the time the caller kept the result before asking again
                    continue
                if exhausted and not tasks:
                    return
                pending = list(owner)
                if not pending:  # pragma: no cover - every unfinished task has calls in flight
                    raise RuntimeError("shardsoftmax: scorer lost track of its batches")
                ray.wait(pending, num_returns=1)
                ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                clock.lap("wait")
                failed: dict[int, BaseException] = {}
                for ref in ready:
                    if ref not in owner:
                        continue
                    call, rank = owner[ref]
                    if call.group in failed:
                        continue
                    try:
                        value = ray.get(ref)
                    except Exception as err:
                        if not _retryable(err):
                            raise
                        failed[call.group] = err
                        continue
                    del owner[ref]
                    call.n_done += 1
                    if rank == 0:
                        call.value = value
                    clock.lap("get")
                    if call.n_done == self.tp:
                        returned(call)
                for gi, err in failed.items():
                    fail(self._groups[gi], err)
                    clock.lap("rebuild")
        finally:  # abandoned early (an error, or the caller stopped): forget what is still queued
            owner.clear()
            for g in self._groups:
                g.inflight.clear()
                g.calls.clear()

    # ------------------------------------------------------------------------------------ timing

    def timing_breakdown(self, reset: bool = False) -> dict:
        """Milliseconds per batch spent in each stage of the data path since the last reset
        (``breakdown=True``; empty dicts otherwise). Waits for the workers' answers, so call it
        between iterations.

        ``driver``: ``read`` (next batch from the caller's iterable, checks; for a ``FileRows``,
        the check against its file's header), ``put`` (tensors into the object store, see
        ``_put_batch``; ``put_faults``: page faults per batch, ``put_objects``: objects per batch;
        absent for ``FileRows``), ``send`` (actor calls), ``wait`` (blocked on the workers), ``get``
        (their answers), ``unpack``, ``caller`` (between a yield and the next request), ``rebuild``;
        ``batches`` (put) and ``results`` (yielded); the stages of a put are per batch, the others
        per result. ``workers``: one dict per actor (``replica``, ``rank``): ``idle`` (between
        calls: Ray's argument and result transfer, or nothing to do), ``slot_wait`` (the staging
        slot's batch of three slots ago still on the GPU), ``stage`` (object store to pinned memory
        and, on a GPU, the copy to the device queued, on the worker's stager thread, overlapped
        with the other stages; ``stage_faults`` per batch), ``read`` (the same for a ``FileRows``
        batch read from its file, ``read_faults``), ``stage_wait`` / ``read_wait`` (the worker
        waiting for its stager), ``prev_wait`` (the batch launched before still on the GPU),
        ``launch`` (queueing this batch; on CPU, computing it), ``take`` (results to the reply),
        ``flush``; ``calls`` and ``threads`` (torch threads of the staging copy, also the reading
        threads).
        """
        if not self._clock.on:
            return {"driver": {}, "workers": []}
        answers = ray.get([a.timings.remote(reset) for g in self._groups for a in g.actors])
        driver = self._clock.take() if reset else dict(self._clock.sums)
        out = {"driver": _per_batch(driver, "results"), "workers": []}
        for i, sums in enumerate(answers):
            if sums:
                out["workers"].append(
                    {"replica": i // self.tp, "rank": i % self.tp, **_per_batch(sums, "calls")}
                )
        return out

    def reset_breakdown(self) -> None:
        """Restart the timing sums, without waiting (the workers reset after the calls already
        sent to them): e.g. after a warm-up, in the middle of an iteration."""
        if not self._clock.on:
            return
        self._clock.take()
        for g in self._groups:
            for a in g.actors:
                a.timings.remote(True)

    # ------------------------------------------------------------------------------------ testing / teardown

    def kill_worker(self, replica: int = 0, rank: int = 0) -> None:
        """Fault injection for tests: kill one actor (as a crash would)."""
        ray.kill(self._groups[replica].actors[rank], no_restart=True)

    def close(self) -> None:
        for g in self._groups:
            self._stop_group(g)
        self._groups = []
        self._shards = []
        if self._put_pool is not None:
            self._put_pool.shutdown()
            self._put_pool = None
        if getattr(self, "_headers", None) is not None:
            self._headers.close()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> ShardedScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

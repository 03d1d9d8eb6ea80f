"""Run a function on N freshly spawned ranks of a new process group and collect what each returns.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes with torch.multiprocessing
("spawn"), each joins a new process group through a TCP store that this (the parent) process
serves on a free port chosen by the OS, calls ``fn(ctx, *args)`` with a ``RankContext`` and sends
back the result. A rank that raises sends its traceback instead; the parent then raises
``RankError`` with every rank's traceback. A hang (e.g. one rank stuck in a collective) fails
after ``timeout`` seconds: the ranks are killed and the error names the ranks that never answered.

Children inherit nothing from other tests: their environment is the parent's at spawn time
plus ``env`` (CPU tier: ``TRITON_INTERPRET=1`` so Triton kernels run on CPU tensors; NCCL tier:
``NCCL_NVLS_ENABLE=0`` and no ``TRITON_INTERPRET``). ``fn`` must be a module-level function of an
importable module (a test module is fine: spawn re-imports it in the child).

Also here: ``count_collectives()``, a context manager that counts torch.distributed collective
calls made in this process (outermost calls only).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import queue
import time
import traceback
from collections import Counter
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankContext", "RankError", "count_collectives", "cpu_env", "nccl_env", "run_ranks"]


class RankContext(NamedTuple):
    rank: int
    world_size: int
    group: Any  # the process group (torch.distributed.group.WORLD of the new group)
    device: torch.device  # cuda:rank for NCCL, cpu otherwise
    backend: str


class RankError(AssertionError):
    """One or more ranks failed or timed out; the message holds each rank's traceback."""


def cpu_env() -> dict[str, str | None]:
    """Environment of CPU-tier children: Triton kernels run in the interpreter on CPU tensors."""
    return {"TRITON_INTERPRET": "1"}


def nccl_env() -> dict[str, str | None]:
    """Environment of NCCL children: compiled Triton on CUDA, NVLink multicast (NVLS) off."""
    return {"TRITON_INTERPRET": None, "NCCL_NVLS_ENABLE": "0"}


@contextlib.contextmanager
def _environ(changes: dict[str, str | None]):
    old = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _rank_main(rank, world_size, port, backend, pg_timeout_s, fn, args, results) -> None:
    """Child process body: join the group, run ``fn``, report ("ok", rank, bytes) or ("error", ...)."""
    try:
        torch.set_num_threads(1)  # N ranks share the machine's cores (as torchrun's OMP_NUM_THREADS=1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=datetime.timedelta(seconds=60)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        ctx = RankContext(rank, world_size, dist.group.WORLD, device, backend)
        out = fn(ctx, *args)
        results.put(("ok", rank, _dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(
    fn,
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout: float = 120.0,
    env: dict[str, str | None] | None = None,
) -> list:
    """Run ``fn(ctx, *args)`` on ``world_size`` new processes; return their results, by rank.

    ``timeout``: seconds for the whole run (start-up included). ``env``: variables to set (None:
    unset) in the children; default ``cpu_env()`` for gloo and ``nccl_env()`` for NCCL.
    """
    if env is None:
        env = nccl_env() if backend == "nccl" else cpu_env()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The parent serves the store on port 0 (the OS picks a free port); the ranks are its clients.
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
    )
    pg_timeout_s = max(10.0, timeout - 10.0)  # collectives give up before the parent kills the ranks
    procs = []
    with _environ(env):
        for rank in range(world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(rank, world_size, store.port, backend, pg_timeout_s, fn, args, results),
                daemon=True,
                name=f"rank{rank}",
            )
            p.start()
            procs.append(p)

    deadline = time.monotonic() + timeout
    done: dict[int, tuple[str, Any]] = {}
    dead_since: dict[int, float] = {}
    first_error_at = None
    try:
        while len(done) < world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            # Once a rank has failed, the others get a short grace to fail too, then are stopped.
            if first_error_at is not None and now - first_error_at > 15.0:
                break
            try:
                kind, rank, payload = results.get(timeout=0.2)
                done[rank] = (kind, payload)
                if kind == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
                continue
            except queue.Empty:
                pass
            for rank, p in enumerate(procs):
                if rank in done or p.exitcode is None:
                    continue
                dead_since.setdefault(rank, now)
                if now - dead_since[rank] > 3.0:  # exited and its report (if any) has had time to arrive
                    done[rank] = ("error", f"rank {rank} exited with code {p.exitcode} without reporting")
                    first_error_at = first_error_at or now
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
        del store

    missing = [r for r in range(world_size) if r not in done]
    errors = {r: payload for r, (kind, payload) in done.items() if kind == "error"}
    if missing or errors:
        lines = [
            f"{len(errors)} of {world_size} ranks failed; ranks that never answered: {missing or 'none'}"
        ]
        if missing and not errors:
            lines.append(f"(timed out after {timeout:.0f} s: a hang?)")
        for r in sorted(errors):
            lines.append(f"----- rank {r} -----\n{errors[r]}")
        raise RankError("\n".join(lines))
    return [_loads(done[r][1]) for r in range(world_size)]


_COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "monitored_barrier",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
)


# The same collectives as ProcessGroup methods (the back end the functions above call, which a
# caller may also call directly, as ``collective._all_gather`` does).
_PG_METHODS = (
    "_allgather_base",
    "all_gather_single",
    "all_gather_single_coalesced",
    "all_to_all_single",
    "allgather",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "allreduce",
    "allreduce_coalesced",
    "alltoall",
    "alltoall_base",
    "barrier",
    "broadcast",
    "gather",
    "monitored_barrier",
    "recv",
    "recv_anysource",
    "reduce",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_single",
    "reduce_scatter_single_coalesced",
    "reduce_scatter_tensor_coalesced",
    "scatter",
    "send",
)


def calls_that_sync(calls: dict, group, repeats: int = 3) -> list[str]:
    """Run each of ``calls`` (name -> no-argument function making group calls on CUDA) once to
    agree on the layout (that reads the headers: a sync), then ``repeats`` times under
    ``torch.cuda.set_sync_debug_mode("error")``, where any op that syncs the host with the GPU
    raises. Returns "name: error" for the calls that synced."""
    import shardsoftmax as ss

    synced = []
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(repeats):
                call()
        except RuntimeError as err:
            synced.append(f"{name}: {err}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ss.synchronize(group)
    return synced


@contextlib.contextmanager
def count_collectives():
    """Count torch.distributed collective calls (and point-to-point ones) made in this process.

    Yields a ``Counter`` {function name: calls}; ``sum(counter.values())`` is the total. A call
    made from inside another counted call (e.g. one name forwarding to another) counts once.
    Patches ``torch.distributed``, ``torch.distributed.distributed_c10d`` and the collective
    methods of ``ProcessGroup``.
    """
    from torch.distributed import distributed_c10d as c10d

    counts: Counter = Counter()
    depth = [0]
    patched = []

    def wrap(name, orig):
        def counted(*a, **kw):
            if depth[0] == 0:
                counts[name] += 1
            depth[0] += 1
            try:
                return orig(*a, **kw)
            finally:
                depth[0] -= 1

        return counted

    originals = {}
    for name in _COLLECTIVES:
        for mod in (dist, c10d):
            fn = getattr(mod, name, None)
            if fn is None:
                continue
            orig = originals.setdefault(name, fn)
            patched.append((mod, name, fn))
            setattr(mod, name, wrap(name, orig))
    for name in _PG_METHODS:
        fn = getattr(dist.ProcessGroup, name, None)
        if fn is not None:
            # Restore what the class itself held (a pybind11 instancemethod, or nothing when the
            # method is inherited): the plain function getattr returns does not bind to an instance.
            patched.append((dist.ProcessGroup, name, vars(dist.ProcessGroup).get(name)))
            setattr(dist.ProcessGroup, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for mod, name, fn in patched:
            if fn is None:
                delattr(mod, name)
            else:
                setattr(mod, name, fn)

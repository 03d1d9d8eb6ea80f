"""Ray scoring throughput against the same computation under torchrun, on one machine (issue 4).

The computation, per batch of T tokens: this rank's logits ``hidden @ W_shard.T`` (bf16, [T, V/G]),
``ss.softmax_stats(..., k)`` over the group (one all-gather), and rank 0 copies the per-token
results (lse, target log-prob, entropy, top-k ids and log-probs) to the host. Where the batches
come from (``--source``, several allowed):

* ``file`` (default; what the scoring job does): the batches live in safetensors files (``hidden``
  [T, H] bf16 and ``targets`` [T]), written once to ``--data-dir`` (a new temporary folder by
  default) and read again for every batch (from the page cache after the warm-up). Every
  torchrun rank reads each batch from its file into pinned memory (``RowReader``: positional reads
  by ``--cpus-per-worker`` threads), then copies it to the GPU; it reads batch i+1 on a second
  thread while batch i computes, into the other of two pinned buffers, as a prefetching data
  loader would. The Ray driver sends each batch as a ``FileRows`` reference, and every actor reads
  it the same way into its pinned staging buffer (the scorer's worker-side reading).
* ``memory``: the batches are tensors in host memory (torchrun's pinned beforehand); the Ray
  driver puts each batch in the object store and the actors stage it through pinned memory.

Timing: wall clock over ``--batches`` batches after ``--warmup`` batches. torchrun runs them one
after the other (a host sync per batch, for the results); the Ray scorer streams them through one
``score_iter`` (``--max-inflight`` batches in flight), timed from the warm-up's last result to the
last result, i.e. its steady-state rate. Every Ray result (the warm-up's too) is checked against
torchrun's result of the same batch, every field: top-k ids, and lse, target log-prob, entropy and
top-k log-probs bit for bit, NaN positions included (``--atol`` accepts float differences up to
that, with the ids and the NaN / inf positions still equal). ``check PASS`` or ``check FAIL`` per
configuration, with, per field that differs, the first batch and rows, the NaN counts and the
largest difference; the checks are printed again together at the end, and the script exits
non-zero if one failed.

``--breakdown``: the Ray scorer also times each stage of its data path over the timed batches
(``ShardedScorer.timing_breakdown``: a clock read per stage, no sync) and prints it per batch: the
driver's put into the object store (and its page faults; ``memory`` only), its waits, each
actor's staging copy into pinned memory (``stage``, ``memory``) or its read of the batch from the
file into pinned memory (``read``, ``file``), with the copy to the GPU queued, both on the
actor's stager thread, overlapped with the rest ("in the background"), its wait for that thread
(``*_wait``) and for the previous batch on the GPU, and so on. ``busy`` sums what the driver's or
the actor's main thread spends not waiting: the side whose ``busy`` (or background stage) is near
the wall time per batch is the bottleneck (the GPU when the workers' ``prev_wait`` is large).

    # the torchrun baseline (G processes), then the Ray scorer with tp=G, in one command:
    python benchmarks/bench_ray.py --tp 2 4 --v 128256 256000 [--source file memory] [--out DIR]

On the GPU machine: install into a folder and run from outside the source tree with ``python -P``
(so that the source folder never shadows the installed package, in the driver and in the Ray
workers), e.g. ``pip install --no-deps --no-build-isolation --target /tmp/ss_site . && cd /tmp &&
PYTHONPATH=/tmp/ss_site python -P REPO/benchmarks/bench_ray.py --tp 2 4``.

With no GPU the sizes default to tiny ones on the CPU (gloo, a local Ray) so that the code is
exercised; sizes given on the command line are kept (e.g. ``--h 4096 --tokens 8192 --v 64`` to see
the driver's busy time per 64 MiB batch on a CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def make_shard(v: int, h: int, lo: int, hi: int, dtype) -> torch.Tensor:
    """Rows [lo, hi) of the head weight: row r is a pure function of (seed, r), so the torchrun
    ranks and the Ray driver build the same head without materializing it twice."""
    g = torch.Generator().manual_seed(1234 + lo)
    return (torch.randn(hi - lo, h, generator=g) * 0.02).to(dtype)


DISTINCT = 4  # distinct hidden batches; batch i is hidden[i % DISTINCT]
FIELDS = ("lse", "target_logprob", "entropy", "topk_ids", "topk_logprobs")


def make_batches(n: int, t: int, h: int, v: int, *, pin: bool = False):
    g = torch.Generator().manual_seed(7)
    hid = [torch.randn(t, h, generator=g).to(torch.bfloat16) for _ in range(DISTINCT)]
    tgt = torch.randint(0, v, (t,), generator=g)
    if pin:
        hid, tgt = [x.pin_memory() for x in hid], tgt.pin_memory()
    return [(hid[i % DISTINCT], tgt) for i in range(n)]


def write_batch_files(folder: str, t: int, h: int, v: int) -> list[str]:
    """The DISTINCT batches of ``make_batches`` as safetensors files (``hidden``, ``targets``)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (hid, tgt) in enumerate(make_batches(DISTINCT, t, h, v)):
        paths.append(os.path.join(folder, f"batch{i}_v{v}.safetensors"))
        save_file({"hidden": hid, "targets": tgt}, paths[-1])
    return paths


def file_batch(files: list[str], i: int, t: int):
    """Batch i as a reference: all rows of file ``i % DISTINCT``."""
    from shardsoftmax.launch.data import FileRows

    return FileRows(files[i % DISTINCT], 0, t)


class PrefetchReader:
    """torchrun's file loader: batch i read with ``RowReader`` into pinned buffer ``i % 2`` on a
    background thread while the batch before computes; ``get(i)`` returns batch i on the device
    (its host-to-device copy queued) and starts reading batch i + 1."""

    def __init__(self, files, t, threads, dev, n):
        from shardsoftmax.launch.data import RowReader

        self.files, self.t, self.dev, self.n = files, t, dev, n
        self.reader = RowReader(threads)
        cuda = dev.type == "cuda"
        nbytes = [self.reader.span(files[0], name).row_bytes * t for name in ("hidden", "targets")]

        def buffer(size):
            return torch.empty(size, dtype=torch.uint8, pin_memory=cuda)

        self.slots = [
            {"h": buffer(nbytes[0]), "t": buffer(nbytes[1]), "copied": torch.cuda.Event() if cuda else None}
            for _ in range(2)
        ]
        self.pool = ThreadPoolExecutor(1)
        self.next = self.pool.submit(self._load, 0) if n else None

    def _load(self, i):
        slot = self.slots[i % 2]
        if slot["copied"] is not None:
            slot["copied"].synchronize()  # batch i - 2's copy out of this buffer is done
        path = self.files[i % DISTINCT]
        h = self.reader.read_into(path, "hidden", 0, self.t, slot["h"])
        t = self.reader.read_into(path, "targets", 0, self.t, slot["t"])
        return h, t, slot

    def get(self, i):
        h, t, slot = self.next.result()
        self.next = self.pool.submit(self._load, i + 1) if i + 1 < self.n else None
        x, y = h.to(self.dev, non_blocking=True), t.to(self.dev, non_blocking=True)
        if slot["copied"] is not None:
            slot["copied"].record()
        return x, y

    def close(self):
        self.pool.shutdown()
        self.reader.close()


FLOATS = ("lse", "target_logprob", "entropy", "topk_logprobs")


def compare_field(got, want) -> dict:
    """One field of one batch, Ray's (``got``) against torchrun's (``want``): ``bits`` (every
    value's bits equal, NaN included), and where they are not, ``shape`` (the shapes differ),
    ``ids`` (top-k ids that differ), or for floats ``ray_nan`` / ``base_nan`` (NaN counts),
    ``nonfinite`` (positions where one side is NaN or +-inf and the other is not that same value),
    ``rows`` (the first rows that differ) and ``diff`` (the largest |difference| over the positions
    finite on both sides)."""
    if got is None or want is None or np.shape(got) != np.shape(want):
        return {"bits": False, "shape": f"{np.shape(got) if got is not None else None} vs {np.shape(want)}"}
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype.kind in "iu":
        bad = got != want
        out = {"bits": not bad.any(), "ids": int(bad.sum())}
    else:
        got, want = got.astype(np.float32), want.astype(np.float32)
        bad = got.view(np.uint32) != want.view(np.uint32)  # NaN == NaN of the same bits; -0 != 0
        finite = np.isfinite(got) & np.isfinite(want)
        nonfinite = ~finite & ~((got == want) | (np.isnan(got) & np.isnan(want)))
        diff = np.abs(got[finite].astype(np.float64) - want[finite]) if finite.any() else np.zeros(1)
        out = {
            "bits": not bad.any(),
            "ray_nan": int(np.isnan(got).sum()),
            "base_nan": int(np.isnan(want).sum()),
            "nonfinite": int(nonfinite.sum()),
            "diff": float(diff.max()),
        }
    out["rows"] = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[:5].tolist()
    return out


def compare(ray_results: list, base: dict, atol: float = 0.0) -> tuple[bool, str]:
    """Ray's result of batch i against torchrun's of batch i % DISTINCT (both ran the same kernels
    on the same data), every field of every batch: the top-k ids, and lse, target log-prob,
    entropy and top-k log-probs with their NaN and +-inf positions. PASS when every value is the
    same bit for bit, or (``atol`` > 0) when the ids and the non-finite positions are the same and
    no finite value differs by more than ``atol``. The message names, per field that differs, the
    first batch and rows that differ, the NaN counts of both sides and the largest difference."""
    worst: dict[str, dict] = {}  # per field: the first batch that differs, and totals
    nan = [0, 0]  # NaN values in Ray's and torchrun's float fields, every batch
    for i, res in enumerate(ray_results):
        for f in FIELDS:
            got, want = getattr(res, f), base[f"{i % DISTINCT}_{f}"]
            if f in FLOATS:
                nan[0] += 0 if got is None else int(np.isnan(got).sum())
                nan[1] += int(np.isnan(want).sum())
            c = compare_field(got, want)
            if c["bits"]:
                continue
            totals = dict.fromkeys(("batches", "ids", "ray_nan", "base_nan", "nonfinite"), 0)
            w = worst.setdefault(
                f, {**totals, "first": i, "rows": c.get("rows", []), "shape": None, "diff": 0.0}
            )
            w["batches"] += 1
            w["shape"] = w["shape"] or c.get("shape")
            for key in ("ids", "ray_nan", "base_nan", "nonfinite"):
                w[key] += c.get(key, 0)
            w["diff"] = max(w["diff"], c.get("diff", 0.0))
    n = len(ray_results)
    nans = f"NaN values: Ray {nan[0]}, torchrun {nan[1]}"
    if not worst:
        return True, f"PASS ({n} batches, every field bit for bit: {', '.join(FIELDS)}; {nans})"
    ok = atol > 0 and all(
        w["shape"] is None and w["ids"] == 0 and w["nonfinite"] == 0 and w["diff"] <= atol
        for w in worst.values()
    )
    parts = []
    for f, w in worst.items():
        where = f"{f} differs in {w['batches']} batches (first: batch {w['first']}, rows {w['rows']})"
        if w["shape"]:
            parts.append(f"{where}: shapes {w['shape']}")
        elif f == "topk_ids":
            parts.append(f"{where}: {w['ids']} ids")
        else:
            parts.append(
                f"{where}: NaN Ray {w['ray_nan']} / torchrun {w['base_nan']}, {w['nonfinite']} non-finite "
                f"positions differ, max finite |diff| {w['diff']:.2e}"
            )
    same = [f for f in FIELDS if f not in worst]
    tail = f"; bit for bit: {', '.join(same)}" if same else ""
    rule = f"within atol {atol:g}" if atol > 0 else "bit for bit required"
    return ok, f"{'PASS' if ok else 'FAIL'} ({n} batches, {rule}: {'; '.join(parts)}{tail}; {nans})"


def bounds(v: int, g: int) -> list[int]:
    base, extra = divmod(v, g)
    out = [0]
    for r in range(g):
        out.append(out[-1] + base + (1 if r < extra else 0))
    return out


# --------------------------------------------------------------------------- torchrun baseline


def torchrun_worker(args) -> None:
    import torch.distributed as dist

    import shardsoftmax as ss

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args.v = args.v[0]
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)  # init_process_group's device_id needs the index
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": dev} if cuda else {}))
    b = bounds(args.v, world)
    dtype = torch.bfloat16 if cuda else torch.float32
    w = make_shard(args.v, args.h, b[rank], b[rank + 1], dtype).to(dev)
    n = args.batches + args.warmup
    if args.source == "file":  # read from the files (prefetched into pinned memory), then to the GPU
        loaders = [PrefetchReader(args.files, args.tokens, args.threads, dev, m) for m in (DISTINCT, n)]
        batches = [[loaders[0].get] * DISTINCT, [loaders[1].get] * n]
    else:  # pinned host tensors
        loaded = make_batches(n, args.tokens, args.h, args.v, pin=cuda)
        batches = [[lambda i, b=b: b for b in loaded[:DISTINCT]], [lambda i, b=b: b for b in loaded]]

    def step(x, t):
        x = x.to(dev, dtype, non_blocking=True)
        t = t.to(dev, non_blocking=True)
        with torch.no_grad():
            group = None if world == 1 else dist.group.WORLD
            st = ss.softmax_stats(
                torch.nn.functional.linear(x, w), t, k=args.k, vocab_size=args.v, vocab_start=b[rank],
                process_group=group,
            )  # fmt: skip
        if rank == 0:  # the results to the host, as the scorer returns them
            return {f: getattr(st, f).cpu().numpy() for f in FIELDS}
        return None

    saved = {}  # the DISTINCT batches' results, for the Ray run's check (untimed, like the warm-up)
    for i, get in enumerate(batches[0]):
        res = step(*get(i))
        if rank == 0:
            saved.update({f"{i}_{f}": v for f, v in res.items()})
    timed = batches[1]
    for i in range(args.warmup):
        step(*timed[i](i))
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.warmup, n):
        step(*timed[i](i))
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        np.savez(args.result + ".npz", **saved)
        with open(args.result, "w") as f:
            json.dump({"seconds": dt, "tokens": args.batches * args.tokens}, f)
    if args.source == "file":
        for loader in loaders:
            loader.close()
    dist.destroy_process_group()


def run_torchrun(args, g: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [
        sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={g}",
        os.path.abspath(__file__), "--worker",
    ]  # fmt: skip
    # The worker's settings travel in the environment (torchrun's parser would take --v etc.).
    cfg = dict(v=[args.v1], h=args.h, tokens=args.tokens, batches=args.batches, warmup=args.warmup, k=args.k,
               source=args.source1, files=args.files, threads=args.cpus_per_worker)  # fmt: skip
    env = dict(os.environ, BENCH_RAY_WORKER=json.dumps(dict(cfg, result=result)))
    subprocess.run(cmd, check=True, timeout=args.timeout, env=env)
    with open(result) as f:
        out = json.load(f)
    with np.load(result + ".npz") as z:
        out["results"] = dict(z)
    os.remove(result)
    os.remove(result + ".npz")
    return out


# --------------------------------------------------------------------------------------- Ray


def run_ray(args, g: int) -> dict:
    from shardsoftmax.launch.ray_scorer import ShardedScorer

    cuda = torch.cuda.is_available()
    b = bounds(args.v1, g)
    dtype = torch.bfloat16 if cuda else torch.float32
    weight = torch.cat([make_shard(args.v1, args.h, b[r], b[r + 1], dtype) for r in range(g)])
    n = args.batches + args.warmup
    if args.source1 == "file":  # references only: the actors read the rows
        batches = (file_batch(args.files, i, args.tokens) for i in range(n))
    else:
        batches = make_batches(n, args.tokens, args.h, args.v1)
    results = []
    with ShardedScorer(
        weight, tp=g, replicas=1, k=args.k, device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32", max_inflight=args.max_inflight,
        cpus_per_worker=args.cpus_per_worker, put_threads=args.put_threads, breakdown=args.breakdown,
    ) as scorer:  # fmt: skip
        for res in scorer.score_iter(batches):
            results.append(res)
            if len(results) == args.warmup:
                t0 = time.perf_counter()
                scorer.reset_breakdown()  # time the steady state only
        dt = time.perf_counter() - t0
        breakdown = scorer.timing_breakdown() if args.breakdown else None
    assert len(results) == args.batches + args.warmup
    return {"seconds": dt, "tokens": args.batches * args.tokens, "results": results, "breakdown": breakdown}


DRIVER_STAGES = ("read", "put", "send", "wait", "get", "unpack", "caller", "rebuild")
WORKER_STAGES = (
    "idle", "slot_wait", "stage_wait", "read_wait", "prev_wait", "launch", "take", "flush", "stage", "read",
)  # fmt: skip
WAITING = ("wait", "caller", "idle", "prev_wait", "stage_wait", "read_wait")  # not counted as busy
BACKGROUND = ("stage", "read")  # a worker's stager thread, overlapped: shown, not counted as busy


def format_breakdown(bd: dict, wall_ms: float) -> str:
    """The breakdown as one line for the driver and one per worker (ms per batch)."""

    def line(d: dict, stages) -> str:
        parts, busy = [], 0.0
        for name in stages:
            ms = d.get(name + "_ms")
            if ms is None:
                continue
            counts = (name + "_objects", name + "_faults")
            extra = [f"{d[k]:,.0f} {k.split('_')[-1]}" for k in counts if k in d]
            tag = " in the background" if d is not bd["driver"] and name in BACKGROUND else ""
            parts.append(f"{name}{tag} {ms:.2f}" + (f" ({', '.join(extra)})" if extra else ""))
            busy += 0.0 if name in WAITING or tag else ms
        return " | ".join(parts) + f"; busy {busy:.2f} of {wall_ms:.2f}"

    out = [f"  driver: {line(bd['driver'], DRIVER_STAGES)}"]
    for w in bd["workers"]:
        who = f"replica {w['replica']} rank {w['rank']}, {w['threads']} threads"
        out.append(f"  worker ({who}): {line(w, WORKER_STAGES)}")
    return "\n".join(out)


def bench_one(args, g: int, v: int, name: str, rows: list) -> bool:
    """torchrun, then Ray, on one configuration; print and record the comparison. False if the
    results differ."""
    base = run_torchrun(args, g)
    ray_r = run_ray(args, g)
    same, check = compare(ray_r["results"], base["results"], args.atol)
    tr = base["tokens"] / base["seconds"]
    rr = ray_r["tokens"] / ray_r["seconds"]
    overhead = tr / rr - 1
    rows.append(
        dict(gpu=name, tp=g, v=v, h=args.h, tokens_per_batch=args.tokens, k=args.k, source=args.source1,
             batches=args.batches, max_inflight=args.max_inflight, cpus_per_worker=args.cpus_per_worker,
             put_threads=args.put_threads, torchrun_tok_s=tr, ray_tok_s=rr, ray_tok_s_per_gpu=rr / g,
             ray_overhead=overhead, check=check, ray_breakdown=ray_r["breakdown"])
    )  # fmt: skip
    print(
        f"tp={g} V={v} source={args.source1}: "
        f"torchrun {tr:,.0f} tok/s ({1e3 * args.tokens / tr:.2f} ms/batch), "
        f"Ray {rr:,.0f} tok/s ({1e3 * args.tokens / rr:.2f} ms/batch, {rr / g:,.0f} tok/s per GPU), "
        f"Ray overhead {overhead:+.1%} ({'PASS' if overhead < 0.10 else 'FAIL'} < 10%); "
        f"check {check}",
        flush=True,
    )
    if ray_r["breakdown"] is not None:
        print(format_breakdown(ray_r["breakdown"], 1e3 * args.tokens / rr), flush=True)
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--v", type=int, nargs="+", help="default 128256 256000 (CPU: 1000)")
    ap.add_argument("--h", type=int, help="default 4096 (CPU: 32)")
    ap.add_argument("--tokens", type=int, help="tokens per batch, default 8192 (CPU: 64)")
    ap.add_argument("--batches", type=int, help="timed batches, default 50 (CPU: 6)")
    ap.add_argument("--warmup", type=int, help="batches before the clock starts (>= 1), default 5 (CPU: 2)")
    ap.add_argument(
        "--source", nargs="+", choices=("file", "memory"), default=["file"],
        help="where the batches are: safetensors files read by each rank / actor (default), or host "
        "memory (torchrun: pinned; Ray: put in the object store by the driver)",
    )  # fmt: skip
    ap.add_argument(
        "--data-dir", help="file source: folder for the batch files (default: a new temporary one)"
    )
    ap.add_argument("--max-inflight", type=int, default=4, help="Ray: batches in flight per replica")
    ap.add_argument(
        "--cpus-per-worker", type=int, default=None,
        help="Ray: CPUs per actor, the threads of its staging copy (default 4 on GPUs, 1 on CPU)",
    )  # fmt: skip
    ap.add_argument("--put-threads", type=int, default=4, help="Ray: driver threads that put a batch")
    ap.add_argument("--breakdown", action="store_true", help="Ray: print the time per stage of the data path")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument(
        "--atol", type=float, default=0.0,
        help="check: accept float differences up to this (ids and NaN / inf positions must still be "
        "equal); default 0: Ray's results must equal torchrun's bit for bit",
    )  # fmt: skip
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torchrun_worker(argparse.Namespace(**json.loads(os.environ["BENCH_RAY_WORKER"])))
        return
    cuda = torch.cuda.is_available()
    defaults = dict(v=[128256, 256000], h=4096, tokens=8192, batches=50, warmup=5)
    if not cuda:  # exercise the code on tiny sizes
        defaults = dict(v=[1000], h=32, tokens=64, batches=6, warmup=2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the Ray clock starts at the warm-up's last result)")
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 4 if cuda else 1
    name = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    print(
        f"{name}: H={args.h}, {args.tokens} tokens per batch, {args.batches} timed batches after "
        f"{args.warmup}, k={args.k}; Ray: max_inflight={args.max_inflight}, "
        f"cpus_per_worker={args.cpus_per_worker} (also the reading threads of each torchrun rank), "
        f"put_threads={args.put_threads}",
        flush=True,
    )
    failed = False
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_ray_")
    try:
        for g in args.tp:
            if cuda and torch.cuda.device_count() < g:
                print(f"tp={g}: skipped ({torch.cuda.device_count()} GPUs)", flush=True)
                continue
            for v in args.v:
                args.v1 = v
                for source in args.source:
                    args.source1 = source
                    args.files = None
                    if source == "file":
                        args.files = write_batch_files(data_dir, args.tokens, args.h, v)
                    failed |= not bench_one(args, g, v, name, rows)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    for r in rows:  # the checks again, together (the per-config lines above are far apart)
        print(f"check tp={r['tp']} V={r['v']} source={r['source']}: {r['check']}", flush=True)
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_ray.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print("wrote", path)
    if failed:
        raise SystemExit("bench_ray: Ray results differ from torchrun's (see check above)")


if __name__ == "__main__":
    main()

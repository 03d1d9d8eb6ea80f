"""Ray launcher: ShardedScorer and the `shardsoftmax score` job, on a local Ray instance (CPU tier:
logical CPUs, gloo) and on GPUs where there are at least two (GPU tier, skipped otherwise).

Every output row is compared with the single-process API on the same data:
``ss.softmax_stats(hidden @ W.T + b, targets, k=K, vocab_size=V)`` (ids exact, floats 1e-5).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("tqdm")

from shardsoftmax.launch import data as data_mod  # noqa: E402
from shardsoftmax.launch import ray_scorer  # noqa: E402
from shardsoftmax.launch.data import FileRows, InputError, RowReader  # noqa: E402
from shardsoftmax.launch.job import MANIFEST, JobConfig, run_job  # noqa: E402
from shardsoftmax.launch.ray_scorer import ShardedScorer  # noqa: E402

import shardsoftmax as ss  # noqa: E402

pytestmark = pytest.mark.ray

ROWS, VOCAB, HIDDEN, K = 203, 200, 32, 33  # odd rows (uneven split), 3 padding rows, k straddling 32
SHARDS = {"a": 300, "b": 1, "c": 257, "d": 0, "e": 70}  # "b": bf16 hidden, "e": no targets


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A head with bias and padding rows, and input shards of awkward lengths and dtypes."""
    root = tmp_path_factory.mktemp("ray_data")
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(ROWS, HIDDEN, generator=g) * 0.3
    bias = torch.randn(ROWS, generator=g) * 0.1
    head = str(root / "head.safetensors")
    safetensors_torch.save_file({"weight": weight, "bias": bias}, head, metadata={"vocab_size": str(VOCAB)})
    inputs = root / "inputs"
    inputs.mkdir()
    shards = {}
    for name, n in SHARDS.items():
        hidden = torch.randn(n, HIDDEN, generator=g)
        if name == "b":
            hidden = hidden.bfloat16()
        targets = torch.randint(0, VOCAB, (n,), generator=g)
        targets[torch.rand(n, generator=g) < 0.25] = -100
        tensors = {"hidden": hidden} if name == "e" else {"hidden": hidden, "targets": targets}
        safetensors_torch.save_file(tensors, str(inputs / f"{name}.safetensors"))
        shards[name] = (hidden, targets if name != "e" else None)
    return {
        "head": head,
        "inputs": str(inputs),
        "weight": weight,
        "bias": bias,
        "shards": shards,
        "root": root,
    }


def reference(data, hidden, targets, k=K):
    logits = hidden.float() @ data["weight"].T + data["bias"]
    with ss.use_backend("torch"):  # the test process may run Triton's interpreter; this is the plain API
        return ss.softmax_stats(logits, targets, k=k, vocab_size=VOCAB)


def assert_matches(got, ref, targets, *, null_ignored: bool):
    np.testing.assert_array_equal(np.asarray(got["topk_ids"]), ref.topk_ids.numpy())
    tol = {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(np.asarray(got["lse"]), ref.lse.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(got["entropy"]), ref.entropy.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(got["topk_logprobs"]), ref.topk_logprobs.numpy(), **tol)
    tlp = got["target_logprob"]
    if targets is None:
        assert tlp is None or all(v is None for v in tlp)
        return
    want = ref.target_logprob.numpy()
    if null_ignored:  # parquet: null where the target is ignore_index
        ignored = (targets == -100).numpy()
        assert [v is None for v in tlp] == list(ignored)
        tlp = np.array([0.0 if v is None else v for v in tlp], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(tlp), want, **tol)


def read_output(out_dir) -> dict:
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*")))
    files += sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, ".*")))
    assert files == sorted([f"{n}.parquet" for n in SHARDS] + [MANIFEST]), files  # no temp files
    return {n: pq.read_table(os.path.join(out_dir, f"{n}.parquet")).to_pydict() for n in SHARDS}


def check_output(out_dir, data):
    """Every input row exactly once, in order, equal to the single-process API."""
    tables = read_output(out_dir)
    manifest = json.load(open(os.path.join(out_dir, MANIFEST)))
    for name, n in SHARDS.items():
        t = tables[name]
        assert manifest["shards"][name]["rows"] == n
        assert t["position"] == list(range(n)) and t["shard"] == [name] * n
        hidden, targets = data["shards"][name]
        if n:
            assert_matches(t, reference(data, hidden, targets), targets, null_ignored=True)
    return tables


def job(data, out, **kw) -> JobConfig:
    base = {"head": data["head"], "input": data["inputs"], "output": str(out), "tp": 2, "k": K,
            "batch_tokens": 64, "progress": False, "device": "cpu"}  # fmt: skip
    return JobConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------- CPU tier


def test_scorer_tp2_matches_single_process(ray_cluster, data):
    hidden, targets = data["shards"]["a"]
    with ShardedScorer(
        data["weight"], bias=data["bias"], vocab_size=VOCAB, tp=2, k=K, device="cpu"
    ) as scorer:
        got = scorer.score(hidden, targets)
        assert_matches(got._asdict(), reference(data, hidden, targets), targets, null_ignored=False)
        assert scorer.timing_breakdown() == {"driver": {}, "workers": []}  # breakdown off: nothing kept
        # no targets, another k, batches streamed in order
        pieces = list(
            scorer.score_iter([(hidden[:1], None), (hidden[1:100], None), (hidden[100:], None)], k=5)
        )
        merged = {
            f: np.concatenate([getattr(p, f) for p in pieces])
            for f in ("lse", "entropy", "topk_ids", "topk_logprobs")
        }
        assert_matches(
            {**merged, "target_logprob": None}, reference(data, hidden, None, k=5), None, null_ignored=False
        )
        # bad batch: a clear error, and the scorer still works
        with pytest.raises(ValueError, match="hidden must have shape"):
            scorer.score(torch.zeros(3, HIDDEN + 1))
        # a crashed worker (rank 0, the one that answers): the group is rebuilt, the batch retried
        scorer.kill_worker(0, 0)
        again = scorer.score(hidden, targets)
        assert scorer.rebuilds == 1
        np.testing.assert_array_equal(again.topk_ids, got.topk_ids)
        np.testing.assert_allclose(again.lse, got.lse, rtol=1e-6, atol=1e-6)


def test_scorer_pipelined_many_batches_in_flight(ray_cluster, data, monkeypatch):
    """The one-batch-behind protocol with several batches in flight on 2 replicas: mixed sizes,
    with and without targets, fp32 and bf16, every row equal to the single-process API; an
    abandoned iteration, a killed worker mid-stream and no read-ahead (max_inflight=1) on the way.
    Batches go into the object store as up to 3 row blocks put by 3 driver threads (tiny blocks
    here), and the timing breakdown is on."""
    monkeypatch.setattr(ray_scorer, "PUT_BLOCK_MIN_BYTES", 256)  # 2+ rows of 32 float32 per block
    hidden, targets = data["shards"]["a"]
    cuts = [0, 1, 8, 72, 105, 106, 170, 233, 300]
    batches = []
    for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        h = hidden[lo:hi].bfloat16() if i == 3 else hidden[lo:hi]
        batches.append((h, None if i % 3 == 1 else targets[lo:hi]))

    def check(results, batches):
        assert len(results) == len(batches)
        for got, (h, t) in zip(results, batches):
            assert_matches(got._asdict(), reference(data, h.float(), t), t, null_ignored=False)

    with ShardedScorer(
        data["weight"], bias=data["bias"], vocab_size=VOCAB, tp=2, replicas=2, k=K, device="cpu",
        max_inflight=3, put_threads=3, breakdown=True,
    ) as scorer:  # fmt: skip
        cap = scorer.replicas * scorer.max_inflight
        reads, ahead = [0], []

        def counted(items):
            for item in items:
                reads[0] += 1
                yield item

        results = []
        for res in scorer.score_iter(counted(batches)):
            ahead.append(reads[0] - len(results))  # batches read and not yet yielded
            results.append(res)
        check(results, batches)
        assert max(ahead) == cap and min(ahead) >= 1, ahead  # several in flight, never more than cap
        bd = scorer.timing_breakdown(reset=True)
        driver, workers = bd["driver"], bd["workers"]
        assert driver["batches"] == driver["results"] == len(batches)
        assert driver["put_objects"] > 2  # hidden in several blocks (one block + targets would be <= 2)
        assert all(driver[f"{s}_ms"] >= 0 for s in ("read", "put", "send", "wait", "get", "unpack"))
        assert [(w["replica"], w["rank"]) for w in workers] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert sum(w["calls"] for w in workers if w["rank"] == 0) == len(batches)
        assert all(w["stage_ms"] >= 0 and w["launch_ms"] > 0 and w["threads"] == 1 for w in workers)

        # abandon an iteration after two results: its workers' pending batches must not leak
        it = scorer.score_iter(batches)
        assert [next(it) for _ in range(2)] and it.close() is None
        check(list(scorer.score_iter(batches)), batches)

        # a worker dies while batches are in flight on its group: rebuilt, every batch once, in order
        results = []
        for res in scorer.score_iter(batches):
            if not results:
                scorer.kill_worker(1, 1)
            results.append(res)
        assert scorer.rebuilds == 1
        check(results, batches)

        scorer.max_inflight = 1  # no read-ahead: every batch is collected by a flush call
        check(list(scorer.score_iter(batches)), batches)


@pytest.mark.parametrize("read_in_driver", [False, True], ids=["workers_read", "read_in_driver"])
def test_job_dp2_tp2(ray_cluster, data, tmp_path, monkeypatch, read_in_driver):
    """Both data paths of the job: by default the workers read their batches (no object-store put
    of hidden states), with ``read_in_driver`` the driver puts every batch. The second also takes
    ``head_impl="chunked"`` (the workers never store their logits shard), recorded in the
    manifest's settings."""
    puts, scorers = [], []
    real_put, real_init = ShardedScorer._put_batch, ShardedScorer.__init__
    monkeypatch.setattr(ShardedScorer, "_put_batch", lambda self, *a: puts.append(1) or real_put(self, *a))
    monkeypatch.setattr(
        ShardedScorer, "__init__", lambda self, *a, **kw: scorers.append(self) or real_init(self, *a, **kw)
    )
    head_impl = "chunked" if read_in_driver else "unfused"
    summary = run_job(
        job(data, tmp_path / "out", replicas=2, read_in_driver=read_in_driver, head_impl=head_impl)
    )
    assert [s.head_impl for s in scorers] == [head_impl]
    settings = json.load(open(tmp_path / "out" / MANIFEST))["settings"]
    assert settings.get("head_impl") == (None if head_impl == "unfused" else head_impl)
    assert summary.workers == 4 and summary.shards_computed == len(SHARDS)
    assert summary.tokens == sum(SHARDS.values())
    n_batches = sum(-(-n // 64) for n in SHARDS.values())
    assert len(puts) == (n_batches if read_in_driver else 0)
    check_output(tmp_path / "out", data)


FIELDS = ("lse", "target_logprob", "entropy", "topk_ids", "topk_logprobs")


def test_scorer_workers_read_file_rows(ray_cluster, data, tmp_path, monkeypatch):
    """``score_files``/``FileRows``: the workers read the rows themselves; the results equal the
    driver path's bit for bit and the single-process API's; bad references fail before anything
    is sent, and a file the workers cannot read fails with their error, not retried."""
    paths = [os.path.join(data["inputs"], f"{n}.safetensors") for n in SHARDS]
    with ShardedScorer(
        data["weight"], bias=data["bias"], vocab_size=VOCAB, tp=2, k=K, device="cpu", breakdown=True
    ) as scorer:
        got = list(scorer.score_files(paths, batch_tokens=64))
        want = [(n, a, min(a + 64, rows)) for n, rows in SHARDS.items() for a in range(0, rows, 64)]
        assert [(os.path.basename(r.path)[:-12], r.start, r.stop) for r, _ in got] == want
        bd = scorer.timing_breakdown(reset=True)
        assert "put_ms" not in bd["driver"] and bd["driver"]["batches"] == len(want)
        assert all(w["read_ms"] > 0 and "stage_ms" not in w for w in bd["workers"])
        tensors = []
        for name, a, b in want:
            hidden, targets = data["shards"][name]
            tensors.append((hidden[a:b], None if targets is None else targets[a:b]))
        via_driver = list(scorer.score_iter(tensors))
        for (rows, res), other, (h, t) in zip(got, via_driver, tensors):
            assert (res.target_logprob is None) == (t is None) == (rows.targets is None)
            for f in FIELDS:
                if t is not None or f != "target_logprob":
                    np.testing.assert_array_equal(getattr(res, f), getattr(other, f))
            assert_matches(res._asdict(), reference(data, h.float(), t), t, null_ignored=False)

        # one FileRows with a relative path (from the driver's directory), its targets not used
        monkeypatch.chdir(data["inputs"])
        res = scorer.score(FileRows("a.safetensors", 10, 75, targets=None))
        hidden = data["shards"]["a"][0][10:75]
        assert_matches(res._asdict(), reference(data, hidden, None), None, null_ignored=False)

        # bad references: a clear error before anything is sent; the scorer keeps working
        a_path, e_path = paths[0], paths[-1]
        with pytest.raises(InputError, match=r"rows \[0, 301\) are not within the file's 300 rows"):
            scorer.score(FileRows(a_path, 0, 301))
        with pytest.raises(InputError, match="no tensor named 'targets'.*targets=None"):
            scorer.score(FileRows(e_path, 0, 1))
        with pytest.raises(InputError, match="nope.safetensors: cannot read it"):
            scorer.score_files([a_path, str(tmp_path / "nope.safetensors")])
        blob = open(a_path, "rb").read()
        (tmp_path / "cut.safetensors").write_bytes(blob[:-100])
        with pytest.raises(InputError, match="cut.safetensors: truncated"):
            scorer.score_files([str(tmp_path / "cut.safetensors")])
        # a file the workers cannot read (a node without the shared file system): every rank fails
        # the same way, the error is theirs and is not retried
        monkeypatch.setattr(scorer, "_check_rows", lambda rows: rows)
        with pytest.raises(InputError, match="same path on every node"):
            scorer.score(FileRows(str(tmp_path / "gone.safetensors"), 0, 1))
        assert scorer.rebuilds == 0
        again = scorer.score(FileRows(a_path, 0, 300))
        np.testing.assert_array_equal(again.topk_ids, np.concatenate([r.topk_ids for _, r in got[:5]]))


# The in-process worker test: sizes per device (the GPU's are large enough that a batch's kernels
# still run while the stager stages the next batches and grows their buffers).
STAGER_SIZES = {"cpu": (203, 200, 32, 1), "cuda": (32003, 32000, 1024, 40)}  # rows, vocab, H, scale
STAGER_ROWS = [37, 1, 90, 64, 3, 128, 17, 90, 5, 77, 64, 2, 100, 33]  # x scale; 14 batches, 3 slots


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA GPU")])],
)  # fmt: skip
def test_worker_stager_reuses_its_slots_safely(tmp_path, monkeypatch, device):
    """``TPWorker``'s protocol in this process (no Ray: one rank, no process group), two batches
    behind with its stager thread: 14 batches of different sizes, values, k, dtypes and targets
    (ignored ones, none), read from files (``score_file``) or given as object-store blocks
    (``score``), with ``flush`` calls in between, through 3 reused slots whose buffers grow and
    shrink. Every buffer the worker takes (``_grown``) is first filled with NaN bytes, and on the
    stager thread the fill is followed by a pause: a slot refilled while a launched batch still
    reads it (or, on a GPU, a device buffer carved from memory in use) shows as NaN or wrong
    results. Every batch equals the single-process API; a batch whose file is missing fails the
    next call with the read error, and the worker goes on."""
    rows, vocab, h, scale = STAGER_SIZES[device]
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(rows, h, generator=g) * (0.3 if device == "cpu" else 0.03)
    bias = torch.randn(rows, generator=g) * 0.1
    batches = []  # (hidden, targets, k, how)
    for i, n in enumerate(STAGER_ROWS):
        n *= scale
        hidden = torch.randn(n, h, generator=g) + i  # different values per batch
        hidden = hidden.bfloat16() if i % 4 == 1 else hidden
        targets = torch.randint(0, vocab, (n,), generator=g)
        targets[torch.rand(n, generator=g) < 0.25] = -100
        batches.append(
            (hidden, None if i % 5 == 2 else targets, 33 if i % 3 else 5, "file" if i % 2 else "blocks")
        )

    real_grown = ray_scorer._grown

    def poisoned(buffers, name, nbytes, *, device, pin):
        buf = real_grown(buffers, name, nbytes, device=device, pin=pin)
        buf.fill_(255)  # NaN in float32 and bfloat16, id -1 in int64; on a GPU on this thread's stream
        if threading.current_thread().name.startswith("shardsoftmax-stage"):
            time.sleep(0.002)
        return buf

    monkeypatch.setattr(ray_scorer, "_grown", poisoned)
    threads = torch.get_num_threads()
    backend = ss.use_backend("torch") if device == "cpu" else contextlib.nullcontext()
    with backend:
        worker = ray_scorer.TPWorker(
            0, 1, 0, ray_scorer.to_wire(weight), ray_scorer.to_wire(bias), vocab, device, None, None,
            {"temperature": 1.0, "softcap": None, "ignore_index": -100},
        )  # fmt: skip
        try:
            got = {}

            def answer(res):
                if res is not None:
                    assert res[0] not in got
                    got[res[0]] = res[1]

            for seq, (hidden, targets, k, how) in enumerate(batches):
                if how == "file":
                    path = str(tmp_path / f"b{seq}.safetensors")
                    tensors = (
                        {"hidden": hidden} if targets is None else {"hidden": hidden, "targets": targets}
                    )
                    safetensors_torch.save_file(tensors, path)
                    name = None if targets is None else "targets"
                    answer(worker.score_file(seq, k, FileRows(path, 0, hidden.shape[0], targets=name)))
                else:
                    blocks = [ray_scorer.to_wire(b) for b in hidden.split(max(1, hidden.shape[0] // 3))]
                    answer(worker.score(seq, k, ray_scorer.to_wire(targets), *blocks))
                if seq % 5 == 4:
                    answer(worker.flush())
            for _ in range(3):
                answer(worker.flush())
            assert sorted(got) == list(range(len(batches)))
            assert worker.n_used == len(batches) and worker.staged is None and worker.pending is None

            # a missing file: the call after it raises the read error, and the batch launched before
            # it goes with that error (the driver abandons them); the next batches are unharmed,
            # one of them in the dropped batch's slot
            def blocks_call(seq, i):
                hidden, targets, k, _ = batches[i]
                return worker.score(seq, k, ray_scorer.to_wire(targets), ray_scorer.to_wire(hidden))

            missing = FileRows(str(tmp_path / "gone.safetensors"), 0, 1, targets=None)
            assert blocks_call(99, 0) is None
            assert worker.score_file(100, 5, missing) is None
            with pytest.raises(InputError, match="same path on every node"):
                blocks_call(101, 1)
            assert blocks_call(102, 2) is None
            for _ in range(3):
                answer(worker.flush())
            assert sorted(got) == [*range(len(batches)), 101, 102]
            want = dict(enumerate(batches))
            want.update({101: batches[1], 102: batches[2]})

            dev = torch.device(device)
            for seq, (hidden, targets, k, _) in want.items():
                logits = torch.nn.functional.linear(hidden.float().to(dev), weight.to(dev), bias.to(dev))
                t = None if targets is None else targets.to(dev)
                ref = ss.softmax_stats(logits, t, k=k, vocab_size=vocab, vocab_start=0)
                res = ray_scorer.unpack_results(got[seq], targets is not None)
                np.testing.assert_array_equal(
                    res.topk_ids, ref.topk_ids.cpu().numpy(), err_msg=f"batch {seq}"
                )
                for f in ("lse", "target_logprob", "entropy", "topk_logprobs"):
                    expect = getattr(ref, f)
                    if expect is None:
                        assert getattr(res, f) is None
                        continue
                    np.testing.assert_allclose(
                        getattr(res, f),
                        expect.float().cpu().numpy(),
                        rtol=1e-5,
                        atol=1e-5,
                        err_msg=f"batch {seq} {f}",
                    )
        finally:
            worker.stager.shutdown()
            worker.reader.close()
            torch.set_num_threads(threads)


@pytest.mark.parametrize("head_impl", ray_scorer.HEAD_IMPLS)
def test_worker_head_impls_give_the_same_results(monkeypatch, head_impl):
    """``head_impl``: "unfused" stores the shard's logits and calls ``softmax_stats``; "chunked" and
    "fused" call ``linear_softmax_stats`` with that impl and never store them. Each gives the
    single-process API's results (one rank, no process group, in this process), with and without
    targets, bias and padding rows included."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(ROWS, HIDDEN, generator=g) * 0.3
    bias = torch.randn(ROWS, generator=g) * 0.1
    calls = []
    for name in ("softmax_stats", "linear_softmax_stats"):
        real = getattr(ss, name)
        monkeypatch.setattr(
            ss,
            name,
            lambda *a, _real=real, _name=name, **kw: calls.append((_name, kw.get("impl"))) or _real(*a, **kw),
        )
    batches = [(torch.randn(70, HIDDEN, generator=g), torch.randint(0, VOCAB, (70,), generator=g), 7),
               (torch.randn(5, HIDDEN, generator=g), None, 0)]  # fmt: skip
    batches[0][1][::4] = -100
    with ss.use_backend("torch"):
        worker = ray_scorer.TPWorker(
            0, 1, 0, ray_scorer.to_wire(weight), ray_scorer.to_wire(bias), VOCAB, "cpu", None, None,
            {"temperature": 1.0, "softcap": None, "ignore_index": -100}, head_impl=head_impl,
        )  # fmt: skip
        try:
            got = []
            for seq, (hidden, targets, k) in enumerate(batches):
                got.append(worker.score(seq, k, ray_scorer.to_wire(targets), ray_scorer.to_wire(hidden)))
            got += [worker.flush(), worker.flush()]
        finally:
            worker.stager.shutdown()
            worker.reader.close()
        want = ("softmax_stats", None) if head_impl == "unfused" else ("linear_softmax_stats", head_impl)
        assert calls == [want] * len(batches)
        results = dict(r for r in got if r is not None)
        for seq, (hidden, targets, k) in enumerate(batches):
            ref = ss.softmax_stats(F.linear(hidden, weight, bias), targets, k=k, vocab_size=VOCAB)
            res = ray_scorer.unpack_results(results[seq], targets is not None)
            np.testing.assert_array_equal(res.topk_ids, ref.topk_ids.numpy())
            for f in ("lse", "target_logprob", "entropy", "topk_logprobs"):
                if getattr(ref, f) is None:
                    assert getattr(res, f) is None
                else:
                    np.testing.assert_allclose(getattr(res, f), getattr(ref, f).numpy(), rtol=1e-5, atol=1e-5)


def test_breakdown_per_batch_divides_driver_and_worker_stages_by_their_events():
    """The driver's read/put happen once per batch sent, its other stages once per result; every
    worker stage (its ``read`` of a FileRows batch too) once per call."""
    driver = {"read": 0.3, "put": 0.6, "wait": 0.2, "batches": 3, "results": 2}
    assert ray_scorer._per_batch(driver, "results") == pytest.approx({
        "read_ms": 100.0, "put_ms": 200.0, "wait_ms": 100.0, "batches": 3, "results": 2,
    })  # fmt: skip
    worker = {"read": 0.9, "read_faults": 30, "launch": 0.3, "calls": 3, "threads": 2}
    assert ray_scorer._per_batch(worker, "calls") == pytest.approx({
        "read_ms": 300.0, "read_faults": 10.0, "launch_ms": 100.0, "calls": 3, "threads": 2,
    })  # fmt: skip


def test_row_reader_reads_row_ranges_into_a_buffer(tmp_path, monkeypatch):
    """``RowReader`` (no Ray): row ranges of any dtype, split over threads, equal the file's rows; a
    file replaced at the same path is read again; a truncated or foreign file is an InputError."""
    monkeypatch.setattr(data_mod, "READ_BLOCK_MIN_BYTES", 64)  # several threads on small rows
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(301, 33, generator=g).bfloat16()
    targets = torch.randint(-100, 50, (301,), generator=g, dtype=torch.int32)
    path = str(tmp_path / "x.safetensors")
    safetensors_torch.save_file({"targets": targets, "hidden": hidden}, path, metadata={"k": "v"})
    reader = RowReader(threads=3, max_open=1)
    buf = torch.empty(301 * 33 * 2 + 5, dtype=torch.uint8)
    for a, b in [(0, 301), (7, 8), (5, 5), (100, 250)]:
        x = reader.read_into(path, "hidden", a, b, buf)
        assert x.dtype == torch.bfloat16 and torch.equal(x, hidden[a:b])
    t = reader.read_into(path, "targets", 3, 300, torch.empty(2000, dtype=torch.uint8))
    assert t.dtype == torch.int32 and torch.equal(t, targets[3:300])
    with pytest.raises(InputError, match="rows \\[0, 302\\) are not within 'hidden'"):
        reader.read_into(path, "hidden", 0, 302, buf)
    other = str(tmp_path / "y.safetensors")
    safetensors_torch.save_file({"hidden": hidden[:5] + 1}, other)
    assert torch.equal(reader.read_into(other, "hidden", 0, 5, buf), hidden[:5] + 1)  # closes x (max_open=1)
    safetensors_torch.save_file({"hidden": hidden[:9] * 2}, path)  # replaced at the same path
    assert torch.equal(reader.read_into(path, "hidden", 0, 9, buf), hidden[:9] * 2)
    os.truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(InputError, match="truncated"):
        reader.read_into(path, "hidden", 0, 9, buf)
    (tmp_path / "z.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a safetensors file"):
        reader.read_into(str(tmp_path / "z.safetensors"), "hidden", 0, 1, buf)
    reader.close()


def test_resume_recomputes_only_the_missing_shard(ray_cluster, data, tmp_path):
    out = tmp_path / "out"
    run_job(job(data, out))
    first = read_output(out)
    mtimes = {n: os.stat(out / f"{n}.parquet").st_mtime_ns for n in SHARDS}
    os.remove(out / "c.parquet")
    manifest = json.load(open(out / MANIFEST))
    del manifest["shards"]["c"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / ".a.parquet.tmp-deadbeef").write_bytes(b"partial")  # left over by a crashed run
    summary = run_job(job(data, out))
    assert summary.computed == ["c"] and summary.shards_skipped == len(SHARDS) - 1
    assert all(os.stat(out / f"{n}.parquet").st_mtime_ns == mtimes[n] for n in SHARDS if n != "c")
    assert check_output(out, data) == first
    # everything done: nothing to compute, no cluster needed
    assert run_job(job(data, out)).computed == []


def test_killed_actor_group_is_rebuilt_and_rows_are_exactly_once(ray_cluster, data, tmp_path):
    killed = []

    def kill_after_first_shard(scorer, name):
        if not killed:
            killed.append(name)
            scorer.kill_worker(0, 1)  # rank 1: rank 0 is left waiting in the collective

    summary = run_job(job(data, tmp_path / "out", batch_tokens=32), on_shard_done=kill_after_first_shard)
    assert killed and summary.rebuilds == 1
    assert summary.shards_computed == len(SHARDS)
    check_output(tmp_path / "out", data)


def _corrupt(data, tmp_path, case):
    """Build one bad input; return the JobConfig overrides and the expected message."""
    src = data["inputs"]
    bad = tmp_path / "in"
    bad.mkdir()
    for p in glob.glob(os.path.join(src, "*.safetensors")):
        os.link(p, bad / os.path.basename(p))
    if case == "missing head":
        return {"head": str(tmp_path / "nope.safetensors")}, "head file not found"
    if case == "missing input":
        return {"input": str(tmp_path / "nope" / "*.safetensors")}, "matches no files"
    if case == "hidden size":
        safetensors_torch.save_file({"hidden": torch.zeros(4, HIDDEN + 1)}, str(bad / "z.safetensors"))
        return {"input": str(bad)}, f"hidden size {HIDDEN + 1} does not match the head's hidden size {HIDDEN}"
    if case == "target id":
        t = torch.tensor([1, -100, VOCAB, 2])  # VOCAB itself is padding: outside the vocabulary
        safetensors_torch.save_file(
            {"hidden": torch.zeros(4, HIDDEN), "targets": t}, str(bad / "z.safetensors")
        )
        return {"input": str(bad)}, f"target id {VOCAB} at position 2 is outside the vocabulary"
    if case == "corrupt shard":
        blob = open(os.path.join(src, "a.safetensors"), "rb").read()
        (bad / "z.safetensors").write_bytes(blob[: len(blob) // 2])
        return {"input": str(bad)}, "z.safetensors: cannot read it"
    if case == "tp too large":
        return {"tp": 8}, "tp=8 needs 8 CPUs on one node, but the largest node has 4"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["missing head", "missing input", "hidden size", "target id", "corrupt shard", "tp too large"]
)
def test_bad_input_fails_before_work(ray_cluster, data, tmp_path, case):
    overrides, message = _corrupt(data, tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run_job(job(data, out, **overrides))
    assert not out.exists()


def _cli_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TRITON_INTERPRET")}
    return env


def test_cli_bad_input_exit_code(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardsoftmax.launch.cli", "score", "--head", str(tmp_path / "missing.pt"),
           "--input", str(tmp_path), "--output", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert r.returncode == 2 and "error: head file not found" in r.stderr, r.stderr
    assert not out.exists()


def test_cli_demo(tmp_path):
    """The README's "run the main job" command, from a fresh process and a fresh local Ray."""
    out = str(tmp_path / "d")
    cmd = [
        sys.executable,
        "-m",
        "shardsoftmax.launch.cli",
        "score",
        "--demo",
        "--output",
        out,
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    scores = tmp_path / "d" / "scores"
    assert f"output: {scores}" in r.stdout and "tokens/s per " in r.stdout, r.stdout  # per worker / per GPU
    files = sorted(os.listdir(scores))
    assert files == [MANIFEST] + [f"part-{i:03d}.parquet" for i in range(4)]
    rows = sum(pq.read_metadata(scores / f).num_rows for f in files[1:])
    assert rows == 1500 + 1024 + 1201 + 777


def test_bench_ray_cpu_dry_run(tmp_path):
    """benchmarks/bench_ray.py on tiny CPU sizes, both sources: torchrun and Ray both run, and
    Ray's results equal torchrun's batch by batch (the benchmark's own check); the timing breakdown
    is printed and saved (file source: the actors read, the driver puts nothing)."""
    bench = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_ray.py"
    )
    cmd = [
        sys.executable,
        bench,
        "--tp",
        "2",
        "--breakdown",
        "--source",
        "file",
        "memory",
        "--out",
        str(tmp_path),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for source in ("file", "memory"):
        assert f"tp=2 V=1000 source={source}: torchrun " in r.stdout, r.stdout
    assert r.stdout.count("check PASS (8 batches") == 2, r.stdout
    assert "  driver: read " in r.stdout and "  worker (replica 0 rank 1, 1 threads): idle " in r.stdout
    file_row, memory_row = json.load(open(tmp_path / "bench_ray.json"))
    assert (file_row["source"], memory_row["source"]) == ("file", "memory")
    for row in (file_row, memory_row):
        assert row["tp"] == 2 and row["torchrun_tok_s"] > 0 and row["ray_tok_s"] > 0
        assert row["ray_breakdown"]["driver"]["results"] == 6  # the timed batches only
    assert (
        "put_ms" not in file_row["ray_breakdown"]["driver"]
        and "put_ms" in memory_row["ray_breakdown"]["driver"]
    )
    assert all(w["read_ms"] > 0 for w in file_row["ray_breakdown"]["workers"])


# ---------------------------------------------------------------------------------------- GPU tier


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL tensor-parallel group)")
def test_gpu_tp2_nccl(ray_cluster, data, tmp_path):
    assert ray.cluster_resources().get("GPU", 0) >= 2
    summary = run_job(job(data, tmp_path / "out", device="cuda"))
    assert summary.device == "cuda"
    check_output(tmp_path / "out", data)


def test_local_object_store_is_sized_to_what_it_holds():
    """The store a scorer starts holds the head, the batches in flight and a margin, never more
    than Ray's own default share of the machine's memory."""
    rs = ray_scorer
    small = rs.local_store_bytes(1000, 1, 1)
    assert small == 1000 + rs.INFLIGHT_BATCH_BYTES + rs.STORE_MARGIN_BYTES
    assert rs.local_store_bytes(1000, 2, 4) - small == 7 * rs.INFLIGHT_BATCH_BYTES
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert rs.local_store_bytes(10 * total, 1, 1) == int(0.3 * total)


BAD_SCORER_ARGS = [
    ({"tp": 0}, "tp"),
    ({"put_threads": 0}, "put_threads"),
    ({"object_store_memory": -1}, "object_store_memory"),
    ({"object_store_memory": "big"}, "object_store_memory"),
    ({"head_impl": "fast"}, "head_impl"),
]


@pytest.mark.parametrize(("kw", "name"), BAD_SCORER_ARGS)
def test_scorer_rejects_bad_arguments_before_starting_ray(kw, name):
    with pytest.raises(ValueError, match=name):
        ray_scorer.ShardedScorer(torch.randn(8, 4), **kw)

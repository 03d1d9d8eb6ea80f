#!/usr/bin/env bash
# One call on a GPU machine per set of steps (all the default steps together pass the 10-minute
# limit of one call: split them over two calls): install, the CUDA test
# tier, the one-GPU benchmark (--preset bars), the distributed benchmark on 2 GPUs (--preset bars)
# and on 4 GPUs (--preset scaling: TP = 4, 2, 1, which includes the TP = 4 bars), the figures, and
# a summary of every bar. Each step has its own time limit (and passes a smaller --max-seconds to
# the benchmark, so it stops cleanly and still prints its report); logs, CSVs, reports (.txt),
# README tables (.md) and figures go under $OUT (default ./gpu_out).
#
#     bash benchmarks/gpu_session.sh [steps...]   # steps: install tests bench dist2 dist4 plot summary
#                                                 # (default: all of them); optional: host selftest
#                                                 # tune (benchmarks/tune.py ${TUNE_ARGS})
#                                                 # linear (the fused LM head, bench_linear.py)
#                                                 # linear_tp (bench_linear.py --tp on 2 and 4 GPUs)
#                                                 # nccl (the NCCL pytest tier, 2 and 4 GPUs;
#                                                 # NCCL_EXPR: a pytest -k subset)
#                                                 # profile (profile_group.py ${PROFILE_ARGS}
#                                                 # on 2 and 4 GPUs)
#                                                 # ray (Ray's NCCL job test and bench_ray.py;
#                                                 # needs the wheels of .whl/ carried)
#
# Limits (seconds, environment): TEST_LIMIT=420 per test process (TEST_PROCS=8; compiling takes most of it: v0.16, one of 8 processes of test_linear.py went past 300 s; the fused top-k fallback test alone takes 161 s) BENCH_LIMIT=210 DIST2_LIMIT=70 DIST4_LIMIT=120;
# TUNE_LIMIT=300 LINEAR_LIMIT=300 LINEAR_TP_LIMIT=150 NCCL_LIMIT=420 RAY_LIMIT=300 PROFILE_LIMIT=60 (opt-in steps); RAY_TEST=0 skips
# Ray's NCCL job test, RAY_STAGER_TEST=0 the one-GPU test of a worker's stager, RAY_BATCHES sets
# bench_ray's timed batches (default 30), RAY_TPS its group sizes (default 2 4, or 2 on 2 GPUs).
# The device tool returns at most 8 files from $OUT: with many steps, the last logs may not come
# back (their tails are printed by each step).
# Commit: the copy of the tree on the GPU machine may carry a stale .git; run with
# SHARDSOFTMAX_COMMIT=<the commit you sent> so that the CSVs name the code that ran.
# Carried wheels: .wheels/*.whl (liger-kernel 0.8.5, cut-cross-entropy 25.1.1) are installed too; without them the Liger
# and Cut Cross-Entropy peers are skipped with the reason printed.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")  # steps that run from /tmp (ray) write here too
# NVLink multicast (NVLS) off: it is not available on these machines.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/ss_site${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-install tests bench dist2 dist4 plot summary}
T0=$SECONDS

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, session at $((SECONDS - T0))s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (TIME LIMIT: rows written so far are in the CSV)')"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

has() { [[ " $steps " == *" $1 "* ]]; }

if has install; then
    # A non-editable install into a folder, imported with python -P so that the source folder
    # (where kernels/ is not inside shardsoftmax/) never shadows it. The folder is emptied first:
    # on a machine still warm from an earlier call, pip install --target keeps the package already
    # there ("Target directory ... already exists") and the older code would run.
    rm -rf /tmp/ss_site
    pip install -q --no-deps --no-build-isolation --target /tmp/ss_site . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
    if ls .wheels/*.whl >/dev/null 2>&1; then
        pip install -q --no-index --no-deps --target /tmp/ss_site .wheels/*.whl >>"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python -P -c "import torch, triton, shardsoftmax; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
    python -P -c "import liger_kernel; print('liger-kernel', getattr(liger_kernel, '__version__', 'installed'))" 2>/dev/null \
        || echo "liger-kernel: not installed (carry .wheels/ to compare against it)"
fi
NGPU=$(python -P -c "import torch; print(torch.cuda.device_count())")

if has tests; then
    # The CUDA tier (the kernel-level files first: sampling and the selection had bugs only the
    # compiler shows). Compiling the kernels takes most of its time and is CPU-bound, so the
    # collected tests run as TEST_PROCS (default 8) pytest processes (test ids dealt round robin),
    # spread over the GPUs (several share one GPU on a one-GPU machine); the NCCL tests are
    # the nccl step's. One log: $OUT/pytest_gpu.log.
    # TEST_FILES / TEST_EXPR: a subset (e.g. TEST_FILES="tests/test_select.py")
    expr=${TEST_EXPR:-"(cuda or gpu or host_ops) and not nccl"}
    # (test_linear.py's CUDA tier, ~190 s over 8 processes on an H200, joined the list in v0.12: a
    # test bug there had never run on a GPU)
    files=${TEST_FILES:-"tests/test_select.py tests/test_sample.py tests/test_finalize.py tests/test_wire.py tests/test_merge.py
        tests/test_core.py tests/test_grad.py tests/test_host_ops.py tests/test_distributed.py tests/test_linear.py"}
    tdir=$(mktemp -d)
    # shellcheck disable=SC2086
    python -P -m pytest --collect-only -q -p no:cacheprovider -m "not slow" -k "$expr" $files \
        2>&1 | grep '::' >"$tdir/ids"
    procs=${TEST_PROCS:-8}
    # round robin: the few slow compilations (top-k with k > 128) land in different processes
    awk -v P="$procs" -v D="$tdir" '{ print > sprintf("%s/block.%02d", D, (NR - 1) % P) }' "$tdir/ids"
    echo "=== pytest_gpu: $(wc -l <"$tdir/ids") tests in $(ls "$tdir"/block.* | wc -l) processes (limit ${TEST_LIMIT:-420}s each, session at $((SECONDS - T0))s)"
    t0=$SECONDS
    i=0
    for b in "$tdir"/block.*; do
        CUDA_VISIBLE_DEVICES=$((i % (NGPU > 0 ? NGPU : 1))) timeout -k 10 "${TEST_LIMIT:-420}" xargs -a "$b" -d '\n' \
            python -P -m pytest -q -p no:cacheprovider -rs >"$b.log" 2>&1 &
        i=$((i + 1))
    done
    rcs=""
    for job in $(jobs -p); do wait "$job"; rcs="$rcs $?"; done
    cat "$tdir"/block.*.log >"$OUT/pytest_gpu.log"
    echo "=== pytest_gpu rc:$rcs in $((SECONDS - t0))s (124: time limit)"
    grep -hE "(passed|failed|skipped|error).* in [0-9.]+s" "$tdir"/block.*.log
    grep -hE "^(FAILED|ERROR) " "$tdir"/block.*.log | head -n 20
fi
if has bench; then
    limit=${BENCH_LIMIT:-210}
    # BENCH_ARGS: extra arguments (e.g. --v 32064 --k 0 50: fewer cases)
    # shellcheck disable=SC2086
    step bench_ops "$limit" python -P benchmarks/bench_ops.py --preset bars --max-seconds $((limit - 45)) --out "$OUT" ${BENCH_ARGS:-}
fi
if has tune; then
    # shellcheck disable=SC2086
    step tune "${TUNE_LIMIT:-300}" python -P benchmarks/tune.py ${TUNE_ARGS:-}
fi
if has host; then
    step bench_host "${HOST_LIMIT:-150}" python -P benchmarks/bench_host.py --out "$OUT"
fi
if has linear; then
    # LINEAR_ARGS: extra arguments (e.g. --no-fused: leaves out the Triton kernels, impl="fused",
    # whose forward meets issue 7's bar against Cut Cross-Entropy; the whole run took ~3 minutes
    # on an H200 with them in v0.12, most of it their slow backward)
    # shellcheck disable=SC2086
    step bench_linear "${LINEAR_LIMIT:-300}" python -P benchmarks/bench_linear.py ${LINEAR_ARGS-} --out "$OUT"
fi
if has linear_tp; then
    for n in 2 4; do
        [ "$NGPU" -ge "$n" ] || continue
        step "bench_linear_tp$n" "${LINEAR_TP_LIMIT:-150}" python -P -m torch.distributed.run --standalone \
            --nproc-per-node "$n" benchmarks/bench_linear.py --tp --out "$OUT"
    done
fi
run_dist() {  # run_dist NAME NPROC LIMIT ARGS...
    local name=$1 nproc=$2 limit=$3
    shift 3
    if [ "$NGPU" -lt "$nproc" ]; then
        echo "=== $name: skipped ($NGPU GPUs, needs $nproc)"
        return
    fi
    step "$name" "$limit" python -P -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
        benchmarks/bench_dist.py --max-seconds $((limit - 35)) --out "$OUT" "$@"
}
if has dist2; then
    run_dist bench_dist2 2 "${DIST2_LIMIT:-70}" --preset bars
fi
if has dist4; then
    run_dist bench_dist4 4 "${DIST4_LIMIT:-120}" --preset scaling
fi
if has selftest && [ "$NGPU" -ge 2 ]; then
    step torchrun_tests 120 python -P -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
        --no-python python -P -m shardsoftmax.launch.torchrun tests
fi
if has profile; then
    for n in 2 4; do
        [ "$NGPU" -ge "$n" ] || continue
        # shellcheck disable=SC2086
        step "profile$n" "${PROFILE_LIMIT:-60}" python -P -m torch.distributed.run --standalone \
            --nproc-per-node "$n" benchmarks/profile_group.py ${PROFILE_ARGS:-}
    done
fi
if has nccl && [ "$NGPU" -ge 2 ]; then
    # 420 s: test_nccl_suite[4] did not finish within 280 s after [2] on a fresh machine, then
    # took 28 s on the same machine (v0.11; most likely four processes compiling with a cold cache)
    step pytest_nccl "${NCCL_LIMIT:-420}" python -P -m pytest -q -x -p no:cacheprovider -rs \
        tests/test_distributed.py -k "${NCCL_EXPR:-nccl}"
fi
if has ray && [ "$NGPU" -ge 2 ]; then
    # Ray adds the driver's working directory to its workers' import path: run from /tmp so that
    # the installed package (not the source tree, whose kernels/ sits outside shardsoftmax/) loads.
    pip install -q --no-index --no-deps --target /tmp/ss_site .whl/*.whl >>"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
    R=$PWD
    limit=${RAY_LIMIT:-300}
    [ "${RAY_TEST:-1}" = 0 ] || (cd /tmp && step ray_nccl_test 150 python -P -m pytest -q -p no:cacheprovider "$R/tests/test_ray.py" -k gpu_tp2_nccl)
    # One worker in one process on one GPU, its stager thread and slots under poisoned buffers,
    # every batch against the single-process API (tests/test_ray.py; ~1 minute)
    [ "${RAY_STAGER_TEST:-1}" = 0 ] || (cd /tmp && step ray_stager_test 120 python -P -m pytest -q -p no:cacheprovider "$R/tests/test_ray.py" -k "worker_stager and cuda")
    tps="2"
    [ "$NGPU" -ge 4 ] && tps="2 4"
    tps=${RAY_TPS:-$tps}
    (cd /tmp && step bench_ray "$limit" python -P "$R/benchmarks/bench_ray.py" --tp $tps --v 128256 256000 --breakdown \
        --batches "${RAY_BATCHES:-30}" --out "$OUT")
fi
if has plot; then
    step plot 40 python -P benchmarks/plot.py "$OUT"/*.csv --out "$OUT/figures"
fi
if has summary; then
    echo "=== summary of the bars (every report under $OUT), session took $((SECONDS - T0))s"
    for f in "$OUT"/*.txt; do
        [ -e "$f" ] || continue
        echo "--- $(basename "$f")"
        grep -E "^(PASS|FAIL|MISSING) |^bars: |^not run|^== results" "$f"
    done
fi

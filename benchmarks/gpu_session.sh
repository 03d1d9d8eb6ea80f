#!/usr/bin/env bash
# One call on a GPU machine: install, GPU test tier, one-GPU benchmark, torchrun self-check and the
# distributed benchmark on every GPU. Logs and CSVs under $OUT (default ./gpu_out); each step's
# tail is printed as it ends. Usage (from the repository root):
#     bash benchmarks/gpu_session.sh [steps...]     # steps: install tests bench host dist (default: all)
# Carried wheels (optional): .wheels/*.whl (e.g. liger-kernel) are installed too.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/ss_site${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-install tests bench host dist}

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
    tail -n "${TAIL:-20}" "$OUT/$name.log"
}

has() { [[ " $steps " == *" $1 "* ]]; }

if has install; then
    # A non-editable install into a folder, imported with python -P so that the source folder
    # (where kernels/ is not yet inside shardsoftmax/) never shadows it.
    pip install -q --no-deps --no-build-isolation --target /tmp/ss_site . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
    ls .wheels/*.whl >/dev/null 2>&1 && pip install -q --no-index --no-deps --target /tmp/ss_site .wheels/*.whl
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python -P -c "import torch, triton, shardsoftmax; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
fi
NGPU=$(python -P -c "import torch; print(torch.cuda.device_count())")
if has tests; then
    step pytest_gpu "${TEST_LIMIT:-300}" python -P -m pytest -q -x -p no:cacheprovider -m "not slow" \
        tests/test_core.py tests/test_grad.py tests/test_finalize.py tests/test_host_ops.py \
        tests/test_distributed.py -k "cuda or nccl or gpu or host_ops"
fi
if has bench; then
    step bench_ops "${BENCH_LIMIT:-240}" python -P benchmarks/bench_ops.py --compile none --out "$OUT"
fi
if has host; then
    step bench_host "${HOST_LIMIT:-150}" python -P benchmarks/bench_host.py --out "$OUT"
fi
if has dist && [ "$NGPU" -ge 2 ]; then
    step torchrun_tests 120 torchrun --standalone --nproc-per-node "$NGPU" --no-python \
        python -P -m shardsoftmax.launch.torchrun tests
    step bench_dist "${DIST_LIMIT:-200}" torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_dist.py --out "$OUT"
    if [ "$NGPU" -gt 2 ]; then
        step bench_dist2 "${DIST_LIMIT:-200}" torchrun --standalone --nproc-per-node 2 benchmarks/bench_dist.py --out "$OUT"
    fi
fi

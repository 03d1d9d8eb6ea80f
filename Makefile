# Common tasks. `make test` is what CI runs (through .ci/run).
PY ?= python

.PHONY: install test test-gpu test-dist bench bench-dist lint demo

install:
	$(PY) -m pip install -e ".[test,ray,bench,dev]"

test:  ## CPU tier: Triton interpreter + PyTorch backend, gloo process groups, local Ray
	$(PY) -m pytest -q

test-gpu:  ## the same suite on a CUDA machine (GPU tiers run, NCCL tests need 2+ GPUs)
	$(PY) -m pytest -q

test-dist:  ## distributed self-check under torchrun (NCCL on GPUs, gloo on CPU)
	torchrun --nproc-per-node $${NPROC:-2} -m shardsoftmax.launch.torchrun tests

bench:  ## one-GPU benchmark (copy bandwidth first, outputs checked, CSV under bench_out/)
	$(PY) benchmarks/bench_ops.py

bench-dist:
	torchrun --nproc-per-node $${NPROC:-2} -m shardsoftmax.launch.torchrun bench

lint:
	ruff check . && ruff format --check .

demo:
	shardsoftmax score --demo

"""Where tests that call the kernels directly (no backend choice) run: the CPU under Triton's
interpreter, or a CUDA GPU (the GPU tier, with the interpreter off)."""

from __future__ import annotations

import pytest
import torch

from shardsoftmax.backend import triton_interpreted

TRITON_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not triton_interpreted(), reason="CPU Triton needs TRITON_INTERPRET=1"),
        id="cpu-triton",
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or triton_interpreted(), reason="needs a CUDA GPU"
        ),
        id="cuda-triton",
    ),
]

"""Shared test setup.

Without a GPU, Triton kernels run in Triton's CPU interpreter; it is chosen when Triton is first
imported, so this must happen before anything imports ``triton`` or ``shardsoftmax``.

Core tests take the ``core_tier`` fixture and run once per tier of the same suite:

* ``cpu-triton``: the Triton kernels in the CPU interpreter (slow: keep sizes small);
* ``cpu-torch``: the PyTorch reference backend on the CPU;
* ``cuda-triton``: the Triton kernels on a CUDA GPU (skipped, with a reason, without one).

``@pytest.mark.core_tiers("cpu-torch", "cuda-triton")`` limits a test to some tiers (large sizes
that the interpreter would take minutes over).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

import shardsoftmax as ss  # noqa: E402
from shardsoftmax.backend import triton_interpreted  # noqa: E402

INTERPRETED = triton_interpreted()
HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class CoreTier:
    """Where a core test runs: the device of its tensors and the backend that computes them."""

    name: str
    device: str
    backend: str
    interpreted: bool  # Triton in the CPU interpreter: seconds per call at large sizes


CORE_TIERS = {
    "cpu-triton": pytest.param(
        CoreTier("cpu-triton", "cpu", "triton", True),
        id="cpu-triton",
        marks=pytest.mark.skipif(
            not INTERPRETED, reason="Triton interpreter off (CUDA present and TRITON_INTERPRET unset)"
        ),
    ),
    "cpu-torch": pytest.param(CoreTier("cpu-torch", "cpu", "torch", False), id="cpu-torch"),
    "cuda-triton": pytest.param(
        CoreTier("cuda-triton", "cuda", "triton", False),
        id="cuda-triton",
        marks=pytest.mark.skipif(
            not HAS_CUDA or INTERPRETED,
            reason="needs a CUDA GPU" if not HAS_CUDA else "TRITON_INTERPRET=1 is set",
        ),
    ),
}


def pytest_configure(config):
    # The interpreter evaluates kernels with numpy, which warns where IEEE results are intended
    # (exp overflowing to inf, 0 * inf in masked lanes).
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line(
        "markers",
        "core_tiers(*names): run a core_tier test only on these tiers (" + ", ".join(CORE_TIERS) + ")",
    )


def pytest_generate_tests(metafunc):
    if "core_tier" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("core_tiers")
    names = marker.args if marker else tuple(CORE_TIERS)
    unknown = set(names) - set(CORE_TIERS)
    if unknown:
        raise ValueError(f"unknown core tiers {sorted(unknown)}; known: {list(CORE_TIERS)}")
    metafunc.parametrize("core_tier", [CORE_TIERS[n] for n in names], indirect=True)


@pytest.fixture
def core_tier(request):
    """The tier's backend is active for the test and restored afterwards."""
    tier = request.param
    with ss.use_backend(tier.backend):
        yield tier

"""Every kernel that the public API launches compiles for a GPU (sm_90), checked without one.

The CPU tier runs the kernels in Triton's interpreter, which executes them as Python. It takes
code that the compiler rejects: a plain module global read in a kernel, a loop-carried variable
bound again to another shape, an argument that the launcher specializes to a constant (an integer
equal to 1) used as a tensor. Each of these once passed the CPU tier and failed on the GPU. Here,
representative calls run under the interpreter while every launch is recorded: the kernel, its
arguments' types, its constexprs and launch options. A subprocess without the interpreter then
compiles each distinct launch for sm_90 (to a cubin: ptxas ships with Triton), specializing
integers equal to 1 as the launcher does. The GPU tier compiles every kernel for real and skips
this test."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import shardsoftmax as ss
from shardsoftmax.backend import triton_interpreted

pytestmark = pytest.mark.skipif(
    not triton_interpreted(), reason="the Triton interpreter is off: the GPU tier compiles every kernel"
)

DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
OPTIONS = ("num_warps", "num_stages", "maxnreg")

# Runs in a subprocess without TRITON_INTERPRET: reads the recorded launches (JSON on stdin) and
# compiles each for sm_90; prints one line per launch, "ok" or the error.
COMPILER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def jit_function(obj):
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn  # @triton.heuristics / @triton.autotune wrappers
    return obj

def compile_one(launch):
    fn = jit_function(getattr(importlib.import_module(launch["module"]), launch["name"]))
    signature, constexprs = {}, {}
    for p in fn.params:
        kind, value = launch["args"][p.name]
        if kind == "const" or (kind == "int" and value == 1 and not p.do_not_specialize):
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif kind == "int":
            signature[p.name] = "i32" if value < 2**31 else "i64"
        else:
            signature[p.name] = value  # a pointer's or a scalar's type
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])

for launch in json.load(sys.stdin):
    try:
        compile_one(launch)
        print("ok", launch["name"], flush=True)
    except Exception as e:  # report every launch, not only the first failure
        print("FAIL", launch["name"], launch["args"], type(e).__name__, str(e).replace(chr(10), " ")[:2000])
"""


def describe(value, constexpr: bool):
    """(kind, value) of one kernel argument for the compiler: a constexpr's value; a pointer's or a
    float's type; an integer as 1 (which the launcher specializes), 2 (32 bits) or 2**40 (64 bits)."""
    if constexpr or value is None:
        return "const", value
    if isinstance(value, torch.Tensor):
        return "type", "*" + DTYPES[value.dtype]
    if type(value).__name__ == "TensorDescriptor":  # a TMA operand: its type names dtype and block
        return "type", f"tensordesc<{DTYPES[value.base.dtype]}[{','.join(map(str, value.block_shape))}]>"
    if isinstance(value, bool):
        return "type", "i1"
    if isinstance(value, int):
        return "int", 1 if value == 1 else 2 if -(2**31) <= value < 2**31 else 2**40
    if isinstance(value, float):
        return "type", "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


@pytest.fixture
def recorded(monkeypatch):
    """The distinct launches made during the test, recorded by the interpreter's run()."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        values = dict(zip(self.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k not in OPTIONS})
        launch = {
            "module": self.fn.__module__,
            "name": self.fn.__name__,
            "args": {k: describe(v, "constexpr" in str(params[k].annotation)) for k, v in values.items()},
            "options": {k: kwargs[k] for k in OPTIONS if k in kwargs},
        }
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return launches


def compile_for_sm90(launches: dict[str, dict]) -> list[str]:
    """Compile each launch in a subprocess without the interpreter; the failures' lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", COMPILER],
        input=json.dumps(list(launches.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(launches):
        pytest.fail(f"the compiler subprocess failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return [line for line in lines if not line.startswith("ok ")]


def test_api_kernels_compile_for_sm90(recorded):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 300, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, 300, (3,), generator=g)
    ss.softmax_stats(x, t, k=0)
    ss.softmax_stats(x, t, k=5, softcap=20.0, temperature=0.7)  # the selection, KP = 8
    ss.softmax_stats(x.float(), k=129)  # KP = 256: its own tile and warps
    xs = x.clone().requires_grad_()
    ss.cross_entropy(xs, t, label_smoothing=0.1, z_loss=1e-3).backward()
    ss.softmax(x)
    ss.log_softmax(x, softcap=10.0)
    ss.sample(x, seed=1)  # seed 1: a specialized argument
    ss.sample(x, seed=2**40 + 1, top_k=3)
    # column splits merged in finalize (a GPU's decode path; TP = 2's merge of 2 x 50 keys)
    from shardsoftmax import kernels
    from shardsoftmax.kernels import linear as KL

    kw = dict(n_valid_cols=300, vocab_start=0, ignore_index=-100, softcap=None, temperature=1.0)
    st, tv, ti = kernels.shard_partials(x, t, k=50, n_splits=2, tile=(4, 32), **kw)
    assert st.shape[1] == 2
    kernels.finalize_stats(st, tv, ti, t, vocab_start=0, ignore_index=-100)
    h = torch.randn(5, 16, generator=g)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    ss.linear_softmax_stats(h, w.detach(), k=3, impl="fused")
    ss.linear_cross_entropy(h.requires_grad_(), w, torch.randint(0, 40, (5,)), impl="fused").backward()
    # bf16 with 16-byte aligned rows: the logit tiles' TMA loads (as on Hopper)
    hb, wb = h.detach().bfloat16(), w.detach().bfloat16().requires_grad_()
    ss.linear_cross_entropy(hb.requires_grad_(), wb, torch.randint(0, 40, (5,)), impl="fused").backward()
    KL.linear_partials(hb.detach(), wb.detach(), None, None, k=3, n_valid_cols=40, vocab_start=0, ignore_index=-100,
                       softcap=None, temperature=1.0, fused_topk=True)  # top-k candidates (opt-in), TMA
    assert any("tensordesc" in str(launch["args"]) for launch in recorded.values()), "no TMA launch recorded"
    assert any(launch["args"].get("TOPK") == ("const", True) for launch in recorded.values()), "no top-k launch"
    assert len(recorded) >= 8, f"only {len(recorded)} distinct launches recorded"
    failures = compile_for_sm90(recorded)
    assert not failures, "\n".join(failures)

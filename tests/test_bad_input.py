"""Invalid arguments raise TypeError / ValueError naming the argument and the value, before any
kernel runs; degenerate but valid shapes (no rows, one column) give defined results."""

from __future__ import annotations

import re

import pytest
import torch

import shardsoftmax as ss

NAN = float("nan")
INF = float("inf")
V = 10


def x_and_t():
    return torch.randn(3, V), torch.tensor([1, 2, 3])


# Each public function, called with good defaults plus the bad keyword arguments.
CALLS = {
    "softmax_stats": lambda x, t, **kw: ss.softmax_stats(x, t, **kw),
    "cross_entropy": lambda x, t, **kw: ss.cross_entropy(x, t, **kw),
    "softmax": lambda x, t, **kw: ss.softmax(x, **kw),
    "log_softmax": lambda x, t, **kw: ss.log_softmax(x, **kw),
    "topk": lambda x, t, k=1, **kw: ss.topk(x, k, **kw),
}
ALL = tuple(CALLS)
WITH_TARGET = ("softmax_stats", "cross_entropy")
WITH_K = ("softmax_stats", "topk")
LOSS = ("cross_entropy",)

# (id, functions, keyword arguments, exception, argument named in the message, value in the message)
BAD_OPTIONS = [
    ("k-negative", WITH_K, {"k": -1}, ValueError, "k", "-1"),
    ("k-over-1024", WITH_K, {"k": 1025}, ValueError, "k", "1025"),
    ("k-over-vocab", WITH_K, {"k": V + 1}, ValueError, "k", str(V + 1)),
    ("k-over-padded-vocab", WITH_K, {"k": 8, "vocab_size": 7}, ValueError, "k", "8"),
    ("k-float", WITH_K, {"k": 2.0}, TypeError, "k", "2.0"),
    ("temperature-zero", ALL, {"temperature": 0.0}, ValueError, "temperature", "0.0"),
    ("temperature-negative", ALL, {"temperature": -1.0}, ValueError, "temperature", "-1.0"),
    ("temperature-nan", ALL, {"temperature": NAN}, ValueError, "temperature", "nan"),
    ("temperature-inf", ALL, {"temperature": INF}, ValueError, "temperature", "inf"),
    ("temperature-str", ALL, {"temperature": "1"}, TypeError, "temperature", "'1'"),
    ("softcap-zero", ALL, {"softcap": 0.0}, ValueError, "softcap", "0.0"),
    ("softcap-negative", ALL, {"softcap": -30.0}, ValueError, "softcap", "-30.0"),
    ("softcap-nan", ALL, {"softcap": NAN}, ValueError, "softcap", "nan"),
    ("label_smoothing-one", LOSS, {"label_smoothing": 1.0}, ValueError, "label_smoothing", "1.0"),
    ("label_smoothing-negative", LOSS, {"label_smoothing": -0.1}, ValueError, "label_smoothing", "-0.1"),
    ("label_smoothing-nan", LOSS, {"label_smoothing": NAN}, ValueError, "label_smoothing", "nan"),
    ("reduction-unknown", LOSS, {"reduction": "avg"}, ValueError, "reduction", "'avg'"),
    ("reduction-none-object", LOSS, {"reduction": None}, ValueError, "reduction", "None"),
    ("z_loss-negative", LOSS, {"z_loss": -1e-4}, ValueError, "z_loss", "-0.0001"),
    ("z_loss-nan", LOSS, {"z_loss": NAN}, ValueError, "z_loss", "nan"),
    ("vocab_size-over-columns", ALL, {"vocab_size": V + 1}, ValueError, "vocab_size", str(V + 1)),
    ("vocab_size-over-offset-columns", ALL, {"vocab_size": 15 + V + 1, "vocab_start": 15}, ValueError,
     "vocab_size", str(15 + V + 1)),
    ("vocab_size-zero", ALL, {"vocab_size": 0}, ValueError, "vocab_size", "0"),
    ("vocab_size-float", ALL, {"vocab_size": 5.0}, TypeError, "vocab_size", "5.0"),
    ("vocab_start-negative", ALL, {"vocab_start": -1}, ValueError, "vocab_start", "-1"),
    ("ignore_index-float", WITH_TARGET, {"ignore_index": -100.0}, TypeError, "ignore_index", "-100.0"),
    ("inplace_backward-int", LOSS, {"inplace_backward": 1}, TypeError, "inplace_backward", "1"),
]  # fmt: skip


def _cases():
    for name, fns, kw, exc, arg, value in BAD_OPTIONS:
        for fn in fns:
            yield pytest.param(fn, kw, exc, arg, value, id=f"{fn}-{name}")


def assert_names(err: pytest.ExceptionInfo, arg: str, value: str) -> None:
    msg = str(err.value)
    assert re.search(rf"\b{re.escape(arg)}\b", msg), f"message does not name {arg!r}: {msg}"
    assert value in msg, f"message does not show the value {value}: {msg}"


@pytest.mark.parametrize(("fn", "kw", "exc", "arg", "value"), list(_cases()))
def test_bad_option_is_rejected_by_name(fn, kw, exc, arg, value):
    x, t = x_and_t()
    with pytest.raises(exc) as err:
        CALLS[fn](x, t, **kw)
    assert_names(err, arg, value)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_logits_are_rejected(fn, dtype):
    x = torch.zeros(3, V, dtype=dtype)
    with pytest.raises(TypeError) as err:
        CALLS[fn](x, torch.tensor([1, 2, 3]))
    assert_names(err, "logits", str(dtype))


@pytest.mark.parametrize("fn", ALL)
def test_logits_must_be_a_tensor_with_a_vocab_dim(fn):
    with pytest.raises(TypeError) as err:
        CALLS[fn]([[0.0, 1.0]], torch.tensor([0]))
    assert_names(err, "logits", "list")
    with pytest.raises(ValueError) as err:
        CALLS[fn](torch.tensor(1.0), torch.tensor(0))
    assert_names(err, "logits", "0-d")


@pytest.mark.parametrize("fn", WITH_TARGET)
@pytest.mark.parametrize(
    ("target", "exc", "value"),
    [
        (torch.tensor([1, 2]), ValueError, "(2,)"),
        (torch.tensor([[1, 2, 3]]), ValueError, "(1, 3)"),
        (torch.tensor(1), ValueError, "()"),
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, "torch.float32"),
        (torch.tensor([True, False, True]), TypeError, "torch.bool"),
        ([1, 2, 3], TypeError, "list"),
    ],
    ids=["short", "extra-dim", "scalar", "float", "bool", "list"],
)
def test_bad_target_is_rejected_by_name(fn, target, exc, value):
    x, _ = x_and_t()
    with pytest.raises(exc) as err:
        CALLS[fn](x, target)
    assert_names(err, "target", value)


def test_cross_entropy_needs_a_target():
    x, _ = x_and_t()
    with pytest.raises(TypeError) as err:
        ss.cross_entropy(x, None)
    assert_names(err, "target", "NoneType")


def test_options_are_keyword_only():
    x, t = x_and_t()
    with pytest.raises(TypeError):
        ss.cross_entropy(x, t, -100)  # noqa
    with pytest.raises(TypeError):
        ss.softmax_stats(x, t, 3)  # noqa


def test_backend_name_is_checked():
    with pytest.raises(ValueError) as err:
        ss.set_backend("cuda")
    assert_names(err, "backend", "'cuda'")
    assert ss.get_backend() in ("auto", "triton", "torch")


# ------------------------------------------------------------------------------------------------
# Degenerate shapes that are valid
# ------------------------------------------------------------------------------------------------


def test_no_rows(core_tier):
    x = torch.zeros(0, 50, device=core_tier.device)
    t = torch.zeros(0, dtype=torch.int64, device=core_tier.device)
    got = ss.softmax_stats(x, t, k=3)
    assert got.lse.shape == got.entropy.shape == got.target_logprob.shape == (0,)
    assert got.topk_ids.shape == got.topk_logprobs.shape == (0, 3)
    assert ss.cross_entropy(x, t, reduction="none").shape == (0,)
    assert ss.cross_entropy(x, t, reduction="sum") == 0
    assert ss.cross_entropy(x, t).isnan(), "mean over no tokens is NaN, as PyTorch"
    assert ss.softmax(x).shape == ss.log_softmax(x).shape == (0, 50)
    vals, ids = ss.topk(x.reshape(0, 5, 10), 2)
    assert vals.shape == ids.shape == (0, 5, 2)
    xg = x.clone().requires_grad_(True)
    ss.cross_entropy(xg, t, reduction="sum").backward()
    assert xg.grad.shape == (0, 50)


def test_one_column(core_tier):
    x = torch.tensor([[3.0], [-2.0], [-INF]], device=core_tier.device)
    t = torch.tensor([0, -100, 0], device=core_tier.device)
    got = ss.softmax_stats(x, t, k=1)
    assert got.lse.tolist()[:2] == [3.0, -2.0] and got.lse[2] == -INF
    assert got.entropy.tolist()[:2] == [0.0, 0.0]
    assert got.target_logprob.tolist()[:2] == [0.0, 0.0]
    assert got.topk_ids.tolist() == [[0], [0], [0]]
    assert ss.softmax(x)[:2].tolist() == [[1.0], [1.0]]
    assert ss.log_softmax(x)[:2].tolist() == [[0.0], [0.0]]
    loss = ss.cross_entropy(x[:2], t[:2], reduction="none")
    assert loss.tolist() == [0.0, 0.0]
    xg = x[:2].clone().requires_grad_(True)
    ss.cross_entropy(xg, t[:2], label_smoothing=0.1, z_loss=1e-3).backward()
    torch.testing.assert_close(xg.grad.cpu(), torch.tensor([[2 * 1e-3 * 3.0], [0.0]]))
    # a one-column shard with an offset: its id is vocab_start
    assert ss.topk(x[:1], 1, vocab_start=41)[1].tolist() == [[41]]

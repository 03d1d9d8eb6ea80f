"""Argument checks shared by the public functions. Each error names the argument, the value and what
is allowed. Nothing here reads tensor values (no host sync)."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a 0-d tensor")


def check_target(target, logits: torch.Tensor, name: str = "target", of: str = "logits") -> None:
    """``of``: what ``logits`` is called in messages (the fused head passes its hidden states)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class ids, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int64, int32, ...), got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have shape {tuple(logits.shape[:-1])} ({of}' shape without the last dim), "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"{name} is on {target.device}, {of} on {logits.device}")


def check_linear(hidden, weight, bias) -> None:
    """The fused LM head's inputs: hidden [..., H], weight [V_shard, H] and bias [V_shard] or None,
    one float dtype and one device."""
    check_logits(hidden, "hidden")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a non-empty last dimension (H), got shape {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor [V_shard, H], got {type(weight).__name__}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V_shard, {hidden.shape[-1]}] (H = hidden's last dimension), "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor [V_shard] or None, got {type(bias).__name__}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) (weight's V_shard), got {tuple(bias.shape)}"
        )
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")


def check_int(value, name: str, *, low: int | None = None, high: int | None = None, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def check_positive(value, name: str, *, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_transform(temperature, softcap) -> None:
    check_positive(temperature, "temperature")
    check_positive(softcap, "softcap", allow_none=True)


def check_layout_args(vocab_size, vocab_start) -> None:
    check_int(vocab_size, "vocab_size", low=1, allow_none=True)
    check_int(vocab_start, "vocab_start", low=0, allow_none=True)


def check_loss_options(reduction, label_smoothing, z_loss) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real):
        raise TypeError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss}")


def check_loss_kwargs(ignore_index, reduction, label_smoothing, z_loss, temperature, softcap) -> None:
    """The options every cross-entropy entry point takes (functions and modules)."""
    check_int(ignore_index, "ignore_index")
    check_loss_options(reduction, label_smoothing, z_loss)
    check_transform(temperature, softcap)

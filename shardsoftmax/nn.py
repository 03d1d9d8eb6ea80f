"""``torch.nn`` modules for a vocabulary split across the ranks of a process group.

* ``VocabParallelCrossEntropy``: ``shardsoftmax.cross_entropy`` with its options fixed at
  construction, as a module.
* ``VocabParallelLMHead``: the output projection of a language model, column-parallel over the
  vocabulary. Each rank holds rows ``[vocab_start, vocab_start + V_shard)`` of the ``[V, H]``
  weight, computes its logit shard and gets the exact global loss (or statistics) from one
  collective. The hidden states are replicated on every rank, so in backward their gradient is
  the sum over ranks of each shard's contribution: one all-reduce, the column-parallel rule.

``process_group=None`` means one process holds the whole vocabulary; no collective is made.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _validate as V
from . import collective
from .api import SoftmaxStats, cross_entropy, linear_cross_entropy, linear_softmax_stats, softmax_stats
from .collective import IMPLS

__all__ = ["VocabParallelCrossEntropy", "VocabParallelLMHead", "copy_to_vocab_parallel", "shard_sizes"]


def shard_sizes(vocab_size_padded: int, world_size: int) -> list[int]:
    """Contiguous split of ``vocab_size_padded`` columns over ``world_size`` ranks: the first
    ``vocab_size_padded % world_size`` ranks get one column more (50257 over 4 -> 12565, 12564,
    12564, 12564). Every rank gets at least one column."""
    V.check_int(world_size, "world_size", low=1)
    V.check_int(vocab_size_padded, "vocab_size_padded", low=world_size)
    base, extra = divmod(vocab_size_padded, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def _group_rank_and_size(process_group, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): from the group when one is given (and checked against explicit values),
    else the explicit values (default 0 of 1)."""
    if process_group is not None:
        g_rank, g_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        if rank is not None and rank != g_rank:
            raise ValueError(f"rank={rank} but this process is rank {g_rank} of process_group")
        if world_size is not None and world_size != g_size:
            raise ValueError(f"world_size={world_size} but process_group has {g_size} ranks")
        return g_rank, g_size
    world_size = 1 if world_size is None else world_size
    rank = 0 if rank is None else rank
    V.check_int(world_size, "world_size", low=1)
    V.check_int(rank, "rank", low=0, high=world_size - 1)
    return rank, world_size


class _CopyToVocabParallel(torch.autograd.Function):
    """Identity in forward; in backward the gradient is summed over the group (all-reduce)."""

    @staticmethod
    def forward(ctx, x, process_group):
        ctx.process_group = process_group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # never modify autograd's buffer
        collective.poll(ctx.process_group)  # a landed header check that failed: raise, do not all-reduce
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad, None


def copy_to_vocab_parallel(x: torch.Tensor, process_group) -> torch.Tensor:
    """``x`` (replicated on every rank) as the input of a vocabulary-parallel layer: unchanged in
    forward, gradient all-reduced (summed) over ``process_group`` in backward. A no-op for
    ``process_group=None`` or a group of one rank."""
    if process_group is None or dist.get_world_size(process_group) == 1:
        return x
    return _CopyToVocabParallel.apply(x, process_group)


class VocabParallelCrossEntropy(nn.Module):
    """``shardsoftmax.cross_entropy`` as a module; the keyword options are those of that function.

    ``forward(logits_shard [..., V_shard] float16/bfloat16/float32/float64, target [...] int)``
    returns the loss over the global vocabulary: a float32 scalar (float64 for float64 logits) for
    ``reduction`` "mean"/"sum", or ``[...]`` for "none" (0 at ignored tokens). With a
    ``process_group`` each rank passes its contiguous shard and gets the same loss; the backward
    needs no collective and gives each rank the gradient of its own shard.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        temperature: float = 1.0,
        softcap: float | None = None,
        vocab_size: int | None = None,
        vocab_start: int | None = None,
        process_group=None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        V.check_loss_kwargs(ignore_index, reduction, label_smoothing, z_loss, temperature, softcap)
        V.check_layout_args(vocab_size, vocab_start)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        self.temperature = float(temperature)
        self.softcap = None if softcap is None else float(softcap)
        self.vocab_size = vocab_size
        self.vocab_start = vocab_start
        self.process_group = process_group
        self.inplace_backward = inplace_backward

    def forward(self, logits_shard: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            logits_shard,
            target,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            temperature=self.temperature,
            softcap=self.softcap,
            vocab_size=self.vocab_size,
            vocab_start=self.vocab_start,
            process_group=self.process_group,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        opts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("temperature", 1.0)):
            if getattr(self, name) != default:
                opts.append(f"{name}={getattr(self, name)}")
        for name in ("softcap", "vocab_size", "vocab_start"):
            if getattr(self, name) is not None:
                opts.append(f"{name}={getattr(self, name)}")
        return ", ".join(opts)


class VocabParallelLMHead(nn.Module):
    """Output projection ``hidden [..., H] -> logits [..., V]`` with the vocabulary split over ranks.

    This rank holds ``weight [V_shard, H]`` (and ``bias [V_shard]`` if ``bias=True``): rows
    ``[vocab_start, vocab_start + V_shard)`` of the full weight, with ``V_shard`` from
    ``shard_sizes(vocab_size_padded, world_size)[rank]``. Rows at or past ``vocab_size`` (the true
    vocabulary) are padding: they never enter the softmax and get zero gradient (they are
    initialised to zero). ``rank``/``world_size`` default to the group's (0 of 1 without a group).
    The loss options (``ignore_index``, ``reduction``, ``label_smoothing``, ``z_loss``,
    ``temperature``, ``softcap``) are those of ``shardsoftmax.cross_entropy``.

    ``fused``: compute the loss and statistics with ``linear_cross_entropy`` /
    ``linear_softmax_stats`` (their default ``impl="chunked"``) instead of ``F.linear`` +
    ``cross_entropy`` / ``softmax_stats``, which store the whole [N, V_shard] logits (and, in
    training, their gradient). Statistics and evaluation (``torch.no_grad()``): cuBLAS logits of
    one block of rows of at most ``shardsoftmax.linear.FORWARD_BLOCK_BYTES`` = 512 MiB at a time,
    each handed to the shard kernels. Training with reduction "mean" or "sum": the eager-gradient
    forward (blocks of 2048 rows or more; the three gradients computed in forward, 3 GEMMs as the unfused
    path; one all-gather per block in a group; memory: one block of logits and the fp32
    grad_weight accumulator, see ``linear_cross_entropy``); with reduction "none", backward
    recomputes each chunk (one more GEMM). Off by default: when the logits fit, the unfused path is
    the fastest, in training and for statistics alike (one H200, H = 4096, bf16, docs/performance.md
    v0.15: the loss's forward + backward took 9-16% longer fused at N = 8192 and 31-36% at 2048;
    statistics took 0-6% longer through ``linear_softmax_stats`` at 1024-32768 tokens and up to
    1.5x at 1-256). Turn it on
    when the [N, V_shard] logits (and their gradient) do not fit. Both paths round the
    logits to the weight's dtype as ``F.linear`` does and give the same results up to the matmul's
    summation order, with the same gradients.

    ``impl`` (with ``fused=True``): the ``impl`` of ``linear_cross_entropy`` /
    ``linear_softmax_stats``. ``"chunked"`` (default) as above; ``"recompute"`` or ``"fused"`` when
    even one block of logits and the fp32 grad_weight are too much: they keep one chunk of at most
    128 MiB in backward, and ``"fused"`` (the Triton kernels) no logits at all in forward. They
    cost one more GEMM: forward + backward 1.4-1.5x of three matmuls against ~1.2x for
    ``"chunked"`` (one H200, N = 8192, docs/performance.md v0.17). ``"fused"`` does not round the
    logits to the weight's dtype.

    ``forward(hidden, target=None, *, k=0, return_stats=False)``:

    * ``hidden``: ``[..., H]``, the same on every rank, in the weight's dtype.
    * with ``target`` (``[...]`` int) and ``return_stats=False``: the cross-entropy loss (float32,
      or float64 for float64 weights; see ``shardsoftmax.cross_entropy`` for reductions and ignored
      tokens). Differentiable; backward all-reduces the gradient of ``hidden`` over the group.
    * otherwise: ``shardsoftmax.softmax_stats`` of the logits (lse, max, entropy, log p(target) if a
      target is given, global top-``k`` ids and log-probs), shapes ``[...]`` and ``[..., k]``.
      Not differentiable.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        *,
        vocab_size_padded: int | None = None,
        bias: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        process_group=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        temperature: float = 1.0,
        softcap: float | None = None,
        fused: bool = False,
        impl: str = "chunked",
        device=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        V.check_int(hidden_size, "hidden_size", low=1)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl != "chunked" and not fused:
            raise ValueError(f"impl={impl!r} chooses the LM head path's implementation: it needs fused=True")
        self.fused, self.impl = fused, impl
        V.check_int(vocab_size, "vocab_size", low=1)
        padded = vocab_size if vocab_size_padded is None else vocab_size_padded
        V.check_int(padded, "vocab_size_padded", low=vocab_size)
        self.rank, self.world_size = _group_rank_and_size(process_group, rank, world_size)
        sizes = shard_sizes(padded, self.world_size)
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.vocab_size_padded = padded
        self.vocab_start = sum(sizes[: self.rank])
        self.shard_size = sizes[self.rank]
        self.process_group = process_group
        # The loss over this rank's logit shard; its options also serve the statistics path.
        self.loss_fn = VocabParallelCrossEntropy(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            temperature=temperature,
            softcap=softcap,
            vocab_size=vocab_size,
            vocab_start=self.vocab_start,
            process_group=process_group,
        )
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(self.shard_size, **factory)) if bias else None
        self.reset_parameters()

    shard_sizes = staticmethod(shard_sizes)

    @property
    def n_real_rows(self) -> int:
        """Rows of this shard inside the true vocabulary (the rest are padding)."""
        return max(0, min(self.shard_size, self.vocab_size - self.vocab_start))

    def reset_parameters(self) -> None:
        """As ``nn.Linear`` (uniform in +-1/sqrt(H)); padding rows zero."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            self.weight[self.n_real_rows :] = 0
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
                self.bias[self.n_real_rows :] = 0

    @classmethod
    def from_full(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        process_group=None,
        vocab_size: int | None = None,
        **loss_options,
    ) -> VocabParallelLMHead:
        """This rank's head cut from a full ``weight [V_padded, H]`` (and ``bias [V_padded]``),
        copied; ``vocab_size`` (default ``V_padded``) is the true vocabulary, the rows past it are
        padding. The split is ``shard_sizes(V_padded, world_size)``, uneven allowed.
        ``loss_options``: the keyword options of the constructor (``label_smoothing`` etc.)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"weight must be a 2-D tensor [V_padded, H], got {getattr(weight, 'shape', weight)}"
            )
        padded, hidden = weight.shape
        if bias is not None and tuple(bias.shape) != (padded,):
            raise ValueError(f"bias must have shape ({padded},) to match weight, got {tuple(bias.shape)}")
        vocab_size = padded if vocab_size is None else vocab_size
        V.check_int(vocab_size, "vocab_size", low=1, high=padded)
        head = cls(
            hidden,
            vocab_size,
            vocab_size_padded=padded,
            bias=bias is not None,
            rank=rank,
            world_size=world_size,
            process_group=process_group,
            device=weight.device,
            dtype=weight.dtype,
            **loss_options,
        )
        rows = slice(head.vocab_start, head.vocab_start + head.shard_size)
        with torch.no_grad():
            head.weight.copy_(weight[rows])
            if bias is not None:
                head.bias.copy_(bias[rows])
        return head

    def forward(
        self,
        hidden: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        k: int = 0,
        return_stats: bool = False,
    ) -> torch.Tensor | SoftmaxStats:
        if self.world_size > 1 and self.process_group is None:
            raise ValueError(
                f"this head holds shard {self.rank} of {self.world_size} but has no process_group; "
                "pass the group the vocabulary is split over"
            )
        loss = target is not None and not return_stats
        if loss and k != 0:
            raise ValueError(
                f"k={k} applies to statistics only (return_stats=True or no target); the loss has no top-k"
            )
        opts = self.loss_fn
        if self.fused:
            layout = {"vocab_size": self.vocab_size, "vocab_start": self.vocab_start}
            transform = {"temperature": opts.temperature, "softcap": opts.softcap}
            if not loss:
                return linear_softmax_stats(
                    hidden, self.weight, target, bias=self.bias, k=k, ignore_index=opts.ignore_index,
                    process_group=self.process_group, impl=self.impl, **transform, **layout,
                )  # fmt: skip
            return linear_cross_entropy(
                hidden, self.weight, target, bias=self.bias, ignore_index=opts.ignore_index,
                reduction=opts.reduction, label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
                process_group=self.process_group, reduce_hidden_grad=True, impl=self.impl, **transform,
                **layout,
            )  # fmt: skip
        if not loss:
            with torch.no_grad():
                logits = F.linear(hidden, self.weight, self.bias)
            return softmax_stats(
                logits, target, k=k, ignore_index=opts.ignore_index, temperature=opts.temperature,
                softcap=opts.softcap, vocab_size=self.vocab_size, vocab_start=self.vocab_start,
                process_group=self.process_group,
            )  # fmt: skip
        logits = F.linear(copy_to_vocab_parallel(hidden, self.process_group), self.weight, self.bias)
        return self.loss_fn(logits, target)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, "
            f"vocab_size_padded={self.vocab_size_padded}, rank={self.rank}/{self.world_size}, "
            f"rows=[{self.vocab_start}, {self.vocab_start + self.shard_size}), bias={self.bias is not None}"
            + (", fused=True" if self.fused else "")
            + (f", impl={self.impl!r}" if self.impl != "chunked" else "")
        )

"""The partials monoid: per-row summaries of a vocabulary shard, and the one merge that combines them.

A shard's partials, per row (fp32, or fp64 for fp64 logits):

======================  =====================================================================
``max``                 m = max_j x_j over real columns (-inf for an empty shard)
``sumexp``              s = sum_j exp(x_j - m)
``target_logit``        x_target if the target lies in this shard, else 0
``target_hits``         1 if the target lies in this shard, else 0
``sumexp_x``            t = sum_j exp(x_j - m) * x_j   (entropy = lse - t / s)
``sum_x``               sum_j x_j                     (label smoothing)
``count``               number of real (non-padding) columns
``topk_vals/ids``       [N, k] the shard's k best (value, global id), value descending, lower id
                        first among equal values; missing entries are (-inf, ID_SENTINEL)
======================  =====================================================================

``merge`` is associative and commutative; ``identity`` (an empty shard) is its neutral element.
It never forms ``-inf - -inf`` and lets NaN through. Every path (one process, column splits
inside a kernel launch, ranks of a process group, Ray actors) merges with this code.

``Pieces`` is the packed form finalize reads: the scalar fields of S pieces in one [F, S, N]
tensor (what the partials kernel writes, S its column splits) plus the [S, N, k] top-k (ids
int64, or int32 with the missing mark 2**31 - 1 in the ranks' pieces of ``collective``). F is 7,
or fewer where a kernel stored only the leading fields its call reads (the fused LM head,
``kernels.stat_planes``: 4 for the loss without label smoothing); the fields it did not store
read as NaN here, as the sums a kernel skips do. The
functions at the end (``stats_rows``, ``cross_entropy_rows``) turn merged partials into the
public per-row results; they are the reference and CPU path of the finalize kernels
(``shardsoftmax.kernels.finalize``), which merge the S column splits with this module's math.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .kernels.common import ID_SENTINEL as _ID_SENTINEL
from .kernels.common import topk_select, unpack_key16, widen_ids
from .kernels.partials import FIELDS

ID_SENTINEL = _ID_SENTINEL.value  # int64 max: the kernels' mark of a missing top-k entry


class Partials(NamedTuple):
    max: torch.Tensor
    sumexp: torch.Tensor
    target_logit: torch.Tensor
    target_hits: torch.Tensor
    sumexp_x: torch.Tensor
    sum_x: torch.Tensor
    count: torch.Tensor
    topk_vals: torch.Tensor
    topk_ids: torch.Tensor


SCALAR_FIELDS = Partials._fields[:7]
assert SCALAR_FIELDS == FIELDS  # the kernels' stats planes, in this order


def scalar_fields(stats: torch.Tensor) -> list[torch.Tensor]:
    """The 7 scalar fields of packed ``stats`` [F, ...] (F <= 7 leading fields stored); the fields
    past F as NaN."""
    fields = list(stats.unbind(0))
    if len(fields) < len(SCALAR_FIELDS):
        fields += [torch.full_like(fields[0], float("nan"))] * (len(SCALAR_FIELDS) - len(fields))
    return fields


class Pieces(NamedTuple):
    """Partials of S pieces of each row, packed: ``stats`` [F, S, N] (the first F <= 7 fields in
    ``Partials`` order), ``topk_vals`` [S, N, k], ``topk_ids`` [S, N, k]. With ``key_base`` (int64
    [S], S > 1) the top-k entries come as int32 ``make_key16`` words in ``topk_ids`` (values
    exactly bfloat16, columns from ``key_base[s]``: how a group of several ranks exchanges them
    where that is exact, ``collective.packs_topk``) and ``topk_vals`` is None."""

    stats: torch.Tensor
    topk_vals: torch.Tensor | None
    topk_ids: torch.Tensor
    key_base: torch.Tensor | None = None

    @property
    def n_splits(self) -> int:
        return self.stats.shape[1]

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    def unpacked(self) -> Partials:
        """Fields stacked over the pieces ([S, N] and [S, N, k]), for ``merge_stacked``; ids as
        int64 (the ranks' pieces carry int32 ids or packed entries, ``collective``); fields not
        stored as NaN."""
        if self.key_base is not None:
            vals, ids = unpack_key16(self.topk_ids, self.key_base)
        else:
            vals, ids = self.topk_vals, widen_ids(self.topk_ids)
        return Partials(*scalar_fields(self.stats), vals, ids)

    def merged(self) -> Partials:
        return merge_stacked(self.unpacked())


def pack(p: Partials) -> Pieces:
    """One piece ([N] / [N, k] fields, e.g. merged partials) in the packed form, S = 1."""
    return Pieces(torch.stack(list(p[:7]))[:, None], p.topk_vals[None], p.topk_ids[None])


def identity(n_rows: int, k: int, *, dtype=torch.float32, device=None) -> Partials:
    """Partials of an empty shard: the neutral element of ``merge``."""
    z = torch.zeros(n_rows, dtype=dtype, device=device)
    return Partials(
        max=torch.full((n_rows,), float("-inf"), dtype=dtype, device=device),
        sumexp=z,
        sumexp_x=z,
        sum_x=z,
        count=z,
        target_logit=z,
        target_hits=z,
        topk_vals=torch.full((n_rows, k), float("-inf"), dtype=dtype, device=device),
        topk_ids=torch.full((n_rows, k), ID_SENTINEL, dtype=torch.int64, device=device),
    )


def stack(parts: list[Partials]) -> Partials:
    """Stack partials of several pieces along a new leading dimension (for ``merge_stacked``)."""
    return Partials(*(torch.stack(list(f)) for f in zip(*parts)))


def rescale(value: torch.Tensor, m: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """value * exp(m - new_max), with 0 where the piece's max is -inf (so no -inf - -inf); a NaN
    value stays NaN there (a NaN logit hidden behind a max of -inf)."""
    return torch.where(m == float("-inf"), value * 0.0, value * torch.exp(m - new_max))


def merge_stacked(p: Partials) -> Partials:
    """Merge pieces stacked along dim 0 (shape [P, N] and [P, N, k]) into one [N] / [N, k]."""
    if p.max.shape[0] == 1:  # a merge over one piece is that piece
        return Partials(*(f[0] for f in p))
    new_max = p.max.amax(dim=0)
    new_max = torch.where(p.max.isnan().any(dim=0), torch.full_like(new_max, float("nan")), new_max)
    sumexp = rescale(p.sumexp, p.max, new_max).sum(dim=0)
    sumexp_x = rescale(p.sumexp_x, p.max, new_max).sum(dim=0)
    k = p.topk_vals.shape[-1]
    if p.topk_vals.shape[0] == 1:
        topk_vals, topk_ids = p.topk_vals[0], p.topk_ids[0]
    else:
        pieces, n = p.topk_vals.shape[:2]  # an explicit width: reshape(0, -1) is ambiguous (no rows)
        vals = p.topk_vals.permute(1, 0, 2).reshape(n, pieces * k)
        ids = p.topk_ids.permute(1, 0, 2).reshape(n, pieces * k)
        topk_vals, topk_ids = topk_select(vals, ids, k)
    return Partials(
        max=new_max,
        sumexp=sumexp,
        sumexp_x=sumexp_x,
        sum_x=p.sum_x.sum(dim=0),
        count=p.count.sum(dim=0),
        target_logit=p.target_logit.sum(dim=0),
        target_hits=p.target_hits.sum(dim=0),
        topk_vals=topk_vals,
        topk_ids=topk_ids,
    )


def merge(a: Partials, b: Partials) -> Partials:
    """The monoid operation on two pieces."""
    return merge_stacked(stack([a, b]))


def log_normalizer(p: Partials) -> torch.Tensor:
    """lse = m + log s. An empty or all -inf row has m = -inf and s = 0, so lse = -inf with no
    special case; NaN stays NaN."""
    return p.max + torch.log(p.sumexp)


def target_logit(p: Partials) -> torch.Tensor:
    """The target's logit, NaN where no shard held the target (an out-of-range id)."""
    return torch.where(p.target_hits > 0, p.target_logit, float("nan"))


class Finalized(NamedTuple):
    """Global per-row results derived from fully merged partials."""

    lse: torch.Tensor
    max: torch.Tensor
    entropy: torch.Tensor
    target_logit: torch.Tensor  # NaN where the target was found in no shard
    topk_vals: torch.Tensor
    topk_ids: torch.Tensor


def finalize(p: Partials) -> Finalized:
    """lse = m + log s; entropy = lse - t / s. Rows whose every logit is -inf get lse = -inf and
    entropy NaN (as torch.logsumexp / torch.softmax do); rows with a NaN give NaN."""
    lse = log_normalizer(p)
    entropy = lse - p.sumexp_x / p.sumexp
    row_max = torch.where(p.sumexp.isnan(), p.sumexp, p.max)
    return Finalized(lse, row_max, entropy, target_logit(p), p.topk_vals, p.topk_ids)


class StatsRows(NamedTuple):
    """Per-row results of ``softmax_stats`` (flat: [N] and [N, k])."""

    lse: torch.Tensor
    max: torch.Tensor
    entropy: torch.Tensor
    target_logprob: torch.Tensor | None
    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor


def stats_rows(p: Partials, target: torch.Tensor | None, ignore_index: int) -> StatsRows:
    """``finalize`` plus log p(target) (0 where ignored, NaN where no shard held the target) and
    the top-k as log-probabilities."""
    fin = finalize(p)
    target_logprob = None
    if target is not None:
        target_logprob = torch.where(target == ignore_index, 0.0, fin.target_logit - fin.lse)
    return StatsRows(
        fin.lse, fin.max, fin.entropy, target_logprob, fin.topk_vals - fin.lse[:, None], fin.topk_ids
    )


def rows_loss(p: Partials, lse: torch.Tensor, valid: torch.Tensor, label_smoothing: float, z_loss: float):
    """Per-row loss: (1 - eps)(lse - x_t) + eps (lse - sum_x / C) + z lse^2; 0 on ignored rows,
    NaN where the target lies outside the vocabulary."""
    eps = label_smoothing
    loss = lse - target_logit(p)
    if eps > 0:
        loss = (1.0 - eps) * loss + eps * (lse - p.sum_x / p.count)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def cross_entropy_rows(
    p: Partials,
    target: torch.Tensor,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse_bwd)``: the loss reduced as ``reduction`` says ("mean" over non-ignored rows,
    "sum", "none": [N]) and what backward reads: [N + 1], the lse of each row (NaN where a valid
    target was found in no shard, so that row's gradient is NaN), then the reduction's gradient
    scale (1 / non-ignored rows for "mean", else 1)."""
    lse = log_normalizer(p)
    valid = target != ignore_index
    loss = rows_loss(p, lse, valid, label_smoothing, z_loss)
    scale = torch.ones(1, dtype=lse.dtype, device=lse.device)
    if reduction == "mean":
        n_valid = valid.sum()
        loss, scale = loss.sum() / n_valid, scale / n_valid
    elif reduction == "sum":
        loss = loss.sum()
    lse_bwd = torch.where(valid & (p.target_hits == 0), float("nan"), lse)
    return loss, torch.cat([lse_bwd, scale])


def backward_row_scale(lse_bwd: torch.Tensor, grad_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The per-row factor of the cross-entropy gradient: grad_out times the reduction's scale
    (``lse_bwd[-1]``), 0 on ignored rows."""
    return torch.where(valid, grad_out * lse_bwd[-1], 0.0)

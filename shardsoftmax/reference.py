"""Pure-PyTorch versions of every op, written for clarity.

Two roles:

* ``shard_*`` functions compute exactly what the Triton kernels compute for one shard (same
  partials, same outputs). They are the CPU backend and run in fp32, or fp64 for fp64 logits.
* ``oracle_*`` functions compute the final answers straight from the full, unsharded logits with
  ordinary PyTorch ops. Tests run them in float64 as ground truth for every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .partials import ID_SENTINEL, Partials, topk_select


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform(x: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    """softcap * tanh(x / softcap) (if given), then / temperature, in the compute dtype."""
    x = x.to(compute_dtype(x.dtype))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def transform_grad(x: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    x = x.to(compute_dtype(x.dtype))
    if softcap is None:
        return torch.full_like(x, 1.0 / temperature)
    return (1.0 - torch.tanh(x / softcap) ** 2) / temperature


def shard_partials(
    logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    k: int,
    n_valid_cols: int,
    vocab_start: int,
    ignore_index: int,
    softcap: float | None,
    temperature: float,
) -> Partials:
    """Partials of one ``[N, V_shard]`` shard (see ``shardsoftmax.partials``)."""
    n_rows = logits.shape[0]
    x = transform(logits[:, :n_valid_cols], softcap, temperature)
    dt = x.dtype
    m = x.amax(dim=1) if n_valid_cols > 0 else torch.full((n_rows,), float("-inf"), dtype=dt)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(x - m_safe[:, None])
    s = e.sum(dim=1)
    t = torch.where(e > 0, e * x, torch.zeros_like(x)).sum(dim=1)
    count = torch.full((n_rows,), float(n_valid_cols), dtype=dt, device=logits.device)
    tgt_logit = torch.zeros(n_rows, dtype=dt, device=logits.device)
    tgt_hits = torch.zeros(n_rows, dtype=dt, device=logits.device)
    if target is not None:
        local = target.long() - vocab_start
        hit = (target.long() != ignore_index) & (local >= 0) & (local < n_valid_cols)
        if n_valid_cols > 0:
            picked = x.gather(1, torch.where(hit, local, 0)[:, None])[:, 0]
            tgt_logit = torch.where(hit, picked, tgt_logit)
        tgt_hits = hit.to(dt)
    ids = vocab_start + torch.arange(n_valid_cols, device=logits.device).expand(n_rows, n_valid_cols)
    vals, top_ids = topk_select(x, ids, k)
    if vals.shape[1] < k:  # fewer real columns than k: pad with the identity
        pad = k - vals.shape[1]
        vals = torch.cat([vals, torch.full((n_rows, pad), float("-inf"), dtype=dt, device=x.device)], 1)
        top_ids = torch.cat([top_ids, torch.full((n_rows, pad), ID_SENTINEL, device=x.device)], 1)
    return Partials(
        max=m, sumexp=s, target_logit=tgt_logit, target_hits=tgt_hits, sumexp_x=t, sum_x=x.sum(dim=1),
        count=count, topk_vals=vals, topk_ids=top_ids,
    )  # fmt: skip


def shard_softmax(
    logits: torch.Tensor,
    lse: torch.Tensor,
    *,
    log: bool,
    n_valid_cols: int,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    """This shard of the global (log-)softmax given the global per-row lse; padding gets 0 / -inf."""
    y = transform(logits, softcap, temperature) - lse[:, None]
    y = y if log else torch.exp(y)
    y[:, n_valid_cols:] = float("-inf") if log else 0.0
    return y.to(logits.dtype)


def shard_cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    n_valid_cols: int,
    vocab_start: int,
    label_smoothing: float,
    vocab_size: int,
    z_loss: float,
    softcap: float | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of row_scale * loss_row w.r.t. this shard's raw logits (see the kernel's docstring)."""
    x = transform(logits, softcap, temperature)
    p = torch.exp(x - lse[:, None])
    g = p * (1.0 + 2.0 * z_loss * lse[:, None]) - label_smoothing / vocab_size
    cols = torch.arange(logits.shape[1], device=logits.device)
    onehot = cols[None, :] == (target.long() - vocab_start)[:, None]
    g = g - (1.0 - label_smoothing) * onehot.to(g.dtype)
    g = g * row_scale[:, None] * transform_grad(logits, softcap, temperature)
    keep = (cols[None, :] < n_valid_cols) & (row_scale[:, None] != 0)
    g = torch.where(keep, g, torch.zeros_like(g)).to(logits.dtype)
    if out is None:
        return g
    out.copy_(g)
    return out


# ----------------------------------------------------------------------------------------------
# The fused LM head on the PyTorch path: logits = hidden @ weight^T (+ bias) in the compute dtype,
# a chunk of rows at a time (never more than LINEAR_CHUNK_ELEMENTS logits at once).
# ----------------------------------------------------------------------------------------------

LINEAR_CHUNK_ELEMENTS = 1 << 24


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden [n, H] @ weight [V, H]^T (+ bias) in the compute dtype of hidden (fp32, or fp64)."""
    dt = compute_dtype(hidden.dtype)
    x = hidden.to(dt) @ weight.to(dt).T
    return x if bias is None else x + bias.to(dt)


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, LINEAR_CHUNK_ELEMENTS // max(1, n_cols))
    return [(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)] or [(0, 0)]


def shard_linear_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    **kw,
) -> Partials:
    """``shard_partials`` of the logits hidden @ weight^T (+ bias), computed a chunk of rows at a time."""
    pieces = []
    for r0, r1 in _row_chunks(hidden.shape[0], weight.shape[0]):
        logits = linear_logits(hidden[r0:r1], weight, bias)
        pieces.append(shard_partials(logits, None if target is None else target[r0:r1], **kw))
    return Partials(*(torch.cat(f) for f in zip(*pieces)))


def shard_linear_cross_entropy_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = True,
    **kw,
):
    """Gradients of sum_rows row_scale * loss_row w.r.t. hidden (compute dtype, this shard's
    partial sum), weight and bias (their dtypes): the logit gradient of
    ``shard_cross_entropy_backward`` for a chunk of rows at a time, times hidden / weight."""
    dt = compute_dtype(hidden.dtype)
    w = weight.to(dt)
    grad_hidden = torch.zeros(hidden.shape, dtype=dt, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=dt, device=hidden.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=dt, device=hidden.device)
    for r0, r1 in _row_chunks(hidden.shape[0], weight.shape[0]):
        logits = linear_logits(hidden[r0:r1], weight, bias)
        g = shard_cross_entropy_backward(logits, target[r0:r1], lse[r0:r1], row_scale[r0:r1], **kw)
        grad_hidden[r0:r1] = g @ w
        grad_weight += g.T @ hidden[r0:r1].to(dt)
        if grad_bias is not None:
            grad_bias += g.sum(dim=0)
    return (
        grad_hidden if need_hidden_grad else None,
        grad_weight.to(weight.dtype) if need_weight_grad else None,
        grad_bias.to(bias.dtype) if need_bias_grad and bias is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# Oracles: final answers from the full logits, ordinary PyTorch, meant to run in float64.
# ----------------------------------------------------------------------------------------------


def oracle_log_softmax(logits, *, softcap=None, temperature=1.0, vocab_size=None):
    """log_softmax over the real vocabulary; padding columns get -inf."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    x = transform(logits, softcap, temperature)
    out = torch.full_like(x, float("-inf"))
    out[..., :vocab_size] = torch.log_softmax(x[..., :vocab_size], dim=-1)
    return out


def oracle_stats(
    logits, target=None, *, k=0, softcap=None, temperature=1.0, ignore_index=-100, vocab_size=None
):
    """dict of lse, max, entropy, target_logprob, topk_ids, topk_logprobs over the last dim."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    x = transform(logits, softcap, temperature)[..., :vocab_size]
    lse = torch.logsumexp(x, dim=-1)
    logp = torch.log_softmax(x, dim=-1)
    p = torch.softmax(x, dim=-1)
    # p == 0 terms are 0 (not 0 * -inf); NaN p (rows all -inf or with a NaN) keeps entropy NaN.
    entropy = -(torch.where(p == 0, torch.zeros_like(p), p * logp)).sum(-1)
    ids = torch.arange(vocab_size).expand_as(x)
    vals, top_ids = topk_select(x, ids, k)
    out = {
        "lse": lse,
        "max": x.amax(-1) if vocab_size > 0 else lse,
        "entropy": entropy,
        "topk_ids": top_ids,
        "topk_logprobs": vals - lse[..., None],
    }
    if target is not None:
        valid = target != ignore_index
        safe = torch.where(valid, target, 0).clamp(0, vocab_size - 1)
        tl = logp.gather(-1, safe[..., None])[..., 0]
        out["target_logprob"] = torch.where(valid, tl, torch.zeros_like(tl))
    return out


def oracle_cross_entropy(
    logits,
    target,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    vocab_size=None,
):
    """F.cross_entropy on the transformed logits over the real vocabulary, plus z_loss * lse**2."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    x = transform(logits, softcap, temperature)[..., :vocab_size].reshape(-1, vocab_size)
    t = target.reshape(-1)
    loss = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = t != ignore_index
    loss = loss + torch.where(valid, z_loss * torch.logsumexp(x, -1) ** 2, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


# ----------------------------------------------------------------------------------------------
# Counter-based Gumbel noise, bit-identical in spirit to kernels/sample.py (same hash, same math).
# ----------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _M32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: int, counters: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (fp32) for ``counters`` [N] (offset + row) and global ``ids`` [N, m]."""
    seed &= (1 << 64) - 1
    c = counters.long()
    h = lowbias32(torch.full_like(c, (seed & _M32) ^ 0x9E3779B9))
    h = lowbias32(h ^ (seed >> 32))
    h = lowbias32(h ^ (c & _M32))
    h = lowbias32(h ^ ((c >> 32) & _M32))
    h = lowbias32(h[:, None] ^ (ids.long() & _M32))
    u = h.to(torch.float32) * 2.0**-32 + 2.0**-33
    v = (_M32 - h).to(torch.float32) * 2.0**-32 + 2.0**-33
    e = torch.where(v < 0.00390625, v * (1.0 + v * (0.5 + v * (1.0 / 3.0))), -torch.log(u))
    return -torch.log(e)


def shard_gumbel_argmax(
    logits: torch.Tensor,
    *,
    seed: int,
    row_offset: int,
    n_valid_cols: int,
    vocab_start: int,
    softcap: float | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax over this shard of x' + gumbel (lower id on ties; NaN wins): ([N], [N] int64)."""
    n_rows = logits.shape[0]
    if n_valid_cols == 0 or n_rows == 0:
        empty = torch.full((n_rows,), float("-inf"), device=logits.device)
        return empty, torch.full((n_rows,), ID_SENTINEL, device=logits.device)
    x = transform(logits[:, :n_valid_cols], softcap, temperature).float()
    ids = vocab_start + torch.arange(n_valid_cols, device=logits.device).expand(n_rows, n_valid_cols)
    counters = row_offset + torch.arange(n_rows, device=logits.device)
    y = x + gumbel_noise(seed, counters, ids)
    y = torch.where(y.isnan(), torch.full_like(y, float("inf")), y)
    vals, top = topk_select(y, ids, 1)
    real = vals[:, 0] > float("-inf")
    return vals[:, 0], torch.where(real, top[:, 0], torch.full_like(top[:, 0], ID_SENTINEL))


# ----------------------------------------------------------------------------------------------
# Oracles of the fused LM head: the float64 matmul, then the oracles above.
# ----------------------------------------------------------------------------------------------


def oracle_linear_logits(hidden, weight, bias=None):
    """float64 hidden @ weight^T (+ bias); differentiable."""
    x = hidden.double() @ weight.double().T
    return x if bias is None else x + bias.double()


def oracle_linear_stats(hidden, weight, target=None, *, bias=None, **kw):
    """``oracle_stats`` of the float64 logits of ``hidden [..., H]`` and ``weight [V, H]``."""
    return oracle_stats(oracle_linear_logits(hidden, weight, bias), target, **kw)


def oracle_linear_cross_entropy(hidden, weight, target, *, bias=None, **kw):
    """``oracle_cross_entropy`` of the float64 logits; differentiable w.r.t. hidden, weight, bias."""
    return oracle_cross_entropy(oracle_linear_logits(hidden, weight, bias), target, **kw)

"""shardsoftmax.nn: the vocabulary-parallel LM head and cross-entropy module.

* ``shard_sizes`` / ``from_full``: uneven splits, padding rows, argument errors (one process).
* The head with ``process_group=None`` equals ``nn.Linear`` + ``F.cross_entropy`` (loss and every
  gradient), and its statistics equal the float64 oracle.
* Training: a tiny causal LM (embedding, one causal self-attention block with an MLP, H=32,
  vocabulary 97, sequence 16, batch 4) trained for 25 Adam steps, unsplit with F.cross_entropy vs
  the same initial weights with the head split over 2 and 3 gloo ranks (3: vocabulary padded to 99,
  the last shard holds 2 padding rows). Loss curves agree within 1e-5 relative at every step and
  the final weights within 1e-5 (times max(1, |w|)); every rank's loss is bitwise the same; the
  padding rows stay exactly zero. One forward makes exactly one collective, the backward exactly
  one (the all-reduce of the hidden-state gradient).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardsoftmax as ss
from shardsoftmax import reference as R
from shardsoftmax.nn import VocabParallelCrossEntropy, VocabParallelLMHead, shard_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import count_collectives, run_ranks  # noqa: E402

VOCAB, HIDDEN, SEQ, BATCH, STEPS, LR = 97, 32, 16, 4, 25, 1e-2
# fp32; for scale, the unsplit fp32 model itself ends ~1e-6 from a float64 run of the same steps
LOSS_RTOL = 1e-5  # per step, relative
WEIGHT_TOL = 1e-5  # final weights, times max(1, |w|)


# ------------------------------------------------------------------------------------------------
# shard_sizes / from_full
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab, world, expected",
    [
        (50257, 4, [12565, 12564, 12564, 12564]),
        (97, 2, [49, 48]),
        (97, 3, [33, 32, 32]),
        (7, 4, [2, 2, 2, 1]),
        (1003, 1, [1003]),
        (4, 4, [1, 1, 1, 1]),
    ],
)
def test_shard_sizes(vocab, world, expected):
    assert shard_sizes(vocab, world) == expected
    assert VocabParallelLMHead.shard_sizes(vocab, world) == expected


def test_shard_sizes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        shard_sizes(10, 0)
    with pytest.raises(ValueError, match="vocab_size_padded must be >= 4"):
        shard_sizes(3, 4)
    with pytest.raises(TypeError, match="world_size must be an int"):
        shard_sizes(10, 2.0)


@pytest.mark.parametrize("padded, vocab, world", [(97, 97, 2), (97, 97, 3), (99, 97, 3), (50257, 50000, 4)])
def test_from_full_slices_cover_the_weight(padded, vocab, world):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(padded, 8, generator=g)
    bias = torch.randn(padded, generator=g)
    heads = [
        VocabParallelLMHead.from_full(weight, bias, rank=r, world_size=world, vocab_size=vocab)
        for r in range(world)
    ]
    assert [h.weight.shape[0] for h in heads] == shard_sizes(padded, world)
    assert torch.equal(torch.cat([h.weight for h in heads]), weight)
    assert torch.equal(torch.cat([h.bias for h in heads]), bias)
    assert [h.vocab_start for h in heads] == [sum(shard_sizes(padded, world)[:r]) for r in range(world)]
    assert sum(h.n_real_rows for h in heads) == vocab
    assert all(h.vocab_size == vocab and h.vocab_size_padded == padded for h in heads)
    assert heads[0].weight.data_ptr() != weight.data_ptr()  # a copy, not a view
    # a shard that is not the whole vocabulary needs its process group
    if world > 1:
        with pytest.raises(ValueError, match="has no process_group"):
            heads[0](torch.randn(2, 8), torch.zeros(2, dtype=torch.long))


def test_from_full_and_init_reject_bad_arguments():
    w = torch.randn(10, 4)
    with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
        VocabParallelLMHead.from_full(torch.randn(10))
    with pytest.raises(ValueError, match="bias must have shape"):
        VocabParallelLMHead.from_full(w, torch.randn(9))
    with pytest.raises(ValueError, match="vocab_size must be <= 10"):
        VocabParallelLMHead.from_full(w, vocab_size=11)
    with pytest.raises(ValueError, match="rank must be <= 1"):
        VocabParallelLMHead.from_full(w, rank=2, world_size=2)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        VocabParallelLMHead(4, 10, label_smoothing=1.5)
    with pytest.raises(ValueError, match="vocab_size_padded must be >= 10"):
        VocabParallelLMHead(4, 10, vocab_size_padded=9)
    with pytest.raises(ValueError, match="reduction must be one of"):
        VocabParallelCrossEntropy(reduction="avg")


def test_padding_rows_start_at_zero():
    head = VocabParallelLMHead(8, 97, vocab_size_padded=99, bias=True, rank=2, world_size=3)
    assert (head.vocab_start, head.shard_size, head.n_real_rows) == (66, 33, 31)
    assert torch.all(head.weight[31:] == 0) and torch.all(head.bias[31:] == 0)
    assert head.weight[:31].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# One process (process_group=None)
# ------------------------------------------------------------------------------------------------


def test_head_without_group_matches_linear_and_cross_entropy():
    torch.manual_seed(0)
    linear = nn.Linear(HIDDEN, VOCAB)
    head = VocabParallelLMHead.from_full(linear.weight, linear.bias, label_smoothing=0.1)
    h1 = torch.randn(3, 5, HIDDEN, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_()
    t = torch.randint(0, VOCAB, (3, 5))
    t[0, :2] = -100
    want = F.cross_entropy(linear(h1).reshape(-1, VOCAB), t.reshape(-1), label_smoothing=0.1)
    got = head(h2, t)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, linear.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.bias.grad, linear.bias.grad, rtol=1e-5, atol=1e-7)


def test_head_stats_and_loss_module():
    torch.manual_seed(1)
    head = VocabParallelLMHead(HIDDEN, VOCAB, vocab_size_padded=100, bias=True, softcap=8.0, temperature=0.8)
    h = torch.randn(6, HIDDEN)
    t = torch.randint(0, VOCAB, (6,))
    st = head(h, t, k=7, return_stats=True)
    logits = F.linear(h, head.weight, head.bias).double()
    o = R.oracle_stats(logits, t, k=7, softcap=8.0, temperature=0.8, vocab_size=VOCAB)
    torch.testing.assert_close(st.lse.double(), o["lse"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.target_logprob.double(), o["target_logprob"], rtol=1e-5, atol=1e-6)
    assert torch.equal(st.topk_ids, o["topk_ids"])
    assert head(h, k=3).target_logprob is None
    with pytest.raises(ValueError, match="k=3 applies to statistics only"):
        head(h, t, k=3)
    # the loss module passes its options through
    loss_fn = VocabParallelCrossEntropy(
        reduction="none", z_loss=1e-3, vocab_size=VOCAB, softcap=8.0, temperature=0.8
    )
    logits32 = F.linear(h, head.weight, head.bias)
    want = ss.cross_entropy(
        logits32, t, reduction="none", z_loss=1e-3, vocab_size=VOCAB, softcap=8.0, temperature=0.8
    )
    assert torch.equal(loss_fn(logits32, t), want)
    assert "z_loss=0.001" in repr(loss_fn) and "rows=[0, 100)" in repr(head)


# ------------------------------------------------------------------------------------------------
# Training: unsplit vs vocabulary-parallel head
# ------------------------------------------------------------------------------------------------


class Body(nn.Module):
    """Embedding + one pre-norm causal self-attention block + MLP: tokens [B, T] -> hidden [B, T, H]."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, seq: int = SEQ):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.randn(seq, hidden) * 0.02)
        self.norm1 = nn.LayerNorm(hidden)
        # no bias: a key bias has zero gradient, and Adam would turn its rounding noise into steps
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm_out = nn.LayerNorm(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = x + self.mlp(self.norm2(x))
        return self.norm_out(x)


def build(seed: int = 0) -> tuple[Body, nn.Linear]:
    torch.manual_seed(seed)
    return Body(), nn.Linear(HIDDEN, VOCAB)


def batches(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable sequences (mostly t[i+1] = 5 t[i] + 3 mod V, 20% random tokens) with next-token
    targets; the last position and ~10% of the others are ignored (-100)."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
        for i in range(1, SEQ + 1):
            follow = torch.rand(batch, generator=g) < 0.8
            tokens[:, i] = torch.where(follow, (5 * tokens[:, i - 1] + 3) % VOCAB, tokens[:, i])
        targets = tokens[:, 1:].clone()
        targets[torch.rand(batch, SEQ, generator=g) < 0.1] = -100
        targets[:, -1] = -100
        out.append((tokens[:, :-1], targets))
    return out


def train_reference(steps: int, batch: int) -> dict:
    body, head = build()
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=LR)
    losses = []
    for tokens, targets in batches(steps, batch):
        opt.zero_grad()
        loss = F.cross_entropy(head(body(tokens)).reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "body": body.state_dict(),
        "weight": head.weight.detach(),
        "bias": head.bias.detach(),
    }


def train_rank(ctx, backend: str, padded: int, steps: int, batch: int) -> dict:
    """One rank: the same body and initial head, the head split with from_full; Adam."""
    ss.set_backend(backend)
    body, full = build()
    pad = padded - VOCAB
    weight = torch.cat([full.weight.detach(), torch.zeros(pad, HIDDEN)])
    bias = torch.cat([full.bias.detach(), torch.zeros(pad)])
    head = VocabParallelLMHead.from_full(weight, bias, process_group=ctx.group, vocab_size=VOCAB)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=LR)
    losses = []
    data = batches(steps, batch)
    for tokens, targets in data:
        opt.zero_grad()
        loss = head(body(tokens), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # steady state: one collective in forward, one (the hidden-gradient all-reduce) in backward
    with count_collectives() as calls:
        loss = head(body(data[-1][0]), data[-1][1])
        forward = dict(calls)
        calls.clear()
        loss.backward()
        backward = dict(calls)
    return {
        "losses": losses,
        "body": body.state_dict(),
        "weight": head.weight.detach(),
        "bias": head.bias.detach(),
        "forward_calls": forward,
        "backward_calls": backward,
    }


def assert_weights_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = ((got - want).abs() / want.abs().clamp_min(1.0)).max().item()
    assert err <= WEIGHT_TOL, f"{name}: final weights differ by {err:.3g} (tolerance {WEIGHT_TOL})"


@pytest.mark.parametrize(
    "backend, world_size, padded, steps, batch",
    [
        ("torch", 2, VOCAB, STEPS, BATCH),  # 97 = 49 + 48
        ("torch", 3, 99, STEPS, BATCH),  # 33 + 33 + 33, the last with 2 padding rows
        # the Triton interpreter costs ~0.2 s per step even this small: fewer rows, 20 steps
        ("triton", 2, 98, 20, 2),
    ],
)
def test_training_matches_unsplit_model(backend, world_size, padded, steps, batch):
    ref = train_reference(steps, batch)
    out = run_ranks(train_rank, world_size, backend, padded, steps, batch, timeout=180)
    for rank, r in enumerate(out):
        assert r["losses"] == out[0]["losses"], f"rank {rank}'s losses differ from rank 0's"
        for step, (got, want) in enumerate(zip(r["losses"], ref["losses"])):
            assert abs(got - want) <= LOSS_RTOL * abs(want), f"step {step}: loss {got} vs unsplit {want}"
        for key, want in ref["body"].items():
            assert_weights_close(f"rank {rank} body.{key}", r["body"][key], want)
        assert sum(r["forward_calls"].values()) == 1, f"forward made {r['forward_calls']}"
        assert r["backward_calls"] == {"all_reduce": 1}, f"backward made {r['backward_calls']}"
    weight = torch.cat([r["weight"] for r in out])
    bias = torch.cat([r["bias"] for r in out])
    assert_weights_close("head.weight", weight[:VOCAB], ref["weight"])
    assert_weights_close("head.bias", bias[:VOCAB], ref["bias"])
    assert torch.all(weight[VOCAB:] == 0) and torch.all(bias[VOCAB:] == 0), "padding rows changed"
    assert ref["losses"][-1] < 0.9 * ref["losses"][0], "the model did not train (test too weak)"

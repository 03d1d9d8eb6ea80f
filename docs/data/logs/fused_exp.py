"""Experiment: the fused LM-head forward (k = 0) with Hopper-style tiles.

Variants of ``_linear_partials_kernel`` (current code with forced configs) and a TMA-descriptor
kernel (host TensorDescriptor, optional flattened loop / warp specialization), timed against the
cuBLAS matmul of the same shape and Cut Cross-Entropy's forward, checked against fp32 logits.
python -P .oldk/fused_exp.py [--v 32064 128256] [--quick]
"""

import argparse
import sys
import time
import traceback

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import shardsoftmax.kernels.linear as L
from shardsoftmax.kernels.common import online_update, transform_logits

sys.path.insert(0, "benchmarks")
import common as C  # noqa: E402


@triton.jit
def _epilogue(acc, cols, col_ok, local, m, s, t, sum_x, tgt_logit, bias_ptr, softcap, inv_temperature,
              HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
              NEED_ENTROPY: tl.constexpr, NEED_SUM_X: tl.constexpr):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + tl.where(col_ok, cols, 0)).to(tl.float32)[None, :]
    x = transform_logits(acc, softcap, inv_temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    m, s, t, sum_x = online_update(m, s, t, sum_x, x, col_ok[None, :], tl.max(x, axis=1), NEED_ENTROPY, NEED_SUM_X)
    if HAS_TARGET:
        tgt_logit += tl.sum(tl.where(cols[None, :] == local[:, None], x, 0.0), axis=1)
    return m, s, t, sum_x, tgt_logit


@triton.jit
def _tma_partials_kernel(
    h_desc, w_desc, bias_ptr, target_ptr, stats_ptr,
    n_rows, n_valid_cols, hidden_size, n_splits, vocab_start, ignore_index, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    NEED_ENTROPY: tl.constexpr, NEED_SUM_X: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    FLATTEN: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr, EPI: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    row_block, split = L._grouped_tile(pid, n_row_blocks, n_splits, GROUP)
    n_tiles = tl.cdiv(n_valid_cols, BLOCK_V)
    cols_per_split = tl.cdiv(n_tiles, n_splits) * BLOCK_V
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_valid_cols)
    row0 = row_block * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows_in = tl.where(row_ok, rows, 0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    sum_x = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)
    local = tl.full([BLOCK_N], -1, tl.int64)
    tgt_here = rows < 0
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows_in).to(tl.int64)
        local = tgt - vocab_start
        tgt_here = (tgt != ignore_index) & (local >= col_lo) & (local < col_hi)
        local = tl.where(tgt_here, local, -1)
    k_tiles = tl.cdiv(hidden_size, BLOCK_H)
    for start in tl.range(col_lo, col_hi, BLOCK_V, flatten=FLATTEN, warp_specialize=WS):
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for kk in tl.range(0, k_tiles, num_stages=STAGES):
            a = h_desc.load([row0, kk * BLOCK_H])
            b = w_desc.load([start, kk * BLOCK_H])
            acc = tl.dot(a, b.T, acc)
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < col_hi
        if EPI == 1:  # measurement only: the matmul with a minimal epilogue (one row max)
            m = tl.maximum(m, tl.max(acc, axis=1))
        elif EPI == 2:  # measurement only: max and exp sum, no masks or target
            m, s, t, sum_x = online_update(m, s, t, sum_x, acc, col_ok[None, :], tl.max(acc, axis=1), False, False)
        else:
            m, s, t, sum_x, tgt_logit = _epilogue(
                acc, cols, col_ok, local, m, s, t, sum_x, tgt_logit, bias_ptr, softcap, inv_temperature,
                HAS_BIAS, HAS_TARGET, HAS_SOFTCAP, HAS_TEMPERATURE, NEED_ENTROPY, NEED_SUM_X)  # fmt: skip
    count = tl.zeros([BLOCK_N], tl.float32) + tl.maximum(col_hi - col_lo, 0).to(tl.float32)
    tgt_hits = tl.where(tgt_here, 1.0, 0.0)
    if not NEED_ENTROPY:
        t = t + float("nan")
    if not NEED_SUM_X:
        sum_x = sum_x + float("nan")
    out = stats_ptr + split * n_rows + rows
    plane = n_splits * n_rows
    tl.store(out + 0 * plane, m, mask=row_ok)
    tl.store(out + 1 * plane, s, mask=row_ok)
    tl.store(out + 2 * plane, t, mask=row_ok)
    tl.store(out + 3 * plane, sum_x, mask=row_ok)
    tl.store(out + 4 * plane, count, mask=row_ok)
    tl.store(out + 5 * plane, tgt_logit, mask=row_ok)
    tl.store(out + 6 * plane, tgt_hits, mask=row_ok)


def splits_for(n, v, bn, bv, dev):
    return L._choose_splits(triton.cdiv(n, bn), max(1, triton.cdiv(v, bv)), L._sm_count(dev.index or 0))


def run_tma(hidden, weight, target, cfg, entropy):
    bn, bv, bh, w, st, flat, ws, epi, group = (*cfg, 0, L.GROUP_N)[:9] if len(cfg) < 9 else cfg
    if len(cfg) == 8:
        group = L.GROUP_N
    n, h = hidden.shape
    v = weight.shape[0]
    S = splits_for(n, v, bn, bv, hidden.device)
    stats = torch.empty((L.N_FIELDS, S, n), dtype=torch.float32, device=hidden.device)
    hd = TensorDescriptor.from_tensor(hidden, [bn, bh])
    wd = TensorDescriptor.from_tensor(weight, [bv, bh])
    grid = (triton.cdiv(n, bn) * S,)
    _tma_partials_kernel[grid](
        hd, wd, stats, target, stats, n, v, h, S, 0, -100, 1.0, 1.0,
        HAS_BIAS=False, HAS_TARGET=True, HAS_SOFTCAP=False, HAS_TEMPERATURE=False,
        NEED_ENTROPY=entropy, NEED_SUM_X=entropy, GROUP=group, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        FLATTEN=flat, WS=ws, STAGES=st, EPI=epi, num_warps=w, num_stages=st,
    )  # fmt: skip
    return stats


def run_old(hidden, weight, target, cfg, entropy):
    n, v = hidden.shape[0], weight.shape[0]
    if cfg is None:  # autotuned, default splits
        return L.linear_partials(hidden, weight, None, target, k=0, n_valid_cols=v, vocab_start=0, ignore_index=-100,
                                 softcap=None, temperature=1.0, need_entropy=entropy, need_sum_x=entropy)[0]  # fmt: skip
    bn, bv, bh, w, st = cfg
    S = splits_for(n, v, bn, bv, hidden.device)
    conf = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "num_warps": w, "num_stages": st}
    return L.linear_partials(hidden, weight, None, target, k=0, n_valid_cols=v, vocab_start=0, ignore_index=-100,
                             softcap=None, temperature=1.0, n_splits=S, need_entropy=entropy, need_sum_x=entropy,
                             config=conf)[0]  # fmt: skip


def lse_tgt(stats):
    m, s, tg = stats[0], stats[1], stats[5]
    M = m.amax(0)
    lse = M + torch.log((s * torch.exp(m - M)).sum(0))
    return lse, tg.sum(0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--v", type=int, nargs="+", default=[32064, 128256])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=4096)
    p.add_argument("--budget", type=float, default=420.0)
    a = p.parse_args()
    t_start = time.time()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__, flush=True)
    torch.manual_seed(0)
    old_cfgs = [None, (128, 256, 64, 8, 3)]
    tma_cfgs = [
        (128, 256, 64, 8, 3, False, False), (128, 256, 64, 8, 3, False, False, 1), (128, 256, 64, 8, 3, False, False, 2),
        (128, 256, 128, 8, 2, False, False), (256, 128, 64, 8, 3, False, False), (128, 128, 64, 8, 4, False, False),
        (128, 256, 64, 8, 3, False, False, 0, 8), (128, 256, 64, 8, 3, False, False, 0, 32),
        (128, 256, 64, 8, 2, False, False), (128, 256, 64, 8, 4, False, False),
    ]  # fmt: skip
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as e:
        cce = None
        print("no cce:", e)
    rows = []
    for v in a.v:
        hidden = (torch.randn(a.n, a.h, device=dev) * 0.5).bfloat16()
        weight = (torch.randn(v, a.h, device=dev) * (3.0 / a.h**0.5)).bfloat16()
        target = torch.randint(0, v, (a.n,), device=dev)
        ref = hidden.float() @ weight.float().T
        ref_lse = torch.logsumexp(ref, 1)
        ref_t = ref.gather(1, target[:, None])[:, 0]
        del ref
        mm = C.bench(lambda: hidden @ weight.T, dev)
        print(f"V={v} matmul {mm:.3f} ms ({2 * a.n * a.h * v / mm / 1e9:.0f} TFLOP/s)", flush=True)
        rows.append((v, "cublas matmul", mm, 1.0, "", ""))
        if cce is not None:
            def cce_fwd():
                with torch.no_grad():
                    return cce(hidden, weight, target)
            ms = C.bench(cce_fwd, dev)
            mem = C.extra_peak_memory(lambda: (cce_fwd(),), dev, (hidden, weight))
            print(f"V={v} cce fwd {ms:.3f} ms x{ms / mm:.3f} mem {mem / 2**20:.1f} MiB", flush=True)
            rows.append((v, "cce fwd", ms, ms / mm, "", f"{mem / 2**20:.1f} MiB"))
        variants = [("tma", c, run_tma) for c in tma_cfgs] + [("old", c, run_old) for c in old_cfgs]
        for ent in (False, True):
            for name, cfg, fn in variants:
                if ent and ((cfg is not None and len(cfg) > 7) or (not (name == "old" and cfg is None) and (name, cfg) not in best_by_v.get(v, []))):
                    continue
                if time.time() - t_start > a.budget:
                    print("budget reached", flush=True)
                    break
                label = f"{name} {cfg} {'stats' if ent else 'ce'}"
                try:
                    t0 = time.time()
                    st = fn(hidden, weight, target, cfg, ent)
                    torch.cuda.synchronize()
                    tc = time.time() - t0
                    lse, tg = lse_tgt(st)
                    e1 = ((lse - ref_lse).abs().max() / ref_lse.abs().max()).item()
                    e2 = ((tg - ref_t).abs().max()).item()
                    ms = C.bench(lambda: fn(hidden, weight, target, cfg, ent), dev)
                    mem = C.extra_peak_memory(lambda: (fn(hidden, weight, target, cfg, ent),), dev, (hidden, weight))
                    print(f"V={v} {label}: {ms:.3f} ms x{ms / mm:.3f} of matmul, lse err {e1:.1e}, tgt err {e2:.1e}, "
                          f"mem {mem / 2**20:.1f} MiB, first call {tc:.1f}s", flush=True)  # fmt: skip
                    rows.append((v, label, ms, ms / mm, f"{e1:.1e}/{e2:.1e}", f"{mem / 2**20:.1f} MiB"))
                except Exception as e:  # noqa: BLE001
                    print(f"V={v} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    traceback.print_exc(limit=2)
            if not ent:
                ce_rows = sorted([r for r in rows if r[0] == v and r[1].endswith(" ce")], key=lambda r: r[2])
                best_by_v[v] = [(r[1].split(" ", 1)[0], eval(r[1].split(" ", 1)[1].rsplit(" ", 1)[0])) for r in ce_rows[:3]]
        del hidden, weight, target
        torch.cuda.empty_cache()
    print("\n| V | variant | ms | x matmul | err lse/tgt | extra mem |")
    for r in rows:
        print("| " + " | ".join(str(x) if not isinstance(x, float) else f"{x:.3f}" for x in r) + " |")


best_by_v: dict = {}
if __name__ == "__main__":
    main()

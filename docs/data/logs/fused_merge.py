"""A/B of the in-kernel merge of the fused forward's splits; the API's time and memory."""
import sys, time
import torch, triton
import shardsoftmax as ss
import shardsoftmax.kernels.linear as L
sys.path.insert(0, "benchmarks")
import common as C

dev = torch.device("cuda")
print(torch.cuda.get_device_name(), triton.__version__, flush=True)
torch.manual_seed(0)
for v in (32064, 128256):
    n, h = 8192, 4096
    hidden = (torch.randn(n, h, device=dev) * 0.5).bfloat16()
    weight = (torch.randn(v, h, device=dev) * (3.0 / h**0.5)).bfloat16()
    target = torch.randint(0, v, (n,), device=dev)
    S0 = L.default_linear_splits(n, v, dev, True)
    mm = C.bench(lambda: hidden @ weight.T, dev)
    print(f"V={v} matmul {mm:.3f} default S {S0}", flush=True)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        def cce_fwd():
            with torch.no_grad():
                return cce(hidden, weight, target)
        ms = C.bench(cce_fwd, dev); mem = C.extra_peak_memory(lambda: (cce_fwd(),), dev, (hidden, weight))
        print(f"V={v} CCE fwd {ms:.3f} ms x{ms / mm:.3f} extra {mem / 2**20:.3f} MiB", flush=True)
    except ImportError as e:
        print("no cce", e)
    kw = dict(k=0, n_valid_cols=v, vocab_start=0, ignore_index=-100, softcap=None, temperature=1.0, need_entropy=False, need_sum_x=False)
    cfg = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=3)
    ref = L.linear_partials(hidden, weight, None, target, config=cfg, slots=0, **kw)[0]
    M = ref[0].amax(0); lse_ref = M + (ref[1] * (ref[0] - M).exp()).sum(0).log()
    for S in (S0, 33):
        for merge in (0, 1, 2, 4, 8):
            st = L.linear_partials(hidden, weight, None, target, n_splits=S, config=cfg, slots=merge, **kw)[0]
            M = st[0].amax(0); lse = M + (st[1] * (st[0] - M).exp()).sum(0).log()
            err = (lse - lse_ref).abs().max().item(); terr = (st[5].sum(0) - ref[5].sum(0)).abs().max().item()
            ms = C.bench(lambda: L.linear_partials(hidden, weight, None, target, n_splits=S, config=cfg, slots=merge, **kw), dev)
            print(f"V={v} S={S} merge={merge}: {ms:.3f} ms x{ms / mm:.3f} lse diff {err:.1e} tgt diff {terr:.1e}", flush=True)
    for merge in (0, 1, 4, 8):
        L.MERGE_SLOTS = merge
        f = lambda: ss.linear_cross_entropy(hidden, weight, target, impl="fused")
        g = lambda: ss.linear_softmax_stats(hidden, weight, target, impl="fused")
        with torch.no_grad():
            t0 = time.time(); f(); torch.cuda.synchronize(); tc = time.time() - t0
            ms = C.bench(f, dev); mem = C.extra_peak_memory(lambda: (f(),), dev, (hidden, weight))
            ms2 = C.bench(g, dev); mem2 = C.extra_peak_memory(lambda: tuple(g()), dev, (hidden, weight))
        print(f"V={v} merge={merge} API CE fwd: {ms:.3f} ms x{ms / mm:.3f} extra {mem / 2**20:.3f} MiB; stats: {ms2:.3f} ms x{ms2 / mm:.3f} extra {mem2 / 2**20:.2f} MiB (first call {tc:.1f}s)", flush=True)
    L.MERGE_SLOTS = 4
    del hidden, weight
    torch.cuda.empty_cache()

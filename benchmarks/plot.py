"""Figures from the benchmark CSVs.

    python benchmarks/plot.py bench_out/*.csv --out docs/figures

One-GPU rows (bench_ops.py), per GPU, dtype and N:
  ops_frac_*.png     fraction of the copy bandwidth measured in the same run, per op and provider, vs V_shard
  ops_speedup_*.png  how many times faster shardsoftmax is than each peer, per op, at each V_shard
  ops_decode_*.png   decode-sized calls: microseconds per call (kernel, eager end-to-end, CUDA graph)
Multi-GPU rows (bench_dist.py), per GPU, TP, dtype and N:
  dist_tp*_ms_*.png  milliseconds per op and provider (max over ranks), per vocabulary size
  dist_scaling_*.png strong scaling: ms against TP at a fixed vocabulary, next to the shard-read
                     floor and the measured all-gather (issue 6)
The run's conditions (GPU, date, dtype, N, versions, commit, copy bandwidth) are written under each
figure. Only rows with status ok are drawn. Where several CSVs hold the same measurement, the last
file given wins.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

OURS = "shardsoftmax"
KEY_COLUMNS = ("gpu", "bench", "tp", "op", "provider", "dtype", "n", "vocab", "v_shard", "k", "pass")


def load(paths: list[str]) -> list[dict]:
    """Rows with a time and status ok (older CSVs without the status, bench, tp or vocab columns
    are read too); of the rows of one case in several CSVs, the newest run's."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if not r.get("ms") or r.get("status", "ok") not in ("ok", ""):
                    continue
                if not r.get("pass") or not r.get("v_shard"):  # another benchmark's CSV
                    continue
                r.setdefault("bench", "ops" if r.get("world_size", "1") == "1" else "dist")
                if not r.get("tp"):
                    r["tp"] = "1" if r["bench"] == "ops" else r.get("world_size", "1")
                if not r.get("vocab"):
                    r["vocab"] = r["v_shard"]
                key = tuple(r.get(c, "") for c in KEY_COLUMNS)
                if key not in rows or r.get("date", "") >= rows[key].get("date", ""):
                    rows[key] = r  # the newest run wins (then the last file)
    return list(rows.values())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:40]


def panel_name(op: str, pass_: str, k: str) -> str:
    name = op if op not in ("softmax_stats", "local_stats", "allgather") else f"{op} k={k}"
    return name if pass_ == "fwd" and op != "cross_entropy" else f"{name} {pass_}"


PANEL_ORDER = ["softmax_stats", "local_stats", "cross_entropy", "softmax", "log_softmax", "allgather"]
PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2, "e2e": 3, "graph": 4}
DECODE_PASSES = ("e2e", "graph")


def panel_key(p: tuple[str, str, str]) -> tuple:
    op, pass_, k = p
    return (PANEL_ORDER.index(op) if op in PANEL_ORDER else 99, int(k or 0), PASS_ORDER.get(pass_, 9))


def conditions(rows: list[dict], extra: str = "") -> str:
    r = rows[0]
    dates = sorted({x["date"][:10] for x in rows})
    bws = sorted({x["copy_gb_s"] for x in rows if x.get("copy_gb_s")})
    bw = f", copy bandwidth {float(bws[0]):.0f} GB/s (read+write)" if len(bws) == 1 else ""
    if len(bws) > 1:
        bw = f", copy bandwidth {float(bws[0]):.0f}-{float(bws[-1]):.0f} GB/s"
    commits = sorted({x["commit"] for x in rows})
    commit = f"commit {commits[0]}" if len(commits) == 1 else f"commits {', '.join(commits)}"
    return (
        f"{r['gpu']}, {', '.join(dates)}; {r['dtype']}, N={r['n']}{extra}; "
        f"torch {r['torch']}, triton {r['triton']}, {commit}{bw}"
    )


def style(provider: str) -> dict:
    if provider == OURS:
        return {"color": "black", "linewidth": 2.5, "marker": "o", "zorder": 5}
    return {"linewidth": 1.2, "marker": ".", "alpha": 0.85}


def ours_style(label: str) -> dict:
    """Our several lines in one panel: black, told apart by line style and marker."""
    looks = {"fwd+bwd": ("--", "s"), "CE fwd": (":", "^"), "k=50": ("-.", "D")}
    ls, marker = next((v for key, v in looks.items() if label.endswith(key)), ("-", "o"))
    return {**style(OURS), "linestyle": ls, "marker": marker}


def finish(fig, note: str, path: str, plt, rect=(0, 0.05, 1, 0.95)) -> str:
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grid_axes(plt, count: int):
    cols = min(4, count)
    nrows = (count + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows + 0.7), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def decode_keys(rows: list[dict]) -> set:
    """(gpu, dtype, n, v_shard, k) of the decode-sized cases (those with end-to-end rows)."""
    return {(r["gpu"], r["dtype"], r["n"], r["v_shard"], r["k"]) for r in rows if r["pass"] in DECODE_PASSES}


def plot_ops(rows: list[dict], out: str, plt) -> list[str]:
    made = []
    groups = defaultdict(list)
    decode = decode_keys(rows)  # drawn by plot_decode, kernel time included
    for r in rows:
        if r["op"] in ("copy", "matmul") or (r["gpu"], r["dtype"], r["n"], r["v_shard"], r["k"]) in decode:
            continue
        groups[(r["gpu"], r["dtype"], int(r["n"]))].append(r)
    for (gpu, dtype, n), rs in sorted(groups.items()):
        panels = sorted({(r["op"], r["pass"], r["k"]) for r in rs}, key=panel_key)
        note = conditions(rs)
        stem = f"{slug(gpu)}_{dtype}_N{n}"

        # fraction of the copy bandwidth vs V
        fig, axes = grid_axes(plt, len(panels))
        for ax, p in zip(axes, panels):
            sel = [r for r in rs if (r["op"], r["pass"], r["k"]) == p and r.get("frac_of_copy_bw")]
            for prov in sorted({r["provider"] for r in sel}, key=lambda s: (s != OURS, s)):
                pts = sorted(
                    (int(r["v_shard"]), float(r["frac_of_copy_bw"])) for r in sel if r["provider"] == prov
                )
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=prov, **style(prov))
            ax.set_title(panel_name(*p), fontsize=10)
            ax.set_xlabel("V_shard")
            ax.set_ylabel("fraction of copy bandwidth")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(
            "Effective bandwidth (op's floor bytes / time) as a fraction of the copy bandwidth", fontsize=11
        )
        made.append(finish(fig, note, os.path.join(out, f"ops_frac_{stem}.png"), plt))

        # speed-up over each peer, grouped by panel, one bar per (peer, V)
        ours = {
            (r["op"], r["pass"], r["k"], r["v_shard"]): float(r["ms"]) for r in rs if r["provider"] == OURS
        }
        bars = defaultdict(dict)  # panel -> {(provider, v): speedup}
        for r in rs:
            key = (r["op"], r["pass"], r["k"], r["v_shard"])
            if r["provider"] != OURS and key in ours:
                bars[key[:3]][(r["provider"], int(r["v_shard"]))] = float(r["ms"]) / ours[key]
        bar_panels = [p for p in panels if p in bars]
        if not bar_panels:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(bar_panels) + 3), 4.8))
        series = sorted({pv for p in bar_panels for pv in bars[p]})
        width = 0.8 / max(1, len(series))
        cmap = plt.get_cmap("tab20")
        for i, (prov, v) in enumerate(series):
            xs = [
                j + (i - (len(series) - 1) / 2) * width
                for j, p in enumerate(bar_panels)
                if (prov, v) in bars[p]
            ]
            ys = [bars[p][(prov, v)] for p in bar_panels if (prov, v) in bars[p]]
            ax.bar(xs, ys, width, label=f"{prov}, V={v}", color=cmap(i % 20))
        ax.axhline(1.0, color="black", linewidth=0.8)
        values = [x for p in bar_panels for x in bars[p].values() if x > 0]
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(bar_panels)))
        ax.set_xticklabels([panel_name(*p) for p in bar_panels], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("speed-up of shardsoftmax (peer ms / ours)")
        ax.set_title("shardsoftmax vs each peer (higher: shardsoftmax faster)", fontsize=11)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(axis="y", alpha=0.3)
        made.append(
            finish(fig, note, os.path.join(out, f"ops_speedup_{stem}.png"), plt, rect=(0, 0.06, 1, 1))
        )
    return made


def plot_decode(rows: list[dict], out: str, plt) -> list[str]:
    """Decode-sized calls: us per call of each provider for the kernel (fwd), eager end-to-end and
    CUDA-graph replay, per (N, k); the 30 us bar as a line."""
    made = []
    groups = defaultdict(list)
    decode = decode_keys(rows)
    for r in rows:
        if (r["gpu"], r["dtype"], r["n"], r["v_shard"], r["k"]) in decode:
            groups[(r["gpu"], r["dtype"], r["v_shard"])].append(r)
    for (gpu, dtype, v), rs in sorted(groups.items()):
        cases = sorted({(int(r["n"]), int(r["k"])) for r in rs})
        provs = sorted({r["provider"] for r in rs}, key=lambda s: (s != OURS, s))
        fig, axes = grid_axes(plt, len(cases))
        cmap = plt.get_cmap("tab10")
        for ax, (n, k) in zip(axes, cases):
            sel = [r for r in rs if (int(r["n"]), int(r["k"])) == (n, k)]
            passes = [p for p in ("fwd", "e2e", "graph") if any(r["pass"] == p for r in sel)]
            width = 0.8 / max(1, len(provs))
            for i, prov in enumerate(provs):
                pts = {r["pass"]: float(r["ms"]) * 1e3 for r in sel if r["provider"] == prov}
                xs = [j + (i - (len(provs) - 1) / 2) * width for j, p in enumerate(passes) if p in pts]
                ax.bar(
                    xs,
                    [pts[p] for p in passes if p in pts],
                    width,
                    label=prov,
                    color="black" if prov == OURS else cmap(i % 10),
                )
            ax.axhline(30.0, color="red", linewidth=0.8, linestyle="--", label="30 us bar")
            ax.set_xticks(range(len(passes)))
            ax.set_xticklabels(["kernel (do_bench)" if p == "fwd" else p for p in passes], fontsize=8)
            ax.set_ylabel("us per call")
            ax.set_title(f"softmax_stats N={n} k={k}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(
            f"Decode-sized calls, V={v}: e2e = wall time per call back to back; graph = CUDA-graph replay",
            fontsize=10,
        )
        note = conditions(rs, extra=f", V={v}").replace(
            f"N={rs[0]['n']}", "N=" + "/".join(sorted({r["n"] for r in rs}))
        )
        made.append(finish(fig, note, os.path.join(out, f"ops_decode_{slug(gpu)}_{dtype}_V{v}.png"), plt))
    return made


def plot_dist(rows: list[dict], out: str, plt) -> list[str]:
    made = []
    groups = defaultdict(list)
    for r in rows:
        if r["op"] not in ("copy", "matmul"):
            groups[(r["gpu"], int(r["tp"]), r["dtype"], int(r["n"]))].append(r)
    for (gpu, tp, dtype, n), rs in sorted(groups.items()):
        panels = sorted({(r["op"], r["pass"], r["k"]) for r in rs}, key=panel_key)
        vs = sorted({int(r["vocab"]) for r in rs})
        fig, axes = grid_axes(plt, len(panels))
        cmap = plt.get_cmap("tab10")
        for ax, p in zip(axes, panels):
            sel = [r for r in rs if (r["op"], r["pass"], r["k"]) == p]
            provs = sorted({r["provider"] for r in sel}, key=lambda s: (s != OURS, s))
            width = 0.8 / max(1, len(provs))
            for i, prov in enumerate(provs):
                pts = {int(r["vocab"]): float(r["ms"]) for r in sel if r["provider"] == prov}
                xs = [j + (i - (len(provs) - 1) / 2) * width for j, v in enumerate(vs) if v in pts]
                ax.bar(
                    xs,
                    [pts[v] for v in vs if v in pts],
                    width,
                    label=prov,
                    color="black" if prov == OURS else cmap(i % 10),
                )
            ax.set_xticks(range(len(vs)))
            ax.set_xticklabels([f"V={v}\n({tp} shards)" for v in vs], fontsize=8)
            ax.set_ylabel("ms (max over ranks)")
            ax.set_title(panel_name(*p), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"TP={tp}: time per call (lower is better)", fontsize=11)
        note = conditions(rs, extra=f", TP={tp}")
        made.append(finish(fig, note, os.path.join(out, f"dist_tp{tp}_ms_{slug(gpu)}_{dtype}_N{n}.png"), plt))
    return made


# Each call's GPU time with the host ahead (bench_dist's "<provider> host-ahead" rows, as in a
# training step); gather-then-compute has no such row (its GPU time dominates anyway). Provider
# None: any, the host-ahead rows where a run has them (the all-gather alone, since v0.9).
SCALING_SERIES = [  # (label, op, provider, pass, k or None for any)
    ("shardsoftmax softmax_stats k=0", "softmax_stats", f"{OURS} host-ahead", "fwd", "0"),
    ("shardsoftmax softmax_stats k=50", "softmax_stats", f"{OURS} host-ahead", "fwd", "50"),
    ("shardsoftmax CE fwd", "cross_entropy", f"{OURS} host-ahead", "fwd", None),
    ("shardsoftmax CE fwd+bwd", "cross_entropy", f"{OURS} host-ahead", "fwd+bwd", None),
    ("Megatron-style CE fwd", "cross_entropy", "megatron host-ahead", "fwd", None),
    ("Megatron-style CE fwd+bwd", "cross_entropy", "megatron host-ahead", "fwd+bwd", None),
    ("Liger vocab-parallel CE fwd", "cross_entropy", "liger host-ahead", "fwd", None),
    ("Liger vocab-parallel CE fwd+bwd", "cross_entropy", "liger host-ahead", "fwd+bwd", None),
    ("gather + logsumexp", "softmax_stats", "gather+torch", "fwd", "0"),
    ("all-gather of the partials (k=0)", "allgather", None, "fwd", "0"),
]


def plot_scaling(rows: list[dict], out: str, plt) -> list[str]:
    """Strong scaling: for each (GPU, dtype, N, global V) measured at 2+ TP sizes, ms against TP."""
    made = []
    groups = defaultdict(list)
    for r in rows:
        if r["op"] not in ("copy", "matmul"):
            groups[(r["gpu"], r["dtype"], int(r["n"]), int(r["vocab"]))].append(r)
    for (gpu, dtype, n, v), rs in sorted(groups.items()):
        tps = sorted({int(r["tp"]) for r in rs})
        if len(tps) < 2:
            continue
        fig, ax = plt.subplots(figsize=(10.5, 5.2))
        for label, op, prov, pass_, k in SCALING_SERIES:
            sel = [
                r
                for r in rs
                if r["op"] == op
                and (prov is None or r["provider"] == prov)
                and r["pass"] == pass_
                and (k is None or r["k"] == k)
            ]
            if prov is None and any(r["provider"].endswith("host-ahead") for r in sel):
                sel = [r for r in sel if r["provider"].endswith("host-ahead")]  # as the other lines
            pts = sorted((int(r["tp"]), float(r["ms"])) for r in sel)
            if pts:
                ax.plot(
                    [t for t, _ in pts],
                    [m for _, m in pts],
                    label=label,
                    **(ours_style(label) if label.startswith("shardsoftmax") else style(label)),
                )
        floor = sorted(
            (int(r["tp"]), float(r["floor_ms"]))
            for r in rs
            if r["op"] == "softmax_stats" and r["provider"] == OURS and r["k"] == "0" and r.get("floor_ms")
        )
        if floor:
            ax.plot(
                [t for t, _ in floor], [m for _, m in floor], "k--", linewidth=1, label="shard-read floor"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(tps)
        ax.set_xticklabels([str(t) for t in tps])
        ax.set_xlabel("TP (GPUs the vocabulary is split over)")
        ax.set_ylabel("ms per call (max over ranks)")
        ax.set_title(f"Strong scaling at V={v}, N={n} (GPU time per call, host ahead)", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        note = conditions(rs, extra=f", V={v}, TP={'/'.join(map(str, tps))}")
        made.append(
            finish(
                fig,
                note,
                os.path.join(out, f"dist_scaling_{slug(gpu)}_{dtype}_N{n}_V{v}.png"),
                plt,
                rect=(0, 0.06, 1, 1),
            )
        )
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="CSV files written by bench_ops.py / bench_dist.py")
    p.add_argument("--out", default=os.path.join("docs", "figures"), help="folder for the PNGs")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    rows = load(args.csv)
    if not rows:
        print("no rows with a time in the given CSVs", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    ops = [r for r in rows if r["bench"] == "ops"]
    dist = [r for r in rows if r["bench"] == "dist"]
    made = plot_ops(ops, args.out, plt) + plot_decode(ops, args.out, plt)
    made += plot_dist(dist, args.out, plt) + plot_scaling(dist, args.out, plt)
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
